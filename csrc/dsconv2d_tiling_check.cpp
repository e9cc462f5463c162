// Host emulator of the DSConv CUDA kernels: op dsconv_ext::cuda_tiling_selftest.
//
// It runs the per-thread functions of csrc/dsconv2d_tiling.h, which the CUDA kernels are built
// from, for every thread of every CTA on CPU tensors: the BFP quantisation, the weight and
// parameter repacks, then either the direct kernel or the implicit GEMM, phase by phase through the
// same pipeline skeleton (gemm_mainloop). The GEMM's inner product runs either as the dp4a path
// (pre-sm_80 devices) or as the tensor-core path: fragments gathered with the kernel's own
// load_fragments and multiplied by a model of mma.sync.m16n8k32.s8 written from the PTX ISA
// fragment tables. Compiled into every build (no CUDA needed), so the CPU tests exercise all index
// arithmetic of the CUDA path against the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "dsconv2d_geometry.h"
#include "dsconv2d_tiling.h"

namespace dsconv_ext {
namespace {

using tiling::EpiloguePtrs;
using tiling::GemmTile;
using tiling::OperandPtrs;
using tiling::PackedGeometry;
using tiling::TileCoord;

int8_t byte_of(uint32_t reg, int i) { return static_cast<int8_t>(reg >> (8 * i)); }

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 for one warp, from the PTX ISA fragment tables
// (groupID = lane >> 2, threadID_in_group = lane % 4; element i of a fragment is byte i % 4 of
// register i / 4):
//   A a0..a15: row = groupID for i in [0, 4) or [8, 12), else groupID + 8;
//              col = threadID_in_group * 4 + (i & 3), + 16 for i >= 8
//   B b0..b7:  row = threadID_in_group * 4 + (i & 3), + 16 for i >= 4; col = groupID
//   C c0..c3:  row = groupID, + 8 for i >= 2; col = threadID_in_group * 2 + (i & 1)
void model_mma_m16n8k32(int32_t (*c)[4], const uint32_t (*a)[4], const uint32_t (*b)[2]) {
  int8_t A[16][32], B[32][8];
  int seen_a[16][32] = {}, seen_b[32][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 16; ++i) {
      const int row = (i < 4 || (i >= 8 && i < 12)) ? gid : gid + 8;
      const int col = tig * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      A[row][col] = byte_of(a[lane][i / 4], i % 4);
      ++seen_a[row][col];
    }
    for (int i = 0; i < 8; ++i) {
      const int row = tig * 4 + (i & 3) + (i >= 4 ? 16 : 0);
      B[row][gid] = byte_of(b[lane][i / 4], i % 4);
      ++seen_b[row][gid];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 32; ++k) TORCH_INTERNAL_ASSERT(seen_a[r][k] == 1, "A fragment table");
  for (int k = 0; k < 32; ++k)
    for (int n = 0; n < 8; ++n) TORCH_INTERNAL_ASSERT(seen_b[k][n] == 1, "B fragment table");
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
      int64_t v = c[lane][i];
      for (int k = 0; k < 32; ++k) v += static_cast<int64_t>(A[row][k]) * B[k][col];
      c[lane][i] = static_cast<int32_t>(static_cast<uint32_t>(v));  // wraps like the hardware
    }
  }
}

// One CTA, every thread of it; the methods are the phases between barriers of gemm_mainloop.
template <class Tile>
struct HostCta {
  struct Thread {
    tiling::LoaderState<Tile> ls;
    int32_t acc[Tile::kMTiles][Tile::kNTiles][4];
    float facc[Tile::kMTiles][Tile::kNTiles][4];
  };
  const PackedGeometry& p;
  const OperandPtrs& q;
  TileCoord tc;
  bool tensor_cores;
  std::vector<char> smem;
  std::vector<Thread> th;

