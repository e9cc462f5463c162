// AVX-512 VNNI path: packing with 16 pixels per vector, a 4 output channel x 48 pixel vpdpbusd
// microkernel, the float-family kernel and the depthwise path (dsconv2d_cpu.h). Compiled with
// function-level target attributes and only entered after a run-time CPU check
// (dsconv2d_cpu.cpp).
//
// Cost of the microkernel's segment fold (B = 32: 8 vpdpbusd per (block, tap) segment and
// accumulator, then acc += alpha * 2^E * float(S)): folding with fma(scalef(cvt(S), E), alpha)
// ran the YOLO11 3x3 layers ~11% slower (same-process A/B) than fma(cvt(S), alpha + (E << 23)),
// the integer add on alpha's exponent bits that replaces vscalefps where every alpha * 2^E of a
// band is a normal float (conv_tiles_impl, ExponentRange): vscalefps competes with vpdpbusd and
// FMA for the multiply pipes, the integer add does not.
#include "cpu/dsconv2d_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "cpu/avx512_common.h"

namespace dsconv_ext {
namespace cpu {
namespace {

using avx512::bit_pattern;
using avx512::epilogue;
using avx512::epilogue_tile;
using avx512::exp_ps;
using avx512::kVec;
using avx512::lane_range;
using avx512::store_vec;

constexpr int64_t kPV = 3;  // pixel vectors per tile
constexpr int64_t kQTile = kVec * kPV;
// Stage of the strided int8 packer (pack_row).
constexpr int64_t kStageBytes = 16 << 10;
// Channels of the stride-1 packer's column stage (8 KB on the stack).
constexpr int64_t kStageChannels = 128;
// Software prefetch distance of the stride-1 int8 packer, per channel row: 4 cache lines ahead
// (its 32 concurrent channel streams are more than the hardware prefetchers follow; ~3% of a
// converted yolo11n forward, same-process A/B); the stride-2 packer fetches twice as far. Into
// L2, not L1: where a channel plane is a multiple of 4 KB (160x160, 320x320 maps) every
// channel's lines fall in the same L1 sets, and 32 channels' lines fetched ahead into 8-way L1
// evicted each other before use (one Zen 4 core, interleaved processes: 3x3 64->64 stride 2 at
// 160x160 -13%, stride 1 64->4 -10%, 1x1 32->4 -5%).
constexpr int64_t kPrefetchInFloats = 64;
// Software prefetch distance of the depthwise kernel's output stores: 16 lines ahead (+2-4% on
// the YOLO11 depthwise layers, same-process A/B).
constexpr int64_t kDwPrefetchOutFloats = 256;

// Row stores of the packers: a plain store for whole vectors (masked stores are markedly slower
// on AMD cores), a masked one only for the row's last, partial vector.
DSCONV_AVX512 inline void store_row(float* p, __mmask16 m, __m512 v) {
  if (m == 0xFFFF)
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, m, v);
}
DSCONV_AVX512 inline void store_row(uint32_t* p, __mmask16 m, __m512i v) {
  if (m == 0xFFFF)
    _mm512_storeu_si512(p, v);
  else
    _mm512_mask_storeu_epi32(p, m, v);
}

// --- Packing -------------------------------------------------------------------------------

struct RowLoader {
  const float* row;  // channel 0, input row h
  int64_t cstride, w0, sw, W;
  __mmask16 m16;  // sw == 1 or gather: lanes inside the input
  __mmask32 m32;  // sw == 2: the 32 consecutive columns inside the input
};

// Of the 32 consecutive columns from w0, those inside a row of W.
inline __mmask32 columns_inside32(int64_t w0, int64_t W) {
  const int64_t clo = std::max<int64_t>(-w0, 0), chi = std::min<int64_t>(W - w0, 32);
  if (clo >= chi) return 0;
  return static_cast<__mmask32>(((chi >= 32 ? 0ull : (1ull << chi)) - 1ull) &
                                ~((1ull << clo) - 1ull));
}

DSCONV_AVX512 inline RowLoader make_loader(const float* row, int64_t cstride, int64_t w0,
                                           int64_t sw, int64_t W, int64_t nlanes) {
  RowLoader L{row, cstride, w0, sw, W, 0, 0};
  // Lanes l with 0 <= w0 + l*sw < W (no division for the common stride 1).
  int64_t lo = -w0, hi = W - w0;
  if (sw != 1) {
    lo = w0 >= 0 ? 0 : (-w0 + sw - 1) / sw;
    hi = hi <= 0 ? 0 : (hi + sw - 1) / sw;
  }
  L.m16 = lane_range(lo, std::min(hi, nlanes));
  if (sw == 2) {
    L.m32 = columns_inside32(w0, W);
  }
  return L;
}

DSCONV_AVX512 inline __m512 load_lanes(const RowLoader& L, int64_t c) {
  const float* p = L.row + c * L.cstride + L.w0;  // may point before the row: lanes are masked
  if (L.sw == 1) return _mm512_maskz_loadu_ps(L.m16, p);
  if (L.sw == 2) {
    const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(L.m32), p);
    const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(L.m32 >> 16), p + kVec);
    const __m512i even =
        _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_ps(lo, even, hi);
  }
  const __m512i idx =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(static_cast<int32_t>(L.sw)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), L.m16, idx, p, 4);
}

// Shared exponent of 16 blocks from their max |x| bit patterns (bfp_exponent, vectorised with
// integer maths so that subnormal blocks are right whatever the denormals-are-zero flag says).
DSCONV_AVX512 inline __m512i block_exponent(__m512i amax_bits, int mant_bits) {
  const __m512i e_norm = _mm512_sub_epi32(_mm512_srli_epi32(amax_bits, 23), _mm512_set1_epi32(127));
  // A subnormal's bits, read as an integer, convert exactly to a float of the same leading bit.
  const __m512i as_float = _mm512_castps_si512(_mm512_cvtepi32_ps(amax_bits));
  const __m512i e_sub =
      _mm512_sub_epi32(_mm512_srli_epi32(as_float, 23), _mm512_set1_epi32(127 + 149));
  const __mmask16 sub = _mm512_cmplt_epi32_mask(amax_bits, _mm512_set1_epi32(0x00800000));
  __m512i e = _mm512_mask_blend_epi32(sub, e_norm, e_sub);
  e = _mm512_sub_epi32(e, _mm512_set1_epi32(mant_bits - 2));
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(amax_bits, _mm512_setzero_si512());
  return _mm512_maskz_mov_epi32(static_cast<__mmask16>(~zero), e);
}

