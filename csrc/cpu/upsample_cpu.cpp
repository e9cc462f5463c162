// CPU implementation of dsconv_ext::upsample_nearest_out (schema in csrc/dsconv2d.cpp): nearest
// upsampling by an integer factor s, written into `out` (the upsampled map's slice of the Concat
// that reads it). Each input row is widened once into its first output row (AVX2 for s = 2),
// then copied to the s - 1 rows below: one pass over the output instead of PyTorch's two (see
// dsconv_ext/yolo/pooling.py, NearestUpsample).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/dsconv2d_cpu.h"
#include "cpu/image_out.h"
#include "cpu/float_map_checks.h"
#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dsconv_ext {
namespace cpu {
namespace {

void widen_scalar(const float* x, int64_t W, int64_t s, float* o) {
  for (int64_t i = 0; i < W; ++i)
    for (int64_t j = 0; j < s; ++j) o[i * s + j] = x[i];
}

#if defined(__x86_64__)
// s = 2: (a0 .. a7) -> (a0 a0 a1 a1 a2 a2 a3 a3), (a4 a4 .. a7 a7).
__attribute__((target("avx2"))) void widen2_avx2(const float* x, int64_t W, int64_t, float* o) {
  int64_t i = 0;
  for (; i + 8 <= W; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 lo = _mm256_unpacklo_ps(v, v), hi = _mm256_unpackhi_ps(v, v);
    _mm256_storeu_ps(o + 2 * i, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(o + 2 * i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  widen_scalar(x + i, W - i, 2, o + 2 * i);
}
#endif

void upsample_nearest_out_cpu(const at::Tensor& x_in, int64_t scale, const at::Tensor& out) {
  check_float_map_args("upsample_nearest_out", "x", x_in, "out", out);
  TORCH_CHECK(scale >= 1, "upsample_nearest_out: scale must be >= 1, got ", scale);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = H * scale, Wo = W * scale;
  check_image_dense_out("upsample_nearest_out", out, N, C, Ho, Wo);
  if (out.numel() == 0) return;
  const at::Tensor x = input_apart_from(x_in, out);
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t y_nstride = N == 1 ? 0 : out.stride(0);
#if defined(__x86_64__)
  const auto widen = scale == 2 && isa_is_x86_simd(select_isa()) ? &widen2_avx2 : &widen_scalar;
#else
  const auto widen = &widen_scalar;
#endif
  parallel_for_tasks(N * C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xc = xp + t * H * W;
      float* yc = yp + (t / C) * y_nstride + (t % C) * Ho * Wo;
      for (int64_t h = 0; h < H; ++h) {
        float* row = yc + h * scale * Wo;
        widen(xc + h * W, W, scale, row);
        for (int64_t j = 1; j < scale; ++j) std::copy(row, row + Wo, row + j * Wo);
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) {
  m.impl("upsample_nearest_out", &dsconv_ext::cpu::upsample_nearest_out_cpu);
}