  HostCta(const PackedGeometry& p_, const OperandPtrs& q_, TileCoord tc_, bool tensor_cores_)
      : p(p_),
        q(q_),
        tc(tc_),
        tensor_cores(tensor_cores_),
        // Garbage, not zeros, so that a byte the kernel reads without writing shows up.
        smem(Tile::kSmemBytes, static_cast<char>(0x5a)),
        th(Tile::kThreads) {
    for (int tid = 0; tid < Tile::kThreads; ++tid) {
      tiling::init_loader<Tile>(p, tc, tid, th[tid].ls);
      for (auto& x : th[tid].acc)
        for (auto& y : x)
          for (auto& z : y) z = tiling::segment_sum_init(p.biased);
      for (auto& x : th[tid].facc)
        for (auto& y : x)
          for (auto& z : y) z = 0.f;
    }
  }
  char* stage(int s) { return smem.data() + s * Tile::kStageBytes; }
  void load(int s, int32_t k) {
    for (int tid = 0; tid < Tile::kThreads; ++tid)
      tiling::load_stage<Tile>(p, q, tc, th[tid].ls, tid, stage(s), k);
  }
  void commit() {}
  void wait_and_sync() {}
  void compute(int s) {
    for (int warp = 0; warp < Tile::kWarps; ++warp) {
      if (!tensor_cores) {
        for (int lane = 0; lane < 32; ++lane)
          tiling::warp_mac<Tile>(stage(s), warp, lane, th[warp * 32 + lane].acc);
        continue;
      }
      uint32_t a[32][Tile::kMTiles][4], b[32][Tile::kNTiles][2];
      for (int lane = 0; lane < 32; ++lane)
        tiling::load_fragments<Tile>(stage(s), warp, lane, a[lane], b[lane]);
      for (int mt = 0; mt < Tile::kMTiles; ++mt) {
        for (int nt = 0; nt < Tile::kNTiles; ++nt) {
          uint32_t am[32][4], bm[32][2];
          int32_t cm[32][4];
          for (int lane = 0; lane < 32; ++lane) {
            for (int j = 0; j < 4; ++j) am[lane][j] = a[lane][mt][j];
            for (int j = 0; j < 2; ++j) bm[lane][j] = b[lane][nt][j];
            for (int j = 0; j < 4; ++j) cm[lane][j] = th[warp * 32 + lane].acc[mt][nt][j];
          }
          model_mma_m16n8k32(cm, am, bm);
          for (int lane = 0; lane < 32; ++lane)
            for (int j = 0; j < 4; ++j) th[warp * 32 + lane].acc[mt][nt][j] = cm[lane][j];
        }
      }
    }
  }
  void fold(int s) {
    for (int tid = 0; tid < Tile::kThreads; ++tid)
      tiling::fold_thread<Tile>(p, stage(s), tid / 32, tid % 32, th[tid].acc, th[tid].facc);
  }
  template <typename out_t>
  void epilogue(const EpiloguePtrs<out_t>& e) {
    for (int tid = 0; tid < Tile::kThreads; ++tid)
      tiling::epilogue_thread<Tile, out_t>(p, e, tc, tid / 32, tid % 32, th[tid].facc);
  }
};

// The GEMM launch as dsconv_gemm_kernel runs it: CTA b of gg.blocks takes tiles b, b + blocks...
// (max_blocks below the tile count makes CTAs loop, as on the device beyond 2^31 - 1 tiles).
template <int WARPS_N, typename out_t>
void emulate_gemm(const PackedGeometry& p, const OperandPtrs& q, const EpiloguePtrs<out_t>& e,
                  bool tensor_cores, int64_t max_blocks) {
  using Tile = GemmTile<WARPS_N>;
  const tiling::GemmGrid gg = tiling::gemm_grid<Tile>(p, max_blocks);
  for (int64_t b = 0; b < gg.blocks; ++b) {
    for (int64_t t = b; t < gg.tiles; t += gg.blocks) {
      HostCta<Tile> cta(p, q, tiling::gemm_tile<Tile>(gg, t), tensor_cores);
      tiling::gemm_mainloop(cta, static_cast<int32_t>(p.Ktot / tiling::kBK),
                            static_cast<int32_t>(p.KB / tiling::kBK));
      cta.epilogue(e);
    }
  }
}

// Launch plan of a dsconv2d call on the GPU, from the same functions the CUDA launcher uses:
// {grid x, y, z} of the BFP quantiser, the weight repack, the parameter repack and the main
// kernel ("direct" or a GEMM tile width: "gemm32" / "gemm64" / "gemm128"), then the main kernel's
// work items (outputs or tiles) and, where there are at most 2^22 tiles, 1 if every CTA's tile
// walk covers each tile exactly once with valid coordinates (else 0; -1 when not checked).
template <int WARPS_N>
std::vector<int64_t> gemm_plan(const PackedGeometry& p, int64_t max_blocks) {
  using Tile = GemmTile<WARPS_N>;
  const tiling::GemmGrid gg = tiling::gemm_grid<Tile>(p, max_blocks);
  int64_t covered = -1;
  if (gg.tiles <= (int64_t{1} << 22)) {
    std::vector<char> seen(static_cast<size_t>(gg.tiles), 0);
    covered = 1;
    for (int64_t b = 0; b < gg.blocks; ++b) {
      for (int64_t t = b; t < gg.tiles; t += gg.blocks) {
        const TileCoord tc = tiling::gemm_tile<Tile>(gg, t);
        const bool valid = tc.m0 >= 0 && tc.m0 < p.M && tc.m0 % Tile::BM == 0 && tc.n0 >= 0 &&
                           tc.n0 < p.c.Og && tc.n0 % Tile::BN == 0 && tc.g >= 0 &&
                           tc.g < p.c.groups;
        const int64_t id =
            valid ? (tc.g * gg.tiles_n + tc.n0 / Tile::BN) * gg.tiles_m + tc.m0 / Tile::BM : 0;
        if (!valid || seen[static_cast<size_t>(id)]++) covered = 0;
      }
    }
    for (char c : seen) covered = c == 1 ? covered : 0;
  }
  return {gg.blocks, 1, 1, gg.tiles, covered};
}

