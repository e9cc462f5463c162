// Weight streams for the microkernels (layout: SegHeader in dsconv2d_cpu.h), with a cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "cpu/dsconv2d_cpu.h"

namespace dsconv_ext {
namespace cpu {

// Weights packed for `lay`, cached by tensor identity and version (see weight_pack.cpp):
// SegHeader streams of `elem_bytes` weights, or AmxSegHeader streams with amx_weights.
std::shared_ptr<const PackedWeights> packed_weights(const at::Tensor& intweight,
                                                    const at::Tensor& alpha,
                                                    const c10::optional<at::Tensor>& KDSb,
                                                    const Layout& lay, int elem_bytes,
                                                    bool amx_weights);

// Weight packs since load (cache misses and uncacheable weights): a test hook.
int64_t weight_packs();

}  // namespace cpu
}  // namespace dsconv_ext
