// CPU implementation of dsconv_ext::dsconv2d: argument checks, the packed layouts, the two
// parallel phases (pack activations, convolve) and the ISA dispatch. The maths lives in the
// per-ISA files; see dsconv2d_cpu.h for the layouts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cpu/dsconv2d_cpu.h"
#include "cpu/weight_pack.h"
#include "cpu/parallel.h"

namespace dsconv_ext {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni:
      return "avx512_vnni";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

static Isa best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa select_isa() {
  static const Isa best = best_isa();
  const char* env = std::getenv("DSCONV_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa isa;
  if (want == "avx512_vnni") {
    isa = Isa::kAvx512Vnni;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "scalar") {
    isa = Isa::kScalar;
  } else {
    TORCH_CHECK(false, "DSCONV_EXT_CPU_ISA must be one of avx512_vnni, avx2, scalar; got '", want,
                "'");
  }
  // The variable can only lower the path: a request above what the CPU runs gets the best.
  return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
}

static const IsaKernels& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni:
      return kernels_avx512();
    case Isa::kAvx2:
      return kernels_avx2();
    default:
      return kernels_scalar();
  }
}

namespace {

// Grow-only scratch of the calling thread: the packed activations of a large layer are MBs, and
// fresh allocations of that size come back as untouched pages that fault on every call.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(ptr); }
  uint8_t* get(size_t want) {
    if (want > bytes) {
      std::free(ptr);
      bytes = (want + 4095) & ~size_t(4095);
      ptr = std::aligned_alloc(64, bytes);
      TORCH_CHECK(ptr != nullptr, "dsconv2d: out of memory for ", bytes, " bytes of scratch");
    }
    return static_cast<uint8_t*>(ptr);
  }
};

size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

void check_param(const c10::optional<at::Tensor>& t, const char* name, c10::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), "dsconv2d: ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dsconv2d: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "dsconv2d: ", name, " must have shape ", shape, ", got ",
              t->sizes());
}

Layout make_layout(const at::Tensor& x, const at::Tensor& w, c10::IntArrayRef stride,
                   c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                   int64_t block, int64_t qtile) {
  Layout lay;
  ConvGeometry& g = lay.g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = w.size(0), g.kh = w.size(2), g.kw = w.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1];
  g.groups = groups, g.Cg = g.C / groups, g.Og = g.O / groups;
  g.block = block, g.nblk = num_blocks(g.Cg, block);
  g.Ho = conv_out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = conv_out_size(g.W, g.kw, g.sw, g.pw, g.dw);
  lay.Hp = g.H + 2 * g.ph, lay.Wp = g.W + 2 * g.pw;
  lay.Hq = (lay.Hp + g.sh - 1) / g.sh, lay.Wq = (lay.Wp + g.sw - 1) / g.sw;
  lay.P = g.sh * g.sw;
  lay.ntaps = g.kh * g.kw;
  lay.depthwise = g.Cg == 1;
  lay.K4 = lay.depthwise ? 0 : (std::min(block, g.Cg) + 3) / 4;
  lay.Qlen = g.Ho * lay.Wq;
  lay.qtile = qtile;
  lay.nqt = (lay.Qlen + qtile - 1) / qtile;
  // The last tile reads up to a whole tile past Qlen, plus the farthest tap.
  const int64_t far = ((g.kh - 1) * g.dh / g.sh) * lay.Wq + (g.kw - 1) * g.dw / g.sw;
  const int64_t need = lay.nqt * qtile + far;
  lay.Hqx = std::max(lay.Hq, (need + lay.Wq - 1) / lay.Wq);
  lay.Lq = lay.Hqx * lay.Wq;
  lay.tapoff.resize(lay.ntaps);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t phase = ((i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw;
      lay.tapoff[i * g.kw + j] = phase * lay.Lq + ((i * g.dh) / g.sh) * lay.Wq + (j * g.dw) / g.sw;
    }
  }
  return lay;
}

}  // namespace

