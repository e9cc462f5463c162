// AVX-512 helpers shared by the AVX-512 VNNI kernel (kernel_avx512.cpp) and the AMX kernel
// (kernel_amx.cpp), whose fold and epilogue must be the same instructions for the two paths to
// give bit-identical outputs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/dsconv2d_cpu.h"

// (prfchw: PREFETCHW, which every AVX-512 CPU has)
#define DSCONV_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,prfchw")))

namespace dsconv_ext {
namespace cpu {
namespace avx512 {

constexpr int64_t kVec = 16;

DSCONV_AVX512 inline __mmask16 lane_range(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, kVec);
  if (lo >= hi) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// e^x to about 2 ulp (kExpPoly); scalef makes large |x| saturate to inf / 0.
DSCONV_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// permutex2var indices of the even lanes of two concatenated vectors (a stride-2 phase split).
DSCONV_AVX512 inline __m512i even_lanes() {
  return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}

// SiLU y / (1 + e^-y), 16 lanes, with e^-y = 2^t, t = -y log2(e) rounded once (relative error
// about |t| 2^-24 in e^-y, which the division only shrinks): 2^t = 2^floor(t) * 2^f with
// f = t - floor(t) from one vreduceps, 2^f from a degree-5 fit on [0, 1) (1.6e-7 relative in
// float32) and vscalefps, which takes floor(t) itself. In the int8 kernels' epilogue this SiLU
// costs as much as a whole 1x1 conv with 64 input channels; against rounding t, subtracting and
// clamping it first, it takes 17% fewer cycles (an AMX Xeon core, 2026-12-07: 7.8 against 9.4
// TSC cycles per vector). No clamp is needed: t >= 128 makes 2^t inf (y / inf = -0, and
// -inf / inf = NaN as float64 SiLU gives), t = -inf makes it 0 (inf / 1 = inf), and a NaN y
// stays NaN.
DSCONV_AVX512 inline __m512 silu_ps(__m512 y) {
  const __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(kNegLog2E));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(kExp2Poly01[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly01[i]));
  const __m512 e = _mm512_scalef_ps(p, t);
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// dsconv_epilogue, 16 lanes: y = CDSw * acc + (CDSb + bias), then SiLU.
DSCONV_AVX512 inline __m512 epilogue(__m512 acc, float cdsw, float cb, bool silu) {
  const __m512 y = _mm512_fmadd_ps(acc, _mm512_set1_ps(cdsw), _mm512_set1_ps(cb));
  return silu ? silu_ps(y) : y;
}

// The epilogue of a tile of R output channels x V pixel vectors (f[r * V + v]; channels o0..,
// whose constants are padded past the layer's last channel), in place, before any of it is
// stored. As straight-line code the tile's SiLU dependency chains (~50 cycles each, ending in a
// division) overlap; computed one vector at a time between the stores' branches, the core
// waited on each division in turn (1x1 convs reading 32-128 channels ran 8-10% slower). Not
// inlined: the SiLU's temporaries then take no registers from the caller's accumulation loop.
template <int R, int V>
DSCONV_AVX512 __attribute__((noinline)) void epilogue_tile(__m512* f, const Epilogue& ep,
                                                           int64_t o0) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 w = _mm512_set1_ps(ep.cdsw[o0 + r]), b = _mm512_set1_ps(ep.cb[o0 + r]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) f[r * V + v] = _mm512_fmadd_ps(f[r * V + v], w, b);
  }
  if (!ep.silu) return;
#pragma GCC unroll 16
  for (int i = 0; i < R * V; ++i) f[i] = silu_ps(f[i]);
}

inline int32_t bit_pattern(float v) {
  int32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

// Stores 16 q-space values, the first of which is output (oh, ow), into the output plane `out`,
// skipping columns >= Wo and rows >= oh1 (the band's end).
DSCONV_AVX512 inline void store_vec(const Layout& lay, float* out, int64_t oh, int64_t ow,
                                    int64_t oh1, __m512 y) {
  const int64_t Wo = lay.g.Wo;
  if (ow + kVec <= Wo && oh < oh1) {  // the common case: one row, all lanes real
    _mm512_storeu_ps(out + oh * Wo + ow, y);
    return;
  }
  // Two q-rows, both in the band: output rows are adjacent in the plane, so the real lanes are
  // contiguous there once the q-grid's Wq - Wo extra columns are squeezed out of the vector (none
  // when Wq == Wo: one plain store). One store instead of a loop of two masked ones (narrow maps,
  // where most vectors cross a row end).
  const int64_t n1 = lay.Wq - ow;  // lanes in the first q-row
  if (n1 < kVec && kVec - n1 <= lay.Wq && oh + 1 < oh1) {
    if (lay.Wq == Wo) {
      _mm512_storeu_ps(out + oh * Wo + ow, y);
      return;
    }
    const int64_t v1 = ow < Wo ? Wo - ow : 0, v2 = std::min<int64_t>(kVec - n1, Wo);
    const __m512 real = _mm512_maskz_compress_ps(lane_range(0, v1) | lane_range(n1, n1 + v2), y);
    _mm512_mask_storeu_ps(out + (ow < Wo ? oh * Wo + ow : (oh + 1) * Wo), lane_range(0, v1 + v2),
                          real);
    return;
  }
  int64_t lane = 0;
  while (lane < kVec && oh < oh1) {
    const int64_t n = std::min(kVec - lane, lay.Wq - ow);
    const int64_t valid = std::min(n, Wo - ow);
    // Lane `lane` goes to column ow: the base is shifted back by `lane`; masked-off lanes are
    // never accessed.
    if (valid > 0) {
      _mm512_mask_storeu_ps(out + oh * Wo + ow - lane, lane_range(lane, lane + valid), y);
    }
    lane += n;
    ++oh;
    ow = 0;
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace dsconv_ext
