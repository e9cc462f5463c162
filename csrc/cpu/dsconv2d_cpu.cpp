// CPU implementation of dsconv_ext::dsconv2d: argument checks, the band split, the parallel loop
// over (image, group, band, output-channel chunk) tasks and the ISA dispatch. The maths lives in
// the per-ISA files; see dsconv2d_cpu.h for the layouts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/c_allocator.h"
#include "cpu/dsconv2d_cpu.h"
#include "cpu/weight_pack.h"
#include "cpu/parallel.h"

namespace dsconv_ext {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAmxModel:
      return "amx_model";
    case Isa::kNeonDot:
      return "neon_dot";
    case Isa::kNeonModel:
      return "neon_model";
    case Isa::kAvx512Vnni:
      return "avx512_vnni";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// Best SIMD path without AMX.
static Isa best_vector_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  if (neon_dot_usable()) return Isa::kNeonDot;
  return Isa::kScalar;
}

Isa select_isa(bool* amx_forced) {
  if (amx_forced) *amx_forced = false;
  // The AMX path packs and folds with the AVX-512 code, so it needs both.
  static const Isa vector_best = best_vector_isa();
  static const char* amx_why = nullptr;
  static const bool amx = vector_best == Isa::kAvx512Vnni && amx_usable(&amx_why);
  const Isa best = amx ? Isa::kAmx : vector_best;
  const char* env = std::getenv("DSCONV_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  // The AMX paths are forced, not capped at what the CPU runs: a test or benchmark asking for
  // them must not silently measure another path.
  if (want == "amx") {
    TORCH_CHECK(amx, "DSCONV_EXT_CPU_ISA=amx, but this machine cannot run AMX: ",
                vector_best != Isa::kAvx512Vnni ? "the CPU has no AVX-512 VNNI" : amx_why);
    if (amx_forced) *amx_forced = true;
    return Isa::kAmx;
  }
  if (want == "amx_model") {
    TORCH_CHECK(vector_best == Isa::kAvx512Vnni,
                "DSCONV_EXT_CPU_ISA=amx_model runs the AMX kernel on a software model of the "
                "tiles with AVX-512 around it, and this CPU has no AVX-512 VNNI");
    return Isa::kAmxModel;
  }
  if (want == "neon_dot") {
    TORCH_CHECK(vector_best == Isa::kNeonDot,
                "DSCONV_EXT_CPU_ISA=neon_dot, but this machine cannot run it: it needs an AArch64 "
                "CPU with the dot-product instructions (FEAT_DotProd)");
    return Isa::kNeonDot;
  }
  // The model is plain C++: any CPU runs it.
  if (want == "neon_model") return Isa::kNeonModel;
  Isa isa;
  if (want == "avx512_vnni") {
    isa = Isa::kAvx512Vnni;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "scalar") {
    isa = Isa::kScalar;
  } else {
    TORCH_CHECK(false,
                "DSCONV_EXT_CPU_ISA must be one of amx, amx_model, avx512_vnni, avx2, neon_dot, "
                "neon_model, scalar; got '",
                want, "'");
  }
  // The vector paths can only be lowered: a request above what the CPU runs gets the best (on
  // an Arm CPU an x86 path is never run: the request gets the Arm CPU's best).
  if (isa_is_x86_simd(isa) && !isa_is_x86_simd(vector_best)) return vector_best;
  return static_cast<int>(isa) < static_cast<int>(vector_best) ? isa : vector_best;
}

// Whether the AMX tiles beat the AVX-512 VNNI ones on an int8 layer. Every (block, tap) segment's
// C tile goes through memory into a float fold (kernel_amx.cpp) whatever the segment's depth, so
// AMX loses where segments are shallow. Measured on an AMX Xeon (2 threads, YOLO11 conv shapes,
// block 32, 2026-12-06, docs/benchmarks.md): from 32 input channels per group on, 3x3 layers
// ran at 1.11-1.35x the VNNI speed and 1x1 layers at 1.01-1.22x; 16 -> 8 at 160x160 at 0.72x and
// 16 -> 32 at 80x80 at 0.98x. Blocks of 64 and 128 channels gave the same cut.
bool amx_pays_off(int64_t Cg) { return Cg >= kAmxMinChannels; }

Isa select_isa_for_layer(int64_t Cg) {
  bool forced = false;
  const Isa isa = select_isa(&forced);
  if (isa != Isa::kAmx || forced) return isa;
  return amx_pays_off(Cg) ? Isa::kAmx : Isa::kAvx512Vnni;
}

const IsaKernels& kernels_not_built(const char* isa, const char* family) {
  TORCH_CHECK(false, "dsconv_ext: the ", isa, " CPU path is compiled only for ", family,
              " CPUs, and this build is for another CPU");
  return kernels_scalar();  // (not reached)
}

const IsaKernels& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return kernels_amx();
    case Isa::kAmxModel:
      return kernels_amx_model();
    case Isa::kAvx512Vnni:
      return kernels_avx512();
    case Isa::kAvx2:
      return kernels_avx2();
    case Isa::kNeonDot:
      return kernels_neon_dot();
    case Isa::kNeonModel:
      return kernels_neon_model();
    default:
      return kernels_scalar();
  }
}

