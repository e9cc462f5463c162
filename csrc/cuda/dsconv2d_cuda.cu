// DSConv on CUDA: BFP quantisation of the activations, a repack of the VQK, then an int8
// implicit-GEMM convolution (mma.sync m16n8k32 on sm_80+, dp4a before) whose exact int32 sums per
// (block, tap) are folded into float with alpha, 2^E and KDSb, and the CDS / bias / SiLU epilogue.
//
// The kernels here are shells: the work of each thread is written once, __host__ __device__, in
// csrc/dsconv2d_tiling.h, where the CPU tests run it through an emulator.
// Only c10/cuda headers on the CUDA side: ATen/cuda/CUDAContext.h would pull in cuSPARSE /
// cuBLAS headers, which a minimal toolkit (as on our CI machines) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>

#include "dsconv2d_geometry.h"
#include "dsconv2d_tiling.h"

namespace dsconv_ext {
namespace {

using tiling::elementwise_blocks;
using tiling::EpiloguePtrs;
using tiling::GemmGrid;
using tiling::GemmTile;
using tiling::kElementwiseThreads;
using tiling::OperandPtrs;
using tiling::PackedGeometry;
using tiling::TileCoord;

// f(scalar_t{}) for the activation / output dtypes the op supports.
template <class F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, "dsconv_ext::dsconv2d: unsupported dtype ", t);
  }
}

// A one-dimensional grid (tiling::elementwise_blocks and tiling::gemm_grid stay within x's limit).
dim3 grid_x(int64_t blocks) {
  TORCH_INTERNAL_ASSERT(blocks >= 1 && blocks <= tiling::kMaxGridX, "grid of ", blocks, " blocks");
  return dim3(static_cast<unsigned>(blocks));
}

#define DSCONV_GRID_STRIDE_LOOP(idx, total)                                                      \
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < (total); \
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename in_t>
__global__ void bfp_quantize_kernel(PackedGeometry p, const in_t* __restrict__ x, int8_t* xq,
                                    float* xs, int32_t* xm, int64_t total) {
  DSCONV_GRID_STRIDE_LOOP(idx, total) { tiling::bfp_quantize_thread(p, x, xq, xs, xm, idx); }
}

__global__ void pack_weight_kernel(PackedGeometry p, const int8_t* __restrict__ w, int8_t* wp,
                                   int64_t total) {
  DSCONV_GRID_STRIDE_LOOP(idx, total) { tiling::pack_weight_thread(p, w, wp, idx); }
}

__global__ void pack_params_kernel(PackedGeometry p, const float* __restrict__ alpha,
                                   const float* __restrict__ kdsb, float* ap, float* kp,
                                   int64_t total) {
  DSCONV_GRID_STRIDE_LOOP(idx, total) { tiling::pack_params_thread(p, alpha, kdsb, ap, kp, idx); }
}

template <typename out_t>
__global__ void dsconv_direct_kernel(PackedGeometry p, OperandPtrs q, EpiloguePtrs<out_t> e,
                                     int64_t total) {
  DSCONV_GRID_STRIDE_LOOP(idx, total) { tiling::direct_thread(p, q, e, idx); }
}

// One thread of a GEMM CTA, driven by tiling::gemm_mainloop.
template <class Tile>
struct DeviceThread {
  const PackedGeometry& p;
  const OperandPtrs& q;
  TileCoord tc;
  char* smem;
  int tid, warp, lane;
  tiling::LoaderState<Tile> ls;
  int32_t acc[Tile::kMTiles][Tile::kNTiles][4];
  float facc[Tile::kMTiles][Tile::kNTiles][4];