// round-half-even(x * 2^-E) clamped to +-lim, 0 in non-finite blocks.
DSCONV_AVX512 inline __m512i mantissa(__m512 v, __m512 neg_e, __m512i lim, __mmask16 finite) {
  const __m512i m = _mm512_cvt_roundps_epi32(_mm512_scalef_ps(v, neg_e),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i c =
      _mm512_min_epi32(_mm512_max_epi32(m, _mm512_sub_epi32(_mm512_setzero_si512(), lim)), lim);
  return _mm512_maskz_mov_epi32(finite, c);
}

// The int8 words of 4 channels' mantissas for 16 pixels of a block whose lanes are all finite:
// the two saturating packs leave each 128-bit lane as [c0 p0..p3, c1 p0..p3, c2 .., c3 ..]
// bytes, one shuffle per lane makes that pixel-major, and the clamp to +-lim and the +128 of
// the u8 operand are then one byte op each for 64 mantissas (instead of per 32-bit lane).
// kMul: x * 2^-E as a multiply by `scale` = 2^-E, a normal float in every lane (exact, as the
// vscalefps by -E is, and the same rounding where the product is subnormal; a multiply takes
// one cycle of a zmm pipe pair where vscalefps takes two on Zen 4). Else `scale` is -E for
// vscalefps.
template <bool kMul>
DSCONV_AVX512 inline __m512i mantissa_word(const float* c0, int64_t cstride, int64_t nc,
                                           __mmask16 lanes, __m512 scale, __m512i lo8, __m512i hi8,
                                           __m512i bias8) {
  __m512i m[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    if (i < nc) {
      const __m512 x = _mm512_maskz_loadu_ps(lanes, c0 + i * cstride);
      m[i] = _mm512_cvt_roundps_epi32(kMul ? _mm512_mul_ps(x, scale) : _mm512_scalef_ps(x, scale),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      m[i] = _mm512_setzero_si512();
    }
  }
  __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(m[0], m[1]), _mm512_packs_epi32(m[2], m[3]));
  b = _mm512_min_epi8(_mm512_max_epi8(b, lo8), hi8);
  // Destination byte 4j + i (pixel j, channel i) of each lane comes from byte 4i + j.
  const __m512i pixel_major =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  b = _mm512_shuffle_epi8(b, pixel_major);
  return _mm512_xor_si512(b, bias8);
}

// Constants of one packer call. bias8: 0x80 per byte, the +128 that makes each mantissa the u8
// operand of vpdpbusd; zero where the kernel multiplies signed bytes (AMX's TDPBSSD).
struct PackConsts {
  __m512i lim, lo8, hi8, bias8;
  int mant_bits;
  bool signed_bytes;
};

// One block's 16 pixels at q-space column x0 of one phase row: exponent from the blocks' max |x|
// bit patterns `amax`, mantissa words into every k4 plane, esc and usum. Channel c of the 16
// pixels is at src + c * src_cstride, lanes outside `lanes` read as 0.
DSCONV_AVX512 inline void pack_vector(const PackRow& r, const PackConsts& k, const float* src,
                                      int64_t src_cstride, __mmask16 lanes, __m512i amax,
                                      int64_t base, int64_t x0, __mmask16 st) {
  const Layout& lay = *r.lay;
  const int64_t kplane = lay.P * lay.Lq;
  const __mmask16 finite = _mm512_cmplt_epi32_mask(amax, _mm512_set1_epi32(0x7F800000));
  const __m512i ei = block_exponent(amax, k.mant_bits);
  const __m512 e = _mm512_cvtepi32_ps(ei);
  const __m512 neg_e = _mm512_sub_ps(_mm512_setzero_ps(), e);
  // 2^-E as float bits, a normal float for E in [-126, 126] (every block whose max is above
  // about 2^-120 at 8 bits).
  const bool pow2_scale = _mm512_cmp_epi32_mask(ei, _mm512_set1_epi32(-126), _MM_CMPINT_LT) == 0 &&
                          _mm512_cmp_epi32_mask(ei, _mm512_set1_epi32(126), _MM_CMPINT_GT) == 0;
  const __m512 inv_pow2 =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127), ei), 23));
  if (r.erange) {
    ExponentRange& er = *r.erange;
    const __mmask16 ok = finite & st;
    const __m512i lo = _mm512_loadu_si512(er.lo), hi = _mm512_loadu_si512(er.hi);
    _mm512_storeu_si512(er.lo, _mm512_mask_min_epi32(lo, ok, lo, ei));
    _mm512_storeu_si512(er.hi, _mm512_mask_max_epi32(hi, ok, hi, ei));
    if (ok != st) er.nonfinite = 1;
  }
  uint32_t* act = r.act + base + x0;
  __m512i msum = _mm512_setzero_si512();  // sum of the bytes (m + 128, or m)
  for (int64_t k4 = 0; k4 < lay.K4; ++k4) {
    const int64_t nc = std::min<int64_t>(4, r.nch - k4 * 4);
    const float* c0 = src + k4 * 4 * src_cstride;
    __m512i word;
    if (finite == 0xFFFF) {
      word = pow2_scale
                 ? mantissa_word<true>(c0, src_cstride, nc, lanes, inv_pow2, k.lo8, k.hi8, k.bias8)
                 : mantissa_word<false>(c0, src_cstride, nc, lanes, neg_e, k.lo8, k.hi8, k.bias8);
    } else {  // NaN or Inf in some block: its mantissas are 0 (its esc kEscNonFinite)
      word = _mm512_setzero_si512();
      for (int64_t lane = 0; lane < 4; ++lane) {
        __m512i m = _mm512_setzero_si512();
        if (lane < nc) {
          m = mantissa(_mm512_maskz_loadu_ps(lanes, c0 + lane * src_cstride), neg_e, k.lim, finite);
        }
        // m + 128 in [1, 255], or m's own low byte
        const __m512i byte =
            _mm512_and_si512(_mm512_add_epi32(m, _mm512_set1_epi32(k.signed_bytes ? 0 : 128)),
                             _mm512_set1_epi32(0xFF));
        word = _mm512_or_si512(word, _mm512_sllv_epi32(byte, _mm512_set1_epi32(8 * lane)));
      }
    }
    if (r.usum) {
      msum = k.signed_bytes ? _mm512_dpbusd_epi32(msum, _mm512_set1_epi8(1), word)
                            : _mm512_dpbusd_epi32(msum, word, _mm512_set1_epi8(1));
    }
    store_row(act + k4 * kplane, st, word);
  }
  // esc: E << 23, the amount conv_tiles adds to alpha's bit pattern (esc_shift).
  store_row(
      reinterpret_cast<uint32_t*>(r.esc) + base + x0, st,
      _mm512_mask_mov_epi32(_mm512_set1_epi32(kEscNonFinite), finite, _mm512_slli_epi32(ei, 23)));
  if (r.usum) {
    const __m512 nan = _mm512_set1_ps(NAN);
    if (!k.signed_bytes)
      msum = _mm512_sub_epi32(msum, _mm512_set1_epi32(static_cast<int32_t>(512 * lay.K4)));
    const __m512 u = _mm512_scalef_ps(_mm512_cvtepi32_ps(msum), e);
    store_row(r.usum + base + x0, st, _mm512_mask_mov_ps(nan, finite, u));
  }
}

// Stores 16 pixels of one channel's phase row into the stage and folds their |x| into the
// per-pixel block maxima (the first channel of the block starts them).
DSCONV_AVX512 inline void stage_vector(float* sc, int32_t* amax, int64_t rstride, bool first,
                                       int64_t rx, int64_t v, __m512 x) {
  _mm512_storeu_ps(sc + rx * rstride + v * kVec, x);
  int32_t* am = amax + rx * rstride + v * kVec;
  const __m512i bits = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i prev = first ? _mm512_setzero_si512() : _mm512_loadu_si512(am);
  _mm512_storeu_si512(am, _mm512_max_epi32(prev, bits));
}