namespace {

size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

void check_param(const c10::optional<at::Tensor>& t, const char* name, c10::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), "dsconv2d: ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dsconv2d: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "dsconv2d: ", name, " must have shape ", shape, ", got ",
              t->sizes());
}

// Whether `out` shares memory with `x`, decided from byte ranges instead of
// at::get_overlap_status, which answers "too hard" for any non-contiguous tensor, and so let
// through every overlapping channel slice of a batch > 1 (the op is also reached directly, by
// torch.compile and by DSConv2d.forward_into, without the Python wrapper's check).
enum class Overlap { kNone, kYes, kMaybe };

struct ByteSpan {
  uintptr_t lo, hi;  // [lo, hi)
};

// Bytes covered by dims [d0, dim) of t, starting at `base` (torch strides are >= 0).
ByteSpan span_from(uintptr_t base, const at::Tensor& t, int64_t d0) {
  int64_t last = 0;
  for (int64_t d = d0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {base, base + uintptr_t(last + 1) * uintptr_t(t.element_size())};
}

// Whether one image of a 4-D tensor ([C, H, W], any dim order) is non-overlapping and dense:
// then every element slot between its first and last byte belongs to it.
bool image_dense(const at::Tensor& t) {
  std::pair<int64_t, int64_t> dims[3];  // (stride, size) of the dims of size > 1
  int n = 0;
  for (int64_t d = 1; d < 4; ++d)
    if (t.size(d) != 1) dims[n++] = {t.stride(d), t.size(d)};
  // Insertion sort of at most 3 (std::sort's inlined 16-element threshold makes GCC 12's
  // -Warray-bounds flag a read past the 3 that can never happen).
  for (int i = 1; i < n; ++i)
    for (int j = i; j > 0 && dims[j] < dims[j - 1]; --j) std::swap(dims[j], dims[j - 1]);
  int64_t expect = 1;
  for (int i = 0; i < n; ++i) {
    if (dims[i].first != expect) return false;
    expect *= dims[i].second;
  }
  return true;
}

// Strides of an `out` whose [Ho, Wo] planes are each dense and lie apart, in (image, channel)
// order: plane (n, o) at n * image + o * plane floats. Channel slices of a concatenation
// ([N, C, Ho, Wo] with C > O) and the anchor axis of a detection head's [N, O, anchors] buffer
// (planes `anchors` apart) are such layouts. Sizes of 1 take the dense strides.
struct PlaneStrides {
  int64_t image, plane;
};

bool plane_strides(const at::Tensor& out, PlaneStrides* ps) {
  const int64_t N = out.size(0), O = out.size(1), Ho = out.size(2), Wo = out.size(3);
  if ((Wo != 1 && out.stride(3) != 1) || (Ho != 1 && out.stride(2) != Wo)) return false;
  ps->plane = O == 1 ? Ho * Wo : out.stride(1);
  if (ps->plane < Ho * Wo) return false;
  const int64_t image_span = (O - 1) * ps->plane + Ho * Wo;
  ps->image = N == 1 ? image_span : out.stride(0);
  return ps->image >= image_span;
}

// `out` has plane strides `ps` (checked before). Compares each x image's byte range with out's
// planes, so that channel slices of one buffer (x = buf[:, :32], out = buf[:, 32:]: whole spans
// interleaved at batch > 1, images disjoint) pass. A plane meeting an x image's range is a real
// overlap when that image is dense (it covers every slot of its range); otherwise (x strided
// within an image) it cannot tell cheaply: kMaybe.
Overlap out_overlap(const at::Tensor& out, const PlaneStrides& ps, const at::Tensor& x) {
  if (out.numel() == 0 || x.numel() == 0) return Overlap::kNone;
  const uintptr_t o0 = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t x0 = reinterpret_cast<uintptr_t>(x.data_ptr());
  const ByteSpan ow = span_from(o0, out, 0), xw = span_from(x0, x, 0);
  if (ow.hi <= xw.lo || xw.hi <= ow.lo) return Overlap::kNone;
  const int64_t N = out.size(0), O = out.size(1), esize = out.element_size();
  const int64_t plane_b = out.size(2) * out.size(3) * esize;  // bytes of one plane
  const int64_t pstep = ps.plane * esize, istep = ps.image * esize;
  const int64_t ispan = (O - 1) * pstep + plane_b;
  for (int64_t n = 0; n < x.size(0); ++n) {
    const ByteSpan xi = span_from(x0 + uintptr_t(n * x.stride(0) * x.element_size()), x, 1);
    if (xi.hi <= o0 || xi.lo >= ow.hi) continue;
    // Out's images whose span may meet [xi.lo, xi.hi), in increasing order.
    const int64_t lo = int64_t(xi.lo) - int64_t(o0), hi = int64_t(xi.hi) - int64_t(o0);
    int64_t m = lo < ispan ? 0 : (lo - ispan) / istep + 1;
    for (; m < N && m * istep < hi; ++m) {
      // Planes o with [m*istep + o*pstep, + plane_b) meeting [lo, hi).
      const int64_t rel_lo = lo - m * istep, rel_hi = hi - m * istep;
      const int64_t first = rel_lo < plane_b ? 0 : (rel_lo - plane_b) / pstep + 1;
      const int64_t last = std::min<int64_t>(O - 1, (rel_hi - 1) / pstep);
      if (first <= last) return image_dense(x) ? Overlap::kYes : Overlap::kMaybe;
    }
  }
  return Overlap::kNone;
}

// Per-thread packed band: about this many bytes, so that it stays in a core's L2.
constexpr int64_t kBandBytes = 384 << 10;
// Depthwise band (one channel, quantised and convolved at once): with its output stage about
// twice this, within a 32-48 KB L1 beside the input rows streaming in and the output going out
// (12 KB measured a little faster than 20 KB).
constexpr int64_t kDwBandBytes = 12 << 10;
// Elements past each phase plane's last row. Depthwise: its quantiser stores whole 16-float
// vectors, so a row's last one may run past the plane. Dense: the AVX2 packer stores a row's last
// partial chunk whole (the masked store is microcoded on AMD Zen 2 and 3); its spare lanes fall
// on the next row of the plane, packed after it, or here.
constexpr int64_t kPlaneSlack = 16;

// Calls per kernel path since load, (kScalefBands) int8 bands of esc_shift ISAs folded with
// vscalefps rather than by exponent addition (Slice::exponent_add), (kPathAmx) int8 calls
// that ran on the AMX kernel, real or model, and (kPathAvx2Bytes) int8 calls on the AVX2 byte
// layout: a test hook that shows which path a shape takes.
enum Path : int {
  kPathInt8 = 0,
  kPathFloat = 1,
  kPathDepthwise = 2,
  kScalefBands = 3,
  kPathAmx = 4,
  kPathAvx2Bytes = 5,
  kPaths = 6
};
std::atomic<int64_t> path_calls[kPaths];

// The weight width to pack for: an ISA's own, and for AVX2 (0: by the weights' |q|) 2 when
// DSCONV_EXT_AVX2_LAYOUT=int16 asks for the int16 pairs whatever the weights (read per call, as
// DSCONV_EXT_CPU_ISA: benchmarks and tests compare the two layouts in one process).
int weight_elem_bytes(const IsaKernels& kern) {
  if (kern.weight_elem_bytes != 0) return kern.weight_elem_bytes;
  const char* layout = std::getenv("DSCONV_EXT_AVX2_LAYOUT");
  if (layout == nullptr || *layout == '\0' || std::strcmp(layout, "auto") == 0) return 0;
  TORCH_CHECK(std::strcmp(layout, "int16") == 0,
              "DSCONV_EXT_AVX2_LAYOUT must be 'auto' or 'int16', got '", layout, "'");
  return 2;
}

// Geometry, band split and q-space sizes. With few tasks the split aims at a task count that is
// a multiple of `threads` (two threads on three equal tasks idle a third of the time), splitting
// the output channels into `ochunks` when the rows alone cannot give enough tasks.
Layout make_layout(const at::Tensor& x, const at::Tensor& w, c10::IntArrayRef stride,
                   c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                   int64_t block, int64_t qtile, int64_t float_qtile, int64_t planes_per_k4,
                   bool with_kdsb, int64_t threads, int64_t band_bytes, int64_t plane_slack,
                   int64_t* ochunks) {
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
  lay.K4 = (std::min(block, g.Cg) + 3) / 4;
  lay.K4_last = (block_end(g.nblk - 1, block, g.Cg) - block_begin(g.nblk - 1, block) + 3) / 4;
  lay.kfloat = lay.K4 <= 1;
  lay.kplanes = lay.K4 * planes_per_k4;
  lay.qtile = lay.kfloat ? float_qtile : qtile;

  // Bands: as tall as the budget allows, then more of them while there are too few tasks.
  const int64_t per_pixel =
      lay.kfloat ? 4 * g.Cg : g.nblk * (4 * lay.kplanes + 4 + (with_kdsb ? 4 : 0));
  const int64_t row_bytes = std::max<int64_t>(1, per_pixel * lay.Wp * g.sh);
  int64_t rows = std::clamp<int64_t>(band_bytes / row_bytes, 1, g.Ho);
  int64_t nb = (g.Ho + rows - 1) / rows;
  const int64_t slices = g.N * groups;
  *ochunks = 1;
  if (slices * nb < 4 * threads) {
    const int64_t want = (slices * nb + threads - 1) / threads * threads;
    nb = std::max(nb, std::min((want + slices - 1) / slices, std::max<int64_t>(1, g.Ho / 2)));
    if (slices * nb < want) *ochunks = (want + slices * nb - 1) / (slices * nb);
  }
  lay.band_rows = (g.Ho + nb - 1) / nb;
  lay.nbands = (g.Ho + lay.band_rows - 1) / lay.band_rows;
  lay.nqt = (lay.band_rows * lay.Wq + lay.qtile - 1) / lay.qtile;
  // A tile reads up to qtile - 1 past the band's last q, plus the farthest tap.
  const int64_t far = ((g.kh - 1) * g.dh / g.sh) * lay.Wq + (g.kw - 1) * g.dw / g.sw;
  lay.Hqb = (lay.nqt * lay.qtile + far + lay.Wq - 1) / lay.Wq;
  lay.Lq = lay.Hqb * lay.Wq + plane_slack;
  lay.tapoff.resize(lay.ntaps);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t phase = ((i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw;
      lay.tapoff[i * g.kw + j] = phase * lay.Lq + ((i * g.dh) / g.sh) * lay.Wq + (j * g.dw) / g.sw;
    }
  }
  return lay;
}

// Float-family weights alpha * q + KDSb as [G][o-tile][c][tap][R] floats, R = 1 or kFloatOTile.
std::vector<float> float_weights(const at::Tensor& intweight, const at::Tensor& alpha,
                                 const c10::optional<at::Tensor>& KDSb, const Layout& lay,
                                 int64_t R) {
  const ConvGeometry& g = lay.g;
  const at::Tensor q = intweight.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor kb = KDSb.has_value() ? KDSb->to(at::kFloat).contiguous() : at::Tensor();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* ap = a.data_ptr<float>();
  const float* kp = kb.defined() ? kb.data_ptr<float>() : nullptr;
  const int64_t ot_n = (g.Og + R - 1) / R, T = lay.ntaps;
  std::vector<float> wf(size_t(g.groups * ot_n * g.Cg * T * R), 0.f);
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t grp = o / g.Og, ol = o % g.Og, ot = ol / R, r = ol % R;
    for (int64_t c = 0; c < g.Cg; ++c) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t ai = (o * g.nblk + c / g.block) * T + t;
        wf[(((grp * ot_n + ot) * g.Cg + c) * T + t) * R + r] =
            ap[ai] * float(qp[(o * g.Cg + c) * T + t]) + (kp ? kp[ai] : 0.f);
      }
    }
  }
  return wf;
}

}  // namespace

