// Arm path (AArch64 with the dot-product instructions): the portable path's byte layout, float
// family and epilogue, with the int8 layers' packing, sums and fold on NEON vectors. The packed
// activations are the portable path's (per pixel one dword of 4 mantissa bytes m + 128,
// dsconv2d_cpu.h): pack_quad writes them 4 pixels at a time (convs of stride 1 and 2), computing
// what pack_pixel_bytes does. EOR with 0x80 turns them back into signed bytes; SDOT (by element)
// then takes 4 channels of 4 pixels against one output's 4 weights, so one 128-bit weight load
// feeds the tile's 4 outputs, and segment_fold folds each (block, tap) segment in
// kernel_scalar.cpp's order of operations (neon_dot.h). So the model path
// (DSCONV_EXT_CPU_ISA=neon_model) gives the portable path's outputs bit for bit.
//
// Speed on Arm CPUs has not been measured (no Arm machine was available): quantize times every
// layer against its float conv on this path and keeps the slower ones float (speed_check.py).
#include <algorithm>

#include "cpu/dsconv2d_cpu.h"
#include "cpu/neon_dot.h"

#if defined(__linux__) && defined(__aarch64__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__) && defined(__aarch64__)
#include <sys/sysctl.h>
#endif

namespace dsconv_ext {
namespace cpu {
namespace {

static_assert(kNeonOTile == kOTile, "the weight streams hold kOTile outputs per group");

// One phase row: 4 pixels at a time where the conv's stride is 1 or 2 and the floats read lie
// inside the input row (pack_quad), else (padding, row ends, a block pack_quad refuses) pixel by
// pixel.
template <class Ops>
DSCONV_NEON_DOT void pack_row(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t h = pack_input_row(r);
  const int32_t lim = mantissa_limit(r.mant_bits);
  const int64_t kplane = lay.P * lay.Lq;
  for (int64_t rx = 0; rx < g.sw; ++rx) {
    const int64_t off = (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
    for (int64_t xq = 0; xq < lay.Wq;) {
      const int64_t w = xq * g.sw + rx - g.pw, at = off + xq;
      if (h >= 0 && g.sw <= 2 && w >= 0 && w + 4 * g.sw <= g.W && xq + 4 <= lay.Wq) {
        const float* px = r.x + h * g.W + w;
        float* us = r.usum ? r.usum + at : nullptr;
        const bool packed = g.sw == 1
                                ? pack_quad<Ops, 1>(px, r.x_cstride, r.nch, lay.K4, r.mant_bits,
                                                    r.act + at, kplane, r.esc + at, us)
                                : pack_quad<Ops, 2>(px, r.x_cstride, r.nch, lay.K4, r.mant_bits,
                                                    r.act + at, kplane, r.esc + at, us);
        for (int64_t l = 0; l < 4 && !packed; ++l)
          pack_pixel_bytes(r, w + l * g.sw, h, at + l, lim);
        xq += 4;
        continue;
      }
      pack_pixel_bytes(r, h >= 0 && in_range(w, g.W) ? w : -1, h, at, lim);
      ++xq;
    }
  }
}

// o-tile `ot` over q tiles [qt0, qt1) of one slice. A tile reads whole kNeonQTile pixels past the
// band's last q: the band's packed rows (Layout::Hqb) cover them.
template <class Ops>
DSCONV_NEON_DOT void conv_tiles(const Slice& sl, const uint8_t* wstream, const Epilogue& ep,
                                int64_t ot, int64_t qt0, int64_t qt1) {
  const Layout& lay = *sl.lay;
  const int64_t plane = lay.P * lay.Lq;
  const int64_t wbytes = lay.K4 * kOTile * 4;
  const int64_t q_end = std::min((sl.oh1 - sl.oh0) * lay.Wq, qt1 * kNeonQTile);
  for (int64_t q0 = qt0 * kNeonQTile; q0 < q_end; q0 += kNeonQTile) {
    float acc[kOTile][kNeonQTile] = {};
    const uint8_t* s = wstream;
    for (int64_t b = 0; b < lay.g.nblk; ++b) {
      for (int64_t t = 0; t < lay.ntaps; ++t) {
        const int8_t* w;
        const SegHeader hdr = next_segment(s, wbytes, &w);
        const int64_t at = b * plane + lay.tapoff[t] + q0;
        segment_fold<Ops>(sl.act + b * lay.K4 * plane + lay.tapoff[t] + q0, plane, w, lay.K4,
                          hdr.alpha, sl.esc + at, hdr.kdsb, sl.usum ? sl.usum + at : nullptr, acc);
      }
    }
    const int64_t o0 = ot * kOTile, nr = std::min(kOTile, sl.nout - o0);
    for (int64_t p = 0; p < kNeonQTile; ++p) {
      float* y = slice_output(sl, q0 + p);  // (one division per pixel for its 4 outputs)
      for (int64_t r = 0; y && r < nr; ++r)
        y[(o0 + r) * sl.out_cstride] =
            dsconv_epilogue(acc[r][p], ep.cdsw[o0 + r], ep.cb[o0 + r], 0.f, ep.silu);
    }
  }
}

IsaKernels neon_kernels(void (*pack)(const PackRow&),
                        void (*tiles)(const Slice&, const uint8_t*, const Epilogue&, int64_t,
                                      int64_t, int64_t)) {
  IsaKernels k = kernels_scalar();
  k.qtile = kNeonQTile;
  k.pack_row = pack;
  k.conv_tiles = tiles;
  return k;
}

}  // namespace

bool neon_dot_usable() {
#if defined(__linux__) && defined(__aarch64__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // Linux arch/arm64/include/uapi/asm/hwcap.h
#endif
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__) && defined(__aarch64__)
  int dot = 0;
  size_t len = sizeof(dot);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &dot, &len, nullptr, 0) == 0 && dot != 0;
#else
  return false;
#endif
}

const IsaKernels& kernels_neon_dot() {
#if DSCONV_HAVE_NEON_DOT_HW
  static const IsaKernels k = neon_kernels(&pack_row<NeonHw>, &conv_tiles<NeonHw>);
  return k;
#else
  return kernels_not_built("neon_dot", "AArch64");
#endif
}

const IsaKernels& kernels_neon_model() {
  static const IsaKernels k = neon_kernels(&pack_row<NeonModel>, &conv_tiles<NeonModel>);
  return k;
}

}  // namespace cpu
}  // namespace dsconv_ext