// Prefetches the input row that the block's next phase row will read, every channel: a strided
// layer reads rows of several channels, each H * W * 4 bytes apart (yolo11n ~2% faster, yolo11s
// unchanged, same-process A/B; always_inline: see prefetch_next_outputs).
DSCONV_AVX512 __attribute__((always_inline)) inline void prefetch_next_input_row(const PackRow& r,
                                                                                 int64_t hrow) {
  const ConvGeometry& g = r.lay->g;
  const int64_t next = hrow + g.sh;
  if (next >= g.H) return;
  for (int64_t c = 0; c < r.nch; ++c) {
    const char* p = reinterpret_cast<const char*>(r.x + c * r.x_cstride + next * g.W);
    for (int64_t b = 0; b < g.W * 4; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// The int8 packer, one phase row of one block. Stride 1 reads the input rows in place: per 16
// pixels, a max |x| pass over the block's channels that also copies the column into an L1 stage,
// then the words from the stage. Reading the rows in place a second time for the words was
// slower wherever H * W * 4 is a multiple of 4 KB (160x160, 320x320 maps), every channel's line
// then sitting in one L1 set and evicted by the others' before its second read: one core, Zen 4,
// 32 channels at 160x160 packed in 18.5 cycles per 16 floats in place, 14.5 staged (80x80,
// where the lines spread over 4 sets: 12.3 and 11.9). Stride 2 does the same with both phases
// of a column. Other strides, and blocks over kStageChannels, first split each channel's input
// row into its phases in a compact per-thread stage, channel after channel.
template <bool kSignedBytes>
DSCONV_AVX512 void pack_row_impl(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t hrow = pack_input_row(r);
  const int64_t kplane = lay.P * lay.Lq;
  if (hrow < 0) {  // mantissas 0
    const __m512i neutral = _mm512_set1_epi32(kSignedBytes ? 0 : static_cast<int32_t>(0x80808080u));
    for (int64_t rx = 0; rx < g.sw; ++rx) {
      const int64_t base = (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
      for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
        const __mmask16 st = lane_range(0, lay.Wq - x0);
        for (int64_t k4 = 0; k4 < lay.K4; ++k4)
          store_row(r.act + base + x0 + k4 * kplane, st, neutral);
        store_row(r.esc + base + x0, st, _mm512_setzero_ps());
        if (r.usum) store_row(r.usum + base + x0, st, _mm512_setzero_ps());
      }
    }
    return;
  }
  PackConsts k;
  k.mant_bits = r.mant_bits;
  k.lim = _mm512_set1_epi32(mantissa_limit(r.mant_bits));
  k.hi8 = _mm512_set1_epi8(static_cast<char>(mantissa_limit(r.mant_bits)));
  k.lo8 = _mm512_sub_epi8(_mm512_setzero_si512(), k.hi8);
  k.bias8 = _mm512_set1_epi8(kSignedBytes ? 0 : static_cast<char>(0x80));
  k.signed_bytes = kSignedBytes;
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const float* xrow = r.x + hrow * g.W;

  if (g.sw == 1) {
    alignas(64) float stage[kStageChannels * kVec];
    const bool staged = r.nch <= kStageChannels;  // larger blocks: the words read in place
    const int64_t base = r.ry * lay.Lq + r.yl * lay.Wq;
    for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
      const RowLoader L = make_loader(xrow, r.x_cstride, x0 - g.pw, 1, g.W, lay.Wq - x0);
      __m512i amax = _mm512_setzero_si512();
      for (int64_t c = 0; c < r.nch; ++c) {
        // (may point past the row: prefetches do not fault)
        _mm_prefetch(
            reinterpret_cast<const char*>(xrow + c * r.x_cstride + x0 - g.pw + kPrefetchInFloats),
            _MM_HINT_T1);
        const __m512 v = load_lanes(L, c);
        if (staged) _mm512_store_ps(stage + c * kVec, v);
        amax = _mm512_max_epi32(amax, _mm512_and_si512(_mm512_castps_si512(v), absmask));
      }
      if (staged) {
        pack_vector(r, k, stage, kVec, 0xFFFF, amax, base, x0, lane_range(0, lay.Wq - x0));
      } else {
        pack_vector(r, k, L.row + L.w0, L.cstride, L.m16, amax, base, x0,
                    lane_range(0, lay.Wq - x0));
      }
    }
    return;
  }

  // Stride 2: one pair of loads gives 16 columns of both phases, split by these lane indices.
  const __m512i even = avx512::even_lanes();
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  if (g.sw == 2 && r.nch <= kStageChannels) {
    // Per 16 q-columns: each channel's 32 input columns in two loads, split into the two phases
    // into a column stage [phase][channel][16] while both phases' max |x| stay in registers,
    // then the words of each phase from the stage (the stride-1 scheme; through the chunked
    // stage below, with the maxima kept in memory and the loads' masks worked out per channel,
    // it took 22 cycles per 16 input floats on one Zen 4 core).
    alignas(64) float stage[2 * kStageChannels * kVec];
    const int64_t base0 = (r.ry * 2) * lay.Lq + r.yl * lay.Wq;
    for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
      const int64_t w0 = x0 * 2 - g.pw;
      const __mmask32 m32 = columns_inside32(w0, g.W);
      const __mmask16 mlo = static_cast<__mmask16>(m32), mhi = static_cast<__mmask16>(m32 >> 16);
      __m512i amax0 = _mm512_setzero_si512(), amax1 = _mm512_setzero_si512();
      const float* p = xrow + w0;  // may point before the row: masked
      for (int64_t c = 0; c < r.nch; ++c, p += r.x_cstride) {
        // both lines of the pair the channel reads next: one of them alone left every other
        // line to the hardware (the stride-2 layers 4-5% slower, one and two Zen 4 cores,
        // interleaved in one process; fetching twice as far ahead made no difference)
        _mm_prefetch(reinterpret_cast<const char*>(p + 2 * kPrefetchInFloats), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(p + 2 * kPrefetchInFloats + kVec), _MM_HINT_T1);
        const __m512 lo = _mm512_maskz_loadu_ps(mlo, p);
        const __m512 hi = _mm512_maskz_loadu_ps(mhi, p + kVec);
        const __m512 v0 = _mm512_permutex2var_ps(lo, even, hi);
        const __m512 v1 = _mm512_permutex2var_ps(lo, odd, hi);
        _mm512_store_ps(stage + c * kVec, v0);
        _mm512_store_ps(stage + (kStageChannels + c) * kVec, v1);
        amax0 = _mm512_max_epi32(amax0, _mm512_and_si512(_mm512_castps_si512(v0), absmask));
        amax1 = _mm512_max_epi32(amax1, _mm512_and_si512(_mm512_castps_si512(v1), absmask));
      }
      const __mmask16 st = lane_range(0, lay.Wq - x0);
      pack_vector(r, k, stage, kVec, 0xFFFF, amax0, base0, x0, st);
      pack_vector(r, k, stage + kStageChannels * kVec, kVec, 0xFFFF, amax1, base0 + lay.Lq, x0, st);
    }
    return;
  }

  prefetch_next_input_row(r, hrow);
  // The row in chunks of `qc` q-columns whose stage, [channel][phase rx][qc] floats, fits in
  // about 16 KB of L1 beside the words going out; then [rx][qc] max |x| bit patterns.
  const int64_t qc = std::max<int64_t>(kVec, (kStageBytes / (r.nch * g.sw * 4)) / kVec * kVec);
  const int64_t cstride = g.sw * qc;
  static thread_local Scratch scratch;
  float* stage =
      reinterpret_cast<float*>(scratch.get(size_t(r.nch * cstride + g.sw * qc) * sizeof(float)));
  int32_t* amax = reinterpret_cast<int32_t*>(stage + r.nch * cstride);
  for (int64_t xc = 0; xc < lay.Wq; xc += qc) {
    const int64_t nv = (std::min(qc, lay.Wq - xc) + kVec - 1) / kVec;
    for (int64_t c = 0; c < r.nch; ++c) {
      float* sc = stage + c * cstride;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t x0 = xc + v * kVec;
        if (g.sw == 2) {  // one pair of loads gives both phases
          // (the mask alone: make_loader's 16-lane bounds divide by the stride)
          const int64_t w0 = x0 * 2 - g.pw;
          const __mmask32 m32 = columns_inside32(w0, g.W);
          const float* p = xrow + c * r.x_cstride + w0;  // may point before the row: masked
          const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m32), p);
          const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m32 >> 16), p + kVec);
          stage_vector(sc, amax, qc, c == 0, 0, v, _mm512_permutex2var_ps(lo, even, hi));
          stage_vector(sc, amax, qc, c == 0, 1, v, _mm512_permutex2var_ps(lo, odd, hi));
          continue;
        }
        for (int64_t rx = 0; rx < g.sw; ++rx) {
          const RowLoader L =
              make_loader(xrow, r.x_cstride, x0 * g.sw + rx - g.pw, g.sw, g.W, kVec);
          stage_vector(sc, amax, qc, c == 0, rx, v, load_lanes(L, c));
        }
      }
    }
    for (int64_t rx = 0; rx < g.sw; ++rx) {
      const int64_t base = (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t x0 = xc + v * kVec;
        pack_vector(r, k, stage + rx * qc + v * kVec, cstride, 0xFFFF,
                    _mm512_loadu_si512(amax + rx * qc + v * kVec), base, x0,
                    lane_range(0, lay.Wq - x0));
      }
    }
  }
}

DSCONV_AVX512 void pack_row(const PackRow& r) { pack_row_impl<false>(r); }

// The BFP value of single-channel blocks, on the bit pattern: E = floor(log2|x|) - (m - 2) makes
// the mantissa x / 2^E the float's significand with m - 2 fraction bits, so rounding it half to
// even is an integer add and mask at bit k = 25 - m; a carry into the next binade is the clamp to
// 2^(m-1) - 1. Returns false (and the caller takes the general path) for subnormal, Inf or NaN
// lanes.
DSCONV_AVX512 inline bool round_single(__m512 x, int mant_bits, __m512* out) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i ex = _mm512_srli_epi32(mag, 23);
  const __mmask16 special =
      _mm512_cmpeq_epi32_mask(ex, _mm512_set1_epi32(255)) |
      (_mm512_cmpeq_epi32_mask(ex, _mm512_setzero_si512()) & _mm512_test_epi32_mask(mag, mag));
  if (special) return false;
  const int k = 25 - mant_bits;
  const __m512i low = _mm512_set1_epi32((1 << k) - 1);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(mag, k), _mm512_set1_epi32(1));
  const __m512i half = _mm512_set1_epi32((1 << (k - 1)) - 1);
  __m512i rnd = _mm512_andnot_si512(low, _mm512_add_epi32(mag, _mm512_add_epi32(half, lsb)));
  const __mmask16 carry = _mm512_cmpneq_epi32_mask(_mm512_srli_epi32(rnd, 23), ex);
  const __m512i top = _mm512_or_si512(_mm512_slli_epi32(ex, 23),
                                      _mm512_set1_epi32(((1 << (mant_bits - 2)) - 1) << k));
  rnd = _mm512_mask_mov_epi32(rnd, carry, top);
  *out = _mm512_castsi512_ps(
      _mm512_or_si512(rnd, _mm512_and_si512(bits, _mm512_set1_epi32(int32_t(0x80000000u)))));
  return true;
}