// Both ops: `out` null allocates the result, else it is written into `*out` (checked here).
static at::Tensor dsconv2d_cpu_impl(const at::Tensor& x_in, const at::Tensor& intweight_in,
                                    const at::Tensor& alpha, const c10::optional<at::Tensor>& KDSb,
                                    const c10::optional<at::Tensor>& CDSw,
                                    const c10::optional<at::Tensor>& CDSb,
                                    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                    c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                    int64_t groups, int64_t block_size, int64_t act_bits,
                                    bool fuse_silu, const at::Tensor* out) {
  settle_c_allocator_once();
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

  const Isa isa = select_isa_for_layer(C / groups);
  const IsaKernels& kern0 = kernels_for(isa);
  const int64_t N = x_in.size(0);
  at::Tensor y;
  Overlap overlap = Overlap::kNone;
  PlaneStrides planes{O * Ho * Wo, Ho * Wo};
  if (out == nullptr) {
    y = at::empty({N, O, Ho, Wo}, x_in.options());
  } else {
    // Any image and plane stride (a channel slice of a concatenation, a level of a detection
    // head's anchor buffer), but each [Ho, Wo] plane dense: the kernels store whole rows.
    y = *out;
    TORCH_CHECK(y.device().is_cpu(), "dsconv2d_out: out must be a CPU tensor, got ", y.device());
    TORCH_CHECK(y.scalar_type() == at::kFloat, "dsconv2d_out: out must be float32, got ",
                y.scalar_type());
    TORCH_CHECK(y.sizes() == c10::IntArrayRef({N, O, Ho, Wo}),
                "dsconv2d_out: out must have shape [", N, ", ", O, ", ", Ho, ", ", Wo, "], got ",
                y.sizes());
    TORCH_CHECK(plane_strides(y, &planes),
                "dsconv2d_out: out must hold each [Ho, Wo] plane densely, planes apart in "
                "(image, channel) order (strides [>= (O - 1) * stride(1) + ",
                Ho * Wo, ", >= ", Ho * Wo, ", ", Wo, ", 1]), got strides ", y.strides());
    overlap = out_overlap(y, planes, x_in);
    TORCH_CHECK(overlap != Overlap::kYes,
                "dsconv2d_out: out must not overlap x: they share memory, and x would be "
                "overwritten while it is read (x: sizes ",
                x_in.sizes(), ", strides ", x_in.strides(), "; out: strides ", y.strides(), ")");
  }
  if (y.numel() == 0) return y;
  const int64_t y_nstride = N == 1 ? 0 : planes.image, y_cstride = planes.plane;

  // Where the overlap test cannot tell (x strided within an image, its range meeting out's), x
  // is copied first: the result is then that of a call on separate memory, whatever the layout.
  const at::Tensor x =
      overlap == Overlap::kMaybe ? x_in.clone(at::MemoryFormat::Contiguous) : x_in.contiguous();
  const bool with_kdsb = KDSb.has_value();
  const bool depthwise = C == groups && kern0.depthwise != nullptr;
  int64_t ochunks = 1;
  const int64_t float_qtile = kern0.float_qtile ? kern0.float_qtile : kern0.qtile;
  Layout lay = make_layout(x, intweight_in, stride, padding, dilation, groups, block_size,
                           depthwise ? kern0.dw_qtile : kern0.qtile,
                           depthwise ? kern0.dw_qtile : float_qtile, kern0.planes_per_k4, with_kdsb,
                           at::get_num_threads(), depthwise ? kDwBandBytes : kBandBytes,
                           kPlaneSlack, &ochunks);
  const ConvGeometry& g = lay.g;

  // Epilogue constants per group, padded to whole o-tiles of every kind (4, 8 or 16 channels):
  // the epilogues read a whole tile's constants.
  const int64_t Ogp = (g.Og + kAmxTile - 1) / kAmxTile * kAmxTile;
  std::vector<float> epi(size_t(2 * groups * Ogp), 0.f);
  {
    at::Tensor cw = CDSw.has_value() ? CDSw->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor cb = CDSb.has_value() ? CDSb->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor bb = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    // (data_ptr checks the dtype on every call: once per tensor, not per channel)
    const float* cwp = cw.defined() ? cw.data_ptr<float>() : nullptr;
    const float* cbp = cb.defined() ? cb.data_ptr<float>() : nullptr;
    const float* bbp = bb.defined() ? bb.data_ptr<float>() : nullptr;
    for (int64_t o = 0; o < O; ++o) {
      const int64_t grp = o / g.Og, r = o % g.Og;
      epi[grp * Ogp + r] = cwp ? cwp[o] : 1.f;
      // CDSb + bias folded into one add: y = CDSw * acc + (CDSb + bias).
      epi[(groups + grp) * Ogp + r] = (cbp ? cbp[o] : 0.f) + (bbp ? bbp[o] : 0.f);
    }
  }

  if (depthwise) {
    path_calls[kPathDepthwise].fetch_add(1, std::memory_order_relaxed);
    const std::vector<float> wf = float_weights(intweight_in, alpha, KDSb, lay, 1);  // [O][taps]
    DwArgs d{};
    d.lay = &lay;
    d.x = x.data_ptr<float>();
    d.y = y.data_ptr<float>();
    d.y_nstride = y_nstride;
    d.y_cstride = y_cstride;
    d.wf = wf.data();
    d.cdsw = epi.data();
    d.cb = epi.data() + groups * Ogp;
    d.epi_stride = Ogp;
    d.silu = fuse_silu;
    d.mant_bits = static_cast<int>(act_bits);
    const size_t buf_b = size_t(dw_buf_floats(lay)) * 4;
    parallel_for_tasks(N * groups * lay.nbands, [&](int64_t t0, int64_t t1) {
      static thread_local Scratch scratch;
      kern0.depthwise(d, reinterpret_cast<float*>(scratch.get(buf_b)), t0, t1);
    });
    return y;
  }
  path_calls[lay.kfloat ? kPathFloat : kPathInt8].fetch_add(1, std::memory_order_relaxed);
  if (!lay.kfloat && kern0.amx_weights)
    path_calls[kPathAmx].fetch_add(1, std::memory_order_relaxed);

  // Weights: int8 streams (cached) or float weights (small: blocks of <= 4 channels).
  std::shared_ptr<const PackedWeights> pw;
  std::vector<float> wf;
  const int64_t R = !lay.kfloat ? kern0.otile : g.Og == 1 ? 1 : kFloatOTile;
  const int64_t otiles = (g.Og + R - 1) / R;
  if (lay.kfloat) {
    wf = float_weights(intweight_in, alpha, KDSb, lay, R);
  } else {
    pw =
        packed_weights(intweight_in, alpha, KDSb, lay, weight_elem_bytes(kern0), kern0.amx_weights);
  }
  // AVX2: the byte layout's kernels where the weights came out as bytes.
  const bool bytes = pw && kern0.bytes != nullptr && pw->elem_bytes == 1;
  const IsaKernels& kern = bytes ? *kern0.bytes : kern0;
  if (bytes) {
    lay.kplanes = lay.K4 * kern.planes_per_k4;
    path_calls[kPathAvx2Bytes].fetch_add(1, std::memory_order_relaxed);
  }
  // The AMX o-tiles are 16 channels, so a layer has fewer of them than make_layout's split
  // assumed: no chunk without any.
  if (kern.conv_band != nullptr && !lay.kfloat) ochunks = std::min(ochunks, otiles);
  const int64_t oc_len = (otiles + ochunks - 1) / ochunks;

  const size_t act_b = align64(size_t(lay.act_words()) * 4);
  const size_t esc_b = align64(size_t(lay.esc_floats()) * 4);
  const size_t us_b = with_kdsb && !lay.kfloat ? esc_b : 0;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t far_rows = (g.kh - 1) * g.dh / g.sh;
  const int64_t tasks = N * groups * lay.nbands * ochunks;

  parallel_for_tasks(tasks, [&](int64_t t0, int64_t t1) {
    // Per worker thread, grow-only: steady-state calls neither allocate nor fault pages in.
    static thread_local Scratch scratch;
    uint8_t* buf = scratch.get(act_b + esc_b + us_b);
    uint32_t* act = reinterpret_cast<uint32_t*>(buf);
    float* esc = reinterpret_cast<float*>(buf + act_b);
    float* usum = us_b ? reinterpret_cast<float*>(buf + act_b + esc_b) : nullptr;
    int64_t packed = -1;  // (n, g, band) currently in the buffer
    ExponentRange erange;
    bool exponent_add = false;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t oc = t % ochunks, slice_band = t / ochunks;
      const int64_t band = slice_band % lay.nbands, ng = slice_band / lay.nbands;
      const int64_t n = ng / groups, grp = ng % groups;
      const int64_t oh0 = band * lay.band_rows, oh1 = std::min(Ho, oh0 + lay.band_rows);
      if (packed != slice_band) {
        PackRow pr{};
        pr.lay = &lay;
        pr.x_cstride = g.H * g.W;
        pr.mant_bits = static_cast<int>(act_bits);
        pr.yend = oh1 + far_rows;  // rows past the band's taps are only read by unstored q
        const bool track = kern.esc_shift && !lay.kfloat;
        if (track) erange.reset();
        pr.erange = track ? &erange : nullptr;
        const float* xg = xp + (n * g.C + grp * g.Cg) * pr.x_cstride;
        for (int64_t b = 0; b < g.nblk; ++b) {
          const int64_t c0 = block_begin(b, g.block);
          pr.x = xg + c0 * pr.x_cstride;
          pr.nch = block_end(b, g.block, g.Cg) - c0;
          if (lay.kfloat) {
            pr.esc = esc + c0 * lay.P * lay.Lq;  // one plane per channel
          } else {
            pr.act = act + b * lay.kplanes * lay.P * lay.Lq;
            pr.esc = esc + b * lay.P * lay.Lq;
            pr.usum = usum ? usum + b * lay.P * lay.Lq : nullptr;
          }
          // Phase rows in input-row order (yl outer, ry inner): each packer's prefetch runs
          // past the end of its row into the next input row, the next one it packs.
          for (pr.yl = 0; pr.yl < lay.Hqb; ++pr.yl) {
            pr.yq = oh0 + pr.yl;
            for (pr.ry = 0; pr.ry < g.sh; ++pr.ry)
              (lay.kfloat ? kern.pack_row_float : kern.pack_row)(pr);
          }
        }
        packed = slice_band;
        exponent_add = track && erange.exponent_add_exact(*pw);
        if (track && !exponent_add)
          path_calls[kScalefBands].fetch_add(1, std::memory_order_relaxed);
      }
      Slice sl{};
      sl.lay = &lay;
      sl.act = act;
      sl.esc = esc;
      sl.usum = usum;
      sl.out_cstride = y_cstride;
      sl.out = yp + n * y_nstride + grp * g.Og * sl.out_cstride;
      sl.nout = g.Og;
      sl.oh0 = oh0, sl.oh1 = oh1;
      sl.nqt = ((oh1 - oh0) * lay.Wq + lay.qtile - 1) / lay.qtile;
      sl.exponent_add = exponent_add;
      sl.k4_run = pw ? pw->k4_run : 0;
      const Epilogue ep{epi.data() + grp * Ogp, epi.data() + (groups + grp) * Ogp, fuse_silu};
      const int64_t ot0 = oc * oc_len, ot1 = std::min(otiles, ot0 + oc_len);
      if (kern.conv_band != nullptr && !lay.kfloat) {
        kern.conv_band(sl, pw->stream(grp, 0), pw->stream_bytes, ep, ot0, ot1);
        continue;
      }
      if (ot1 - ot0 == 1) {  // one o-tile (depthwise, narrow layers): one call for the band
        if (lay.kfloat) {
          kern.float_tiles(sl, wf.data() + (grp * otiles + ot0) * g.Cg * lay.ntaps * R,
                           static_cast<int>(R), ep, ot0 * R, 0, sl.nqt);
        } else {
          kern.conv_tiles(sl, pw->stream(grp, ot0), ep, ot0, 0, sl.nqt);
        }
        continue;
      }
      // o-tiles innermost: the tile's activations stay in L1 while the weights stream from L2.
      for (int64_t qt = 0; qt < sl.nqt; ++qt) {
        for (int64_t ot = ot0; ot < ot1; ++ot) {
          if (lay.kfloat) {
            kern.float_tiles(sl, wf.data() + (grp * otiles + ot) * g.Cg * lay.ntaps * R,
                             static_cast<int>(R), ep, ot * R, qt, qt + 1);
          } else {
            kern.conv_tiles(sl, pw->stream(grp, ot), ep, ot, qt, qt + 1);
          }
        }
      }
    }
  });
  return y;
}

