// Data layouts, tiling and per-thread work of the DSConv CUDA kernels, written once as
// __host__ __device__ code.
//
// The CUDA kernels (csrc/cuda/dsconv2d_cuda.cu) are thin shells around the functions below, and
// the host emulator (csrc/dsconv2d_tiling_check.cpp, op dsconv_ext::cuda_tiling_selftest) runs the
// very same functions for every thread of every CTA on the CPU, phase by phase. So the CPU test
// suite exercises all index arithmetic of the CUDA path: the packed layouts, padding, tap and block
// walk, the shared-memory tile copies, the tensor-core fragment addresses, the fold of each exact
// integer block sum into float and the epilogue. What the emulator cannot check is the hardware
// itself (cp.async, mma.sync, __dp4a): those are modelled from the PTX ISA description.
//
// Operands (all int8 buffers are zero-padded so that partial blocks stay exact):
//   xq  [N, H, W, G*nblk, KB] int8   BFP mantissas, each block padded to KB channels
//   xs  [N, H, W, G*nblk] float      2^E per block (NaN for a non-finite block)
//   xm  [N, H, W, G*nblk] int32      sum of the block's mantissas (only with KDSb)
//   wp  [O, T, nblk, KB] int8        VQK, K-contiguous per output channel (segment s = t*nblk+b)
//   ap  [G, T*nblk, Og] float        alpha per (group, segment, output channel); kp: KDSb alike
#pragma once

#include <cstdint>
#include <cstring>

#include "dsconv2d_geometry.h"

// `#pragma unroll` in device code only (the host compiler would warn about an unknown pragma).
#if defined(__CUDA_ARCH__)
#define DSCONV_UNROLL _Pragma("unroll")
#else
#define DSCONV_UNROLL
#endif

namespace dsconv_ext {
namespace tiling {

// ---------------------------------------------------------------------------------------------
// Primitives: the device versions use the hardware, the host versions say what it does.

DSCONV_HD uint32_t load_u32(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}

DSCONV_HD void store_u32(void* p, uint32_t v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint32_t*>(p) = v;
#else
  std::memcpy(p, &v, 4);
#endif
}

// 16 bytes at a 16-byte aligned address.
DSCONV_HD void store_u32x4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(a, b, c, d);
#else
  const uint32_t v[4] = {a, b, c, d};
  std::memcpy(p, v, 16);
#endif
}

DSCONV_HD float bits_to_float(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(v);
#else
  float f;
  std::memcpy(&f, &v, 4);
  return f;
#endif
}

DSCONV_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t v;
  std::memcpy(&v, &f, 4);
  return v;
#endif
}

// By the bits, so that no fast-math setting can fold it away.
DSCONV_HD bool is_finite_bits(float f) { return (float_to_bits(f) & 0x7f800000u) != 0x7f800000u; }

// c + the dot product of the four signed bytes of a and b.
DSCONV_HD int32_t dp4a(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i) {
    c += static_cast<int32_t>(static_cast<int8_t>(a >> (8 * i))) *
         static_cast<int32_t>(static_cast<int8_t>(b >> (8 * i)));
  }
  return c;
#endif
}

// Integer block sums start at the bits of 1.5 * 2^23: while |S| < 2^22 the int32 result read as a
// float is exactly 1.5 * 2^23 + S, so the conversion to float is one exact subtraction instead of
// an I2F (a quarter-rate instruction). |S| <= KB * 128 * 127 < 2^22 for KB <= 256; wider blocks
// start from 0 and convert with a cast (also exact: |S| < 2^24).
constexpr int32_t kSumBiasBits = 0x4B400000;
constexpr float kSumBiasValue = 12582912.0f;
constexpr int64_t kMaxBiasedKB = 256;

DSCONV_HD int32_t segment_sum_init(bool biased) { return biased ? kSumBiasBits : 0; }
DSCONV_HD float segment_sum_value(int32_t acc, bool biased) {
  return biased ? bits_to_float(static_cast<uint32_t>(acc)) - kSumBiasValue
                : static_cast<float>(acc);
}

// acc += 2^E * (alpha * S + KDSb * M) for one (block, tap) segment: S is the exact integer block
// sum, M the block's plain mantissa sum; scale = 2^E (NaN for a non-finite block, so it
// propagates even when S == 0).
DSCONV_HD float fold_segment(float acc, float sum, float alpha, float scale, bool has_kds,
                             float kds, float msum) {
  float v = alpha * sum;
  if (has_kds) v = fmaf(kds, msum, v);
  return fmaf(v, scale, acc);
}