DSCONV_AVX512 void pack_row_float(const PackRow& r) {
  const Layout& lay = *r.lay;
  const ConvGeometry& g = lay.g;
  const int64_t hrow = pack_input_row(r);
  const int64_t cplane = lay.P * lay.Lq;
  const __m512i lim = _mm512_set1_epi32(mantissa_limit(r.mant_bits));
  for (int64_t rx = 0; rx < g.sw; ++rx) {
    float* dst = r.esc + (r.ry * g.sw + rx) * lay.Lq + r.yl * lay.Wq;
    for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
      const int64_t nl = std::min(kVec, lay.Wq - x0);
      const __mmask16 st = lane_range(0, nl);
      if (hrow < 0) {
        for (int64_t c = 0; c < r.nch; ++c)
          store_row(dst + c * cplane + x0, st, _mm512_setzero_ps());
        continue;
      }
      const RowLoader L =
          make_loader(r.x + hrow * g.W, r.x_cstride, x0 * g.sw + rx - g.pw, g.sw, g.W, nl);
      if (r.nch == 1) {  // depthwise: round in the bit pattern, see round_single
        __m512 v;
        if (round_single(load_lanes(L, 0), r.mant_bits, &v)) {
          store_row(dst + x0, st, v);
          continue;
        }
      }
      // Up to 4 channels: load each once and keep it for the second pass.
      __m512 xv[4];
      __m512i amax = _mm512_setzero_si512();
      for (int64_t c = 0; c < r.nch; ++c) {
        xv[c] = load_lanes(L, c);
        const __m512i bits =
            _mm512_and_si512(_mm512_castps_si512(xv[c]), _mm512_set1_epi32(0x7FFFFFFF));
        amax = _mm512_max_epi32(amax, bits);
      }
      const __mmask16 finite = _mm512_cmplt_epi32_mask(amax, _mm512_set1_epi32(0x7F800000));
      const __m512 e = _mm512_cvtepi32_ps(block_exponent(amax, r.mant_bits));
      const __m512 neg_e = _mm512_sub_ps(_mm512_setzero_ps(), e);
      for (int64_t c = 0; c < r.nch; ++c) {
        const __m512i m = mantissa(xv[c], neg_e, lim, finite);
        const __m512 v = _mm512_scalef_ps(_mm512_cvtepi32_ps(m), e);
        store_row(dst + c * cplane + x0, st, _mm512_mask_mov_ps(_mm512_set1_ps(NAN), finite, v));
      }
    }
  }
}

// --- Microkernels ---

// The K loop of one (block, tap) segment: acc[r][v] = corr[r] + sum over the K4 4-channel groups
// of u8(activations of pixel vector v) . s8(weights of output channel r), 12 accumulators.
// Starting them at the +128 correction (a broadcast load, no vector ALU op) instead of adding it
// afterwards takes 12 of the 48 epilogue ops per segment off the vector pipes the vpdpbusd use
// (3-4% over the YOLO11 3x3 layers, up to 10% on the wide stride-2 ones).
// Inline asm because GCC 12, given the intrinsics, copies every accumulator once per iteration
// (12 extra moves per 12 vpdpbusd) or spills them to the stack.
DSCONV_AVX512 inline void k_loop(__m512i (&acc)[kOTile][kPV], const uint8_t* a, const int32_t* w,
                                 int64_t K4, int64_t kplane_b, const int32_t* corr) {
  __m512i c00 = _mm512_set1_epi32(corr[0]), c01 = _mm512_set1_epi32(corr[0]),
          c02 = _mm512_set1_epi32(corr[0]);
  __m512i c10 = _mm512_set1_epi32(corr[1]), c11 = _mm512_set1_epi32(corr[1]),
          c12 = _mm512_set1_epi32(corr[1]);
  __m512i c20 = _mm512_set1_epi32(corr[2]), c21 = _mm512_set1_epi32(corr[2]),
          c22 = _mm512_set1_epi32(corr[2]);
  __m512i c30 = _mm512_set1_epi32(corr[3]), c31 = _mm512_set1_epi32(corr[3]),
          c32 = _mm512_set1_epi32(corr[3]);
  if (K4 > 0) {
    // 30 operands, GCC's limit: the loop ends on the weight pointer rather than a counter.
    asm volatile(
        "1:\n\t"
        "vmovdqu64 (%[a]), %%zmm29\n\t"
        "vmovdqu64 64(%[a]), %%zmm30\n\t"
        "vmovdqu64 128(%[a]), %%zmm31\n\t"
        "vpbroadcastd (%[w]), %%zmm28\n\t"
        "vpdpbusd %%zmm28, %%zmm29, %[c00]\n\t"
        "vpdpbusd %%zmm28, %%zmm30, %[c01]\n\t"
        "vpdpbusd %%zmm28, %%zmm31, %[c02]\n\t"
        "vpbroadcastd 4(%[w]), %%zmm28\n\t"
        "vpdpbusd %%zmm28, %%zmm29, %[c10]\n\t"
        "vpdpbusd %%zmm28, %%zmm30, %[c11]\n\t"
        "vpdpbusd %%zmm28, %%zmm31, %[c12]\n\t"
        "vpbroadcastd 8(%[w]), %%zmm28\n\t"
        "vpdpbusd %%zmm28, %%zmm29, %[c20]\n\t"
        "vpdpbusd %%zmm28, %%zmm30, %[c21]\n\t"
        "vpdpbusd %%zmm28, %%zmm31, %[c22]\n\t"
        "vpbroadcastd 12(%[w]), %%zmm28\n\t"
        "vpdpbusd %%zmm28, %%zmm29, %[c30]\n\t"
        "vpdpbusd %%zmm28, %%zmm30, %[c31]\n\t"
        "vpdpbusd %%zmm28, %%zmm31, %[c32]\n\t"
        "add %[stride], %[a]\n\t"
        "add $16, %[w]\n\t"
        "cmp %[wend], %[w]\n\t"
        "jne 1b\n\t"
        : [c00] "+v"(c00), [c01] "+v"(c01), [c02] "+v"(c02), [c10] "+v"(c10), [c11] "+v"(c11),
          [c12] "+v"(c12), [c20] "+v"(c20), [c21] "+v"(c21), [c22] "+v"(c22), [c30] "+v"(c30),
          [c31] "+v"(c31), [c32] "+v"(c32), [a] "+r"(a), [w] "+r"(w)
        : [stride] "r"(kplane_b), [wend] "r"(w + K4 * kOTile)
        : "xmm28", "xmm29", "xmm30", "xmm31", "cc");
  }
  acc[0][0] = c00, acc[0][1] = c01, acc[0][2] = c02, acc[1][0] = c10, acc[1][1] = c11;
  acc[1][2] = c12, acc[2][0] = c20, acc[2][1] = c21, acc[2][2] = c22, acc[3][0] = c30;
  acc[3][1] = c31, acc[3][2] = c32;
}

// k_loop for a band's last tile when its pixels fill only PV < kPV vectors (see conv_tiles): the
// same sums, with 4 * PV accumulators. Intrinsics: with this few accumulators GCC keeps them in
// registers.
template <int PV>
DSCONV_AVX512 inline void k_loop_tail(__m512i (&acc)[kOTile][PV], const uint8_t* a,
                                      const int32_t* w, int64_t K4, int64_t kplane_b,
                                      const int32_t* corr) {
#pragma GCC unroll 4
  for (int r = 0; r < kOTile; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < PV; ++v) acc[r][v] = _mm512_set1_epi32(corr[r]);
  for (int64_t k = 0; k < K4; ++k, a += kplane_b, w += kOTile) {
    __m512i av[PV];
#pragma GCC unroll 2
    for (int v = 0; v < PV; ++v) av[v] = _mm512_loadu_si512(a + v * 64);
#pragma GCC unroll 4
    for (int r = 0; r < kOTile; ++r) {
      const __m512i wr = _mm512_set1_epi32(w[r]);
#pragma GCC unroll 2
      for (int v = 0; v < PV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av[v], wr);
    }
  }
}

