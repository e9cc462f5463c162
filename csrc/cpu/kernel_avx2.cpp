// AVX2 path (CPUs without AVX-512 VNNI): the same maths as the AVX-512 path with 8-pixel
// vectors, and two int8 layouts chosen per layer by its weights' largest |q| (PackedWeights):
//  * int16 pairs (any q). vpmaddubsw's int16 pair sums saturate for 8-bit weights
//    (255 * -128 * 2 < -32768), which would break the exact integer sums, so the products use
//    vpmaddwd on mantissas stored as int16: pairs of signed int16 mantissas (one uint32 per q and
//    pair of channels, two planes per 4-channel group), the weights' int16 pairs broadcast as
//    dwords, each vpmaddwd leaving one whole pixel sum per lane.
//  * bytes (|q| <= kByteMaxQ: VQK widths up to 7 bits). The AVX-512 layout, m + 128 as bytes,
//    four channels per uint32: vpmaddubsw multiplies 32 bytes at once, and its int16 pair sums
//    are then at most 255 * 2 * |q|max <= 32640, so they never saturate. Runs of k4_run groups
//    of them add up in int16 with vpaddw before one vpmaddwd by ones widens them to int32 (one
//    multiply per 32 products instead of two per 32) where a segment is one run or the runs are
//    long (kMinByteRun); otherwise every group is widened at once. The integer sums stay exact.
//    (oneDNN's int8 convolutions without VNNI take vpmaddubsw for all 8-bit weights by halving them
//    to 7 bits, inexactly: its RFC "Optional bit exact Convolution".)
// Subnormal, huge or non-finite blocks fall back to the scalar header functions per lane, so
// every value matches the reference bit for bit.
#include "cpu/dsconv2d_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#define DSCONV_AVX2 __attribute__((target("avx2,fma")))

namespace dsconv_ext {
namespace cpu {
namespace {

constexpr int64_t kVec = 8;
// Pixels per int8 tile: two vectors, so that each weight broadcast feeds two vpmaddwd.
constexpr int64_t kIntVecs = 2;
constexpr int64_t kQTile = kIntVecs * kVec;
constexpr int64_t kFloatQTile = kVec;
// Software prefetch distance of output stores and packer loads (both together: converted yolo11n
// ~2% faster on the AVX2 path, same-process A/B on the Zen 5 test machine).
constexpr int64_t kPrefetchFloats = 64;

DSCONV_AVX2 inline __m256i lane_mask(int64_t lo, int64_t hi) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i l = _mm256_set1_epi32(static_cast<int32_t>(std::max<int64_t>(lo, -1)));
  const __m256i h = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(hi, kVec)));
  return _mm256_and_si256(_mm256_cmpgt_epi32(h, idx),
                          _mm256_or_si256(_mm256_cmpgt_epi32(idx, l), _mm256_cmpeq_epi32(idx, l)));
}

// SiLU y / (1 + e^-y), 8 lanes: the AVX-512 silu_ps (avx512_common.h) with 2^n built in the
// exponent bits instead of vscalefps. t = -y log2(e) is clamped to [-127, 128], where those bits
// are (n + 127) << 23: n = -127 gives 0 and n = 128 gives +inf, so e^-y still overflows to inf
// for y below about -88.7 (y / inf = -0, -inf / inf = NaN as float64 SiLU gives).
DSCONV_AVX2 inline __m256 silu_ps(__m256 y) {
  __m256 t = _mm256_mul_ps(y, _mm256_set1_ps(kNegLog2E));
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-127.f)), _mm256_set1_ps(128.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i two_n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

DSCONV_AVX2 inline __m256 epilogue(__m256 acc, float cdsw, float cb, bool silu) {
  const __m256 y = _mm256_fmadd_ps(acc, _mm256_set1_ps(cdsw), _mm256_set1_ps(cb));
  return silu ? silu_ps(y) : y;
}

// Stores 8 q-space values, the first of which is output (oh, ow); see the AVX-512 store_vec.
DSCONV_AVX2 inline void store_vec(const Layout& lay, float* out, int64_t oh, int64_t ow,
                                  int64_t oh1, __m256 y) {
  const int64_t Wo = lay.g.Wo;
  if (ow + kVec <= Wo && oh < oh1) {
    // 8 tiles ahead in this channel's row: see the AVX-512 prefetch_next_outputs (prefetcht0:
    // not every AVX2 CPU has PREFETCHW).
    _mm_prefetch(reinterpret_cast<const char*>(out + oh * Wo + ow + kPrefetchFloats), _MM_HINT_T0);
    _mm256_storeu_ps(out + oh * Wo + ow, y);
    return;
  }
  int64_t lane = 0;
  while (lane < kVec && oh < oh1) {
    const int64_t n = std::min(kVec - lane, lay.Wq - ow);
    const int64_t valid = std::min(n, Wo - ow);
    if (valid > 0) _mm256_maskstore_ps(out + oh * Wo + ow - lane, lane_mask(lane, lane + valid), y);
    lane += n;
    ++oh;
    ow = 0;
  }
}

// --- Packing -------------------------------------------------------------------------------

// 8 lanes x[l * SW] of a row, all inside it: plain loads (stride 2: two and a de-interleave).
template <int SW>
DSCONV_AVX2 inline __m256 load_inside(const float* p) {
  if (SW == 1) return _mm256_loadu_ps(p);
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + kVec);
  // even elements, lane by lane: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs reordered
  const __m256 even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), _MM_SHUFFLE(3, 1, 2, 0)));
}

// The lanes l with 0 <= w0 + l*sw < W, as a lane mask.
DSCONV_AVX2 inline __m256i row_lanes(int64_t w0, int64_t sw, int64_t W) {
  const int64_t lo = w0 >= 0 ? 0 : (-w0 + sw - 1) / sw;
  const int64_t hi = W - w0 <= 0 ? 0 : (W - w0 + sw - 1) / sw;
  return lane_mask(lo, hi);
}

// Loads the 8 lanes x[w0 + l*sw] of channel c (0 outside [0, W)). Lanes wholly inside the row
// take plain loads (stride 2: two loads and a de-interleave): AMD Zen 2 microcodes the masked
// load and the gather (one core, a 64-channel 160x160 stride-2 3x3 layer to 4 outputs, mostly
// packing: 6.8 ms with them, 2.6 ms without).
DSCONV_AVX2 inline __m256 load_lanes(const float* row, int64_t w0, int64_t sw, int64_t W) {
  if (w0 >= 0 && sw == 1 && w0 + kVec <= W) return load_inside<1>(row + w0);
  if (w0 >= 0 && sw == 2 && w0 + 2 * kVec <= W) return load_inside<2>(row + w0);
  const __m256i m = row_lanes(w0, sw, W);
  const float* p = row + w0;  // lanes outside the mask are not accessed
  if (sw == 1) return _mm256_maskload_ps(p, m);
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(static_cast<int32_t>(sw)));
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, idx, _mm256_castsi256_ps(m), 4);
}

// The same where the floats [0, n) from `base` may all be read (the block's channels): lanes past
// the row's ends are then read by plain loads and zeroed by a mask, as the masked load costs
// more (AMD Zen 3).
DSCONV_AVX2 inline __m256 load_lanes(const float* row, int64_t w0, int64_t sw, int64_t W,
                                     const float* base, int64_t n) {
  const int64_t at = (row - base) + w0;
  if (sw > 2 || at < 0 || at + kVec * sw > n) return load_lanes(row, w0, sw, W);
  const __m256 v = sw == 1 ? load_inside<1>(base + at) : load_inside<2>(base + at);
  return _mm256_and_ps(v, _mm256_castsi256_ps(row_lanes(w0, sw, W)));
}