std::vector<int64_t> cuda_launch_plan(at::IntArrayRef x_shape, at::IntArrayRef w_shape,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, int64_t block_size,
                                      c10::string_view kernel_sv, int64_t max_blocks) {
  const std::string kernel(kernel_sv);
  TORCH_CHECK(x_shape.size() == 4 && w_shape.size() == 4 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2 && max_blocks >= 1,
              "cuda_launch_plan: bad arguments");
  const bool direct = kernel == "direct";
  TORCH_CHECK(direct || kernel == "gemm32" || kernel == "gemm64" || kernel == "gemm128",
              "cuda_launch_plan: unknown kernel '", kernel, "'");
  const ConvGeometry c = tiling::make_conv_geometry(
      x_shape[0], x_shape[1], x_shape[2], x_shape[3], w_shape[0], w_shape[2], w_shape[3], stride[0],
      stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, block_size);
  const PackedGeometry p = tiling::make_packed_geometry(c, direct ? 4 : tiling::kBK, 8, false,
                                                        c.C * c.H * c.W, c.H * c.W, c.W, 1);
  std::vector<int64_t> plan;
  for (int64_t items : {c.N * p.GB * p.HW, c.O * p.Ktot, c.O * p.S}) {
    plan.insert(plan.end(), {tiling::elementwise_blocks(items), 1, 1});
  }
  std::vector<int64_t> main;
  if (direct) {
    const int64_t total = c.N * c.O * c.Ho * c.Wo;
    main = {tiling::elementwise_blocks(total), 1, 1, total, -1};
  } else if (kernel == "gemm32") {
    main = gemm_plan<1>(p, max_blocks);
  } else if (kernel == "gemm64") {
    main = gemm_plan<2>(p, max_blocks);
  } else {
    main = gemm_plan<4>(p, max_blocks);
  }
  plan.insert(plan.end(), main.begin(), main.end());
  return plan;
}

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
      TORCH_CHECK(false, "cuda_tiling_selftest: unsupported dtype ", t);
  }
}