// Fetches, for writing, the output lines of o-tile `ot` at q-space pixel `q` (the next tile):
// without it the stores of a layer whose output is not in cache waited on each line's read for
// ownership: converted yolo11n ran ~10% slower (alternating cross-process runs; 15-20% in a
// same-process A/B, where prefetcht0 instead of prefetchw recovered about two thirds of that).
// (always_inline: as a call, GCC took a function of prefetches alone for one without effects and
// dropped it)
DSCONV_AVX512 __attribute__((always_inline)) inline void prefetch_next_outputs(const Slice& sl,
                                                                               int64_t o0,
                                                                               int64_t nch,
                                                                               int64_t q) {
  const Layout& lay = *sl.lay;
  const int64_t oh = q / lay.Wq + sl.oh0, ow = q % lay.Wq;
  if (oh >= sl.oh1) return;
  for (int64_t o = o0; o < std::min(o0 + nch, sl.nout); ++o) {
    // the tile's kQTile floats from (oh, ow), one more line where they straddle lines
    const char* p = reinterpret_cast<const char*>(sl.out + o * sl.out_cstride + oh * lay.g.Wo + ow);
    for (int64_t b = 0; b < kQTile * 4; b += 64) _mm_prefetch(p + b, _MM_HINT_ET0);
    _mm_prefetch(p + kQTile * 4 - 1, _MM_HINT_ET0);
  }
}

// kExponentAdd (Slice::exponent_add): alpha * 2^E as alpha's bit pattern plus esc (E << 23),
// so that the segment fold is cvt + integer add + FMA, of which only the FMA takes a multiply
// pipe from the vpdpbusd (with vscalefps, two did). Same value, same rounding: alpha * 2^E is
// exact either way. Otherwise E is rebuilt from esc and applied with vscalefps, NaN for
// non-finite blocks.
template <bool kKdsb, bool kExponentAdd, int PV = kPV>
DSCONV_AVX512 void conv_tiles_impl(const Slice& sl, const uint8_t* wstream, const Epilogue& ep,
                                   int64_t ot, int64_t qt0, int64_t qt1) {
  const Layout& lay = *sl.lay;
  const int64_t K4 = lay.K4, ntaps = lay.ntaps;
  const int64_t kplane_b = lay.P * lay.Lq * 4;  // bytes from one k4 plane to the next
  const int64_t seg_b = int64_t(sizeof(SegHeader)) + K4 * kOTile * 4;
  const int64_t* tapoff = lay.tapoff.data();
  for (int64_t qt = qt0; qt < qt1; ++qt) {
    const int64_t q0 = qt * kQTile;
    prefetch_next_outputs(sl, ot * kOTile, kOTile, q0 + kQTile);
    // 12 float accumulators; with the 12 int32 ones of k_loop and its 4 scratch registers the
    // tile uses 28 of the 32 zmm registers.
    __m512 f[kOTile][PV];
#pragma GCC unroll 4
    for (int r = 0; r < kOTile; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < PV; ++v) f[r][v] = _mm512_setzero_ps();
    const uint8_t* ws = wstream;
    for (int64_t b = 0; b < lay.g.nblk; ++b) {
      const uint8_t* act_b = reinterpret_cast<const uint8_t*>(sl.act + q0) + b * K4 * kplane_b;
      const int64_t esc_b = b * lay.P * lay.Lq + q0;
      for (int64_t t = 0; t < ntaps; ++t, ws += seg_b) {
        const SegHeader* h = reinterpret_cast<const SegHeader*>(ws);
        const int32_t* w = reinterpret_cast<const int32_t*>(ws + sizeof(SegHeader));
        const uint8_t* a = act_b + tapoff[t] * 4;
        __m512i acc[kOTile][PV];
        const int64_t nk4 = b + 1 < lay.g.nblk ? K4 : lay.K4_last;
        if constexpr (PV == kPV)
          k_loop(acc, a, w, nk4, kplane_b, h->corr);
        else
          k_loop_tail<PV>(acc, a, w, nk4, kplane_b, h->corr);
        const float* e = sl.esc + esc_b + tapoff[t];
        __m512i es[PV];
#pragma GCC unroll 3
        for (int v = 0; v < PV; ++v) es[v] = _mm512_loadu_si512(e + v * kVec);
        if (kExponentAdd) {
#pragma GCC unroll 4
          for (int r = 0; r < kOTile; ++r) {
            const __m512i al = _mm512_set1_epi32(bit_pattern(h->alpha[r]));
#pragma GCC unroll 3
            for (int v = 0; v < PV; ++v) {
              const __m512 a2e = _mm512_castsi512_ps(_mm512_add_epi32(al, es[v]));
              f[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][v]), a2e, f[r][v]);
            }
          }
        } else {
          __m512 ev[PV];
#pragma GCC unroll 3
          for (int v = 0; v < PV; ++v) {
            const __mmask16 bad = _mm512_cmpeq_epi32_mask(es[v], _mm512_set1_epi32(kEscNonFinite));
            ev[v] = _mm512_mask_mov_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(es[v], 23)), bad,
                                       _mm512_set1_ps(NAN));
          }
#pragma GCC unroll 4
          for (int r = 0; r < kOTile; ++r) {
            const __m512 al = _mm512_set1_ps(h->alpha[r]);
#pragma GCC unroll 3
            for (int v = 0; v < PV; ++v) {
              const __m512 s = _mm512_scalef_ps(_mm512_cvtepi32_ps(acc[r][v]), ev[v]);
              f[r][v] = _mm512_fmadd_ps(s, al, f[r][v]);
            }
          }
        }
        if (kKdsb) {
          const float* u = sl.usum + esc_b + tapoff[t];
#pragma GCC unroll 4
          for (int r = 0; r < kOTile; ++r) {
            const __m512 kb = _mm512_set1_ps(h->kdsb[r]);
#pragma GCC unroll 3
            for (int v = 0; v < PV; ++v)
              f[r][v] = _mm512_fmadd_ps(kb, _mm512_loadu_ps(u + v * kVec), f[r][v]);
          }
        }
      }
    }
    epilogue_tile<kOTile, PV>(&f[0][0], ep, ot * kOTile);
    int64_t oh = q0 / lay.Wq, ow = q0 - oh * lay.Wq;
    oh += sl.oh0;
    for (int v = 0; v < PV; ++v) {
      for (int r = 0; r < kOTile; ++r) {
        const int64_t o = ot * kOTile + r;
        if (o >= sl.nout) break;
        store_vec(lay, sl.out + o * sl.out_cstride, oh, ow, sl.oh1, f[r][v]);
      }
      ow += kVec;
      while (ow >= lay.Wq) ow -= lay.Wq, ++oh;
    }
  }
}

template <int PV>
DSCONV_AVX512 void conv_tiles_pv(const Slice& sl, const uint8_t* wstream, const Epilogue& ep,
                                 int64_t ot, int64_t qt0, int64_t qt1) {
  if (sl.usum) {
    if (sl.exponent_add)
      conv_tiles_impl<true, true, PV>(sl, wstream, ep, ot, qt0, qt1);
    else
      conv_tiles_impl<true, false, PV>(sl, wstream, ep, ot, qt0, qt1);
  } else {
    if (sl.exponent_add)
      conv_tiles_impl<false, true, PV>(sl, wstream, ep, ot, qt0, qt1);
    else
      conv_tiles_impl<false, false, PV>(sl, wstream, ep, ot, qt0, qt1);
  }
}