at::Tensor dsconv2d_cpu(const at::Tensor& x, const at::Tensor& intweight, const at::Tensor& alpha,
                        const c10::optional<at::Tensor>& KDSb,
                        const c10::optional<at::Tensor>& CDSw,
                        const c10::optional<at::Tensor>& CDSb,
                        const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                        int64_t block_size, int64_t act_bits, bool fuse_silu) {
  return dsconv2d_cpu_impl(x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation,
                           groups, block_size, act_bits, fuse_silu, nullptr);
}

void dsconv2d_out_cpu(const at::Tensor& x, const at::Tensor& intweight, const at::Tensor& alpha,
                      const c10::optional<at::Tensor>& KDSb, const c10::optional<at::Tensor>& CDSw,
                      const c10::optional<at::Tensor>& CDSb, const c10::optional<at::Tensor>& bias,
                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                      int64_t groups, int64_t block_size, int64_t act_bits, bool fuse_silu,
                      at::Tensor out) {
  dsconv2d_cpu_impl(x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation, groups,
                    block_size, act_bits, fuse_silu, &out);
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

TORCH_LIBRARY_IMPL(dsconv_ext, CPU, m) {
  m.impl("dsconv2d", &dsconv_ext::cpu::dsconv2d_cpu);
  m.impl("dsconv2d_out", &dsconv_ext::cpu::dsconv2d_out_cpu);
}

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // Which SIMD path the CPU kernel takes on this machine (after DSCONV_EXT_CPU_ISA).
  m.def("cpu_isa() -> str",
        []() -> std::string { return dsconv_ext::cpu::isa_name(dsconv_ext::cpu::select_isa()); });
  // Which int8 layers take the AMX tiles when the path chose AMX by itself (amx_pays_off), or ""
  // (another path, or DSCONV_EXT_CPU_ISA=amx: every layer).
  m.def("cpu_amx_layers() -> str", []() -> std::string {
    bool forced = false;
    if (dsconv_ext::cpu::select_isa(&forced) != dsconv_ext::cpu::Isa::kAmx || forced) return "";
    return ">= " + std::to_string(dsconv_ext::cpu::kAmxMinChannels) +
           " input channels per group (fewer: avx512_vnni)";
  });
  // The AVX2 path's int8 layouts (kernel_avx2.cpp), or "" (another path).
  m.def("cpu_avx2_layouts() -> str", []() -> std::string {
    using namespace dsconv_ext::cpu;
    if (select_isa() != Isa::kAvx2) return "";
    const int bytes = weight_elem_bytes(kernels_avx2());
    if (bytes == 2) return "int16 pairs on every int8 layer (DSCONV_EXT_AVX2_LAYOUT=int16)";
    return "bytes (vpmaddubsw) where every |q| <= " + std::to_string(kByteMaxQ) +
           " (VQK <= 7 bits), else int16 pairs (vpmaddwd)";
  });
  // Test hook: how many threads the kernel's parallel loops really use for `tasks` tasks.
  m.def("_cpu_parallel_probe(int tasks) -> int",
        [](int64_t tasks) -> int64_t { return dsconv_ext::cpu::parallel_probe(tasks); });
  // Test hook: calls so far that took the int8, float-family and depthwise paths, int8 bands
  // folded with vscalefps, and int8 calls on the AMX kernel (see Path).
  m.def("_cpu_path_calls() -> int[]", []() -> std::vector<int64_t> {
    std::vector<int64_t> n;
    for (const auto& c : dsconv_ext::cpu::path_calls) n.push_back(c.load());
    return n;
  });
  // Test hook: int8 weight packs so far (a call served by the packed-weight cache adds none).
  m.def("_cpu_weight_packs() -> int", []() -> int64_t { return dsconv_ext::cpu::weight_packs(); });
}
