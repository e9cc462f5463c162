// For the ops that write a float32 map into a caller's tensor (the slice of a concatenation that
// reads it): the check of that tensor's layout, and the input made safe to read while it is
// written.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dsconv_ext {
namespace cpu {

// `out` must be [N, C, Ho, Wo] with each image's [C, Ho, Wo] dense, any image stride.
inline void check_image_dense_out(const char* op, const at::Tensor& out, int64_t N, int64_t C,
                                  int64_t Ho, int64_t Wo) {
  TORCH_CHECK(out.sizes() == c10::IntArrayRef({N, C, Ho, Wo}), op, ": out must have shape [", N,
              ", ", C, ", ", Ho, ", ", Wo, "], got ", out.sizes());
  TORCH_CHECK((Wo == 1 || out.stride(3) == 1) && (Ho == 1 || out.stride(2) == Wo) &&
                  (C == 1 || out.stride(1) == Ho * Wo) && (N == 1 || out.stride(0) >= C * Ho * Wo),
              op, ": out must hold each image's [C, Ho, Wo] densely (strides [>= ", C * Ho * Wo,
              ", ", Ho * Wo, ", ", Wo, ", 1]), got strides ", out.strides());
}

// x contiguous, copied where its bytes may meet out's (channel slices of one buffer interleave at
// batch > 1): the result is then that of separate memory.
inline at::Tensor input_apart_from(const at::Tensor& x, const at::Tensor& out) {
  const auto lo = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  const auto hi = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return reinterpret_cast<uintptr_t>(t.data_ptr()) + uintptr_t(last + 1) * t.element_size();
  };
  const bool meet = x.numel() > 0 && out.numel() > 0 && lo(x) < hi(out) && lo(out) < hi(x);
  return meet ? x.clone(at::MemoryFormat::Contiguous) : x.contiguous();
}

}  // namespace cpu
}  // namespace dsconv_ext