// Per-lane exponents of 8 blocks from max |x| bit patterns, and whether every lane is a finite
// block whose exponent keeps 2^E and 2^-E normal floats (the vector path); other rows take the
// scalar path.
DSCONV_AVX2 inline bool block_exponent(__m256i amax_bits, int mant_bits, __m256i* e) {
  const __m256i normal_min = _mm256_set1_epi32(0x00800000);
  const __m256i inf = _mm256_set1_epi32(0x7F800000);
  const __m256i zero = _mm256_cmpeq_epi32(amax_bits, _mm256_setzero_si256());
  // Lanes that are all-zero are fine (E = 0); others need a normal, finite max.
  const __m256i bad = _mm256_andnot_si256(
      zero,
      _mm256_or_si256(_mm256_cmpgt_epi32(normal_min, amax_bits),
                      _mm256_cmpgt_epi32(amax_bits, _mm256_sub_epi32(inf, _mm256_set1_epi32(1)))));
  __m256i ex =
      _mm256_sub_epi32(_mm256_srli_epi32(amax_bits, 23), _mm256_set1_epi32(127 + mant_bits - 2));
  ex = _mm256_andnot_si256(zero, ex);
  *e = ex;
  // 2^E and 2^-E must be normal floats: -126 <= E <= 126.
  const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(-126), ex),
                                      _mm256_cmpgt_epi32(ex, _mm256_set1_epi32(126)));
  return _mm256_testz_si256(_mm256_or_si256(bad, out), _mm256_set1_epi32(-1));
}

DSCONV_AVX2 inline __m256 pow2(__m256i e) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

DSCONV_AVX2 inline __m256i mantissa(__m256 v, __m256 inv_scale, __m256i lim) {
  const __m256 r =
      _mm256_round_ps(_mm256_mul_ps(v, inv_scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i m = _mm256_cvttps_epi32(r);
  return _mm256_min_epi32(_mm256_max_epi32(m, _mm256_sub_epi32(_mm256_setzero_si256(), lim)), lim);
}

// Two channels' mantissas as the int16 pairs of the packed layout (channel m0 in the low half).
DSCONV_AVX2 inline __m256i pair_word(__m256i m0, __m256i m1) {
  return _mm256_blend_epi16(m0, _mm256_slli_epi32(m1, 16), 0xAA);
}

// Four channels' mantissas (|m| <= 127) as the byte layout's words, m0 + 128 in the low byte: the
// two packs leave each 128-bit lane as [m0 p0..p3, m1 p0..p3, m2 .., m3 ..] bytes, and one
// shuffle per lane makes that pixel-major.
DSCONV_AVX2 inline __m256i quad_word(__m256i m0, __m256i m1, __m256i m2, __m256i m3) {
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(m0, m1), _mm256_packs_epi32(m2, m3));
  const __m256i pixel_major =
      _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9,
                       13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm256_xor_si256(_mm256_shuffle_epi8(b, pixel_major), _mm256_set1_epi8(char(0x80)));
}

// The packed words of one k-plane: int16 pairs (plane k: channels 2k, 2k + 1) or bytes (plane
// k: channels 4k .. 4k + 3), `channel(c)` giving channel c's mantissas (0 past the block).
template <bool kBytes, typename F>
DSCONV_AVX2 inline __m256i plane_word(int64_t k, const F& channel) {
  if (kBytes)
    return quad_word(channel(4 * k), channel(4 * k + 1), channel(4 * k + 2), channel(4 * k + 3));
  return pair_word(channel(2 * k), channel(2 * k + 1));
}

// Stores the lanes of mask st (32-bit lanes of any type), all 8 when full (masked stores are
// microcoded on AMD Zen 2).
DSCONV_AVX2 inline void store_lanes(float* dst, __m256 v, bool full, __m256i st) {
  if (full)
    _mm256_storeu_ps(dst, v);
  else
    _mm256_maskstore_ps(dst, st, v);
}

// Scalar lane of either pack: the header functions, for rows the vector path cannot take.
inline void scalar_pixel(const PackRow& r, const float* px, bool kfloat, bool bytes,
                         float* out_vals, uint32_t* words, float* scale_out, float* usum_out) {
  const int32_t e = pixel_block_exponent(r, px);
  const bool finite = e != kNonFiniteExponent;
  const int32_t lim = mantissa_limit(r.mant_bits);
  const float scale = bfp_scale(e);
  int32_t msum = 0;
  for (int64_t c = 0; c < (kfloat ? r.nch : r.lay->K4 * 4); ++c) {
    const int32_t m = c < r.nch && finite ? bfp_mantissa(px[c * r.x_cstride], e, lim) : 0;
    msum += m;
    if (kfloat) {
      // ldexpf rather than m * 2^E: 2^E underflows to 0 below 2^-149 while m * 2^E does not
      // (a block whose max |x| is below 2^(-149 + mant_bits - 2) lost all its values).
      out_vals[c] = finite ? ldexpf(float(m), e) : NAN;
    } else if (bytes) {
      uint32_t& w = words[c / 4];
      if (c % 4 == 0) w = 0;
      w |= uint32_t(uint8_t(m + 128)) << (8 * (c % 4));
    } else {
      uint32_t& w = words[c / 2];
      if (c % 2 == 0) w = 0;
      w |= uint32_t(uint16_t(int16_t(m))) << (16 * (c % 2));
    }
  }
  *scale_out = scale;
  *usum_out = scale * float(msum);
}

// Chunks of 8 q per row that the row-wise int8 pack below takes at once (longer rows: the rest
// take the per-chunk path).
constexpr int64_t kRowChunks = 64;

// The int8 pack of chunks [0, n) of a phase row, chunk i being 8 whole pixels whose lanes all lie
// inside the input row, from px + i * 8 * SW (channel 0) into act / esc / usum + i * 8. Channel
// by channel along the row: each channel's row streams through once per pass, where the
// per-chunk order jumped between the block's channels, H * W floats apart, for every 8 pixels (a
// stride-2 3x3 64 -> 64 layer at 160x160, a quarter of it packing, 7.75 -> 6.97 ms on AMD Zen 3).
// ok[i] false (chunk i not stored) where a lane's block needs the scalar path.
template <int SW, bool kUsum, bool kBytes>
DSCONV_AVX2 void pack_row_inside(const PackRow& r, const float* px, int64_t n, uint32_t* act,
                                 int64_t kplane, float* esc, float* usum, bool* ok) {
  const int64_t cs = r.x_cstride, nch = r.nch, kplanes = r.lay->kplanes;
  constexpr int64_t kStep = kVec * SW;
  alignas(32) __m256i amax[kRowChunks];
  alignas(32) __m256 inv[kRowChunks];
  alignas(32) __m256i msum[kRowChunks];
  for (int64_t i = 0; i < n; ++i) amax[i] = _mm256_setzero_si256();
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t c = 0; c < nch; ++c) {
    const float* p = px + c * cs;
    for (int64_t i = 0; i < n; ++i)
      amax[i] = _mm256_max_epi32(
          amax[i], _mm256_and_si256(_mm256_castps_si256(load_inside<SW>(p + i * kStep)), abs_mask));
  }
  for (int64_t i = 0; i < n; ++i) {
    __m256i e;
    ok[i] = block_exponent(amax[i], r.mant_bits, &e);
    // (a chunk that is not ok is packed with E = 0 here, then overwritten by the caller)
    if (!ok[i]) e = _mm256_setzero_si256();
    _mm256_storeu_ps(esc + i * kVec, pow2(e));
    inv[i] = pow2(_mm256_sub_epi32(_mm256_setzero_si256(), e));
    msum[i] = _mm256_setzero_si256();
  }
  const __m256i lim = _mm256_set1_epi32(mantissa_limit(r.mant_bits));
  constexpr int64_t kPer = kBytes ? 4 : 2;  // channels per k-plane word
  for (int64_t k = 0; k < kplanes; ++k) {
    __m256i* dst = reinterpret_cast<__m256i*>(act + k * kplane);
    const int64_t c0 = kPer * k, live = std::clamp<int64_t>(nch - c0, 0, kPer);
    for (int64_t i = 0; i < n; ++i) {
      // (live is the same for the whole row: the branch below is predicted)
      auto channel = [&](int64_t c) DSCONV_AVX2 {
        if (c - c0 >= live) return _mm256_setzero_si256();
        const __m256i m = mantissa(load_inside<SW>(px + c * cs + i * kStep), inv[i], lim);
        if (kUsum) msum[i] = _mm256_add_epi32(msum[i], m);
        return m;
      };
      _mm256_storeu_si256(dst + i, plane_word<kBytes>(k, channel));
    }
  }
  if (kUsum) {
    for (int64_t i = 0; i < n; ++i)
      _mm256_storeu_ps(usum + i * kVec,
                       _mm256_mul_ps(_mm256_cvtepi32_ps(msum[i]), _mm256_loadu_ps(esc + i * kVec)));
  }
}