  __device__ __forceinline__ DeviceThread(const PackedGeometry& p_, const OperandPtrs& q_,
                                          char* smem_, const TileCoord& tc_)
      : p(p_), q(q_), tc(tc_), smem(smem_) {
    tid = threadIdx.x;
    warp = tid / 32;
    lane = tid % 32;
    tiling::init_loader<Tile>(p, tc, tid, ls);
    const int32_t init = tiling::segment_sum_init(p.biased);
    DSCONV_UNROLL
    for (int i = 0; i < Tile::kMTiles; ++i) {
      DSCONV_UNROLL
      for (int j = 0; j < Tile::kNTiles; ++j) {
        DSCONV_UNROLL
        for (int r = 0; r < 4; ++r) {
          acc[i][j][r] = init;
          facc[i][j][r] = 0.f;
        }
      }
    }
  }
  __device__ __forceinline__ void load(int stage, int32_t k) {
    tiling::load_stage<Tile>(p, q, tc, ls, tid, smem + stage * Tile::kStageBytes, k);
  }
  __device__ __forceinline__ void commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
  }
  __device__ __forceinline__ void wait_and_sync() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(tiling::kStages - 2) : "memory");
#endif
    __syncthreads();
  }
  __device__ __forceinline__ void compute(int stage) {
    tiling::warp_mac<Tile>(smem + stage * Tile::kStageBytes, warp, lane, acc);
  }
  __device__ __forceinline__ void fold(int stage) {
    tiling::fold_thread<Tile>(p, smem + stage * Tile::kStageBytes, warp, lane, acc, facc);
  }
};

template <int WARPS_N, typename out_t>
__global__ void __launch_bounds__(GemmTile<WARPS_N>::kThreads)
    dsconv_gemm_kernel(PackedGeometry p, OperandPtrs q, EpiloguePtrs<out_t> e, GemmGrid gg) {
  using Tile = GemmTile<WARPS_N>;
  __shared__ __align__(16) char smem[Tile::kSmemBytes];
  // One tile per CTA unless there are more than 2^31 - 1 (see tiling::gemm_grid).
  for (int64_t t = blockIdx.x; t < gg.tiles; t += gridDim.x) {
    DeviceThread<Tile> th(p, q, smem, tiling::gemm_tile<Tile>(gg, t));
    tiling::gemm_mainloop(th, static_cast<int32_t>(p.Ktot / tiling::kBK),
                          static_cast<int32_t>(p.KB / tiling::kBK));
    tiling::epilogue_thread<Tile, out_t>(p, e, th.tc, th.warp, th.lane, th.facc);
    // The next tile's first copies overwrite stages that slower warps may still be reading.
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "dsconv_ext::dsconv2d (CUDA kernel): ", name,
              " must be a CUDA tensor, got one on ", t.device(),
              "; move every input to the same CUDA device");
  TORCH_CHECK(t.device() == x.device(), "dsconv_ext::dsconv2d (CUDA kernel): ", name, " is on ",
              t.device(), " but x is on ", x.device(), "; move them to one device");
}

void check_optional(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                    at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return;
  check_cuda_tensor(*t, name, x);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dsconv_ext::dsconv2d: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "dsconv_ext::dsconv2d: ", name, " must have shape ", shape,
              ", got ", t->sizes());
}

int64_t pair_at(at::IntArrayRef v, int i, const char* name) {
  TORCH_CHECK(v.size() == 2, "dsconv_ext::dsconv2d: ", name, " must have 2 values, got ", v);
  return v[i];
}