c10::optional<at::Tensor> as_float(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->to(at::kFloat).contiguous();
}
const float* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// kernel: "direct", or "gemm32" / "gemm64" / "gemm128" followed by "-dp4a" or "-mma".
// Arguments are assumed checked (dsconv_ext.dsconv.check_dsconv2d_args).
at::Tensor cuda_tiling_selftest(const at::Tensor& x, const at::Tensor& intweight,
                                const at::Tensor& alpha, const c10::optional<at::Tensor>& KDSb,
                                const c10::optional<at::Tensor>& CDSw,
                                const c10::optional<at::Tensor>& CDSb,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                int64_t block_size, int64_t act_bits, bool fuse_silu,
                                c10::string_view kernel_sv) {
  std::string kernel(kernel_sv);
  // "...@B": launch at most B CTAs (each then walks several tiles).
  int64_t max_blocks = tiling::kMaxGridX;
  const size_t at = kernel.find('@');
  if (at != std::string::npos) {
    max_blocks = std::stoll(kernel.substr(at + 1));
    TORCH_CHECK(max_blocks >= 1, "cuda_tiling_selftest: bad block count in '", kernel, "'");
    kernel.resize(at);
  }
  const bool direct = kernel == "direct";
  int warps_n = 0;
  bool tensor_cores = false;
  for (int wn : {1, 2, 4}) {
    for (bool tc : {false, true}) {
      if (kernel == "gemm" + std::to_string(32 * wn) + (tc ? "-mma" : "-dp4a")) {
        warps_n = wn;
        tensor_cores = tc;
      }
    }
  }
  TORCH_CHECK(direct || warps_n != 0, "cuda_tiling_selftest: unknown kernel '", kernel, "'");
  TORCH_CHECK(x.device().is_cpu() && intweight.device().is_cpu() && alpha.device().is_cpu(),
              "cuda_tiling_selftest emulates the CUDA kernels on CPU tensors");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2);
  const ConvGeometry c = tiling::make_conv_geometry(
      x.size(0), x.size(1), x.size(2), x.size(3), intweight.size(0), intweight.size(2),
      intweight.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
      groups, block_size);
  const bool has_kds = KDSb.has_value() && KDSb->defined();
  const PackedGeometry p =
      tiling::make_packed_geometry(c, direct ? 4 : tiling::kBK, static_cast<int>(act_bits), has_kds,
                                   x.stride(0), x.stride(1), x.stride(2), x.stride(3));
  at::Tensor y = at::empty({c.N, c.O, c.Ho, c.Wo}, x.options());
  if (y.numel() == 0) return y;

  // Buffers start as garbage: every byte the kernels read must have been written.
  const auto opts = x.options();
  at::Tensor xq = at::full({c.N * p.HW * p.Ctot}, 0x5a, opts.dtype(at::kChar));
  at::Tensor xs = at::full({c.N * p.HW * p.GB}, 12345.f, opts.dtype(at::kFloat));
  at::Tensor xm = at::full({c.N * p.HW * p.GB}, 777, opts.dtype(at::kInt));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using in_t = decltype(tag);
    const in_t* xp = x.data_ptr<in_t>();
    for (int64_t i = 0; i < c.N * p.GB * p.HW; ++i) {
      tiling::bfp_quantize_thread(p, xp, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                                  has_kds ? xm.data_ptr<int32_t>() : nullptr, i);
    }
  });
  const at::Tensor w = intweight.contiguous();
  at::Tensor wp = at::full({c.O * p.Ktot}, 0x5a, opts.dtype(at::kChar));
  for (int64_t i = 0; i < wp.numel(); ++i) {
    tiling::pack_weight_thread(p, w.data_ptr<int8_t>(), wp.data_ptr<int8_t>(), i);
  }
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> kd = as_float(KDSb);
  at::Tensor ap = at::full({c.O * p.S}, 999.f, opts.dtype(at::kFloat));
  at::Tensor kp = at::full({c.O * p.S}, 999.f, opts.dtype(at::kFloat));
  for (int64_t i = 0; i < ap.numel(); ++i) {
    tiling::pack_params_thread(p, a.data_ptr<float>(), ptr_or_null(kd), ap.data_ptr<float>(),
                               has_kds ? kp.data_ptr<float>() : nullptr, i);
  }
  const c10::optional<at::Tensor> cw = as_float(CDSw), cb = as_float(CDSb), bb = as_float(bias);
  const OperandPtrs q{
      xq.data_ptr<int8_t>(), xs.data_ptr<float>(), has_kds ? xm.data_ptr<int32_t>() : nullptr,
      wp.data_ptr<int8_t>(), ap.data_ptr<float>(), has_kds ? kp.data_ptr<float>() : nullptr};
  y.fill_(std::numeric_limits<float>::quiet_NaN());  // every output must be written
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using out_t = decltype(tag);
    const EpiloguePtrs<out_t> e{y.data_ptr<out_t>(), ptr_or_null(cw), ptr_or_null(cb),
                                ptr_or_null(bb), fuse_silu};
    if (direct) {
      for (int64_t i = 0; i < y.numel(); ++i) tiling::direct_thread(p, q, e, i);
    } else if (warps_n == 1) {
      emulate_gemm<1, out_t>(p, q, e, tensor_cores, max_blocks);
    } else if (warps_n == 2) {
      emulate_gemm<2, out_t>(p, q, e, tensor_cores, max_blocks);
    } else {
      emulate_gemm<4, out_t>(p, q, e, tensor_cores, max_blocks);
    }
  });
  return y;
}

}  // namespace
}  // namespace dsconv_ext

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // Host emulation of the CUDA kernels (tests): kernel "direct" or "gemm{32,64,128}-{dp4a,mma}",
  // optionally "@B" (at most B CTAs, each walking several tiles).
  m.def(
      "cuda_tiling_selftest(Tensor x, Tensor intweight, Tensor alpha, Tensor? KDSb, "
      "Tensor? CDSw, Tensor? CDSb, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int block_size, int act_bits, bool fuse_silu, str kernel) -> Tensor");
  // The CUDA launcher's grids for a problem, computed on the host (tests): see cuda_launch_plan.
  m.def(
      "cuda_launch_plan(int[] x_shape, int[] w_shape, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int block_size, str kernel, int max_blocks) -> int[]",
      &dsconv_ext::cuda_launch_plan);
}

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) {
  m.impl("cuda_tiling_selftest", &dsconv_ext::cuda_tiling_selftest);
}