template <bool kFloat, bool kBytes>
DSCONV_AVX2 void pack_row_impl(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t hrow = pack_input_row(r);
  const int64_t kplane = lay.P * lay.Lq;
  const __m256i lim = _mm256_set1_epi32(mantissa_limit(r.mant_bits));
  const bool whole_ok = lay.Lq - lay.Hqb * lay.Wq >= kVec;
  const int64_t xn = r.nch * r.x_cstride;
  for (int64_t rx = 0; rx < g.sw; ++rx) {
    const int64_t base = (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
    // int8: the chunks [fa, fb) of whole pixels inside the input row go row-wise first.
    int64_t fa = 0, fb = 0;
    bool fast_ok[kRowChunks];
    if (!kFloat && hrow >= 0 && g.sw <= 2) {
      const int64_t first_x = std::max<int64_t>(0, g.pw - rx + g.sw - 1) / g.sw;  // w0 >= 0
      fa = (first_x + kVec - 1) / kVec;
      // whole 8-lane chunks (nl == kVec) whose loads (stride 2: 16 floats) stay in the row
      const int64_t span = g.sw == 1 ? kVec : 2 * kVec;
      fb = std::min(lay.Wq / kVec, (g.W - span + g.pw - rx) >= 0
                                       ? (g.W - span + g.pw - rx) / g.sw / kVec + 1
                                       : int64_t(0));
      fb = std::min(fb, fa + kRowChunks);
      if (fb > fa) {
        const float* px = r.x + hrow * g.W + fa * kVec * g.sw + rx - g.pw;
        const int64_t at = base + fa * kVec;
        float* usum = r.usum ? r.usum + at : nullptr;
        // (the mantissa sums only where the layer has a KDS bias: usum)
        auto* pack =
            g.sw == 1
                ? (usum ? &pack_row_inside<1, true, kBytes> : &pack_row_inside<1, false, kBytes>)
                : (usum ? &pack_row_inside<2, true, kBytes> : &pack_row_inside<2, false, kBytes>);
        pack(r, px, fb - fa, r.act + at, kplane, r.esc + at, usum, fast_ok);
      } else {
        fb = fa;
      }
    }
    for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
      const int64_t nl = std::min(kVec, lay.Wq - x0);
      const int64_t w0 = x0 * g.sw + rx - g.pw;
      const float* row = hrow >= 0 ? r.x + hrow * g.W : nullptr;
      if (x0 / kVec >= fa && x0 / kVec < fb && fast_ok[x0 / kVec - fa]) continue;
      alignas(32) float vals[4][kVec];                      // float family: up to 4 channels
      alignas(32) uint32_t words[kMaxBlockSize / 2][kVec];  // int8: per k-plane
      alignas(32) float esc[kVec], us[kVec];
      __m256i amax = _mm256_setzero_si256(), e;
      if (row) {
        for (int64_t c = 0; c < r.nch; ++c) {
          _mm_prefetch(
              reinterpret_cast<const char*>(row + c * r.x_cstride + w0 + kPrefetchFloats * g.sw),
              _MM_HINT_T0);
          const __m256 v = load_lanes(row + c * r.x_cstride, w0, g.sw, g.W, r.x, xn);
          amax = _mm256_max_epi32(
              amax, _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF)));
        }
      }
      if (block_exponent(amax, r.mant_bits, &e)) {
        const __m256 scale = pow2(e);
        const __m256 inv = pow2(_mm256_sub_epi32(_mm256_setzero_si256(), e));
        __m256i msum = _mm256_setzero_si256();
        auto channel = [&](int64_t c) DSCONV_AVX2 {
          return row && c < r.nch
                     ? mantissa(load_lanes(row + c * r.x_cstride, w0, g.sw, g.W, r.x, xn), inv, lim)
                     : _mm256_setzero_si256();
        };
        if (kFloat) {
          for (int64_t c = 0; c < r.nch; ++c)
            _mm256_store_ps(vals[c], _mm256_mul_ps(_mm256_cvtepi32_ps(channel(c)), scale));
        } else {
          // Each word (2 or 4 channels' mantissas) is built in registers and stored once.
          auto summed = [&](int64_t c) DSCONV_AVX2 {
            const __m256i m = channel(c);
            msum = _mm256_add_epi32(msum, m);
            return m;
          };
          for (int64_t k = 0; k < lay.kplanes; ++k)
            _mm256_store_si256(reinterpret_cast<__m256i*>(words[k]), plane_word<kBytes>(k, summed));
        }
        _mm256_store_ps(esc, scale);
        _mm256_store_ps(us, _mm256_mul_ps(_mm256_cvtepi32_ps(msum), scale));
      } else {
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t w = w0 + l * g.sw;
          float v[4];
          uint32_t wd[kMaxBlockSize / 2];
          if (row && in_range(w, g.W)) {
            scalar_pixel(r, row + w, kFloat, kBytes, v, wd, &esc[l], &us[l]);
          } else {
            for (int64_t c = 0; c < 4; ++c) v[c] = 0.f;
            for (int64_t k = 0; k < lay.kplanes; ++k) wd[k] = kBytes ? 0x80808080u : 0u;
            esc[l] = 1.f, us[l] = 0.f;
          }
          if (kFloat) {
            for (int64_t c = 0; c < r.nch; ++c) vals[c][l] = v[c];
          } else {
            for (int64_t k = 0; k < lay.kplanes; ++k) words[k][l] = wd[k];
          }
        }
      }
      // A partial chunk (the row's last) is stored whole where the plane has the slack for it.
      const __m256i st = lane_mask(0, nl);
      const bool full = nl == kVec || whole_ok;
      if (kFloat) {
        for (int64_t c = 0; c < r.nch; ++c)
          store_lanes(r.esc + c * kplane + base + x0, _mm256_load_ps(vals[c]), full, st);
      } else {
        for (int64_t k = 0; k < lay.kplanes; ++k) {
          store_lanes(reinterpret_cast<float*>(r.act + k * kplane + base + x0),
                      _mm256_load_ps(reinterpret_cast<const float*>(words[k])), full, st);
        }
        store_lanes(r.esc + base + x0, _mm256_load_ps(esc), full, st);
        if (r.usum) store_lanes(r.usum + base + x0, _mm256_load_ps(us), full, st);
      }
    }
  }
}

DSCONV_AVX2 void pack_row(const PackRow& r) { pack_row_impl<false, false>(r); }
DSCONV_AVX2 void pack_row_bytes(const PackRow& r) { pack_row_impl<false, true>(r); }
DSCONV_AVX2 void pack_row_float(const PackRow& r) { pack_row_impl<true, false>(r); }

// --- Microkernels --------------------------------------------------------------------------