// A band's last tile holds its remaining q, often fewer than kQTile: where they fit in one or
// two pixel vectors, that tile computes only those (converted yolo11n at 2 threads computed
// 7.4% more multiply-adds than its outputs need, much of it in such tails of 20x20 and 40x40
// bands).
DSCONV_AVX512 void conv_tiles(const Slice& sl, const uint8_t* wstream, const Epilogue& ep,
                              int64_t ot, int64_t qt0, int64_t qt1) {
  if (qt1 == sl.nqt && qt0 < qt1) {
    const int64_t rem = (sl.oh1 - sl.oh0) * sl.lay->Wq - (qt1 - 1) * kQTile;
    if (rem <= 2 * kVec) {
      conv_tiles_pv<kPV>(sl, wstream, ep, ot, qt0, qt1 - 1);
      if (rem <= kVec)
        conv_tiles_pv<1>(sl, wstream, ep, ot, qt1 - 1, qt1);
      else
        conv_tiles_pv<2>(sl, wstream, ep, ot, qt1 - 1, qt1);
      return;
    }
  }
  conv_tiles_pv<kPV>(sl, wstream, ep, ot, qt0, qt1);
}

// Float family: R output channels x 48 pixels, one FMA per (channel, tap, channel r, vector).
// With R == 1 the taps alternate between two accumulator sets: three FMA chains alone would wait
// on the FMA latency.
template <int R>
DSCONV_AVX512 void float_tiles_impl(const Slice& sl, const float* wf, const Epilogue& ep,
                                    int64_t o0, int64_t qt0, int64_t qt1) {
  constexpr int kSets = R == 1 ? 2 : 1;
  const Layout& lay = *sl.lay;
  const int64_t plane = lay.P * lay.Lq, T = lay.ntaps;
  const int64_t* tapoff = lay.tapoff.data();
  for (int64_t qt = qt0; qt < qt1; ++qt) {
    const int64_t q0 = qt * kQTile;
    prefetch_next_outputs(sl, o0, R, q0 + kQTile);  // the stems 8-14% faster
    __m512 acc[kSets][R][kPV];
#pragma GCC unroll 2
    for (int k = 0; k < kSets; ++k)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
        for (int v = 0; v < kPV; ++v) acc[k][r][v] = _mm512_setzero_ps();
    const float* w = wf;
    for (int64_t c = 0; c < lay.g.Cg; ++c) {
      const float* xc = sl.esc + c * plane + q0;
      int64_t t = 0;
      for (; t + kSets <= T; t += kSets) {
#pragma GCC unroll 2
        for (int k = 0; k < kSets; ++k, w += R) {
          const float* x = xc + tapoff[t + k];
          const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + kVec);
          const __m512 x2 = _mm512_loadu_ps(x + 2 * kVec);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m512 wr = _mm512_set1_ps(w[r]);
            acc[k][r][0] = _mm512_fmadd_ps(wr, x0, acc[k][r][0]);
            acc[k][r][1] = _mm512_fmadd_ps(wr, x1, acc[k][r][1]);
            acc[k][r][2] = _mm512_fmadd_ps(wr, x2, acc[k][r][2]);
          }
        }
      }
      for (; t < T; ++t, w += R) {
        const float* x = xc + tapoff[t];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 wr = _mm512_set1_ps(w[r]);
#pragma GCC unroll 3
          for (int v = 0; v < kPV; ++v)
            acc[0][r][v] = _mm512_fmadd_ps(wr, _mm512_loadu_ps(x + v * kVec), acc[0][r][v]);
        }
      }
    }
    int64_t oh = q0 / lay.Wq, ow = q0 - oh * lay.Wq;
    oh += sl.oh0;
    for (int v = 0; v < kPV; ++v) {
      for (int r = 0; r < R && o0 + r < sl.nout; ++r) {
        const int64_t o = o0 + r;
        __m512 a = acc[0][r][v];
        if (kSets == 2) a = _mm512_add_ps(a, acc[kSets - 1][r][v]);
        store_vec(lay, sl.out + o * sl.out_cstride, oh, ow, sl.oh1,
                  epilogue(a, ep.cdsw[o], ep.cb[o], ep.silu));
      }
      ow += kVec;
      while (ow >= lay.Wq) ow -= lay.Wq, ++oh;
    }
  }
}

DSCONV_AVX512 void float_tiles(const Slice& sl, const float* wf, int R, const Epilogue& ep,
                               int64_t o0, int64_t qt0, int64_t qt1) {
  if (R == 1)
    float_tiles_impl<1>(sl, wf, ep, o0, qt0, qt1);
  else
    float_tiles_impl<kFloatOTile>(sl, wf, ep, o0, qt0, qt1);
}

// --- Depthwise path (see dsconv2d_cpu.h) ---------------------------------------------------

// BFP value of 16 one-channel blocks, m = kM bits: E = floor(log2|x|) - (m-2) makes x / 2^E the
// significand times 2^(m-2), so the value is the significand rounded half to even to m - 2
// fraction bits (roundscale's immediate, hence the template), clamped below 2 (the clamp to
// 2^(m-1) - 1), times 2^floor(log2|x|). getmant / getexp see subnormals as they are (scalef
// gives the subnormal value exactly), zero stays zero (scaled by 2^-inf) and NaN stays NaN;
// fixupimm makes Inf, whose significand reads as 1, NaN as the reference's non-finite block.
template <int kM>
DSCONV_AVX512 inline __m512 bfp_single(__m512 x) {
  const __m512 mant = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512 r =
      _mm512_roundscale_ps(mant, ((kM - 2) << 4) | _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const float top = 2.f - 1.f / float(1 << (kM - 2));
  const __m512 c = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-top)), _mm512_set1_ps(top));
  const __m512 v = _mm512_scalef_ps(c, _mm512_getexp_ps(x));
  // Table: tokens 4 (-Inf) and 5 (+Inf) answer 3 (QNaN); every other class keeps v.
  return _mm512_fixupimm_ps(v, x, _mm512_set1_epi32(0x00330000), 0);
}

// Quantises the band of one channel (input plane `xc`) into the phase planes of `buf`, whole
// vectors (Lq has 16 floats of slack for the last row's overrun).
template <int kM>
DSCONV_AVX512 void dw_quantise(const Layout& lay, const float* xc, int64_t oh0, int64_t yend,
                               float* buf) {
  const ConvGeometry& g = lay.g;
  // Stride-1 rows of at least a vector with at most a vector of padding per side.
  const bool plain = g.sw == 1 && g.W >= kVec && g.pw <= kVec;
  for (int64_t ry = 0; ry < g.sh; ++ry) {
    for (int64_t yl = 0; yl < lay.Hqb; ++yl) {
      const int64_t yq = oh0 + yl, h = yq * g.sh + ry - g.ph;
      const bool inside = yq < yend && yq < lay.Hq && in_range(h, g.H);
      for (int64_t rx = 0; rx < g.sw; ++rx) {
        float* dst = buf + (ry * g.sw + rx) * lay.Lq + yl * lay.Wq;
        if (!inside) {
          for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec)
            _mm512_storeu_ps(dst + x0, _mm512_setzero_ps());
          continue;
        }
        const float* row = xc + h * g.W;
        if (plain) {
          // Whole vectors only (masked loads and stores are slow on AMD cores): zeros over the
          // left padding, the row in vectors the last of which overlaps the one before, then
          // zeros over the right padding (and the next row's start, written after this one).
          _mm512_storeu_ps(dst, _mm512_setzero_ps());
          for (int64_t w = 0;; w += kVec) {
            w = std::min(w, g.W - kVec);
            _mm512_storeu_ps(dst + g.pw + w, bfp_single<kM>(_mm512_loadu_ps(row + w)));
            if (w == g.W - kVec) break;
          }
          _mm512_storeu_ps(dst + g.pw + g.W, _mm512_setzero_ps());
          continue;
        }
        for (int64_t x0 = 0; x0 < lay.Wq; x0 += kVec) {
          const int64_t w0 = x0 * g.sw + rx - g.pw;
          const __m512 v = load_lanes(make_loader(row, 0, w0, g.sw, g.W, kVec), 0);
          _mm512_storeu_ps(dst + x0, bfp_single<kM>(v));
        }
      }
    }
  }
}

// Copies band-local q-space rows (`Wq` apart) to the output rows (`Wo` apart) with whole
// vectors, the last one of a row overlapping the one before.
DSCONV_AVX512 void dw_copy_rows(const float* src, int64_t Wq, float* dst, int64_t Wo,
                                int64_t rows) {
  for (int64_t r = 0; r < rows; ++r, src += Wq, dst += Wo) {
    if (Wo < kVec) {
      _mm512_mask_storeu_ps(dst, lane_range(0, Wo), _mm512_loadu_ps(src));
      continue;
    }
    for (int64_t w = 0;; w += kVec) {
      w = std::min(w, Wo - kVec);
      _mm512_storeu_ps(dst + w, _mm512_loadu_ps(src + w));
      if (w == Wo - kVec) break;
    }
  }
}