// ---------------------------------------------------------------------------------------------
// Block exponents on the GPU.
//
// The CUDA build keeps subnormals (nvcc --use_fast_math --ftz=false, setup.py). With
// flush-to-zero a subnormal |x| reads as 0 in the block maximum (the block quantised to zeros),
// 2^E below 2^-126 and any alpha or fold product below FLT_MIN became 0: every block whose
// maximum lies below 2^(m-128) (7.5e-37 at m = 8) dropped out of the output, and outputs below
// FLT_MIN were 0. With subnormals kept, the remaining difference was 2^E itself, which has no
// float32 below 2^-149, while E reaches -155 for a subnormal block. Such a block (max |x| below
// 2^(m-150)) holds multiples of 2^-149 whose mantissas x / 2^E are exact integers, so it is
// stored with E = -149 instead: mantissas x / 2^-149, also exact integers of no larger
// magnitude, and mantissa * 2^E is the same x, as in the reference. Every scale 2^E is then a
// float32 (subnormal below 2^-126), built from its bits.

// Smallest exponent the CUDA quantiser stores (2^-149 is the smallest subnormal float32).
constexpr int32_t kMinScaleExponent = -149;

// floor(log2 a) for a finite float a > 0, subnormals included, from the bits alone.
DSCONV_HD int32_t floor_log2_bits(float a) {
  const uint32_t bits = float_to_bits(a);
  const int32_t biased = static_cast<int32_t>((bits >> 23) & 0xffu);
  if (biased != 0) return biased - 127;
  // A subnormal is frac * 2^-149; frac < 2^23 converts to float exactly, and normal.
  const uint32_t frac = bits & 0x7fffffu;
  return static_cast<int32_t>((float_to_bits(static_cast<float>(frac)) >> 23) & 0xffu) - 127 - 149;
}

// bfp_exponent (floor(log2 amax) - (m - 2), 0 for an all-zero block) but at least -149.
DSCONV_HD int32_t cuda_bfp_exponent(float amax, int mant_bits) {
  if (float_to_bits(amax) == 0u) return 0;  // amax >= 0: only +0 has zero bits
  const int32_t e = floor_log2_bits(amax) - (mant_bits - 2);
  return e < kMinScaleExponent ? kMinScaleExponent : e;
}

// 2^e (e in [-149, 127]) from its bits, NaN for a non-finite block.
DSCONV_HD float cuda_bfp_scale(int32_t e) {
  if (e == kNonFiniteExponent) return bits_to_float(0x7fc00000u);
  if (e >= -126) return bits_to_float(static_cast<uint32_t>(e + 127) << 23);
  return bits_to_float(1u << (e - kMinScaleExponent));
}

// ---------------------------------------------------------------------------------------------
// Geometry of the packed operands.

struct PackedGeometry {
  ConvGeometry c;
  int64_t T;     // taps kh * kw
  int64_t S;     // segments per group: T * nblk, tap-major
  int64_t KB;    // packed bytes per block: min(block, Cg) rounded up to the kernel's alignment
  int64_t GB;    // blocks over all groups: G * nblk
  int64_t Ctot;  // bytes per pixel of xq: GB * KB
  int64_t Ktot;  // packed weight bytes per output channel: S * KB
  int64_t HW, HoWo, M;         // M = N * Ho * Wo, the GEMM rows
  int64_t xsN, xsC, xsH, xsW;  // strides of x, in elements (any layout is read in place)
  int32_t mant_bits;
  bool biased;   // integer sums use the float-bias start (KB <= kMaxBiasedKB)
  bool has_kds;  // KDSb given: xm and kp are used
};

// The geometry of a dsconv2d call whose arguments were checked (by the caller).
inline ConvGeometry make_conv_geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O,
                                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                       int64_t pw, int64_t dh, int64_t dw, int64_t groups,
                                       int64_t block) {
  ConvGeometry c{};
  c.N = N;
  c.C = C;
  c.H = H;
  c.W = W;
  c.O = O;
  c.kh = kh;
  c.kw = kw;
  c.sh = sh;
  c.sw = sw;
  c.ph = ph;
  c.pw = pw;
  c.dh = dh;
  c.dw = dw;
  c.groups = groups;
  c.Cg = C / groups;
  c.Og = O / groups;
  c.block = block;
  c.nblk = num_blocks(c.Cg, block);
  c.Ho = conv_out_size(H, kh, sh, ph, dh);
  c.Wo = conv_out_size(W, kw, sw, pw, dw);
  return c;
}