// acc[r][v] += the int16 pair products of vector v of the 16 pixels at `a` and the dword
// w[2 * r] of output r. In assembly: from intrinsics GCC spilled four of the accumulators to
// the stack (the 3x3 64 -> 64 layer at 80x80 ran 16% slower on AMD Zen 3). Registers: the
// accumulators, two activation vectors, a weight and a product.
static_assert(kOTile == 4 && kIntVecs == 2, "madd_pair is written for 4 x 2 accumulators");
DSCONV_AVX2 inline void madd_pair(const uint32_t* a, const int32_t* w,
                                  __m256i (&acc)[kOTile][kIntVecs]) {
  __asm__(
      "vmovdqu (%[a]), %%ymm0\n\t"
      "vmovdqu 32(%[a]), %%ymm1\n\t"
      "vpbroadcastd (%[w]), %%ymm2\n\t"
      "vpmaddwd %%ymm0, %%ymm2, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c00], %[c00]\n\t"
      "vpmaddwd %%ymm1, %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c01], %[c01]\n\t"
      "vpbroadcastd 8(%[w]), %%ymm2\n\t"
      "vpmaddwd %%ymm0, %%ymm2, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c10], %[c10]\n\t"
      "vpmaddwd %%ymm1, %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c11], %[c11]\n\t"
      "vpbroadcastd 16(%[w]), %%ymm2\n\t"
      "vpmaddwd %%ymm0, %%ymm2, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c20], %[c20]\n\t"
      "vpmaddwd %%ymm1, %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c21], %[c21]\n\t"
      "vpbroadcastd 24(%[w]), %%ymm2\n\t"
      "vpmaddwd %%ymm0, %%ymm2, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c30], %[c30]\n\t"
      "vpmaddwd %%ymm1, %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c31], %[c31]\n\t"
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1])
      : [a] "r"(a), [w] "r"(w), "m"(*reinterpret_cast<const uint32_t (*)[kQTile]>(a)),
        "m"(*reinterpret_cast<const int32_t (*)[2 * kOTile]>(w))
      : "xmm0", "xmm1", "xmm2", "xmm3");
}

// The byte layout's step: acc[r][v] (int16 lanes) += the vpmaddubsw pair sums of vector v of the
// 16 pixels at `a` (m + 128 bytes) and the dword w[r] of output r (4 signed weight bytes), in
// assembly for the same reason as madd_pair.
DSCONV_AVX2 inline void madd_bytes(const uint32_t* a, const int32_t* w,
                                   __m256i (&acc)[kOTile][kIntVecs]) {
  __asm__(
      "vmovdqu (%[a]), %%ymm0\n\t"
      "vmovdqu 32(%[a]), %%ymm1\n\t"
      "vpbroadcastd (%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpaddw %%ymm3, %[c00], %[c00]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpaddw %%ymm2, %[c01], %[c01]\n\t"
      "vpbroadcastd 4(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpaddw %%ymm3, %[c10], %[c10]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpaddw %%ymm2, %[c11], %[c11]\n\t"
      "vpbroadcastd 8(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpaddw %%ymm3, %[c20], %[c20]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpaddw %%ymm2, %[c21], %[c21]\n\t"
      "vpbroadcastd 12(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpaddw %%ymm3, %[c30], %[c30]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpaddw %%ymm2, %[c31], %[c31]\n\t"
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1])
      : [a] "r"(a), [w] "r"(w), "m"(*reinterpret_cast<const uint32_t (*)[kQTile]>(a)),
        "m"(*reinterpret_cast<const int32_t (*)[kOTile]>(w))
      : "xmm0", "xmm1", "xmm2", "xmm3");
}

// Segments longer than one run whose runs are shorter than this many groups (5- to 7-bit
// weights) widen every group's pair sums at once. Against the int16 pairs on AMD Zen 3: 5 bits
// 1.04-1.30x widened, 1.00-1.15x in runs of 4; 6 bits 1.14-1.30x widened, 0.84-0.95x in runs of
// 2; 4 bits (blocks of 64) 1.19-1.36x in runs of 8, 1.15-1.30x widened.
constexpr int64_t kMinByteRun = 8;

// The byte layout's step for runs shorter than kMinByteRun: acc[r][v] (int32 lanes) += the pair
// sums of madd_bytes widened at once by a vpmaddwd with `ones`. A pair sum of bytes <= 255 and
// |q| <= 64 is at most 32640, so vpmaddubsw never saturates: three instructions per 32 products
// where the int16 pairs take four, and half their weight broadcasts.
DSCONV_AVX2 inline void madd_bytes_wide(const uint32_t* a, const int32_t* w, __m256i ones,
                                        __m256i (&acc)[kOTile][kIntVecs]) {
  __asm__(
      "vmovdqu (%[a]), %%ymm0\n\t"
      "vmovdqu 32(%[a]), %%ymm1\n\t"
      "vpbroadcastd (%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpmaddwd %[ones], %%ymm3, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c00], %[c00]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpmaddwd %[ones], %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c01], %[c01]\n\t"
      "vpbroadcastd 4(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpmaddwd %[ones], %%ymm3, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c10], %[c10]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpmaddwd %[ones], %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c11], %[c11]\n\t"
      "vpbroadcastd 8(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpmaddwd %[ones], %%ymm3, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c20], %[c20]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpmaddwd %[ones], %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c21], %[c21]\n\t"
      "vpbroadcastd 12(%[w]), %%ymm2\n\t"
      "vpmaddubsw %%ymm2, %%ymm0, %%ymm3\n\t"
      "vpmaddwd %[ones], %%ymm3, %%ymm3\n\t"
      "vpaddd %%ymm3, %[c30], %[c30]\n\t"
      "vpmaddubsw %%ymm2, %%ymm1, %%ymm2\n\t"
      "vpmaddwd %[ones], %%ymm2, %%ymm2\n\t"
      "vpaddd %%ymm2, %[c31], %[c31]\n\t"
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1])
      : [a] "r"(a), [w] "r"(w), [ones] "x"(ones),
        "m"(*reinterpret_cast<const uint32_t (*)[kQTile]>(a)),
        "m"(*reinterpret_cast<const int32_t (*)[kOTile]>(w))
      : "xmm0", "xmm1", "xmm2", "xmm3");
}

// A run of k4 groups [k0, k1) of the byte layout into int16 sums, widened: acc[r][v] = the run's
// int32 sums (the two int16 halves of a pixel's lane are its 4 channels' pair sums; no run can
// leave int16: PackedWeights::k4_run).
DSCONV_AVX2 inline void run_bytes(const uint32_t* a, int64_t plane, const int32_t* w, int64_t k0,
                                  int64_t k1, __m256i (&acc)[kOTile][kIntVecs]) {
  for (int r = 0; r < kOTile; ++r)
    for (int v = 0; v < kIntVecs; ++v) acc[r][v] = _mm256_setzero_si256();
  for (int64_t k4 = k0; k4 < k1; ++k4) madd_bytes(a + k4 * plane, w + k4 * kOTile, acc);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < kOTile; ++r)
    for (int v = 0; v < kIntVecs; ++v) acc[r][v] = _mm256_madd_epi16(acc[r][v], ones);
}

// A segment longer than one run: the runs' int32 sums added up (out of line, so that the usual
// one-run segment keeps its sums in registers).
__attribute__((noinline)) DSCONV_AVX2 void runs_bytes(const uint32_t* a, int64_t plane,
                                                      const int32_t* w, int64_t K4b, int64_t k4_run,
                                                      __m256i (&sum)[kOTile][kIntVecs]) {
  for (int r = 0; r < kOTile; ++r)
    for (int v = 0; v < kIntVecs; ++v) sum[r][v] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < K4b; k0 += k4_run) {
    __m256i acc[kOTile][kIntVecs];
    run_bytes(a, plane, w, k0, std::min(K4b, k0 + k4_run), acc);
    for (int r = 0; r < kOTile; ++r)
      for (int v = 0; v < kIntVecs; ++v) sum[r][v] = _mm256_add_epi32(sum[r][v], acc[r][v]);
  }
}

// Where the kIntVecs vectors of a q tile go: output row (band-local) and column of each one's
// first q.
struct TilePos {
  int64_t ohl[kIntVecs], ow[kIntVecs];
};