at::Tensor dsconv2d_cpu(const at::Tensor& x_in, const at::Tensor& intweight_in,
                        const at::Tensor& alpha, const c10::optional<at::Tensor>& KDSb,
                        const c10::optional<at::Tensor>& CDSw,
                        const c10::optional<at::Tensor>& CDSb,
                        const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                        int64_t block_size, int64_t act_bits, bool fuse_silu) {
  TORCH_CHECK(x_in.device().is_cpu(), "dsconv2d: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat,
              "dsconv2d: the CPU kernel takes float32 x (dsconv_ext.dsconv2d casts float16 / "
              "bfloat16), got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 4, "dsconv2d: x must be 4-D [N, C, H, W], got ", x_in.dim(), "-D");
  TORCH_CHECK(intweight_in.device().is_cpu(), "dsconv2d: intweight must be a CPU tensor, got ",
              intweight_in.device());
  TORCH_CHECK(intweight_in.scalar_type() == at::kChar, "dsconv2d: intweight must be int8, got ",
              intweight_in.scalar_type());
  TORCH_CHECK(intweight_in.dim() == 4, "dsconv2d: intweight must be 4-D [O, C/groups, kh, kw], ",
              "got ", intweight_in.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dsconv2d: stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "dsconv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "dsconv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "dsconv2d: dilation must be >= 1, got ",
              dilation);
  TORCH_CHECK(groups >= 1, "dsconv2d: groups must be >= 1, got ", groups);
  TORCH_CHECK(block_size >= 1 && block_size <= kMaxBlockSize,
              "dsconv2d: block_size must be in [1, ", kMaxBlockSize, "], got ", block_size);
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "dsconv2d: act_bits must be in [2, 8], got ",
              act_bits);
  const int64_t C = x_in.size(1), O = intweight_in.size(0);
  TORCH_CHECK(C >= 1, "dsconv2d: x must have at least one channel");
  TORCH_CHECK(C % groups == 0, "dsconv2d: x has ", C,
              " channels, not divisible by groups=", groups);
  TORCH_CHECK(O % groups == 0, "dsconv2d: intweight has ", O,
              " output channels, not divisible by groups=", groups);
  TORCH_CHECK(intweight_in.size(1) * groups == C, "dsconv2d: x has ", C,
              " channels but intweight expects ", intweight_in.size(1) * groups,
              " (I/g=", intweight_in.size(1), ", groups=", groups, ")");
  const int64_t kh = intweight_in.size(2), kw = intweight_in.size(3);
  TORCH_CHECK(kh >= 1 && kw >= 1, "dsconv2d: intweight kernel size must be >= 1, got ", kh, "x",
              kw);
  const int64_t nblk = num_blocks(C / groups, block_size);
  TORCH_CHECK(alpha.device().is_cpu(), "dsconv2d: alpha must be a CPU tensor, got ",
              alpha.device());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()),
              "dsconv2d: alpha must be a floating-point tensor, got ", alpha.scalar_type());
  TORCH_CHECK(alpha.sizes() == c10::IntArrayRef({O, nblk, kh, kw}),
              "dsconv2d: alpha must have shape [", O, ", ", nblk, ", ", kh, ", ", kw,
              "] (block_size=", block_size, "), got ", alpha.sizes());
  check_param(KDSb, "KDSb", {O, nblk, kh, kw});
  check_param(CDSw, "CDSw", {O});
  check_param(CDSb, "CDSb", {O});
  check_param(bias, "bias", {O});
  const int64_t H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0]);
  const int64_t Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "dsconv2d: x spatial size (", H, ", ", W,
              ") is too small for kernel (", kh, ", ", kw, ") with padding ", padding,
              " and dilation ", dilation);

  const Isa isa = select_isa();
  const IsaKernels& kern = kernels_for(isa);
  const int64_t N = x_in.size(0);
  at::Tensor y = at::empty({N, O, Ho, Wo}, x_in.options());
  if (y.numel() == 0) return y;

  const at::Tensor x = x_in.contiguous();
  const Layout lay =
      make_layout(x, intweight_in, stride, padding, dilation, groups, block_size, kern.qtile);
  const ConvGeometry& g = lay.g;

  // Epilogue constants per group, padded to whole o-tiles.
  const int64_t Ogp = (g.Og + kOTile - 1) / kOTile * kOTile;
  std::vector<float> epi(size_t(2 * groups * Ogp), 0.f);
  {
    at::Tensor cw = CDSw.has_value() ? CDSw->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor cb = CDSb.has_value() ? CDSb->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor bb = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    for (int64_t o = 0; o < O; ++o) {
      const int64_t grp = o / g.Og, r = o % g.Og;
      epi[grp * Ogp + r] = cw.defined() ? cw.data_ptr<float>()[o] : 1.f;
      // CDSb + bias folded into one add: y = CDSw * acc + (CDSb + bias).
      epi[(groups + grp) * Ogp + r] = (cb.defined() ? cb.data_ptr<float>()[o] : 0.f) +
                                      (bb.defined() ? bb.data_ptr<float>()[o] : 0.f);
    }
  }

  // Scratch: per (n, g) slice act words, esc floats, usum floats (int path) or xq (depthwise).
  const bool with_kdsb = KDSb.has_value() && !lay.depthwise;
  const size_t act_b = align64(size_t(lay.act_words()) * 4);
  const size_t esc_b = align64(size_t(lay.esc_floats()) * 4);
  const size_t us_b = with_kdsb ? esc_b : 0;
  const size_t xq_b = lay.depthwise ? align64(size_t(lay.P * lay.Lq) * 4) : 0;
  const size_t slice_b = lay.depthwise ? xq_b : act_b + esc_b + us_b;
  static thread_local Scratch scratch;
  uint8_t* base = scratch.get(slice_b * size_t(N * groups));
  auto slice_ptr = [&](int64_t n, int64_t grp) { return base + (n * groups + grp) * slice_b; };

  // Phase 1: one task per (n, g, block, phase row).
  const float* xp = x.data_ptr<float>();
  const int64_t rows = g.sh * lay.Hqx;
  const int64_t pack_tasks = N * groups * g.nblk * rows;
  parallel_for_tasks(pack_tasks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t % rows, b = (t / rows) % g.nblk, ng = t / (rows * g.nblk);
      const int64_t n = ng / groups, grp = ng % groups;
      PackRow pr{};
      pr.lay = &lay;
      pr.x_cstride = g.H * g.W;
      pr.x = xp + (n * g.C + grp * g.Cg + block_begin(b, g.block)) * pr.x_cstride;
      pr.nch = block_end(b, g.block, g.Cg) - block_begin(b, g.block);
      pr.mant_bits = static_cast<int>(act_bits);
      pr.ry = row / lay.Hqx, pr.yq = row % lay.Hqx;
      uint8_t* s = slice_ptr(n, grp);
      if (lay.depthwise) {
        pr.xq = reinterpret_cast<float*>(s);
        kern.pack_row_dw(pr);
      } else {
        pr.act = reinterpret_cast<uint32_t*>(s) + b * lay.K4 * lay.P * lay.Lq;
        pr.esc = reinterpret_cast<float*>(s + act_b) + b * lay.P * lay.Lq;
        pr.usum =
            with_kdsb ? reinterpret_cast<float*>(s + act_b + esc_b) + b * lay.P * lay.Lq : nullptr;
        kern.pack_row(pr);
      }
    }
  });

  // Phase 2: the convolution.
  float* yp = y.data_ptr<float>();
  auto make_slice = [&](int64_t n, int64_t grp) {
    Slice sl{};
    sl.lay = &lay;
    uint8_t* s = slice_ptr(n, grp);
    if (lay.depthwise) {
      sl.xq = reinterpret_cast<const float*>(s);
    } else {
      sl.act = reinterpret_cast<const uint32_t*>(s);
      sl.esc = reinterpret_cast<const float*>(s + act_b);
      sl.usum = with_kdsb ? reinterpret_cast<const float*>(s + act_b + esc_b) : nullptr;
    }
    sl.out_cstride = Ho * Wo;
    sl.out = yp + (n * O + grp * g.Og) * sl.out_cstride;
    sl.nout = g.Og;
    return sl;
  };
  auto epilogue = [&](int64_t grp) {
    return Epilogue{epi.data() + grp * Ogp, epi.data() + (groups + grp) * Ogp, fuse_silu};
  };

  if (lay.depthwise) {
    // Weights alpha * q + KDSb: with one channel per block the block sum is the mantissa itself.
    const at::Tensor a = alpha.to(at::kFloat).contiguous();
    const at::Tensor kb = KDSb.has_value() ? KDSb->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor q = intweight_in.contiguous();
    std::vector<float> wdw(size_t(O * lay.ntaps));
    for (int64_t i = 0; i < O * lay.ntaps; ++i) {
      wdw[i] = a.data_ptr<float>()[i] * q.data_ptr<int8_t>()[i] +
               (kb.defined() ? kb.data_ptr<float>()[i] : 0.f);
    }
    constexpr int64_t kChunk = 4;  // q tiles per task
    const int64_t nqc = (lay.nqt + kChunk - 1) / kChunk;
    parallel_for_tasks(N * groups * nqc, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t qc = t % nqc, ng = t / nqc, n = ng / groups, grp = ng % groups;
        const Slice sl = make_slice(n, grp);
        kern.dw_tiles(sl, wdw.data() + grp * g.Og * lay.ntaps, epilogue(grp), 0, g.Og, qc * kChunk,
                      std::min(lay.nqt, (qc + 1) * kChunk));
      }
    });
    return y;
  }

  const auto pw = packed_weights(intweight_in, alpha, KDSb, lay, kern.weight_elem_bytes);
  const int64_t otiles = pw->otiles;
  // o-tile innermost: a thread walks all o-tiles over one pixel tile, whose activations stay in
  // L1, while the (smaller) weight streams come from L2.
  parallel_for_tasks(N * groups * lay.nqt * otiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ot = t % otiles, qt = (t / otiles) % lay.nqt;
      const int64_t ng = t / (otiles * lay.nqt), n = ng / groups, grp = ng % groups;
      const Slice sl = make_slice(n, grp);
      kern.conv_tiles(sl, pw->stream(grp, ot), epilogue(grp), ot, qt, qt + 1);
    }
  });
  return y;
}

int parallel_probe(int64_t n) {
  std::vector<std::thread::id> ids(size_t(std::max<int64_t>(n, 0)));
  parallel_for_tasks(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ids[i] = std::this_thread::get_id();
  });
  std::sort(ids.begin(), ids.end());
  return static_cast<int>(std::unique(ids.begin(), ids.end()) - ids.begin());
}

}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) { m.impl("dsconv2d", &dsconv_ext::cpu::dsconv2d_cpu); }

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // Which SIMD path the CPU kernel takes on this machine (after DSCONV_EXT_CPU_ISA).
  m.def("cpu_isa() -> str",
        []() -> std::string { return dsconv_ext::cpu::isa_name(dsconv_ext::cpu::select_isa()); });
  // Test hook: how many threads the kernel's parallel loops really use for `tasks` tasks.
  m.def("_cpu_parallel_probe(int tasks) -> int",
        [](int64_t tasks) -> int64_t { return dsconv_ext::cpu::parallel_probe(tasks); });
}