// c: a checked geometry; align: 32 for the GEMM kernel (one m16n8k32 step), 4 for the direct one.
inline PackedGeometry make_packed_geometry(const ConvGeometry& c, int64_t align, int mant_bits,
                                           bool has_kds, int64_t xsN, int64_t xsC, int64_t xsH,
                                           int64_t xsW) {
  PackedGeometry p{};
  p.c = c;
  p.T = c.kh * c.kw;
  p.S = p.T * c.nblk;
  const int64_t beff = c.block < c.Cg ? c.block : c.Cg;
  p.KB = (beff + align - 1) / align * align;
  p.GB = c.groups * c.nblk;
  p.Ctot = p.GB * p.KB;
  p.Ktot = p.S * p.KB;
  p.HW = c.H * c.W;
  p.HoWo = c.Ho * c.Wo;
  p.M = c.N * p.HoWo;
  p.xsN = xsN;
  p.xsC = xsC;
  p.xsH = xsH;
  p.xsW = xsW;
  p.mant_bits = mant_bits;
  p.biased = p.KB <= kMaxBiasedKB;
  p.has_kds = has_kds;
  return p;
}

// pixel = n * H * W + h * W + w; gb = g * nblk + b; o = global output channel.
DSCONV_HD int64_t act_offset(const PackedGeometry& p, int64_t pixel, int64_t gb) {
  return pixel * p.Ctot + gb * p.KB;
}
DSCONV_HD int64_t scale_index(const PackedGeometry& p, int64_t pixel, int64_t gb) {
  return pixel * p.GB + gb;
}
DSCONV_HD int64_t weight_offset(const PackedGeometry& p, int64_t o, int64_t s) {
  return o * p.Ktot + s * p.KB;
}
DSCONV_HD int64_t seg_param_index(const PackedGeometry& p, int64_t g, int64_t s, int64_t ol) {
  return (g * p.S + s) * p.c.Og + ol;
}

// ---------------------------------------------------------------------------------------------
// BFP quantisation: one thread per (n, group-block, input pixel), pixel fastest (coalesced x).
// total threads: N * GB * H * W.

template <typename in_t>
DSCONV_HD uint32_t pack4_mantissas(const in_t* src, int64_t sC, int64_t k0, int64_t len,
                                   bool finite, int32_t e, int32_t lim, int32_t& msum) {
  uint32_t word = 0;
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + j;
    int32_t m = 0;
    if (finite && k < len) m = bfp_mantissa(static_cast<float>(src[k * sC]), e, lim);
    msum += m;
    word |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(m))) << (8 * j);
  }
  return word;
}

template <typename in_t>
DSCONV_HD void bfp_quantize_thread(const PackedGeometry& p, const in_t* x, int8_t* xq, float* xs,
                                   int32_t* xm, int64_t idx) {
  const ConvGeometry& c = p.c;
  const int64_t pix = idx % p.HW;
  const int64_t r = idx / p.HW;
  const int64_t gb = r % p.GB;
  const int64_t n = r / p.GB;
  const int64_t g = gb / c.nblk, b = gb % c.nblk;
  const int64_t cb = block_begin(b, c.block);
  const int64_t len = block_end(b, c.block, c.Cg) - cb;
  const int64_t h = pix / c.W, w = pix % c.W;
  const in_t* src = x + n * p.xsN + (g * c.Cg + cb) * p.xsC + h * p.xsH + w * p.xsW;

  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < len; ++k) {
    const float v = static_cast<float>(src[k * p.xsC]);
    if (!is_finite_bits(v)) {
      finite = false;
    } else {
      amax = fmaxf(amax, fabsf(v));
    }
  }
  const int32_t e = finite ? cuda_bfp_exponent(amax, p.mant_bits) : kNonFiniteExponent;
  const int32_t lim = mantissa_limit(p.mant_bits);
  const int64_t pixel = n * p.HW + pix;
  int8_t* dst = xq + act_offset(p, pixel, gb);
  int32_t msum = 0;
  if (p.KB % 16 == 0) {  // 16-byte stores (xq rows are 16-byte aligned then)
    for (int64_t k0 = 0; k0 < p.KB; k0 += 16) {
      const uint32_t w0 = pack4_mantissas(src, p.xsC, k0, len, finite, e, lim, msum);
      const uint32_t w1 = pack4_mantissas(src, p.xsC, k0 + 4, len, finite, e, lim, msum);
      const uint32_t w2 = pack4_mantissas(src, p.xsC, k0 + 8, len, finite, e, lim, msum);
      const uint32_t w3 = pack4_mantissas(src, p.xsC, k0 + 12, len, finite, e, lim, msum);
      store_u32x4(dst + k0, w0, w1, w2, w3);
    }
  } else {
    for (int64_t k0 = 0; k0 < p.KB; k0 += 4) {
      store_u32(dst + k0, pack4_mantissas(src, p.xsC, k0, len, finite, e, lim, msum));
    }
  }
  xs[scale_index(p, pixel, gb)] = cuda_bfp_scale(e);
  if (xm != nullptr) xm[scale_index(p, pixel, gb)] = msum;
}

// ---------------------------------------------------------------------------------------------
// Weight and per-segment parameter repacking. w: [O, Cg, kh, kw] int8 contiguous.

