// AMX-INT8 path for the int8 family (dsconv2d_cpu.h): the AVX-512 path with its int8
// microkernel replaced by one on AMX tiles. Packing (with signed mantissa bytes), the float
// family, depthwise and DFL stay the AVX-512 ones.
//
// The packed activations are what TDPBSSD takes as B: per block and k4 group one dword of 4
// signed mantissa bytes per pixel q, consecutive q consecutive, so B row k = k4 group k of 16
// pixels, 64 bytes, the rows one k4 plane apart. A = 16 output channels x 4 * kc signed weight
// bytes (AmxSegHeader streams), C = [16 outputs][16 pixels] int32: one (block, tap) segment's
// exact integer sums. DSConv's per-segment fold acc += alpha * 2^E * S (+ KDSb * usum) cannot be
// deferred, so every segment's C tile goes through memory into AVX-512 registers. The fold is
// the AVX-512 kernel's, instruction for instruction and in the same (block, tap) order, so the
// two paths give bit-identical outputs.
//
// Blocking: one 16 x 16 C tile per microtile, its 16 float accumulators (one zmm per output
// channel) held in registers across all segments; two tile sets (C, A, B) alternate between
// segments. What bounds it (an AMX Xeon, 2026-12-06, microbenchmarks in TSC cycles per
// segment): the C tile store (~13) holds the vector ports, so it does not overlap the fold
// (~28 for 16 rows of load, convert, exponent add and FMA); tile loads use the load ports at
// about two rows a cycle. A segment costs ~44 when everything is in L1, against ~13 for its
// TDPBSSD: the fold, not the tile unit, sets the pace, and deeper segments (more input channels
// per block and tap) are what make AMX pay (amx_pays_off in dsconv2d_cpu.cpp).
//
// Templated over the tile layer (amx_tiles.h): AmxHw runs the instructions, AmxModel a software
// model of them on any AVX-512 machine (DSCONV_EXT_CPU_ISA=amx_model).
#include "cpu/dsconv2d_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/avx512_common.h"

namespace dsconv_ext {
namespace cpu {
namespace {

using avx512::bit_pattern;
using avx512::epilogue_tile;
using avx512::kVec;
using avx512::store_vec;

static_assert(kAmxTile == kVec, "a C tile row is one zmm of pixels");

// Two tile sets: segment s uses set s % 2.
constexpr int kC0 = 0, kC1 = 1, kA0 = 2, kA1 = 3, kB0 = 4, kB1 = 5;
// C buffers in flight: segment s is stored at step s + 1 and folded at step s + 2 (microtile).
constexpr int64_t kCstRing = 4;

TileConfig band_config(const AmxK& k) {
  TileConfig c{};
  c.palette_id = 1;
  for (int t : {kC0, kC1}) c.rows[t] = kAmxTile, c.colsb[t] = kAmxTile * 4;
  for (int t : {kA0, kA1}) c.rows[t] = kAmxTile, c.colsb[t] = uint16_t(4 * k.kc);
  for (int t : {kB0, kB1}) c.rows[t] = uint8_t(k.kc), c.colsb[t] = kAmxTile * 4;
  return c;
}

// Per-call constants of a band.
struct Band {
  const uint8_t* act;  // packed activations, bytes
  const float* esc;
  const float* usum;
  int64_t K4, nseg;
  int64_t kplane_b;  // bytes from one k4 plane to the next: B's row stride
  AmxK k;
  int64_t seg_b;
  // Per segment s = (block, tap): its first B row, in bytes from `act`, and its esc / usum
  // offset, both at q = 0 (a table: no division by ntaps in the segment loop).
  const int64_t* act_off;
  const int64_t* esc_off;
};

// Segment s (block s / ntaps, tap s % ntaps) of the microtile at pixel q0 into tile set (C, A,
// B): its exact integer sums in C.
template <class T, int C, int A, int B>
DSCONV_AVX512 inline void issue(const Band& d, const uint8_t* ws, int64_t s, int64_t q0) {
  const uint8_t* a = ws + s * d.seg_b + sizeof(AmxSegHeader);
  const uint8_t* act = d.act + d.act_off[s] + q0 * 4;
  T::template zero<C>();
  for (int64_t j = 0; j < d.k.nchunk; ++j) {
    T::template load<A>(a + j * d.k.a_bytes(), 4 * d.k.kc);
    T::template load<B>(act + d.k.start(d.K4, j) * d.kplane_b, d.kplane_b);
    T::template dp<DpSign::kSS, C, A, B>();
  }
}

// The single-chunk case (K4 <= 16) split in two, so that a segment's loads go out a step before
// its TDP.
template <class T, int A, int B>
DSCONV_AVX512 inline void load_ab(const Band& d, const uint8_t* ws, int64_t s, int64_t q0) {
  T::template load<A>(ws + s * d.seg_b + sizeof(AmxSegHeader), 4 * d.k.kc);
  T::template load<B>(d.act + d.act_off[s] + q0 * 4, d.kplane_b);
}

// acc += alpha * 2^E * S (+ KDSb * usum) for segment s, from its stored C tile: the
// AVX-512 kernel's fold (conv_tiles_impl there), with C row r as output channel r's 16 pixels.
template <bool kKdsb, bool kExponentAdd>
DSCONV_AVX512 inline void fold(const Band& d, const uint8_t* ws, int64_t s, int64_t q0,
                               const int32_t* cst, __m512 (&f)[kAmxTile]) {
  const AmxSegHeader* h = reinterpret_cast<const AmxSegHeader*>(ws + s * d.seg_b);
  const int64_t e_off = d.esc_off[s] + q0;
  const __m512i es = _mm512_loadu_si512(d.esc + e_off);
  if (kExponentAdd) {
#pragma GCC unroll 16
    for (int r = 0; r < kAmxTile; ++r) {
      const __m512i sum = _mm512_load_si512(cst + r * kAmxTile);
      const __m512 a2e =
          _mm512_castsi512_ps(_mm512_add_epi32(_mm512_set1_epi32(bit_pattern(h->alpha[r])), es));
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), a2e, f[r]);
    }
  } else {
    const __mmask16 bad = _mm512_cmpeq_epi32_mask(es, _mm512_set1_epi32(kEscNonFinite));
    const __m512 ev =
        _mm512_mask_mov_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(es, 23)), bad, _mm512_set1_ps(NAN));
#pragma GCC unroll 16
    for (int r = 0; r < kAmxTile; ++r) {
      const __m512i sum = _mm512_load_si512(cst + r * kAmxTile);
      const __m512 sc = _mm512_scalef_ps(_mm512_cvtepi32_ps(sum), ev);
      f[r] = _mm512_fmadd_ps(sc, _mm512_set1_ps(h->alpha[r]), f[r]);
    }
  }
  if (kKdsb) {
    const __m512 u = _mm512_loadu_ps(d.usum + e_off);
#pragma GCC unroll 16
    for (int r = 0; r < kAmxTile; ++r) f[r] = _mm512_fmadd_ps(_mm512_set1_ps(h->kdsb[r]), u, f[r]);
  }
}

