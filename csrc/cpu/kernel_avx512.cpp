#include "cpu/dsconv2d_cpu.h"
namespace dsconv_ext {
namespace cpu {
const IsaKernels& kernels_avx512() { return kernels_scalar(); }
}  // namespace cpu
}  // namespace dsconv_ext