// kQTile pixels (kIntVecs vectors) from q0 x the kOTile channels of weight stream `ws`, from
// output o0. Per channel pair k2 (a whole plane of int16 pairs), each vector of 8 pixels is one
// load, and each output channel's two int16 weights one dword broadcast feeding kIntVecs
// vpmaddwd: 8 int32 accumulators, the activations and one weight fit AVX2's 16 registers, and no
// pair sums need adding up at the flush. The float accumulators live in a stack buffer (L1):
// they are touched once per (block, tap) segment.
template <bool kKdsb, bool kBytes>
DSCONV_AVX2 inline void conv_tile(const Slice& sl, const uint8_t* ws, const Epilogue& ep,
                                  int64_t o0, int64_t q0, const TilePos& pos) {
  const Layout& lay = *sl.lay;
  const int64_t K4 = lay.K4, K2 = lay.kplanes, ntaps = lay.ntaps, plane = lay.P * lay.Lq;
  const int64_t seg_b = int64_t(sizeof(SegHeader)) + K4 * kOTile * (kBytes ? 4 : 8);
  const int64_t* tapoff = lay.tapoff.data();
  alignas(32) float f[kOTile][kQTile];
  // (vector stores: an `= {}` becomes a rep stosq, slow to start on AMD cores)
  for (int r = 0; r < kOTile; ++r)
    for (int v = 0; v < kIntVecs; ++v) _mm256_store_ps(f[r] + v * kVec, _mm256_setzero_ps());
  for (int64_t b = 0; b < lay.g.nblk; ++b) {
    const int64_t K4b = b + 1 < lay.g.nblk ? K4 : lay.K4_last;
    for (int64_t t = 0; t < ntaps; ++t, ws += seg_b) {
      const SegHeader* h = reinterpret_cast<const SegHeader*>(ws);
      // dword (k4 * kOTile + r) * 2 + k2 % 2: channels 2 * k2 and 2 * k2 + 1 of output r
      const int32_t* w = reinterpret_cast<const int32_t*>(ws + sizeof(SegHeader));
      const uint32_t* a = sl.act + b * K2 * plane + tapoff[t] + q0;
      __m256i acc[kOTile][kIntVecs];
      if (kBytes) {
        // The exact sums of the m + 128 bytes, then the segment's -128 * sum(q) correction.
        if (K4b <= sl.k4_run) {
          run_bytes(a, plane, w, 0, K4b, acc);
        } else if (sl.k4_run < kMinByteRun) {
          const __m256i ones = _mm256_set1_epi16(1);
          for (int r = 0; r < kOTile; ++r)
            for (int v = 0; v < kIntVecs; ++v) acc[r][v] = _mm256_setzero_si256();
          for (int64_t k4 = 0; k4 < K4b; ++k4)
            madd_bytes_wide(a + k4 * plane, w + k4 * kOTile, ones, acc);
        } else {
          __m256i sum[kOTile][kIntVecs];  // (acc itself stays unaddressed: in registers)
          runs_bytes(a, plane, w, K4b, sl.k4_run, sum);
          for (int r = 0; r < kOTile; ++r)
            for (int v = 0; v < kIntVecs; ++v) acc[r][v] = sum[r][v];
        }
        for (int r = 0; r < kOTile; ++r)
          for (int v = 0; v < kIntVecs; ++v)
            acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_set1_epi32(h->corr[r]));
      } else {
        for (int r = 0; r < kOTile; ++r)
          for (int v = 0; v < kIntVecs; ++v) acc[r][v] = _mm256_setzero_si256();
        for (int64_t k4 = 0; k4 < K4b; ++k4, w += 2 * kOTile) {
          for (int pair = 0; pair < 2; ++pair, a += plane) madd_pair(a, w + pair, acc);
        }
      }
      const int64_t eo = b * plane + tapoff[t] + q0;
      for (int v = 0; v < kIntVecs; ++v) {
        const __m256 scale = _mm256_loadu_ps(sl.esc + eo + v * kVec);
        __m256 us;
        if (kKdsb) us = _mm256_loadu_ps(sl.usum + eo + v * kVec);
#pragma GCC unroll 4
        for (int r = 0; r < kOTile; ++r) {
          const __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][v]), scale);
          __m256 fr =
              _mm256_fmadd_ps(s, _mm256_set1_ps(h->alpha[r]), _mm256_load_ps(f[r] + v * kVec));
          if (kKdsb) fr = _mm256_fmadd_ps(_mm256_set1_ps(h->kdsb[r]), us, fr);
          _mm256_store_ps(f[r] + v * kVec, fr);
        }
      }
    }
  }
  // The whole tile's epilogue before its stores, so that the SiLU chains overlap (see
  // avx512::epilogue_tile; the constants are padded past the last channel).
  for (int v = 0; v < kIntVecs; ++v) {
    __m256 y[kOTile];
#pragma GCC unroll 4
    for (int r = 0; r < kOTile; ++r)
      y[r] = _mm256_fmadd_ps(_mm256_load_ps(f[r] + v * kVec), _mm256_set1_ps(ep.cdsw[o0 + r]),
                             _mm256_set1_ps(ep.cb[o0 + r]));
    if (ep.silu) {
#pragma GCC unroll 4
      for (int r = 0; r < kOTile; ++r) y[r] = silu_ps(y[r]);
    }
    for (int r = 0; r < kOTile; ++r) {
      if (o0 + r >= sl.nout) break;
      store_vec(lay, sl.out + (o0 + r) * sl.out_cstride, sl.oh0 + pos.ohl[v], pos.ow[v], sl.oh1,
                y[r]);
    }
  }
}

// Every q tile of the band, and per q tile the o-tiles [ot0, ot1) innermost: the tile's
// activations stay in L1 while the weights stream from L2, and a q tile's store positions are
// found once for all its o-tiles.
template <bool kKdsb, bool kBytes>
DSCONV_AVX2 void conv_band_impl(const Slice& sl, const uint8_t* wstreams, int64_t stream_bytes,
                                const Epilogue& ep, int64_t ot0, int64_t ot1) {
  const int64_t Wq = sl.lay->Wq;
  TilePos pos;
  for (int v = 0; v < kIntVecs; ++v) pos.ohl[v] = (v * kVec) / Wq, pos.ow[v] = (v * kVec) % Wq;
  for (int64_t qt = 0; qt < sl.nqt; ++qt) {
    for (int64_t ot = ot0; ot < ot1; ++ot)
      conv_tile<kKdsb, kBytes>(sl, wstreams + ot * stream_bytes, ep, ot * kOTile, qt * kQTile, pos);
    for (int v = 0; v < kIntVecs; ++v) {
      pos.ow[v] += kQTile;
      while (pos.ow[v] >= Wq) pos.ow[v] -= Wq, ++pos.ohl[v];
    }
  }
}

DSCONV_AVX2 void conv_band(const Slice& sl, const uint8_t* wstreams, int64_t stream_bytes,
                           const Epilogue& ep, int64_t ot0, int64_t ot1) {
  if (sl.usum)
    conv_band_impl<true, false>(sl, wstreams, stream_bytes, ep, ot0, ot1);
  else
    conv_band_impl<false, false>(sl, wstreams, stream_bytes, ep, ot0, ot1);
}

DSCONV_AVX2 void conv_band_bytes(const Slice& sl, const uint8_t* wstreams, int64_t stream_bytes,
                                 const Epilogue& ep, int64_t ot0, int64_t ot1) {
  if (sl.usum)
    conv_band_impl<true, true>(sl, wstreams, stream_bytes, ep, ot0, ot1);
  else
    conv_band_impl<false, true>(sl, wstreams, stream_bytes, ep, ot0, ot1);
}