// One thread per byte of wp: idx in [0, O * Ktot).
DSCONV_HD void pack_weight_thread(const PackedGeometry& p, const int8_t* w, int8_t* wp,
                                  int64_t idx) {
  const ConvGeometry& c = p.c;
  const int64_t o = idx / p.Ktot, k = idx % p.Ktot;
  const int64_t s = k / p.KB, j = k % p.KB;
  const int64_t t = s / c.nblk, b = s % c.nblk;
  const int64_t cb = block_begin(b, c.block);
  const int64_t len = block_end(b, c.block, c.Cg) - cb;
  wp[idx] = j < len ? w[(o * c.Cg + cb + j) * p.T + t] : static_cast<int8_t>(0);
}

// One thread per entry of ap: idx in [0, O * S). alpha, kdsb: [O, nblk, kh, kw] float contiguous.
DSCONV_HD void pack_params_thread(const PackedGeometry& p, const float* alpha, const float* kdsb,
                                  float* ap, float* kp, int64_t idx) {
  const ConvGeometry& c = p.c;
  const int64_t ol = idx % c.Og, r = idx / c.Og;
  const int64_t s = r % p.S, g = r / p.S;
  const int64_t t = s / c.nblk, b = s % c.nblk;
  const int64_t src = ((g * c.Og + ol) * c.nblk + b) * p.T + t;
  ap[idx] = alpha[src];
  if (kdsb != nullptr) kp[idx] = kdsb[src];
}

// ---------------------------------------------------------------------------------------------
// Outputs. y: [N, O, Ho, Wo] contiguous.

template <typename out_t>
struct EpiloguePtrs {
  out_t* y;
  const float* cdsw;  // each may be null
  const float* cdsb;
  const float* bias;
  bool silu;
};

template <typename out_t>
DSCONV_HD void store_output(const PackedGeometry& p, const EpiloguePtrs<out_t>& e, int64_t n,
                            int64_t o, int64_t pix, float acc) {
  const float cw = e.cdsw != nullptr ? e.cdsw[o] : 1.f;
  const float cb = e.cdsb != nullptr ? e.cdsb[o] : 0.f;
  const float bb = e.bias != nullptr ? e.bias[o] : 0.f;
  e.y[(n * p.c.O + o) * p.HoWo + pix] =
      static_cast<out_t>(dsconv_epilogue(acc, cw, cb, bb, e.silu));
}

struct OperandPtrs {
  const int8_t* xq;
  const float* xs;
  const int32_t* xm;  // null unless has_kds
  const int8_t* wp;
  const float* ap;
  const float* kp;  // null unless has_kds
};

// ---------------------------------------------------------------------------------------------
// Direct kernel: one thread per output element, pixel fastest. For depthwise / narrow groups,
// where a GEMM tile would be mostly empty. KB is a multiple of 4 here.

DSCONV_HD float direct_accumulate(const PackedGeometry& p, const OperandPtrs& q, int64_t n,
                                  int64_t o, int64_t ho, int64_t wo) {
  const ConvGeometry& c = p.c;
  const int64_t g = o / c.Og, ol = o % c.Og;
  float acc = 0.f;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t hi = input_coord(ho, t / c.kw, c.sh, c.ph, c.dh);
    const int64_t wi = input_coord(wo, t % c.kw, c.sw, c.pw, c.dw);
    if (!in_range(hi, c.H) || !in_range(wi, c.W)) continue;  // zero padding: S = M = 0
    const int64_t pixel = n * p.HW + hi * c.W + wi;
    for (int64_t b = 0; b < c.nblk; ++b) {
      const int64_t s = t * c.nblk + b, gb = g * c.nblk + b;
      const int8_t* a = q.xq + act_offset(p, pixel, gb);
      const int8_t* w = q.wp + weight_offset(p, o, s);
      int32_t sum = segment_sum_init(p.biased);
      for (int64_t k = 0; k < p.KB; k += 4) sum = dp4a(load_u32(a + k), load_u32(w + k), sum);
      const int64_t pi = seg_param_index(p, g, s, ol), si = scale_index(p, pixel, gb);
      acc =
          fold_segment(acc, segment_sum_value(sum, p.biased), q.ap[pi], q.xs[si], p.has_kds,
                       p.has_kds ? q.kp[pi] : 0.f, p.has_kds ? static_cast<float>(q.xm[si]) : 0.f);
    }
  }
  return acc;
}