// One output channel over a band: 4 pixel vectors per tile, the taps alternating between two
// accumulator sets (8 FMA chains: 2 FMA pipes x 4 cycles of latency). kT > 0: the tap count,
// weights held in registers; 0: any count, weights broadcast from memory. The tiles run over
// q-space (across row ends) into the L1 `stage`, and whole rows go out at the end: storing
// q-space vectors straight to the output would split most of them at row ends into masked
// stores.
template <int kT>
DSCONV_AVX512 void dw_tiles(const Layout& lay, const float* buf, const float* w, float cdsw,
                            float cb, bool silu, float* stage, float* out, int64_t oh0,
                            int64_t oh1) {
  constexpr int kV = 4;
  const int64_t T = kT > 0 ? kT : lay.ntaps;
  const int64_t* tapoff = lay.tapoff.data();
  const int64_t qend = (oh1 - oh0) * lay.Wq;
  __m512 wv[kT > 0 ? kT : 1];
  if (kT > 0) {
#pragma GCC unroll 16
    for (int t = 0; t < kT; ++t) wv[t] = _mm512_set1_ps(w[t]);
  }
  for (int64_t q0 = 0; q0 < qend; q0 += kV * kVec) {
    __m512 a[2][kV];
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k)
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) a[k][v] = _mm512_setzero_ps();
    const float* base = buf + q0;
#pragma GCC unroll 16
    for (int64_t t = 0; t < T; ++t) {
      const float* p = base + tapoff[t];
      const __m512 wt = kT > 0 ? wv[kT > 0 ? t : 0] : _mm512_set1_ps(w[t]);
      const int k = t & 1;
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v)
        a[k][v] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p + v * kVec), a[k][v]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v)
      _mm512_store_ps(stage + q0 + v * kVec,
                      epilogue(_mm512_add_ps(a[0][v], a[1][v]), cdsw, cb, silu));
  }
  dw_copy_rows(stage, lay.Wq, out + oh0 * lay.g.Wo, lay.g.Wo, oh1 - oh0);
}

// Stride-1 3x3 convs (the Detect head's), with aligned loads only: in q-space (Wq = Wp apart)
// nearly every tap load straddles two cache lines and costs two, a third of the tiles' time at
// 80x80. Here rows are Wr = Wp rounded up to a vector apart, each computed vector starts on a
// vector boundary, and a row of taps is two aligned loads, the taps at +1 and +2 columns cut
// from them with valignd. Only the ceil(Wo / 16) vectors of a row that hold outputs are
// computed.
template <int kM>
DSCONV_AVX512 void dw_s1_quantise(const Layout& lay, const DwS1& s, const float* xc, int64_t oh0,
                                  int64_t rows, float* buf) {
  const ConvGeometry& g = lay.g;
  const bool plain = g.W >= kVec && g.pw <= kVec;
  for (int64_t y = 0; y < rows; ++y) {
    float* dst = buf + y * s.Wr;
    const int64_t h = oh0 + y - g.ph;
    if (!in_range(h, g.H)) {
      for (int64_t x0 = 0; x0 < s.Wr; x0 += kVec) _mm512_store_ps(dst + x0, _mm512_setzero_ps());
      continue;
    }
    const float* row = xc + h * g.W;
    if (plain) {  // as in dw_quantise, then zeros to the row's end
      _mm512_store_ps(dst, _mm512_setzero_ps());
      for (int64_t w = 0;; w += kVec) {
        w = std::min(w, g.W - kVec);
        _mm512_storeu_ps(dst + g.pw + w, bfp_single<kM>(_mm512_loadu_ps(row + w)));
        if (w == g.W - kVec) break;
      }
      for (int64_t x0 = g.pw + g.W; x0 < s.Wr; x0 += kVec)
        _mm512_storeu_ps(dst + x0, _mm512_setzero_ps());
      continue;
    }
    for (int64_t x0 = 0; x0 < s.Wr; x0 += kVec) {
      const __m512 v = load_lanes(make_loader(row, 0, x0 - g.pw, 1, g.W, kVec), 0);
      _mm512_store_ps(dst + x0, bfp_single<kM>(v));
    }
  }
}

DSCONV_AVX512 void dw_s1_tiles(const Layout& lay, const DwS1& s, const float* buf, const float* w,
                               float cdsw, float cb, bool silu, float* stage, float* out,
                               int64_t oh0, int64_t oh1) {
  constexpr int kV = 4;
  const ConvGeometry& g = lay.g;
  __m512 wv[9];
  for (int t = 0; t < 9; ++t) wv[t] = _mm512_set1_ps(w[t]);
  const int64_t rstep = g.dh * s.Wr;
  const int64_t nv = (g.Wo + kVec - 1) / kVec, total = (oh1 - oh0) * nv;
  // Rows of whole vectors go straight to the output; others through the stage (a row's last
  // vector would spill into the next row, which may be another thread's band).
  const bool direct = g.Wo % kVec == 0;
  float* const dst = direct ? out + oh0 * g.Wo : stage;
  const int64_t dpitch = direct ? g.Wo : s.Wr;
  int64_t row = 0, vec = 0;  // of the tile's next vector
  for (int64_t k = 0; k < total; k += kV) {
    int64_t pos[kV], dpos[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      pos[v] = row * s.Wr + vec * kVec;
      dpos[v] = row * dpitch + vec * kVec;
      if (k + v + 1 < total && ++vec == nv) vec = 0, ++row;  // past the end: repeat the last
    }
    __m512 a[2][kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) a[0][v] = a[1][v] = _mm512_setzero_ps();
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      const float* p = buf + i * rstep;
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        const __m512 lo = _mm512_load_ps(p + pos[v]), hi = _mm512_load_ps(p + pos[v] + kVec);
        const __m512 x1 = _mm512_castsi512_ps(
            _mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), 1));
        const __m512 x2 = _mm512_castsi512_ps(
            _mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), 2));
        a[i & 1][v] = _mm512_fmadd_ps(wv[3 * i], lo, a[i & 1][v]);
        a[(i + 1) & 1][v] = _mm512_fmadd_ps(wv[3 * i + 1], x1, a[(i + 1) & 1][v]);
        a[i & 1][v] = _mm512_fmadd_ps(wv[3 * i + 2], x2, a[i & 1][v]);
      }
    }
    if (direct) {
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(dst + dpos[v] + kDwPrefetchOutFloats),
                     _MM_HINT_ET0);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v)
      _mm512_storeu_ps(dst + dpos[v], epilogue(_mm512_add_ps(a[0][v], a[1][v]), cdsw, cb, silu));
  }
  if (!direct) dw_copy_rows(stage, s.Wr, out + oh0 * g.Wo, g.Wo, oh1 - oh0);
}

template <int kM>
DSCONV_AVX512 void depthwise_m(const DwArgs& d, float* buf, int64_t t0, int64_t t1) {
  const Layout& lay = *d.lay;
  const ConvGeometry& g = lay.g;
  const int64_t far_rows = (g.kh - 1) * g.dh / g.sh;
  const bool s1 = lay.P == 1 && g.kh == 3 && g.kw == 3 && g.dw == 1;
  const DwS1 s = dw_s1_layout(lay);
  float* stage = buf + dw_stage_offset(lay);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t band = t % lay.nbands, nc = t / lay.nbands;
    const int64_t n = nc / g.C, c = nc % g.C;
    const int64_t oh0 = band * lay.band_rows, oh1 = std::min(g.Ho, oh0 + lay.band_rows);
    const float* xc = d.x + nc * g.H * g.W;
    if (s1)
      dw_s1_quantise<kM>(lay, s, xc, oh0, oh1 - oh0 + far_rows, buf);
    else
      dw_quantise<kM>(lay, xc, oh0, oh1 + far_rows, buf);
    for (int64_t r = 0; r < g.Og; ++r) {
      const int64_t o = c * g.Og + r;
      const float* w = d.wf + o * lay.ntaps;
      const float cdsw = d.cdsw[c * d.epi_stride + r], cb = d.cb[c * d.epi_stride + r];
      float* out = d.y + n * d.y_nstride + o * d.y_cstride;
      if (s1)
        dw_s1_tiles(lay, s, buf, w, cdsw, cb, d.silu, stage, out, oh0, oh1);
      else if (lay.ntaps == 9)
        dw_tiles<9>(lay, buf, w, cdsw, cb, d.silu, stage, out, oh0, oh1);
      else
        dw_tiles<0>(lay, buf, w, cdsw, cb, d.silu, stage, out, oh0, oh1);
    }
  }
}

