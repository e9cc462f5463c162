// Argument checks shared by the compiled float ops on feature maps (stem_conv2d,
// max_pool2d_s1_out, upsample_nearest_out).
#pragma once

#include <ATen/core/Tensor.h>

namespace dsconv_ext {
namespace cpu {

// `map` and `other` are float32 CPU tensors, `map` a 4-D [N, C, H, W] map.
inline void check_float_map_args(const char* op, const char* map_name, const at::Tensor& map,
                                 const char* other_name, const at::Tensor& other) {
  TORCH_CHECK(map.device().is_cpu() && other.device().is_cpu(), op, ": ", map_name, " and ",
              other_name, " must be CPU tensors, got ", map.device(), " and ", other.device());
  TORCH_CHECK(map.scalar_type() == at::kFloat && other.scalar_type() == at::kFloat, op, ": ",
              map_name, " and ", other_name, " must be float32, got ", map.scalar_type(), " and ",
              other.scalar_type());
  TORCH_CHECK(map.dim() == 4, op, ": ", map_name, " must be 4-D [N, C, H, W], got shape ",
              map.sizes());
}

}  // namespace cpu
}  // namespace dsconv_ext
