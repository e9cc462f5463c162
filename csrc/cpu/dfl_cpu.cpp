// CPU implementation of dsconv_ext::dfl_expectation (schema in csrc/dsconv2d.cpp): argument
// checks and the parallel loop over (image, box side, anchor chunk); the per-ISA loops are the
// dfl_side kernels of kernel_avx512.cpp, kernel_avx2.cpp and kernel_scalar.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/dsconv2d_cpu.h"
#include "cpu/parallel.h"

namespace dsconv_ext {
namespace cpu {
namespace {

// Anchors per task: 8400 anchors of a 640 px image give 9 tasks per side.
constexpr int64_t kDflChunk = 1024;

at::Tensor dfl_expectation_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "dfl_expectation: x must be a CPU tensor, got ",
              x_in.device());
  TORCH_CHECK(weight_in.device().is_cpu(), "dfl_expectation: weight must be a CPU tensor, got ",
              weight_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "dfl_expectation: x must be float32, got ",
              x_in.scalar_type());
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat,
              "dfl_expectation: weight must be float32, got ", weight_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 3, "dfl_expectation: x must be 3-D [B, 4 * c1, A], got shape ",
              x_in.sizes());
  const int64_t c1 = weight_in.numel();
  TORCH_CHECK(c1 >= 1, "dfl_expectation: weight must hold at least one bin");
  TORCH_CHECK(x_in.size(1) == 4 * c1, "dfl_expectation: x must have 4 * c1 = ", 4 * c1,
              " channels for a weight of ", c1, " bins, got ", x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.reshape({c1}).contiguous();
  const int64_t B = x.size(0), A = x.size(2);
  at::Tensor y = at::empty({B, 4, A}, x.options());
  if (y.numel() == 0) return y;
  const IsaKernels& kern = kernels_for(select_isa());
  const int64_t chunks = (A + kDflChunk - 1) / kDflChunk;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for_tasks(B * 4 * chunks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t side = t / chunks, a0 = (t % chunks) * kDflChunk;
      kern.dfl_side(xp + side * c1 * A, A, c1, wp, yp + side * A, a0, std::min(A, a0 + kDflChunk));
    }
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) {
  m.impl("dfl_expectation", &dsconv_ext::cpu::dfl_expectation_cpu);
}