// Fetches for writing the 16 output lines of the microtile (o0, q) that runs next, as the
// AVX-512 kernel does for its next tile (prefetch_next_outputs there: without it every store of
// a layer whose output is not cached waits for the line's read for ownership).
DSCONV_AVX512 inline void prefetch_outputs(const Slice& sl, int64_t o0, int64_t q) {
  const Layout& lay = *sl.lay;
  const int64_t oh = q / lay.Wq + sl.oh0, ow = q % lay.Wq;
  if (oh >= sl.oh1) return;
  for (int64_t o = o0; o < std::min(o0 + kAmxTile, sl.nout); ++o) {
    const char* p = reinterpret_cast<const char*>(sl.out + o * sl.out_cstride + oh * lay.g.Wo + ow);
    _mm_prefetch(p, _MM_HINT_ET0);
    _mm_prefetch(p + kAmxTile * 4 - 1, _MM_HINT_ET0);
  }
}

// One 16 x 16 microtile: every segment of o-tile `ot` at q tile `qt`, then the epilogue and the
// stores. `cst` is a ring of kCstRing C buffers.
template <class T, bool kKdsb, bool kExponentAdd>
DSCONV_AVX512 inline void microtile(const Slice& sl, const Band& d, const uint8_t* ws,
                                    const Epilogue& ep, int64_t qt, int64_t ot,
                                    int32_t (*cst)[kAmxTile * kAmxTile]) {
  const Layout& lay = *sl.lay;
  const int64_t q0 = qt * kAmxTile;
  const int64_t oh = q0 / lay.Wq + sl.oh0, ow = q0 % lay.Wq;
  __m512 f[kAmxTile];
#pragma GCC unroll 16
  for (int r = 0; r < kAmxTile; ++r) f[r] = _mm512_setzero_ps();
  // Step s stores segment s - 1's C tile, zeroes segment s + 1's, runs segment s's TDP on the
  // A and B loaded a step earlier, loads segment s + 1's, and folds segment s - 2: a tile store
  // waits for its TDP and holds the vector ports meanwhile, so it comes a fold after the TDP, and
  // a TDP waits for its loads (the weights come from L2), so they go out a fold before it (10-13%
  // faster than loading right before the TDP on 64-256 channel 3x3 layers). The fold reads a
  // C tile stored a step earlier, so its loads do not wait on the store just issued.
  // Blocks of > 64 channels (several A / B chunks per segment) load each chunk with its TDP.
  const bool one_chunk = d.k.nchunk == 1;
  if (one_chunk) {
    T::template zero<kC0>();
    load_ab<T, kA0, kB0>(d, ws, 0, q0);
  }
  for (int64_t s = 0; s < d.nseg + 2; ++s) {
    if (s >= 1 && s <= d.nseg) {
      if ((s - 1) & 1)
        T::template store<kC1>(cst[(s - 1) % kCstRing], kAmxTile * 4);
      else
        T::template store<kC0>(cst[(s - 1) % kCstRing], kAmxTile * 4);
    }
    if (one_chunk) {
      if (s + 1 < d.nseg) {
        if ((s + 1) & 1)
          T::template zero<kC1>();
        else
          T::template zero<kC0>();
      }
      if (s < d.nseg) {
        if (s & 1)
          T::template dp<DpSign::kSS, kC1, kA1, kB1>();
        else
          T::template dp<DpSign::kSS, kC0, kA0, kB0>();
      }
      if (s + 1 < d.nseg) {
        if ((s + 1) & 1)
          load_ab<T, kA1, kB1>(d, ws, s + 1, q0);
        else
          load_ab<T, kA0, kB0>(d, ws, s + 1, q0);
      }
    } else if (s < d.nseg) {
      if (s & 1)
        issue<T, kC1, kA1, kB1>(d, ws, s, q0);
      else
        issue<T, kC0, kA0, kB0>(d, ws, s, q0);
    }
    if (s >= 2) fold<kKdsb, kExponentAdd>(d, ws, s - 2, q0, cst[(s - 2) % kCstRing], f);
  }
  // Rows past the layer's output channels are zero-weight padding: folded, never stored.
  const int64_t o0 = ot * kAmxTile, nr = std::min<int64_t>(kAmxTile, sl.nout - o0);
  // A copy goes to the epilogue (not inlined): passing f itself took its address, and GCC then
  // kept the accumulators in memory through the segment loop.
  __m512 out[kAmxTile];
#pragma GCC unroll 16
  for (int r = 0; r < kAmxTile; ++r) out[r] = f[r];
  epilogue_tile<kAmxTile, 1>(out, ep, o0);
#pragma GCC unroll 16
  for (int r = 0; r < kAmxTile; ++r) {
    if (r >= nr) break;
    store_vec(lay, sl.out + (o0 + r) * sl.out_cstride, oh, ow, sl.oh1, out[r]);
  }
}