ConvGeometry checked_geometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha,
                              const c10::optional<at::Tensor>& KDSb,
                              const c10::optional<at::Tensor>& CDSw,
                              const c10::optional<at::Tensor>& CDSb,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              int64_t block_size, int64_t act_bits) {
  // Devices first: nothing else may touch a CPU pointer.
  TORCH_CHECK(x.is_cuda(),
              "dsconv_ext::dsconv2d (CUDA kernel): x must be a CUDA tensor, got one on ",
              x.device());
  check_cuda_tensor(w, "intweight", x);
  check_cuda_tensor(alpha, "alpha", x);
  TORCH_CHECK(x.dim() == 4, "dsconv_ext::dsconv2d: x must be 4-D [N, C, H, W], got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
              "dsconv_ext::dsconv2d: x must be float32, float16 or bfloat16, got ", xt);
  TORCH_CHECK(w.scalar_type() == at::kChar, "dsconv_ext::dsconv2d: intweight must be int8, got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 4, "dsconv_ext::dsconv2d: intweight must be 4-D [O, I/g, kh, kw], got ",
              w.sizes());
  TORCH_CHECK(groups >= 1, "dsconv_ext::dsconv2d: groups must be >= 1, got ", groups);
  TORCH_CHECK(block_size >= 1 && block_size <= kMaxBlockSize,
              "dsconv_ext::dsconv2d: block_size must be in [1, ", kMaxBlockSize, "], got ",
              block_size);
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8,
              "dsconv_ext::dsconv2d: act_bits must be in [2, 8], got ", act_bits);
  const int64_t sh = pair_at(stride, 0, "stride"), sw = pair_at(stride, 1, "stride");
  const int64_t ph = pair_at(padding, 0, "padding"), pw = pair_at(padding, 1, "padding");
  const int64_t dh = pair_at(dilation, 0, "dilation"), dw = pair_at(dilation, 1, "dilation");
  TORCH_CHECK(sh >= 1 && sw >= 1, "dsconv_ext::dsconv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK(ph >= 0 && pw >= 0, "dsconv_ext::dsconv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK(dh >= 1 && dw >= 1, "dsconv_ext::dsconv2d: dilation must be >= 1, got ", dilation);
  const int64_t C = x.size(1), O = w.size(0);
  TORCH_CHECK(C % groups == 0 && O % groups == 0, "dsconv_ext::dsconv2d: channels in (", C,
              ") and out (", O, ") must be divisible by groups=", groups);
  TORCH_CHECK(w.size(1) * groups == C, "dsconv_ext::dsconv2d: x has ", C,
              " channels but intweight expects ", w.size(1) * groups, " (I/g=", w.size(1),
              ", groups=", groups, ")");
  // (conv_out_size truncates a negative numerator towards zero, so test the extent itself.)
  TORCH_CHECK(x.size(2) + 2 * ph - dh * (w.size(2) - 1) - 1 >= 0 &&
                  x.size(3) + 2 * pw - dw * (w.size(3) - 1) - 1 >= 0,
              "dsconv_ext::dsconv2d: input ", x.size(2), "x", x.size(3),
              " is too small for kernel ", w.size(2), "x", w.size(3), " with padding ", padding,
              " and dilation ", dilation);
  const ConvGeometry c =
      tiling::make_conv_geometry(x.size(0), C, x.size(2), x.size(3), O, w.size(2), w.size(3), sh,
                                 sw, ph, pw, dh, dw, groups, block_size);
  const std::vector<int64_t> pshape{c.O, c.nblk, c.kh, c.kw};
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()),
              "dsconv_ext::dsconv2d: alpha must be a floating-point tensor, got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef(pshape),
              "dsconv_ext::dsconv2d: alpha must have shape ", at::IntArrayRef(pshape),
              " (block_size=", block_size, "), got ", alpha.sizes());
  check_optional(KDSb, "KDSb", x, pshape);
  const std::vector<int64_t> oshape{c.O};
  check_optional(CDSw, "CDSw", x, oshape);
  check_optional(CDSb, "CDSb", x, oshape);
  check_optional(bias, "bias", x, oshape);
  return c;
}