template <typename out_t>
DSCONV_HD void direct_thread(const PackedGeometry& p, const OperandPtrs& q,
                             const EpiloguePtrs<out_t>& e, int64_t idx) {
  const int64_t pix = idx % p.HoWo, r = idx / p.HoWo;
  const int64_t o = r % p.c.O, n = r / p.c.O;
  const float acc = direct_accumulate(p, q, n, o, pix / p.c.Wo, pix % p.c.Wo);
  store_output(p, e, n, o, pix, acc);
}

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM kernel. Per group g: Y[m, o] = sum over segments s = (tap, block) of
// 2^E[m, s] * (alpha[o, s] * (A_s B_s)[m, o] + KDSb[o, s] * M[m, s]), with m = (n, ho, wo) and
// A_s the KB mantissas of block b at the input pixel tap t reads (zero in the padding).
// K is walked 32 bytes at a time (one m16n8k32 step = one pipeline stage); after the last step of
// a segment the exact int32 sums are folded into float accumulators.

constexpr int kBK = 32;       // K bytes per stage
constexpr int kSmemRow = 48;  // smem bytes per tile row: 32 + 16 of padding (see load_fragments)
constexpr int kStages = 3;    // cp.async pipeline depth

template <int WARPS_N>
struct GemmTile {
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = 4;  // m16 tiles per warp: 64 rows
  static constexpr int kNTiles = 4;  // n8 tiles per warp: 32 columns
  static constexpr int BM = kWarpsM * 16 * kMTiles;
  static constexpr int BN = kWarpsN * 8 * kNTiles;
  static constexpr int kAChunks = BM * 2 / kThreads;  // 16-byte A copies per thread and stage
  static constexpr int kScaleRows = (BM + kThreads - 1) / kThreads;
  // One stage of shared memory, in bytes.
  static constexpr int kOffA = 0;
  static constexpr int kOffB = kOffA + BM * kSmemRow;
  static constexpr int kOffScale = kOffB + BN * kSmemRow;  // float[BM]
  static constexpr int kOffMsum = kOffScale + BM * 4;      // int32[BM]
  static constexpr int kOffAlpha = kOffMsum + BM * 4;      // float[BN]
  static constexpr int kOffKds = kOffAlpha + BN * 4;       // float[BN]
  static constexpr int kStageBytes = kOffKds + BN * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(BN * 2 == kThreads, "one 16-byte B copy per thread and stage");
  static_assert(BM * 2 % kThreads == 0, "whole A copies per thread");
  static_assert(kStageBytes % 16 == 0 && kOffScale % 16 == 0, "16-byte aligned stages");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

// Which image pixel a GEMM row reads at tap (0, 0).
struct RowPos {
  int64_t img;  // n * H * W, or -1 for a row past M (never read: its copies are zero-filled)
  int64_t h0;   // ho * sh - ph
  int64_t w0;   // wo * sw - pw
};

DSCONV_HD RowPos row_position(const PackedGeometry& p, int64_t m) {
  RowPos r;
  if (m >= p.M) {
    r.img = -1;
    r.h0 = r.w0 = 0;
    return r;
  }
  const int64_t n = m / p.HoWo, pix = m % p.HoWo;
  r.img = n * p.HW;
  r.h0 = input_coord(pix / p.c.Wo, 0, p.c.sh, p.c.ph, p.c.dh);
  r.w0 = input_coord(pix % p.c.Wo, 0, p.c.sw, p.c.pw, p.c.dw);
  return r;
}

// Input pixel of row r at tap (ti, tj), or -1 where it is padding or past M.
DSCONV_HD int64_t row_pixel(const PackedGeometry& p, const RowPos& r, int64_t ti, int64_t tj) {
  const int64_t hi = r.h0 + ti * p.c.dh, wi = r.w0 + tj * p.c.dw;
  if (r.img < 0 || !in_range(hi, p.c.H) || !in_range(wi, p.c.W)) return -1;
  return r.img + hi * p.c.W + wi;
}

struct TileCoord {
  int64_t m0;  // first GEMM row of the CTA
  int64_t n0;  // first output channel of the CTA within its group
  int64_t g;   // group
};

// ---------------------------------------------------------------------------------------------
// Launch geometry. CUDA allows 2^31 - 1 blocks on grid x but only 65535 on y and z, so every
// launch is one-dimensional: the elementwise kernels stride over their items, and the GEMM's
// tiles (M tiles x N tiles x groups, which overflowed y / z with more than 65535 groups or N
// tiles) are numbered on x, M fastest as before, each CTA looping over tiles when there are
// more than 2^31 - 1. The host emulator launches through the same functions.

constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = int64_t{1} << 20;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;

// Blocks of a grid-stride loop over `total` items.
inline int64_t elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return blocks < 1 ? 1 : blocks > kMaxElementwiseBlocks ? kMaxElementwiseBlocks : blocks;
}

struct GemmGrid {
  int64_t tiles_m;  // ceil(M / BM)
  int64_t tiles_n;  // ceil(Og / BN)
  int64_t tiles;    // tiles_m * tiles_n * groups
  int64_t blocks;   // CTAs launched on grid x: min(tiles, max_blocks)
};