// The microtiles of o-tiles [ot0, ot1) over every q tile of the band, in the order that streams
// fewer bytes from L2: q tiles outermost re-reads every o-tile's weights once per q tile,
// o-tiles outermost re-reads the band's activations once per o-tile (whichever set is reused
// then stays in L1). On an AMX Xeon, 64 -> 64 3x3 at 80x80 (weights 46 KB, activations 52 KB
// per band) ran 12% faster o-tiles outermost; 256 -> 256 1x1 at 20x20, where both orders stream
// about as much, 4% slower.
template <class T, bool kKdsb, bool kExponentAdd>
DSCONV_AVX512 void band_impl(const Slice& sl, const uint8_t* ws0, int64_t stream_bytes,
                             const Epilogue& ep, int64_t ot0, int64_t ot1) {
  if (ot0 >= ot1 || sl.nqt <= 0) return;
  const Layout& lay = *sl.lay;
  const int64_t nseg = lay.g.nblk * lay.ntaps, kplane_b = lay.P * lay.Lq * 4;
  static thread_local std::vector<int64_t> offsets;
  offsets.resize(size_t(2 * nseg));
  for (int64_t b = 0; b < lay.g.nblk; ++b) {
    for (int64_t t = 0; t < lay.ntaps; ++t) {
      offsets[b * lay.ntaps + t] = b * lay.K4 * kplane_b + lay.tapoff[t] * 4;
      offsets[nseg + b * lay.ntaps + t] = b * lay.P * lay.Lq + lay.tapoff[t];
    }
  }
  const AmxK k(lay.K4);
  const Band d{reinterpret_cast<const uint8_t*>(sl.act),
               sl.esc,
               sl.usum,
               lay.K4,
               nseg,
               kplane_b,
               k,
               k.seg_bytes(),
               offsets.data(),
               offsets.data() + nseg};
  T::config(band_config(d.k));
  alignas(64) int32_t cst[kCstRing][kAmxTile * kAmxTile];
  const int64_t not_ = ot1 - ot0;
  const int64_t act_bytes = lay.g.nblk * lay.K4 * kplane_b;
  const bool o_outer = not_ * act_bytes < sl.nqt * not_ * stream_bytes;
  if (o_outer) {
    for (int64_t ot = ot0; ot < ot1; ++ot) {
      for (int64_t qt = 0; qt < sl.nqt; ++qt) {
        prefetch_outputs(sl, ot * kAmxTile, (qt + 1) * kAmxTile);
        microtile<T, kKdsb, kExponentAdd>(sl, d, ws0 + ot * stream_bytes, ep, qt, ot, cst);
      }
    }
  } else {
    for (int64_t qt = 0; qt < sl.nqt; ++qt) {
      for (int64_t ot = ot0; ot < ot1; ++ot) {
        if (ot + 1 < ot1)
          prefetch_outputs(sl, (ot + 1) * kAmxTile, qt * kAmxTile);
        else
          prefetch_outputs(sl, ot0 * kAmxTile, (qt + 1) * kAmxTile);
        microtile<T, kKdsb, kExponentAdd>(sl, d, ws0 + ot * stream_bytes, ep, qt, ot, cst);
      }
    }
  }
  // Back to the init state: a context switch then saves no tile data.
  T::release();
}

