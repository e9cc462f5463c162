// CPU implementation of dsconv_ext::stem_conv2d (schema in csrc/dsconv2d.cpp): argument checks,
// the weight packing and the parallel loop over (image, row band); the
// per-ISA loops are the stem_rows kernels (see StemArgs in dsconv2d_cpu.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/dsconv2d_cpu.h"
#include "cpu/float_map_checks.h"
#include "cpu/parallel.h"

namespace dsconv_ext {
namespace cpu {
namespace {

// Output rows per task: yolo11n's 320-row stem output gives 80 tasks.
constexpr int64_t kStemBandRows = 4;

void check_finite(const at::Tensor& t, const char* name) {
  const float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(std::isfinite(p[i]), "stem_conv2d: ", name,
                " must be finite (a NaN or Inf weight would spread into the zero padding), found ",
                p[i], " at flat index ", i);
}

at::Tensor stem_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                           const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool fuse_silu) {
  check_float_map_args("stem_conv2d", "x", x_in, "weight", weight_in);
  TORCH_CHECK(weight_in.dim() == 4, "stem_conv2d: weight must be 4-D [O, C, kh, kw], got shape ",
              weight_in.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2,
              "stem_conv2d: stride and padding must have 2 values each");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight_in.size(0), kh = weight_in.size(2), kw = weight_in.size(3);
  TORCH_CHECK(C >= 1 && weight_in.size(1) == C, "stem_conv2d: weight must read x's ", C,
              " channels (groups = 1), got weight shape ", weight_in.sizes());
  TORCH_CHECK(O >= 1 && kh >= 1 && kw >= 1, "stem_conv2d: weight must not be empty, got shape ",
              weight_in.sizes());
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  TORCH_CHECK((sh == 1 || sh == 2) && (sw == 1 || sw == 2),
              "stem_conv2d: stride must be 1 or 2 in each dimension, got ", stride);
  TORCH_CHECK(ph >= 0 && pw >= 0, "stem_conv2d: padding must be >= 0, got ", padding);
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw, "stem_conv2d: the padded input (", H + 2 * ph,
              " x ", W + 2 * pw, ") is smaller than the kernel (", kh, " x ", kw, ")");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat,
                "stem_conv2d: bias must be a float32 CPU tensor, got ", bias.scalar_type(), " on ",
                bias.device());
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == O, "stem_conv2d: bias must have shape [", O,
                "], got ", bias.sizes());
    bias = bias.contiguous();
    check_finite(bias, "bias");
  }
  const at::Tensor weight = weight_in.contiguous();
  check_finite(weight, "weight");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({N, O, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;

  const IsaKernels& kern = kernels_for(select_isa());
  const int64_t T = kern.stem_otile, otiles = (O + T - 1) / T, taps = C * kh * kw;
  // [otiles][C][kh][kw][T] and [otiles * T], zero past O.
  std::vector<float> wpack(otiles * taps * T, 0.f), bpack(otiles * T, 0.f);
  const float* wp = weight.data_ptr<float>();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t t = 0; t < taps; ++t) wpack[((o / T) * taps + t) * T + o % T] = wp[o * taps + t];
  if (bias.defined()) std::copy(bias.data_ptr<float>(), bias.data_ptr<float>() + O, bpack.begin());

  const StemArgs args{x.data_ptr<float>(),
                      wpack.data(),
                      bpack.data(),
                      y.data_ptr<float>(),
                      C,
                      H,
                      W,
                      O,
                      kh,
                      kw,
                      sh,
                      sw,
                      ph,
                      pw,
                      Ho,
                      Wo,
                      fuse_silu};
  // Tasks are (image, row band) with every output-channel tile inside, so that a kernel can
  // prepare the band's input rows once for all of them (the AVX2 one splits them into phases).
  const int64_t bands = (Ho + kStemBandRows - 1) / kStemBandRows;
  parallel_for_tasks(N * bands, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t band = t % bands, n = t / bands;
      const int64_t oy0 = band * kStemBandRows;
      kern.stem_rows(args, n, 0, otiles, oy0, std::min(Ho, oy0 + kStemBandRows));
    }
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) { m.impl("stem_conv2d", &dsconv_ext::cpu::stem_conv2d_cpu); }