// Float family: R output channels x 8 pixels; with R == 1, four accumulators over the taps hide
// the FMA latency.
template <int R>
DSCONV_AVX2 void float_tiles_impl(const Slice& sl, const float* wf, const Epilogue& ep, int64_t o0,
                                  int64_t qt0, int64_t qt1) {
  constexpr int kSets = R == 1 ? 4 : 1;
  const Layout& lay = *sl.lay;
  const int64_t plane = lay.P * lay.Lq, T = lay.ntaps;
  const int64_t* tapoff = lay.tapoff.data();
  for (int64_t qt = qt0; qt < qt1; ++qt) {
    const int64_t q0 = qt * kFloatQTile;
    __m256 acc[kSets][R];
    for (int k = 0; k < kSets; ++k)
      for (int r = 0; r < R; ++r) acc[k][r] = _mm256_setzero_ps();
    const float* w = wf;
    for (int64_t c = 0; c < lay.g.Cg; ++c) {
      const float* xc = sl.esc + c * plane + q0;
      int64_t t = 0;
      for (; t + kSets <= T; t += kSets) {
        for (int k = 0; k < kSets; ++k, w += R) {
          const __m256 x = _mm256_loadu_ps(xc + tapoff[t + k]);
          for (int r = 0; r < R; ++r)
            acc[k][r] = _mm256_fmadd_ps(_mm256_set1_ps(w[r]), x, acc[k][r]);
        }
      }
      for (; t < T; ++t, w += R) {
        const __m256 x = _mm256_loadu_ps(xc + tapoff[t]);
        for (int r = 0; r < R; ++r) acc[0][r] = _mm256_fmadd_ps(_mm256_set1_ps(w[r]), x, acc[0][r]);
      }
    }
    const int64_t ohl = q0 / lay.Wq, ow = q0 - ohl * lay.Wq;
    for (int r = 0; r < R && o0 + r < sl.nout; ++r) {
      __m256 a = acc[0][r];
      for (int k = 1; k < kSets; ++k) a = _mm256_add_ps(a, acc[k][r]);
      const int64_t o = o0 + r;
      store_vec(lay, sl.out + o * sl.out_cstride, sl.oh0 + ohl, ow, sl.oh1,
                epilogue(a, ep.cdsw[o], ep.cb[o], ep.silu));
    }
  }
}

DSCONV_AVX2 void float_tiles(const Slice& sl, const float* wf, int R, const Epilogue& ep,
                             int64_t o0, int64_t qt0, int64_t qt1) {
  if (R == 1)
    float_tiles_impl<1>(sl, wf, ep, o0, qt0, qt1);
  else
    float_tiles_impl<kFloatOTile>(sl, wf, ep, o0, qt0, qt1);
}

// --- Depthwise path (see dsconv2d_cpu.h) ---------------------------------------------------

// BFP value of 8 one-channel blocks on the bit pattern: E = floor(log2|x|) - (m-2) makes x / 2^E
// the float's significand with m - 2 fraction bits, so rounding half to even is an integer add
// and mask at bit k = 25 - m, and a carry into the next binade is the clamp to 2^(m-1) - 1.
// Returns the lanes this cannot take (subnormal, Inf, NaN) as a bit mask.
DSCONV_AVX2 inline int bfp_single(__m256 x, int mant_bits, __m256* out) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i ex = _mm256_srli_epi32(mag, 23);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i special = _mm256_or_si256(
      _mm256_cmpeq_epi32(ex, _mm256_set1_epi32(255)),
      _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, zero), _mm256_cmpeq_epi32(ex, zero)));
  const __m128i k = _mm_cvtsi32_si128(25 - mant_bits);
  const __m256i low = _mm256_set1_epi32((1 << (25 - mant_bits)) - 1);
  const __m256i lsb = _mm256_and_si256(_mm256_srl_epi32(mag, k), _mm256_set1_epi32(1));
  const __m256i half = _mm256_set1_epi32((1 << (24 - mant_bits)) - 1);
  __m256i rnd = _mm256_andnot_si256(low, _mm256_add_epi32(mag, _mm256_add_epi32(half, lsb)));
  const __m256i same = _mm256_cmpeq_epi32(_mm256_srli_epi32(rnd, 23), ex);
  const __m256i top =
      _mm256_or_si256(_mm256_slli_epi32(ex, 23),
                      _mm256_set1_epi32(((1 << (mant_bits - 2)) - 1) << (25 - mant_bits)));
  rnd = _mm256_blendv_epi8(top, rnd, same);
  *out = _mm256_castsi256_ps(
      _mm256_or_si256(rnd, _mm256_and_si256(bits, _mm256_set1_epi32(int32_t(0x80000000u)))));
  return _mm256_movemask_ps(_mm256_castsi256_ps(special));
}

// The header's scalar maths for one lane bfp_single cannot take.
inline float bfp_single_scalar(float x, int mant_bits) {
  if (!std::isfinite(x)) return NAN;
  const int32_t e = bfp_exponent(std::fabs(x), mant_bits);
  return ldexpf(float(bfp_mantissa(x, e, mantissa_limit(mant_bits))), e);  // exact
}

// Quantises the band of one channel into the phase planes of `buf` (see the AVX-512 version).
DSCONV_AVX2 void dw_quantise(const Layout& lay, const float* xc, int mant_bits, int64_t oh0,
                             int64_t yend, float* buf) {
  const ConvGeometry& g = lay.g;
  const bool plain = g.sw == 1 && g.W >= kVec && g.pw <= kVec;
  for (int64_t ry = 0; ry < g.sh; ++ry) {
    for (int64_t yl = 0; yl < lay.Hqb; ++yl) {
      const int64_t yq = oh0 + yl, h = yq * g.sh + ry - g.ph;
      const bool inside = yq < yend && yq < lay.Hq && in_range(h, g.H);
      for (int64_t rx = 0; rx < g.sw; ++rx) {
        float* dst = buf + (ry * g.sw + rx) * lay.Lq + yl * lay.Wq;
        if (!inside) {
          for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec)
            _mm256_storeu_ps(dst + x0, _mm256_setzero_ps());
          continue;
        }
        const float* row = xc + h * g.W;
        if (plain) {  // see the AVX-512 dw_quantise
          _mm256_storeu_ps(dst, _mm256_setzero_ps());
          for (int64_t w = 0;; w += kVec) {
            w = std::min(w, g.W - kVec);
            __m256 q;
            const int special = bfp_single(_mm256_loadu_ps(row + w), mant_bits, &q);
            _mm256_storeu_ps(dst + g.pw + w, q);
            for (int l = 0; special && l < kVec; ++l)
              if (special >> l & 1) dst[g.pw + w + l] = bfp_single_scalar(row[w + l], mant_bits);
            if (w == g.W - kVec) break;
          }
          _mm256_storeu_ps(dst + g.pw + g.W, _mm256_setzero_ps());
          continue;
        }
        for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
          const int64_t w0 = x0 * g.sw + rx - g.pw;
          const __m256 v = g.sw == 1 && w0 >= 0 && w0 + kVec <= g.W
                               ? _mm256_loadu_ps(row + w0)
                               : load_lanes(row, w0, g.sw, g.W);
          __m256 q;
          const int special = bfp_single(v, mant_bits, &q);
          _mm256_storeu_ps(dst + x0, q);
          if (special) {
            for (int l = 0; l < kVec; ++l)
              if (special >> l & 1) dst[x0 + l] = bfp_single_scalar(row[w0 + l * g.sw], mant_bits);
          }
        }
      }
    }
  }
}

// Copies band-local q-space rows (`Wq` apart) to the output rows (`Wo` apart) with whole
// vectors, the last one of a row overlapping the one before.
DSCONV_AVX2 void dw_copy_rows(const float* src, int64_t Wq, float* dst, int64_t Wo, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r, src += Wq, dst += Wo) {
    if (Wo < kVec) {
      _mm256_maskstore_ps(dst, lane_mask(0, Wo), _mm256_loadu_ps(src));
      continue;
    }
    for (int64_t w = 0;; w += kVec) {
      w = std::min(w, Wo - kVec);
      _mm256_storeu_ps(dst + w, _mm256_loadu_ps(src + w));
      if (w == Wo - kVec) break;
    }
  }
}