// max_blocks: kMaxGridX on the device; the emulator passes fewer to exercise the tile loop.
template <class Tile>
inline GemmGrid gemm_grid(const PackedGeometry& p, int64_t max_blocks = kMaxGridX) {
  GemmGrid gg;
  gg.tiles_m = (p.M + Tile::BM - 1) / Tile::BM;
  gg.tiles_n = (p.c.Og + Tile::BN - 1) / Tile::BN;
  gg.tiles = gg.tiles_m * gg.tiles_n * p.c.groups;
  gg.blocks = gg.tiles < max_blocks ? gg.tiles : max_blocks;
  return gg;
}

// Tile number t in [0, gg.tiles) -> its CTA coordinates (t = (g * tiles_n + n) * tiles_m + m).
template <class Tile>
DSCONV_HD TileCoord gemm_tile(const GemmGrid& gg, int64_t t) {
  TileCoord tc;
  const int64_t r = t / gg.tiles_m;
  tc.m0 = (t - r * gg.tiles_m) * Tile::BM;
  tc.n0 = (r % gg.tiles_n) * Tile::BN;
  tc.g = r / gg.tiles_n;
  return tc;
}

// Global -> shared copies. Invalid sources are zero-filled and never dereferenced.
DSCONV_HD void copy16(char* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
#elif defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#else
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#endif
}

DSCONV_HD void copy4(char* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 4 : 0));
#else
  store_u32(dst, valid ? load_u32(src) : 0u);
#endif
}

// Per-thread loader state: the rows this thread copies, decoded once.
template <class Tile>
struct LoaderState {
  RowPos a[Tile::kAChunks];
  RowPos s[Tile::kScaleRows];
};

template <class Tile>
DSCONV_HD void init_loader(const PackedGeometry& p, const TileCoord& tc, int tid,
                           LoaderState<Tile>& ls) {
  for (int i = 0; i < Tile::kAChunks; ++i) {
    ls.a[i] = row_position(p, tc.m0 + ((tid + i * Tile::kThreads) >> 1));
  }
  for (int i = 0; i < Tile::kScaleRows; ++i) {
    ls.s[i] = row_position(p, tc.m0 + tid + i * Tile::kThreads);
  }
}

// Thread tid's share of filling one stage with K step kiter.
template <class Tile>
DSCONV_HD void load_stage(const PackedGeometry& p, const OperandPtrs& q, const TileCoord& tc,
                          const LoaderState<Tile>& ls, int tid, char* stage, int32_t kiter) {
  const ConvGeometry& c = p.c;
  const int32_t cps = static_cast<int32_t>(p.KB / kBK);  // K steps per segment
  const int64_t s = kiter / cps, kc = kiter % cps;
  const int64_t t = s / c.nblk, b = s % c.nblk;
  const int64_t ti = t / c.kw, tj = t % c.kw;
  const int64_t gb = tc.g * c.nblk + b;
  DSCONV_UNROLL
  for (int i = 0; i < Tile::kAChunks; ++i) {
    const int id = tid + i * Tile::kThreads, row = id >> 1, half = id & 1;
    const int64_t pixel = row_pixel(p, ls.a[i], ti, tj);
    const bool ok = pixel >= 0;
    const int8_t* src = ok ? q.xq + act_offset(p, pixel, gb) + kc * kBK + half * 16 : q.xq;
    copy16(stage + Tile::kOffA + row * kSmemRow + half * 16, src, ok);
  }
  {
    const int row = tid >> 1, half = tid & 1;
    const int64_t o = tc.n0 + row;
    const bool ok = o < c.Og;
    const int8_t* src =
        ok ? q.wp + weight_offset(p, tc.g * c.Og + o, s) + kc * kBK + half * 16 : q.wp;
    copy16(stage + Tile::kOffB + row * kSmemRow + half * 16, src, ok);
  }
  DSCONV_UNROLL
  for (int i = 0; i < Tile::kScaleRows; ++i) {
    const int row = tid + i * Tile::kThreads;
    if (row < Tile::BM) {
      // Padding and rows past M get scale 0 (their A rows are zero): the segment adds 0.
      const int64_t pixel = row_pixel(p, ls.s[i], ti, tj);
      const bool ok = pixel >= 0;
      const int64_t si = ok ? scale_index(p, pixel, gb) : 0;
      copy4(stage + Tile::kOffScale + row * 4, q.xs + si, ok);
      if (p.has_kds) copy4(stage + Tile::kOffMsum + row * 4, q.xm + si, ok);
    }
  }
  if (tid < Tile::BN) {
    const int64_t o = tc.n0 + tid;
    const bool ok = o < c.Og;
    const int64_t pi = ok ? seg_param_index(p, tc.g, s, o) : 0;
    copy4(stage + Tile::kOffAlpha + tid * 4, q.ap + pi, ok);
    if (p.has_kds) copy4(stage + Tile::kOffKds + tid * 4, q.kp + pi, ok);
  }
}