template <class T>
DSCONV_AVX512 void conv_band(const Slice& sl, const uint8_t* ws0, int64_t stream_bytes,
                             const Epilogue& ep, int64_t ot0, int64_t ot1) {
  if (sl.usum) {
    if (sl.exponent_add)
      band_impl<T, true, true>(sl, ws0, stream_bytes, ep, ot0, ot1);
    else
      band_impl<T, true, false>(sl, ws0, stream_bytes, ep, ot0, ot1);
  } else {
    if (sl.exponent_add)
      band_impl<T, false, true>(sl, ws0, stream_bytes, ep, ot0, ot1);
    else
      band_impl<T, false, false>(sl, ws0, stream_bytes, ep, ot0, ot1);
  }
}

IsaKernels amx_kernels(decltype(IsaKernels::conv_band) band) {
  IsaKernels k = kernels_avx512();
  k.float_qtile = k.qtile;  // the AVX-512 float_tiles keep their 48-pixel tiles
  k.qtile = kAmxTile;
  k.otile = kAmxTile;
  k.amx_weights = true;
  k.pack_row = &pack_row_avx512_signed_bytes;
  k.conv_tiles = nullptr;  // conv_band takes every int8 call
  k.conv_band = band;
  return k;
}

}  // namespace

bool amx_usable(const char** why) {
#if DSCONV_HAVE_AMX_HW && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) {
    *why = "the CPU has no CPUID leaf 7";
    return false;
  }
  __cpuid_count(7, 0, a, b, c, d);
  if (!(d & (1u << 24)) || !(d & (1u << 25))) {
    *why = "the CPU has no AMX-TILE / AMX-INT8 (CPUID.(EAX=7,ECX=0):EDX bits 24, 25)";
    return false;
  }
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) {
    *why = "the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE)";
    return false;
  }
  uint32_t xcr0_lo, xcr0_hi;
  asm volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) {
    *why = "the OS has not enabled the tile state in XCR0 (bits 17 XTILECFG, 18 XTILEDATA)";
    return false;
  }
  // Linux >= 5.16 keeps XTILEDATA off for a process until it asks (Documentation/arch/x86/
  // xstate.rst); the grant covers every thread of the process.
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    *why = "Linux refused arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)";
    return false;
  }
  unsigned long perm = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0 ||
      !(perm & (1ul << kXfeatureXtiledata))) {
    *why = "arch_prctl(ARCH_GET_XCOMP_PERM) does not show XTILEDATA granted";
    return false;
  }
  return true;
#else
  *why = "the AMX path is built for x86-64 Linux only";
  return false;
#endif
}

const IsaKernels& kernels_amx() {
#if DSCONV_HAVE_AMX_HW
  static const IsaKernels k = amx_kernels(&conv_band<AmxHw>);
#else
  static const IsaKernels k = amx_kernels(nullptr);
#endif
  return k;
}

const IsaKernels& kernels_amx_model() {
  static const IsaKernels k = amx_kernels(&conv_band<AmxModel>);
  return k;
}

}  // namespace cpu
}  // namespace dsconv_ext

#else  // not x86-64: select_isa() never picks these paths (see kernels_not_built in dsconv2d_cpu.h)

namespace dsconv_ext {
namespace cpu {
bool amx_usable(const char** why) {
  *why = "the AMX path is built for x86-64 Linux only";
  return false;
}
const IsaKernels& kernels_amx() { return kernels_not_built("amx", "x86-64"); }
const IsaKernels& kernels_amx_model() { return kernels_not_built("amx_model", "x86-64"); }
}  // namespace cpu
}  // namespace dsconv_ext

#endif
