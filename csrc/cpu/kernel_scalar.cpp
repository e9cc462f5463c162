// Portable path: plain C++ on the same packed layouts as the SIMD paths, written with the shared
// geometry header's per-element functions. It is the path of CPUs without AVX2, and the one the
// tests compare the SIMD paths' packing conventions against.
#include <algorithm>
#include <cmath>

#include "cpu/dsconv2d_cpu.h"

namespace dsconv_ext {
namespace cpu {
namespace {

// Calls f(xq, w) for every column of phase rx, w = input column or -1 outside the input.
template <typename F>
void for_each_phase_column(const Layout& lay, int64_t rx, F&& f) {
  const ConvGeometry& g = lay.g;
  for (int64_t xq = 0; xq < lay.Wq; ++xq) {
    const int64_t w = xq * g.sw + rx - g.pw;
    f(xq, in_range(w, g.W) ? w : int64_t(-1));
  }
}

void pack_row(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t h = pack_input_row(r);
  const int32_t lim = mantissa_limit(r.mant_bits);
  for (int64_t rx = 0; rx < g.sw; ++rx) {
    const int64_t off = (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
    for_each_phase_column(lay, rx, [&](int64_t xq, int64_t w) {
      pack_pixel_bytes(r, h < 0 ? -1 : w, h, off + xq, lim);
    });
  }
}

void pack_row_float(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t h = pack_input_row(r);
  const int32_t lim = mantissa_limit(r.mant_bits);
  const int64_t cplane = lay.P * lay.Lq;
  for (int64_t rx = 0; rx < g.sw; ++rx) {
    float* dst = r.esc + (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
    for_each_phase_column(lay, rx, [&](int64_t xq, int64_t w) {
      if (h < 0 || w < 0) {
        for (int64_t c = 0; c < r.nch; ++c) dst[c * cplane + xq] = 0.f;
        return;
      }
      const float* px = r.x + h * g.W + w;
      const int32_t e = pixel_block_exponent(r, px);
      const bool finite = e != kNonFiniteExponent;
      // ldexpf rather than m * 2^E: exact also where 2^E itself is below the smallest subnormal.
      for (int64_t c = 0; c < r.nch; ++c) {
        dst[c * cplane + xq] =
            finite ? ldexpf(float(bfp_mantissa(px[c * r.x_cstride], e, lim)), e) : NAN;
      }
    });
  }
}

inline int64_t band_q_end(const Slice& sl) { return (sl.oh1 - sl.oh0) * sl.lay->Wq; }

void conv_tiles(const Slice& sl, const uint8_t* wstream, const Epilogue& ep, int64_t ot,
                int64_t qt0, int64_t qt1) {
  const Layout& lay = *sl.lay;
  const int64_t plane = lay.P * lay.Lq;
  const int64_t wbytes = lay.K4 * kOTile * 4;
  for (int64_t q = qt0 * lay.qtile; q < std::min(band_q_end(sl), qt1 * lay.qtile); ++q) {
    if (q % lay.Wq >= lay.g.Wo) continue;  // a column that is never stored
    float acc[kOTile] = {};
    const uint8_t* s = wstream;
    for (int64_t b = 0; b < lay.g.nblk; ++b) {
      for (int64_t t = 0; t < lay.ntaps; ++t) {
        const int8_t* w;
        const SegHeader hdr = next_segment(s, wbytes, &w);
        const int64_t at = lay.tapoff[t] + q;
        int32_t S[kOTile];
        for (int64_t r = 0; r < kOTile; ++r) S[r] = hdr.corr[r];
        const uint32_t* a = sl.act + b * lay.K4 * plane + at;
        for (int64_t k4 = 0; k4 < lay.K4; ++k4) {
          const uint32_t word = a[k4 * plane];
          for (int64_t r = 0; r < kOTile; ++r) {
            for (int64_t lane = 0; lane < 4; ++lane) {
              S[r] += int32_t((word >> (8 * lane)) & 0xFF) * w[(k4 * kOTile + r) * 4 + lane];
            }
          }
        }
        const float scale = sl.esc[b * plane + at];
        const float u = sl.usum ? sl.usum[b * plane + at] : 0.f;
        for (int64_t r = 0; r < kOTile; ++r) {
          acc[r] += float(S[r]) * hdr.alpha[r] * scale;
          if (sl.usum) acc[r] += hdr.kdsb[r] * u;
        }
      }
    }
    for (int64_t r = 0; r < kOTile && ot * kOTile + r < sl.nout; ++r) {
      store_output(sl, ep, ot * kOTile + r, q, acc[r]);
    }
  }
}

void float_tiles(const Slice& sl, const float* wf, int R, const Epilogue& ep, int64_t o0,
                 int64_t qt0, int64_t qt1) {
  const Layout& lay = *sl.lay;
  const int64_t plane = lay.P * lay.Lq;
  for (int64_t r = 0; r < R && o0 + r < sl.nout; ++r) {
    for (int64_t q = qt0 * lay.qtile; q < std::min(band_q_end(sl), qt1 * lay.qtile); ++q) {
      float acc = 0.f;
      for (int64_t c = 0; c < lay.g.Cg; ++c) {
        for (int64_t t = 0; t < lay.ntaps; ++t) {
          acc += wf[(c * lay.ntaps + t) * R + r] * sl.esc[c * plane + lay.tapoff[t] + q];
        }
      }
      store_output(sl, ep, o0 + r, q, acc);
    }
  }
}

// Float stem convolution (see StemArgs), output pixel by output pixel.
constexpr int64_t kStemTile = 8;

void stem_rows_tile(const StemArgs& a, int64_t n, int64_t ot, int64_t oy0, int64_t oy1) {
  const int64_t plane = a.H * a.W, oplane = a.Ho * a.Wo;
  const float* xn = a.x + n * a.C * plane;
  const float* wt = a.w + ot * a.C * a.kh * a.kw * kStemTile;
  const int64_t nout = std::min(kStemTile, a.O - ot * kStemTile);
  float* yt = a.y + (n * a.O + ot * kStemTile) * oplane;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox = 0; ox < a.Wo; ++ox) {
      float acc[kStemTile];
      for (int64_t o = 0; o < kStemTile; ++o) acc[o] = a.bias[ot * kStemTile + o];
      for (int64_t c = 0; c < a.C; ++c) {
        for (int64_t ky = 0; ky < a.kh; ++ky) {
          const int64_t iy = oy * a.sh + ky - a.ph;
          if (!in_range(iy, a.H)) continue;
          for (int64_t kx = 0; kx < a.kw; ++kx) {
            const int64_t ix = ox * a.sw + kx - a.pw;
            if (!in_range(ix, a.W)) continue;
            const float v = xn[c * plane + iy * a.W + ix];
            const float* w = wt + ((c * a.kh + ky) * a.kw + kx) * kStemTile;
            for (int64_t o = 0; o < kStemTile; ++o) acc[o] += w[o] * v;
          }
        }
      }
      for (int64_t o = 0; o < nout; ++o)
        yt[o * oplane + oy * a.Wo + ox] = a.silu ? silu(acc[o]) : acc[o];
    }
  }
}

void stem_rows(const StemArgs& a, int64_t n, int64_t ot0, int64_t ot1, int64_t oy0, int64_t oy1) {
  for (int64_t ot = ot0; ot < ot1; ++ot) stem_rows_tile(a, n, ot, oy0, oy1);
}

void dfl_side_scalar(const float* x, int64_t A, int64_t c1, const float* w, float* y, int64_t a0,
                     int64_t a1) {
  for (int64_t a = a0; a < a1; ++a) {
    float mx = -INFINITY;
    bool bad = false;
    for (int64_t i = 0; i < c1; ++i) {
      const float v = x[i * A + a];
      bad |= std::isnan(v) || v == INFINITY;
      mx = std::max(mx, v);
    }
    if (bad || mx == -INFINITY) {  // softmax gives NaN there
      y[a] = NAN;
      continue;
    }
    float sum = 0.f, wsum = 0.f;
    for (int64_t i = 0; i < c1; ++i) {
      const float e = std::exp(x[i * A + a] - mx);
      sum += e;
      wsum += e * w[i];
    }
    y[a] = wsum / sum;
  }
}

}  // namespace

const IsaKernels& kernels_scalar() {
  // No depthwise path: depthwise convs take the float family, which the tests compare with it.
  static const IsaKernels k = [] {
    IsaKernels t{/*qtile=*/16,     /*weight_elem_bytes=*/1,
                 &pack_row,        &pack_row_float,
                 &conv_tiles,      &float_tiles,
                 nullptr,          0,
                 &dfl_side_scalar, /*esc_shift=*/false};
    t.stem_rows = &stem_rows;
    t.stem_otile = kStemTile;
    return t;
  }();
  return k;
}

}  // namespace cpu
}  // namespace dsconv_ext
