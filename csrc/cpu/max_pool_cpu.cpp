// CPU implementation of dsconv_ext::max_pool2d_s1_out (schema in csrc/dsconv2d.cpp): a stride-1
// max pool, -inf padding, NaN propagating as in max_pool2d, written into `out` (a channel slice
// of SPPF's concatenation, say): a max over rows, then over columns, 8 lanes at a time with AVX2.
// The op replaces about ten PyTorch calls per pool, which cost more than the arithmetic on
// SPPF's 20x20 maps (see dsconv_ext/yolo/pooling.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

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

// max(a, b), NaN if either is NaN (max_pool2d's rule).
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

#if defined(__x86_64__)
#define DSCONV_POOL_AVX2 __attribute__((target("avx2")))

// r[i] = nan_max(r[i], l[i]) for i < n; 8 lanes at a time where AVX2 is available (the scalar
// loop does not vectorise: its compare may raise an FP exception, so GCC keeps the branch).
DSCONV_POOL_AVX2 void max_into_avx2(float* r, const float* l, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(r + i), b = _mm256_loadu_ps(l + i);
    // vmaxps returns its second operand where either is NaN: b, then a where a is NaN.
    const __m256 m = _mm256_max_ps(a, b);
    _mm256_storeu_ps(r + i, _mm256_blendv_ps(m, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
  }
  for (; i < n; ++i) r[i] = nan_max(r[i], l[i]);
}
#endif

void max_into_scalar(float* r, const float* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i) r[i] = nan_max(r[i], l[i]);
}

// One [H, W] plane into one [Ho, Wo] plane, each pass as a few long runs over whole planes
// (short per-row runs cost more in calls and scalar tails than in maxima): the input with its
// -inf margins in `pad` ([H + 2 ph] rows of Wp = W + 2 pw), the max over kernel rows into
// `vert` ([Ho] rows of Wp, margins still -inf), then over kernel columns along the flattened
// rows (a window never straddles two rows for the Wo columns kept).
template <void (*MaxInto)(float*, const float*, int64_t)>
void pool_plane(const float* x, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t ph,
                int64_t pw, float* y, int64_t Ho, int64_t Wo, std::vector<float>& pad,
                std::vector<float>& vert) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t Wp = W + 2 * pw;
  pad.assign((H + 2 * ph) * Wp, kNegInf);
  for (int64_t h = 0; h < H; ++h) std::copy(x + h * W, x + (h + 1) * W, &pad[(h + ph) * Wp + pw]);
  vert.assign(pad.begin(), pad.begin() + Ho * Wp);
  for (int64_t ky = 1; ky < kh; ++ky) MaxInto(vert.data(), pad.data() + ky * Wp, Ho * Wp);
  // pad's first rows now take the column maxima: pad[i] = max over kx of vert[i + kx].
  const int64_t n = Ho * Wp - (kw - 1);
  std::copy(vert.begin(), vert.begin() + n, pad.begin());
  for (int64_t kx = 1; kx < kw; ++kx) MaxInto(pad.data(), vert.data() + kx, n);
  for (int64_t oy = 0; oy < Ho; ++oy) std::copy(&pad[oy * Wp], &pad[oy * Wp] + Wo, y + oy * Wo);
}

void max_pool2d_s1_out_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size,
                           at::IntArrayRef padding, const at::Tensor& out) {
  check_float_map_args("max_pool2d_s1_out", "x", x_in, "out", out);
  TORCH_CHECK(kernel_size.size() == 2 && padding.size() == 2,
              "max_pool2d_s1_out: kernel_size and padding must have 2 values each");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], ph = padding[0], pw = padding[1];
  TORCH_CHECK(kh >= 1 && kw >= 1, "max_pool2d_s1_out: kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK(ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
              "max_pool2d_s1_out: padding must be between 0 and kernel_size / 2 (every window "
              "then holds an input), got padding ",
              padding, " for kernel_size ", kernel_size);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = H + 2 * ph - kh + 1, Wo = W + 2 * pw - kw + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "max_pool2d_s1_out: the padded input (", H + 2 * ph, " x ",
              W + 2 * pw, ") is smaller than the kernel ", kernel_size);
  check_image_dense_out("max_pool2d_s1_out", out, N, C, Ho, Wo);
  if (out.numel() == 0) return;
  const at::Tensor x = input_apart_from(x_in, out);
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t y_nstride = N == 1 ? 0 : out.stride(0);
  // Off the x86 SIMD paths (DSCONV_EXT_CPU_ISA=scalar, x86 without AVX2, Arm) the scalar loop.
#if defined(__x86_64__)
  const auto plane =
      isa_is_x86_simd(select_isa()) ? &pool_plane<&max_into_avx2> : &pool_plane<&max_into_scalar>;
#else
  const auto plane = &pool_plane<&max_into_scalar>;
#endif
  parallel_for_tasks(N * C, [&](int64_t t0, int64_t t1) {
    std::vector<float> pad, vert;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / C, c = t % C;
      plane(xp + t * H * W, H, W, kh, kw, ph, pw, yp + n * y_nstride + c * Ho * Wo, Ho, Wo, pad,
            vert);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) {
  m.impl("max_pool2d_s1_out", &dsconv_ext::cpu::max_pool2d_s1_out_cpu);
}