DSCONV_AVX512 void depthwise(const DwArgs& d, float* buf, int64_t t0, int64_t t1) {
  switch (d.mant_bits) {
    case 2:
      return depthwise_m<2>(d, buf, t0, t1);
    case 3:
      return depthwise_m<3>(d, buf, t0, t1);
    case 4:
      return depthwise_m<4>(d, buf, t0, t1);
    case 5:
      return depthwise_m<5>(d, buf, t0, t1);
    case 6:
      return depthwise_m<6>(d, buf, t0, t1);
    case 7:
      return depthwise_m<7>(d, buf, t0, t1);
    default:
      return depthwise_m<8>(d, buf, t0, t1);
  }
}

// --- DFL box decoder ---

// One box side, 16 anchors per vector: a max pass, then exp(x - max) summed plain and weighted.
// Lanes with a NaN or +inf bin, or with every bin -inf, give NaN as softmax does (exp_ps clamps
// its argument, so those are flagged instead of computed).
DSCONV_AVX512 void dfl_side(const float* x, int64_t A, int64_t c1, const float* w, float* y,
                            int64_t a0, int64_t a1) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t a = a0; a < a1; a += kVec) {
    const __mmask16 lanes = lane_range(0, a1 - a);
    __m512 mx = _mm512_sub_ps(_mm512_setzero_ps(), inf);
    __mmask16 bad = 0;
    for (int64_t i = 0; i < c1; ++i) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i * A + a);
      bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, inf, _CMP_EQ_OQ);
      mx = _mm512_max_ps(mx, v);
    }
    bad |= _mm512_cmp_ps_mask(mx, _mm512_sub_ps(_mm512_setzero_ps(), inf), _CMP_EQ_OQ);
    __m512 sum = _mm512_setzero_ps(), wsum = _mm512_setzero_ps();
    for (int64_t i = 0; i < c1; ++i) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i * A + a), mx));
      sum = _mm512_add_ps(sum, e);
      wsum = _mm512_fmadd_ps(e, _mm512_set1_ps(w[i]), wsum);
    }
    const __m512 r = _mm512_div_ps(wsum, sum);
    _mm512_mask_storeu_ps(y + a, lanes, _mm512_mask_mov_ps(r, bad, _mm512_set1_ps(NAN)));
  }
}

// --- Float stem convolution (see StemArgs) ---

// The inputs at columns s0 + SW * i of `row`, i = 0..15, zero outside [0, W). Masked-off lanes
// are not read, so s0 may point before the row or the load run past its end.
// Interior: every column read lies inside the row (no masks to build).
template <int SW, bool Interior>
DSCONV_AVX512 inline __m512 stem_columns(const float* row, int64_t s0, int64_t W) {
  const __m512 lo = Interior ? _mm512_loadu_ps(row + s0)
                             : _mm512_maskz_loadu_ps(lane_range(-s0, W - s0), row + s0);
  if (SW == 1) return lo;
  const __m512 hi =
      Interior ? _mm512_loadu_ps(row + s0 + kVec)
               : _mm512_maskz_loadu_ps(lane_range(-s0 - kVec, W - s0 - kVec), row + s0 + kVec);
  return _mm512_permutex2var_ps(lo, avx512::even_lanes(), hi);
}

// acc[o] += the tile's inputs times the weights of output channel o, over every input channel
// and kernel tap that lands inside the image: per (channel, kernel row, kernel column) one vector
// of inputs and 16 FMAs with broadcast weights.
template <int SW, bool Interior>
DSCONV_AVX512 inline void stem_accumulate(const StemArgs& a, const float* xn, const float* wt,
                                          int64_t oy, int64_t ox0, __m512 (&acc)[kVec]) {
  const int64_t plane = a.H * a.W;
  for (int64_t c = 0; c < a.C; ++c) {
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t iy = oy * a.sh + ky - a.ph;
      if (iy < 0 || iy >= a.H) continue;  // zero padding: nothing to add
      const float* row = xn + c * plane + iy * a.W;
      const float* w = wt + (c * a.kh + ky) * a.kw * kVec;
      for (int64_t kx = 0; kx < a.kw; ++kx, w += kVec) {
        const __m512 v = stem_columns<SW, Interior>(row, ox0 * SW + kx - a.pw, a.W);
#pragma GCC unroll 16
        for (int o = 0; o < kVec; ++o) acc[o] = _mm512_fmadd_ps(_mm512_set1_ps(w[o]), v, acc[o]);
      }
    }
  }
}

// 16 output channels x 16 output pixels in 16 accumulators.
template <int SW>
DSCONV_AVX512 void stem_rows_impl(const StemArgs& a, int64_t n, int64_t ot, int64_t oy0,
                                  int64_t oy1) {
  constexpr int T = kVec;
  const int64_t oplane = a.Ho * a.Wo;
  const float* xn = a.x + n * a.C * a.H * a.W;
  const float* wt = a.w + ot * a.C * a.kh * a.kw * T;
  const float* bt = a.bias + ot * T;
  const int64_t nout = std::min<int64_t>(T, a.O - ot * T);
  float* yt = a.y + (n * a.O + ot * T) * oplane;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox0 = 0; ox0 < a.Wo; ox0 += kVec) {
      __m512 acc[T];
#pragma GCC unroll 16
      for (int o = 0; o < T; ++o) acc[o] = _mm512_set1_ps(bt[o]);
      // The columns the loads touch: [ox0 SW - pw, ox0 SW - pw + kw - 1 + 16 SW).
      const int64_t first = ox0 * SW - a.pw;
      if (first >= 0 && first + a.kw - 1 + kVec * SW <= a.W)
        stem_accumulate<SW, true>(a, xn, wt, oy, ox0, acc);
      else
        stem_accumulate<SW, false>(a, xn, wt, oy, ox0, acc);
      const int64_t nl = std::min<int64_t>(kVec, a.Wo - ox0);
      float* y = yt + oy * a.Wo + ox0;
#pragma GCC unroll 16
      for (int o = 0; o < T; ++o) {
        if (o >= nout) break;
        const __m512 r = a.silu ? avx512::silu_ps(acc[o]) : acc[o];
        if (nl == kVec)  // whole-vector stores: masked ones are slow on AMD cores
          _mm512_storeu_ps(y + o * oplane, r);
        else
          _mm512_mask_storeu_ps(y + o * oplane, lane_range(0, nl), r);
      }
    }
  }
}

DSCONV_AVX512 void stem_rows(const StemArgs& a, int64_t n, int64_t ot0, int64_t ot1, int64_t oy0,
                             int64_t oy1) {
  for (int64_t ot = ot0; ot < ot1; ++ot) {
    if (a.sw == 1)
      stem_rows_impl<1>(a, n, ot, oy0, oy1);
    else
      stem_rows_impl<2>(a, n, ot, oy0, oy1);
  }
}

}  // namespace

DSCONV_AVX512 void pack_row_avx512_signed_bytes(const PackRow& r) { pack_row_impl<true>(r); }

const IsaKernels& kernels_avx512() {
  static const IsaKernels k = [] {
    IsaKernels t{kQTile,      /*weight_elem_bytes=*/1,
                 &pack_row,   &pack_row_float,
                 &conv_tiles, &float_tiles,
                 &depthwise,  /*dw_qtile=*/64,
                 &dfl_side,   /*esc_shift=*/true};
    t.stem_rows = &stem_rows;
    t.stem_otile = kVec;
    return t;
  }();
  return k;
}

}  // namespace cpu
}  // namespace dsconv_ext

#else  // not x86-64: select_isa() never picks this path (see kernels_not_built in dsconv2d_cpu.h)

namespace dsconv_ext {
namespace cpu {
const IsaKernels& kernels_avx512() { return kernels_not_built("avx512_vnni", "x86-64"); }
}  // namespace cpu
}  // namespace dsconv_ext

#endif