c10::optional<at::Tensor> as_float(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

template <int WARPS_N, typename out_t>
void launch_gemm(const PackedGeometry& p, const OperandPtrs& q, const EpiloguePtrs<out_t>& e,
                 cudaStream_t stream) {
  using Tile = GemmTile<WARPS_N>;
  const GemmGrid gg = tiling::gemm_grid<Tile>(p);
  dsconv_gemm_kernel<WARPS_N, out_t><<<grid_x(gg.blocks), Tile::kThreads, 0, stream>>>(p, q, e, gg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kernel: "auto", "direct", "gemm32", "gemm64" or "gemm128" (the last three: GEMM tile width).
at::Tensor dsconv2d_cuda_impl(const at::Tensor& x, const at::Tensor& intweight,
                              const at::Tensor& alpha, const c10::optional<at::Tensor>& KDSb,
                              const c10::optional<at::Tensor>& CDSw,
                              const c10::optional<at::Tensor>& CDSb,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              int64_t block_size, int64_t act_bits, bool fuse_silu,
                              const std::string& kernel) {
  const ConvGeometry c = checked_geometry(x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride,
                                          padding, dilation, groups, block_size, act_bits);
  TORCH_CHECK(kernel == "auto" || kernel == "direct" || kernel == "gemm32" || kernel == "gemm64" ||
                  kernel == "gemm128",
              "dsconv_ext: unknown CUDA kernel variant '", kernel, "'");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  at::Tensor y = at::empty({c.N, c.O, c.Ho, c.Wo}, x.options());
  if (y.numel() == 0) return y;

  std::string variant = kernel;
  if (variant == "auto") {
    // Narrow groups (depthwise) would leave a GEMM tile mostly empty; otherwise the widest tile
    // that the output channels fill, narrowed while the grid would leave SMs idle.
    if (c.Og < 16) {
      variant = "direct";
    } else if (c.Og <= 32) {
      variant = "gemm32";
    } else if (c.Og <= 64) {
      variant = "gemm64";
    } else {
      int sms = 0;
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
      const int64_t tiles = (c.N * c.Ho * c.Wo + 127) / 128 * ((c.Og + 127) / 128) * c.groups;
      variant = tiles < sms ? "gemm64" : "gemm128";
    }
  }
  const bool direct = variant == "direct";
  const bool has_kds = KDSb.has_value() && KDSb->defined();
  const PackedGeometry p =
      tiling::make_packed_geometry(c, direct ? 4 : tiling::kBK, static_cast<int>(act_bits), has_kds,
                                   x.stride(0), x.stride(1), x.stride(2), x.stride(3));
  TORCH_CHECK(p.M <= std::numeric_limits<int32_t>::max() &&
                  p.Ktot / tiling::kBK <= std::numeric_limits<int32_t>::max(),
              "dsconv_ext::dsconv2d: problem too large for the CUDA kernel");

  // Quantised activations and repacked weights (the int8 buffers are fully written: padding
  // channels are stored as zeros).
  const auto opts = x.options();
  at::Tensor xq = at::empty({c.N * p.HW * p.Ctot}, opts.dtype(at::kChar));
  at::Tensor xs = at::empty({c.N * p.HW * p.GB}, opts.dtype(at::kFloat));
  at::Tensor xm = has_kds ? at::empty({c.N * p.HW * p.GB}, opts.dtype(at::kInt)) : at::Tensor();
  const int64_t nq = c.N * p.GB * p.HW;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    bfp_quantize_kernel<scalar_t>
        <<<grid_x(elementwise_blocks(nq)), kElementwiseThreads, 0, stream>>>(
            p, x.data_ptr<scalar_t>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
            has_kds ? xm.data_ptr<int32_t>() : nullptr, nq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const at::Tensor w = intweight.contiguous();
  at::Tensor wp = at::empty({c.O * p.Ktot}, opts.dtype(at::kChar));
  pack_weight_kernel<<<grid_x(elementwise_blocks(wp.numel())), kElementwiseThreads, 0, stream>>>(
      p, w.data_ptr<int8_t>(), wp.data_ptr<int8_t>(), wp.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> kd = as_float(KDSb);
  at::Tensor ap = at::empty({c.O * p.S}, opts.dtype(at::kFloat));
  at::Tensor kp = has_kds ? at::empty({c.O * p.S}, opts.dtype(at::kFloat)) : at::Tensor();
  pack_params_kernel<<<grid_x(elementwise_blocks(ap.numel())), kElementwiseThreads, 0, stream>>>(
      p, a.data_ptr<float>(), ptr_or_null(kd), ap.data_ptr<float>(),
      has_kds ? kp.data_ptr<float>() : nullptr, ap.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const c10::optional<at::Tensor> cw = as_float(CDSw), cb = as_float(CDSb), bb = as_float(bias);
  OperandPtrs q{
      xq.data_ptr<int8_t>(), xs.data_ptr<float>(), has_kds ? xm.data_ptr<int32_t>() : nullptr,
      wp.data_ptr<int8_t>(), ap.data_ptr<float>(), has_kds ? kp.data_ptr<float>() : nullptr};
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const EpiloguePtrs<scalar_t> e{y.data_ptr<scalar_t>(), ptr_or_null(cw), ptr_or_null(cb),
                                   ptr_or_null(bb), fuse_silu};
    if (direct) {
      const int64_t total = y.numel();
      dsconv_direct_kernel<scalar_t>
          <<<grid_x(elementwise_blocks(total)), kElementwiseThreads, 0, stream>>>(p, q, e, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (variant == "gemm32") {
      launch_gemm<1, scalar_t>(p, q, e, stream);
    } else if (variant == "gemm64") {
      launch_gemm<2, scalar_t>(p, q, e, stream);
    } else {
      launch_gemm<4, scalar_t>(p, q, e, stream);
    }
  });
  return y;
}

at::Tensor dsconv2d_cuda(const at::Tensor& x, const at::Tensor& intweight, const at::Tensor& alpha,
                         const c10::optional<at::Tensor>& KDSb,
                         const c10::optional<at::Tensor>& CDSw,
                         const c10::optional<at::Tensor>& CDSb,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         int64_t block_size, int64_t act_bits, bool fuse_silu) {
  return dsconv2d_cuda_impl(x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation,
                            groups, block_size, act_bits, fuse_silu, "auto");
}

at::Tensor dsconv2d_cuda_variant(const at::Tensor& x, const at::Tensor& intweight,
                                 const at::Tensor& alpha, const c10::optional<at::Tensor>& KDSb,
                                 const c10::optional<at::Tensor>& CDSw,
                                 const c10::optional<at::Tensor>& CDSb,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 int64_t block_size, int64_t act_bits, bool fuse_silu,
                                 c10::string_view kernel) {
  return dsconv2d_cuda_impl(x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation,
                            groups, block_size, act_bits, fuse_silu, std::string(kernel));
}

#define DSCONV_STR2(...) #__VA_ARGS__
#define DSCONV_STR(...) DSCONV_STR2(__VA_ARGS__)

// The architectures this library holds device code for, e.g. "sm_80,sm_90" (nvcc defines
// __CUDA_ARCH_LIST__, e.g. 800,900, in every compilation pass).
std::string cuda_archs() {
#if defined(__CUDA_ARCH_LIST__)
  const std::string list = DSCONV_STR(__CUDA_ARCH_LIST__);
  std::string out, num;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i < list.size() && list[i] >= '0' && list[i] <= '9') {
      num += list[i];
    } else if (!num.empty()) {
      out += (out.empty() ? "sm_" : ",sm_") + std::to_string(std::stoi(num) / 10);
      num.clear();
    }
  }
  return out;
#else
  return "unknown";
#endif
}

}  // namespace
}  // namespace dsconv_ext

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  m.def("cuda_archs() -> str", &dsconv_ext::cuda_archs);
  // dsconv2d with the CUDA kernel chosen by name (tests and benchmarks): "auto", "direct",
  // "gemm32", "gemm64", "gemm128".
  m.def(
      "dsconv2d_cuda_variant(Tensor x, Tensor intweight, Tensor alpha, Tensor? KDSb, "
      "Tensor? CDSw, Tensor? CDSb, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int block_size, int act_bits, bool fuse_silu, str kernel) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsconv_ext, CUDA, m) {
  m.impl("dsconv2d", &dsconv_ext::dsconv2d_cuda);
  m.impl("dsconv2d_cuda_variant", &dsconv_ext::dsconv2d_cuda_variant);
}
