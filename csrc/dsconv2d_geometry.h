// Index arithmetic and per-element maths of DSConv shared by the CPU and CUDA kernels.
//
// Everything here is __host__ __device__ so that the CPU kernel (and therefore the CPU test suite)
// exercises exactly the code the CUDA kernel runs: output sizes, tap offsets, block boundaries,
// the block-floating-point exponent and mantissa, and the epilogue order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSCONV_HD __host__ __device__ __forceinline__
#else
#define DSCONV_HD inline
#endif

namespace dsconv_ext {

// Must match dsconv_ext.quant_primitives.MAX_BLOCK_SIZE: keeps every per-block integer sum below
// 2^24 (exact in float32) and far below 2^31 (exact in int32).
constexpr int64_t kMaxBlockSize = 1024;

struct ConvGeometry {
  int64_t N, C, H, W;  // input
  int64_t O, kh, kw;   // weight
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, Cg, Og;  // channels per group, in and out
  int64_t block, nblk;     // block size and blocks per group
  int64_t Ho, Wo;          // output
};

DSCONV_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

DSCONV_HD int64_t num_blocks(int64_t channels_per_group, int64_t block) {
  return (channels_per_group + block - 1) / block;
}

// Channels [block_begin, block_end) of block b within a group; the last block may be shorter.
DSCONV_HD int64_t block_begin(int64_t b, int64_t block) { return b * block; }
DSCONV_HD int64_t block_end(int64_t b, int64_t block, int64_t channels_per_group) {
  const int64_t e = (b + 1) * block;
  return e < channels_per_group ? e : channels_per_group;
}

// Input row (or column) read by output position o at kernel tap t; may be out of range (padding).
DSCONV_HD int64_t input_coord(int64_t o, int64_t t, int64_t stride, int64_t pad, int64_t dil) {
  return o * stride - pad + t * dil;
}

DSCONV_HD bool in_range(int64_t v, int64_t n) { return v >= 0 && v < n; }

// Exponent marking a block that holds NaN or Inf (quant_primitives.NONFINITE_EXPONENT).
constexpr int32_t kNonFiniteExponent = 2147483647;

// BFP shared exponent of a block whose max |x| is amax (finite, >= 0):
// floor(log2(amax)) - (mant_bits - 2), and 0 for an all-zero block.
DSCONV_HD int32_t bfp_exponent(float amax, int mant_bits) {
  if (!(amax > 0.f)) return 0;
  int e;
  frexpf(amax, &e);  // amax = f * 2^e, f in [0.5, 1): floor(log2(amax)) = e - 1
  return (e - 1) - (mant_bits - 2);
}

// 2^E as a float, NaN for a non-finite block. E is at least -155 (the smallest subnormal),
// where the power underflows to 0; the outputs that would need it are themselves below 1e-38.
DSCONV_HD float bfp_scale(int32_t e) {
  if (e == kNonFiniteExponent) return NAN;
  return ldexpf(1.f, e);
}

// Mantissa of x in a block with exponent e: round half to even of x / 2^e, clamped to
// [-(2^(m-1)-1), 2^(m-1)-1]. ldexpf is exact here (the result is a normal number of at most
// 2^(m-1) in magnitude) and never overflows, unlike multiplying by 2^-e for tiny blocks.
DSCONV_HD int32_t bfp_mantissa(float x, int32_t e, int32_t limit) {
  float v = rintf(ldexpf(x, -e));  // default rounding mode: to nearest, ties to even
  v = v > (float)limit ? (float)limit : v;
  v = v < -(float)limit ? -(float)limit : v;
  return (int32_t)v;
}

DSCONV_HD int32_t mantissa_limit(int mant_bits) { return (1 << (mant_bits - 1)) - 1; }

DSCONV_HD float silu(float y) { return y / (1.f + expf(-y)); }

// Epilogue, in this order: y = CDSw * acc + CDSb + bias, then optional SiLU. `acc` already holds
// sum_b sum_t alpha * 2^E * S (+ the KDS bias term).
DSCONV_HD float dsconv_epilogue(float acc, float cdsw, float cdsb, float bias, bool silu) {
  const float y = acc * cdsw + cdsb + bias;
  return silu ? dsconv_ext::silu(y) : y;
}

}  // namespace dsconv_ext