// One output channel over a band: 4 pixel vectors per tile, taps alternating between two
// accumulator sets (8 FMA chains), weights broadcast from memory (16 ymm registers), into the L1
// output stage copied out by rows (see the AVX-512 dw_tiles).
DSCONV_AVX2 void dw_tiles(const Layout& lay, const float* buf, const float* w, float cdsw, float cb,
                          bool silu, float* stage, float* out, int64_t oh0, int64_t oh1) {
  constexpr int kV = 4;
  const int64_t T = lay.ntaps;
  const int64_t* tapoff = lay.tapoff.data();
  const int64_t qend = (oh1 - oh0) * lay.Wq;
  for (int64_t q0 = 0; q0 < qend; q0 += kV * kVec) {
    __m256 a[2][kV];
    for (int k = 0; k < 2; ++k)
      for (int v = 0; v < kV; ++v) a[k][v] = _mm256_setzero_ps();
    const float* base = buf + q0;
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) {
      for (int k = 0; k < 2; ++k) {
        const float* p = base + tapoff[t + k];
        const __m256 wt = _mm256_broadcast_ss(w + t + k);
        for (int v = 0; v < kV; ++v)
          a[k][v] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(p + v * kVec), a[k][v]);
      }
    }
    if (t < T) {
      const float* p = base + tapoff[t];
      const __m256 wt = _mm256_broadcast_ss(w + t);
      for (int v = 0; v < kV; ++v)
        a[0][v] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(p + v * kVec), a[0][v]);
    }
    for (int v = 0; v < kV; ++v)
      _mm256_store_ps(stage + q0 + v * kVec,
                      epilogue(_mm256_add_ps(a[0][v], a[1][v]), cdsw, cb, silu));
  }
  dw_copy_rows(stage, lay.Wq, out + oh0 * lay.g.Wo, lay.g.Wo, oh1 - oh0);
}

DSCONV_AVX2 void depthwise(const DwArgs& d, float* buf, int64_t t0, int64_t t1) {
  const Layout& lay = *d.lay;
  const ConvGeometry& g = lay.g;
  const int64_t far_rows = (g.kh - 1) * g.dh / g.sh;
  float* stage = buf + dw_stage_offset(lay);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t band = t % lay.nbands, nc = t / lay.nbands;
    const int64_t n = nc / g.C, c = nc % g.C;
    const int64_t oh0 = band * lay.band_rows, oh1 = std::min(g.Ho, oh0 + lay.band_rows);
    dw_quantise(lay, d.x + nc * g.H * g.W, d.mant_bits, oh0, oh1 + far_rows, buf);
    for (int64_t r = 0; r < g.Og; ++r) {
      const int64_t o = c * g.Og + r;
      dw_tiles(lay, buf, d.wf + o * lay.ntaps, d.cdsw[c * d.epi_stride + r],
               d.cb[c * d.epi_stride + r], d.silu, stage, d.y + n * d.y_nstride + o * d.y_cstride,
               oh0, oh1);
    }
  }
}

// --- Box decoder (see dfl_side in dsconv2d_cpu.h) ---

// e^x for x <= 0 (the softmax's x - max), to about 2 ulp: the AVX-512 exp_ps with 2^n built in
// the exponent bits. Below -87.33 (e^x under FLT_MIN, where those bits cannot hold 2^n) it gives
// 0, not the subnormal: beside the max bin's e^0 = 1 such a term is below float rounding.
DSCONV_AVX2 inline __m256 exp_nonpositive_ps(__m256 x) {
  const __m256 x0 = x;
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2E)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
  return _mm256_and_ps(e, _mm256_cmp_ps(x0, _mm256_set1_ps(-87.33f), _CMP_GE_OQ));
}

// Anchors [a0, a1) of one box side, 8 per vector (see the AVX-512 dfl_side): a side with a NaN
// or +inf bin, or with every bin -inf, is NaN as softmax gives.
DSCONV_AVX2 void dfl_side(const float* x, int64_t A, int64_t c1, const float* w, float* y,
                          int64_t a0, int64_t a1) {
  const __m256 inf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t a = a0; a < a1; a += kVec) {
    const bool full = a + kVec <= a1;
    const __m256i lanes = lane_mask(0, a1 - a);
    auto load = [&](int64_t i) DSCONV_AVX2 {
      return full ? _mm256_loadu_ps(x + i * A + a) : _mm256_maskload_ps(x + i * A + a, lanes);
    };
    __m256 mx = ninf, bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < c1; ++i) {
      const __m256 v = load(i);
      bad = _mm256_or_ps(
          bad, _mm256_or_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(v, inf, _CMP_EQ_OQ)));
      mx = _mm256_max_ps(mx, v);
    }
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ));
    __m256 sum = _mm256_setzero_ps(), wsum = _mm256_setzero_ps();
    for (int64_t i = 0; i < c1; ++i) {
      const __m256 e = exp_nonpositive_ps(_mm256_sub_ps(load(i), mx));
      sum = _mm256_add_ps(sum, e);
      wsum = _mm256_fmadd_ps(e, _mm256_set1_ps(w[i]), wsum);
    }
    const __m256 r = _mm256_blendv_ps(_mm256_div_ps(wsum, sum), _mm256_set1_ps(NAN), bad);
    if (full)
      _mm256_storeu_ps(y + a, r);
    else
      _mm256_maskstore_ps(y + a, lanes, r);
  }
}

// --- Float stem convolution (see StemArgs) ---
//
// Per output row, the C * kh input rows it reads are first split into their SW column phases,
// zero-padded (phase p holds input columns j * SW + p), so that every (channel, kernel row,
// kernel column) tap of a tile is one plain load per 8 output pixels: the stride-2 de-interleave
// is paid once per input row, not per tap and channel tile. Tiles of 24 pixels x 4 channels keep
// 12 FMA chains in flight (an 8 x 8 tile has 8: just Zen 3's FMA latency x throughput, and the
// shuffles shared its pipes; yolo11n's stem ran at ~40% of FMA peak with it).

constexpr int64_t kStemPx = 3 * kVec;
constexpr int kStemCh = 4;

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// dst[j] = row[j * SW + p] for the columns inside [0, W), zero elsewhere, j in [-lead, len - lead).
template <int SW>
DSCONV_AVX2 void stem_phase_rows(const float* row, int64_t W, int64_t lead, int64_t len,
                                 float* const* dst) {
  for (int p = 0; p < SW; ++p) {
    const int64_t valid = std::min((W - p + SW - 1) / SW, len - lead);
    std::fill(dst[p] - lead, dst[p], 0.f);
    std::fill(dst[p] + valid, dst[p] + len - lead, 0.f);
    if (SW == 1) std::copy(row, row + valid, dst[0]);
  }
  if (SW == 1) return;
  int64_t j = 0;
  for (; j + kVec <= len - lead && 2 * (j + kVec) <= W; j += kVec) {
    const __m256 a = _mm256_loadu_ps(row + 2 * j), b = _mm256_loadu_ps(row + 2 * j + kVec);
    // (a0 a2 b0 b2 | a4 a6 b4 b6) and the odd ones, then the middle 64-bit pairs swapped
    const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_storeu_ps(dst[0] + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev),
                                                                        _MM_SHUFFLE(3, 1, 2, 0))));
    _mm256_storeu_ps(dst[1] + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od),
                                                                        _MM_SHUFFLE(3, 1, 2, 0))));
  }
  for (int p = 0; p < SW; ++p) {
    const int64_t valid = std::min((W - p + SW - 1) / SW, len - lead);
    for (int64_t k = j; k < valid; ++k) dst[p][k] = row[k * SW + p];
  }
}

