// Operator schemas of dsconv_ext, declared once. CPU and CUDA implementations live in
// csrc/cpu/ and csrc/cuda/ and add only their TORCH_LIBRARY_IMPL blocks.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module, so that `import dsconv_ext._C` loads this library (and with it the
// TORCH_LIBRARY registrations below) from Python. PyMODINIT_FUNC exports the symbol despite
// -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dsconv_ext, m) {
  // y = CDSw * (sum_b sum_t alpha * 2^E * S + KDSb term) + CDSb + bias, optional SiLU;
  // see dsconv_ext/dsconv/naive.py for the definition. Output dtype = x dtype.
  m.def(
      "dsconv2d(Tensor x, Tensor intweight, Tensor alpha, Tensor? KDSb, Tensor? CDSw, "
      "Tensor? CDSb, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int block_size, int act_bits, bool fuse_silu) -> Tensor");
  // The same, written into `out`: [N, O, Ho, Wo] with each image dense but any image stride, so
  // that a block whose outputs are concatenated can write them into the concat's buffer in place.
  m.def(
      "dsconv2d_out(Tensor x, Tensor intweight, Tensor alpha, Tensor? KDSb, Tensor? CDSw, "
      "Tensor? CDSb, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int block_size, int act_bits, bool fuse_silu, Tensor(a!) out) -> ()");
  // The box decoder (DFL) of YOLO heads: x [B, 4 * c1, A], weight [c1] ->
  // y[b, s, a] = sum_i softmax_i(x[b, s * c1 + i, a]) * weight[i]; see
  // dsconv_ext/yolo/fast_dfl.py for the reference.
  m.def("dfl_expectation(Tensor x, Tensor weight) -> Tensor");
  // The float stem of a detector: a dense conv reading few channels (groups = 1, stride 1 or 2,
  // no dilation), bias and SiLU fused; see dsconv_ext/yolo/fast_stem.py for the reference.
  m.def(
      "stem_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "bool fuse_silu) -> Tensor");
  // A stride-1 max pool with -inf padding (0 <= padding <= kernel / 2), NaN propagating, written
  // into `out` ([N, C, Ho, Wo], each image dense, any image stride); see
  // dsconv_ext/yolo/pooling.py.
  m.def("max_pool2d_s1_out(Tensor x, int[2] kernel_size, int[2] padding, Tensor(a!) out) -> ()");
  // Nearest upsampling by an integer factor, written into `out` ([N, C, H * scale, W * scale],
  // each image dense, any image stride); see dsconv_ext/yolo/pooling.py.
  m.def("upsample_nearest_out(Tensor x, int scale, Tensor(a!) out) -> ()");
}