// Accumulator element r (0..3) of m16n8 tile (mt, nt) held by lane: its row and column in the CTA
// tile (PTX ISA, mma.m16n8k32 .s32 C/D fragment: row = groupID + 8 * (r >= 2),
// col = 2 * threadID_in_group + (r & 1)).
template <class Tile>
DSCONV_HD int acc_row(int warp, int lane, int mt, int r) {
  return (warp % Tile::kWarpsM) * (16 * Tile::kMTiles) + mt * 16 + (lane >> 2) + 8 * (r >> 1);
}
template <class Tile>
DSCONV_HD int acc_col(int warp, int lane, int nt, int r) {
  return (warp / Tile::kWarpsM) * (8 * Tile::kNTiles) + nt * 8 + 2 * (lane & 3) + (r & 1);
}

// Tensor-core operand fragments of one K step, read from a stage (PTX ISA, mma.m16n8k32 .s8:
// A register j holds row groupID + 8 * (j & 1), bytes 4 * threadID_in_group + 16 * (j >> 1);
// B register j holds column groupID, K bytes 4 * threadID_in_group + 16 * j). With 48-byte rows
// the 32 lanes of each 32-bit load hit 32 distinct banks.
template <class Tile>
DSCONV_HD void load_fragments(const char* stage, int warp, int lane,
                              uint32_t (&a)[Tile::kMTiles][4], uint32_t (&b)[Tile::kNTiles][2]) {
  const int gid = lane >> 2, tig = lane & 3;
  const int row0 = (warp % Tile::kWarpsM) * (16 * Tile::kMTiles) + gid;
  const int col0 = (warp / Tile::kWarpsM) * (8 * Tile::kNTiles) + gid;
  DSCONV_UNROLL
  for (int mt = 0; mt < Tile::kMTiles; ++mt) {
    DSCONV_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int row = row0 + mt * 16 + 8 * (j & 1);
      a[mt][j] = load_u32(stage + Tile::kOffA + row * kSmemRow + 4 * tig + 16 * (j >> 1));
    }
  }
  DSCONV_UNROLL
  for (int nt = 0; nt < Tile::kNTiles; ++nt) {
    DSCONV_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int col = col0 + nt * 8;
      b[nt][j] = load_u32(stage + Tile::kOffB + col * kSmemRow + 4 * tig + 16 * j);
    }
  }
}