// acc[r][v] = bias[r] + sum over taps t of w[t * 8 + r] * the 8 floats at p0 + off[t] + 8 v:
// one 24-pixel x 4-channel stem tile. The tap step is assembly: the 12 accumulators, 3 input
// vectors and a weight take all 16 registers, and from intrinsics GCC stored the accumulators to
// the stack after every tap (2x slower); they are named variables for the same reason.
static_assert(kStemCh == 4 && kStemPx == 3 * kVec, "stem_tile is written for 4 x 3 accumulators");
DSCONV_AVX2 inline void stem_tile(const float* p0, const int64_t* off, int64_t taps, const float* w,
                                  const float* bias, __m256 (&acc)[kStemCh][3]) {
  __m256 a00 = _mm256_set1_ps(bias[0]), a01 = a00, a02 = a00;
  __m256 a10 = _mm256_set1_ps(bias[1]), a11 = a10, a12 = a10;
  __m256 a20 = _mm256_set1_ps(bias[2]), a21 = a20, a22 = a20;
  __m256 a30 = _mm256_set1_ps(bias[3]), a31 = a30, a32 = a30;
  for (int64_t t = 0; t < taps; ++t, w += kVec) {
    const float* p = p0 + off[t];
    __asm__(
        "vmovups (%[p]), %%ymm12\n\t"
        "vmovups 32(%[p]), %%ymm13\n\t"
        "vmovups 64(%[p]), %%ymm14\n\t"
        "vbroadcastss (%[w]), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %[a00]\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %[a01]\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %[a02]\n\t"
        "vbroadcastss 4(%[w]), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %[a10]\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %[a11]\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %[a12]\n\t"
        "vbroadcastss 8(%[w]), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %[a20]\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %[a21]\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %[a22]\n\t"
        "vbroadcastss 12(%[w]), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %[a30]\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %[a31]\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %[a32]\n\t"
        : [a00] "+x"(a00), [a01] "+x"(a01), [a02] "+x"(a02), [a10] "+x"(a10), [a11] "+x"(a11),
          [a12] "+x"(a12), [a20] "+x"(a20), [a21] "+x"(a21), [a22] "+x"(a22), [a30] "+x"(a30),
          [a31] "+x"(a31), [a32] "+x"(a32)
        : [p] "r"(p), [w] "r"(w), "m"(*reinterpret_cast<const float (*)[kStemPx]>(p)),
          "m"(*reinterpret_cast<const float (*)[kStemCh]>(w))
        : "xmm12", "xmm13", "xmm14", "xmm15");
  }
  acc[0][0] = a00, acc[0][1] = a01, acc[0][2] = a02, acc[1][0] = a10, acc[1][1] = a11;
  acc[1][2] = a12, acc[2][0] = a20, acc[2][1] = a21, acc[2][2] = a22, acc[3][0] = a30;
  acc[3][1] = a31, acc[3][2] = a32;
}

// Output rows [oy0, oy1) of image n, channel tiles [ot0, ot1): the band's input rows are split
// into phases once (all the tiles and output rows that read them share the copy).
template <int SW>
DSCONV_AVX2 void stem_rows_impl(const StemArgs& a, int64_t n, int64_t ot0, int64_t ot1, int64_t oy0,
                                int64_t oy1) {
  constexpr int T = kVec;  // weights per tap in the pack: StemArgs::w, stem_otile
  const int64_t oplane = a.Ho * a.Wo, taps = a.C * a.kh * a.kw;
  const float* xn = a.x + n * a.C * a.H * a.W;
  // Tap kx reads input column ox * SW + kx - pw = (ox + off) * SW + phase.
  const int64_t off_min = floor_div(-a.pw, SW), off_max = floor_div(a.kw - 1 - a.pw, SW);
  const int64_t lead = std::max<int64_t>(0, -off_min);
  const int64_t wtiles = (a.Wo + kStemPx - 1) / kStemPx;
  const int64_t len = lead + wtiles * kStemPx + std::max<int64_t>(0, off_max);
  // input rows iy0 + [0, rows) of every channel, each as SW phase rows of len floats
  const int64_t iy0 = oy0 * a.sh - a.ph, rows = (oy1 - 1 - oy0) * a.sh + a.kh;
  std::vector<float> buf(a.C * rows * SW * len);
  for (int64_t c = 0; c < a.C; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      float* dst[SW];
      for (int p = 0; p < SW; ++p) dst[p] = buf.data() + ((c * rows + r) * SW + p) * len + lead;
      const int64_t iy = iy0 + r;
      if (iy >= 0 && iy < a.H) stem_phase_rows<SW>(xn + (c * a.H + iy) * a.W, a.W, lead, len, dst);
      // (rows of the zero padding stay as the vector made them)
    }
  }
  // per tap: where its pixel 0 of output row oy0 lies in buf
  std::vector<int64_t> src(taps);
  for (int64_t c = 0, t = 0; c < a.C; ++c)
    for (int64_t ky = 0; ky < a.kh; ++ky)
      for (int64_t kx = 0; kx < a.kw; ++kx, ++t) {
        const int64_t off = floor_div(kx - a.pw, SW), phase = kx - a.pw - off * SW;
        src[t] = ((c * rows + ky) * SW + phase) * len + lead + off;
      }
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const float* brow = buf.data() + (oy - oy0) * a.sh * SW * len;
    for (int64_t ot = ot0; ot < ot1; ++ot) {
      const float* wt = a.w + ot * taps * T;
      const float* bt = a.bias + ot * T;
      const int64_t nout = std::min<int64_t>(T, a.O - ot * T);
      float* yrow = a.y + (n * a.O + ot * T) * oplane + oy * a.Wo;
      for (int64_t ox0 = 0; ox0 < a.Wo; ox0 += kStemPx) {
        for (int64_t r0 = 0; r0 < nout; r0 += kStemCh) {
          __m256 acc[kStemCh][3];
          stem_tile(brow + ox0, src.data(), taps, wt + r0, bt + r0, acc);
          for (int r = 0; r < kStemCh && r0 + r < nout; ++r) {
            float* y = yrow + (r0 + r) * oplane + ox0;
            for (int v = 0; v < 3; ++v) {
              const int64_t nl = std::min<int64_t>(kVec, a.Wo - ox0 - v * kVec);
              if (nl <= 0) break;
              const __m256 out = a.silu ? silu_ps(acc[r][v]) : acc[r][v];
              if (nl == kVec)
                _mm256_storeu_ps(y + v * kVec, out);
              else
                _mm256_maskstore_ps(y + v * kVec, lane_mask(0, nl), out);
            }
          }
        }
      }
    }
  }
}

DSCONV_AVX2 void stem_rows(const StemArgs& a, int64_t n, int64_t ot0, int64_t ot1, int64_t oy0,
                           int64_t oy1) {
  if (a.sw == 1)
    stem_rows_impl<1>(a, n, ot0, ot1, oy0, oy1);
  else
    stem_rows_impl<2>(a, n, ot0, ot1, oy0, oy1);
}

// The AVX2 kernel table; the byte layout's differs in its packer, microkernel and weight width.
IsaKernels int16_kernels() {
  IsaKernels t{kQTile,
               /*weight_elem_bytes=*/0,  // 1 (byte layout) or 2 (int16 pairs) by the weights' |q|
               &pack_row,
               &pack_row_float,
               /*conv_tiles=*/nullptr,
               &float_tiles,
               &depthwise,
               /*dw_qtile=*/32,
               &dfl_side,
               /*esc_shift=*/false};
  t.stem_rows = &stem_rows;
  t.stem_otile = kVec;
  t.float_qtile = kFloatQTile;
  t.planes_per_k4 = 2;
  t.conv_band = &conv_band;  // every int8 call
  return t;
}

}  // namespace

const IsaKernels& kernels_avx2_bytes() {
  static const IsaKernels k = [] {
    IsaKernels t = int16_kernels();
    t.weight_elem_bytes = 1;
    t.pack_row = &pack_row_bytes;
    t.planes_per_k4 = 1;
    t.conv_band = &conv_band_bytes;
    return t;
  }();
  return k;
}

const IsaKernels& kernels_avx2() {
  static const IsaKernels k = [] {
    IsaKernels t = int16_kernels();
    t.bytes = &kernels_avx2_bytes();
    return t;
  }();
  return k;
}

}  // namespace cpu
}  // namespace dsconv_ext

#else  // not x86-64: select_isa() never picks this path (see kernels_not_built in dsconv2d_cpu.h)

namespace dsconv_ext {
namespace cpu {
const IsaKernels& kernels_avx2_bytes() { return kernels_not_built("avx2", "x86-64"); }
const IsaKernels& kernels_avx2() { return kernels_not_built("avx2", "x86-64"); }
}  // namespace cpu
}  // namespace dsconv_ext

#endif