// The same K step without tensor cores: each lane computes its own accumulator elements with
// dp4a straight from shared memory. Same result, same register layout.
template <class Tile>
DSCONV_HD void warp_mac_dp4a(const char* stage, int warp, int lane,
                             int32_t (&acc)[Tile::kMTiles][Tile::kNTiles][4]) {
  DSCONV_UNROLL
  for (int mt = 0; mt < Tile::kMTiles; ++mt) {
    DSCONV_UNROLL
    for (int nt = 0; nt < Tile::kNTiles; ++nt) {
      DSCONV_UNROLL
      for (int r = 0; r < 4; ++r) {
        const char* arow = stage + Tile::kOffA + acc_row<Tile>(warp, lane, mt, r) * kSmemRow;
        const char* bcol = stage + Tile::kOffB + acc_col<Tile>(warp, lane, nt, r) * kSmemRow;
        int32_t v = acc[mt][nt][r];
        DSCONV_UNROLL
        for (int k = 0; k < kBK; k += 4) v = dp4a(load_u32(arow + k), load_u32(bcol + k), v);
        acc[mt][nt][r] = v;
      }
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_s8_m16n8k32(int32_t (&c)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// One K step of the warp's 64 x 32 tile: int8 tensor cores on sm_80+, dp4a before (and on the
// host, where the emulator models the tensor-core path separately).
template <class Tile>
DSCONV_HD void warp_mac(const char* stage, int warp, int lane,
                        int32_t (&acc)[Tile::kMTiles][Tile::kNTiles][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t a[Tile::kMTiles][4];
  uint32_t b[Tile::kNTiles][2];
  load_fragments<Tile>(stage, warp, lane, a, b);
  DSCONV_UNROLL
  for (int mt = 0; mt < Tile::kMTiles; ++mt) {
    DSCONV_UNROLL
    for (int nt = 0; nt < Tile::kNTiles; ++nt) mma_s8_m16n8k32(acc[mt][nt], a[mt], b[nt]);
  }
#else
  warp_mac_dp4a<Tile>(stage, warp, lane, acc);
#endif
}

// End of a segment: fold the exact integer sums into the float accumulators and restart them.
// The two flags are template parameters so that each unrolled loop holds only the instructions
// it needs (as runtime values the compiler evaluates both sides and selects).
template <class Tile, bool kBiased, bool kKds>
DSCONV_HD void fold_thread_impl(const char* stage, int warp, int lane,
                                int32_t (&acc)[Tile::kMTiles][Tile::kNTiles][4],
                                float (&facc)[Tile::kMTiles][Tile::kNTiles][4]) {
  DSCONV_UNROLL
  for (int mt = 0; mt < Tile::kMTiles; ++mt) {
    DSCONV_UNROLL
    for (int rh = 0; rh < 2; ++rh) {
      const int row = acc_row<Tile>(warp, lane, mt, 2 * rh);
      const float sc = bits_to_float(load_u32(stage + Tile::kOffScale + row * 4));
      const float ms =
          kKds
              ? static_cast<float>(static_cast<int32_t>(load_u32(stage + Tile::kOffMsum + row * 4)))
              : 0.f;
      DSCONV_UNROLL
      for (int nt = 0; nt < Tile::kNTiles; ++nt) {
        DSCONV_UNROLL
        for (int rc = 0; rc < 2; ++rc) {
          const int r = 2 * rh + rc;
          const int col = acc_col<Tile>(warp, lane, nt, r);
          const float al = bits_to_float(load_u32(stage + Tile::kOffAlpha + col * 4));
          const float kd = kKds ? bits_to_float(load_u32(stage + Tile::kOffKds + col * 4)) : 0.f;
          facc[mt][nt][r] = fold_segment(
              facc[mt][nt][r], segment_sum_value(acc[mt][nt][r], kBiased), al, sc, kKds, kd, ms);
          acc[mt][nt][r] = segment_sum_init(kBiased);
        }
      }
    }
  }
}

template <class Tile>
DSCONV_HD void fold_thread(const PackedGeometry& p, const char* stage, int warp, int lane,
                           int32_t (&acc)[Tile::kMTiles][Tile::kNTiles][4],
                           float (&facc)[Tile::kMTiles][Tile::kNTiles][4]) {
  if (p.biased) {
    if (p.has_kds) {
      fold_thread_impl<Tile, true, true>(stage, warp, lane, acc, facc);
    } else {
      fold_thread_impl<Tile, true, false>(stage, warp, lane, acc, facc);
    }
  } else if (p.has_kds) {
    fold_thread_impl<Tile, false, true>(stage, warp, lane, acc, facc);
  } else {
    fold_thread_impl<Tile, false, false>(stage, warp, lane, acc, facc);
  }
}

template <class Tile, typename out_t>
DSCONV_HD void epilogue_thread(const PackedGeometry& p, const EpiloguePtrs<out_t>& e,
                               const TileCoord& tc, int warp, int lane,
                               const float (&facc)[Tile::kMTiles][Tile::kNTiles][4]) {
  DSCONV_UNROLL
  for (int mt = 0; mt < Tile::kMTiles; ++mt) {
    DSCONV_UNROLL
    for (int rh = 0; rh < 2; ++rh) {
      const int64_t m = tc.m0 + acc_row<Tile>(warp, lane, mt, 2 * rh);
      if (m >= p.M) continue;
      const int64_t n = m / p.HoWo, pix = m % p.HoWo;
      DSCONV_UNROLL
      for (int nt = 0; nt < Tile::kNTiles; ++nt) {
        DSCONV_UNROLL
        for (int rc = 0; rc < 2; ++rc) {
          const int64_t o = tc.n0 + acc_col<Tile>(warp, lane, nt, 2 * rh + rc);
          if (o < p.c.Og) store_output(p, e, n, tc.g * p.c.Og + o, pix, facc[mt][nt][2 * rh + rc]);
        }
      }
    }
  }
}

// The pipeline, written once for the device (Exec = one thread) and the host emulator (Exec runs
// each phase for every thread of the CTA; the phases are what lies between barriers).
// Stage k % kStages holds K step k. wait_and_sync() must make step k's copies visible to the CTA
// and guarantee that every thread is done with step k - 1, whose stage the prefetch of step
// k + kStages - 1 then overwrites. One commit per iteration, empty or not, keeps the cp.async group
// count equal to the step count, so waiting until at most kStages - 2 groups are pending completes
// step k.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Exec>
DSCONV_HD void gemm_mainloop(Exec& ex, int32_t ksteps, int32_t cps) {
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ksteps) ex.load(st, st);
    ex.commit();
  }
  for (int32_t k = 0; k < ksteps; ++k) {
    ex.wait_and_sync();
    const int32_t kn = k + kStages - 1;
    if (kn < ksteps) ex.load(kn % kStages, kn);
    ex.commit();
    ex.compute(k % kStages);
    if ((k + 1) % cps == 0) ex.fold(k % kStages);
  }
}

}  // namespace tiling
}  // namespace dsconv_ext
