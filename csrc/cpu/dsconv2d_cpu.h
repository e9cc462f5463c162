// Internal interfaces of the DSConv CPU kernel: packed layouts and the per-ISA entry points.
//
// One call runs one parallel loop over tasks (image n, group g, band of output rows, chunk of
// output channels). A task packs the input rows its band reads into a per-thread buffer (a few
// hundred KB, so it stays in L2) and convolves them right away: the activations make one trip
// from memory, and a high-resolution layer never materialises a full packed copy of its input.
//
// Packed activations ("q-space"). The zero-padded input is split into stride phases (ry, rx) in
// [0,sh) x [0,sw): phase plane (ry, rx) holds padded pixel (y*sh + ry, x*sw + rx) at flat index
// (y - band's first output row)*Wq + x. Output pixel (oh, ow) at tap (i, j) then reads phase
// ((i*dh) % sh, (j*dw) % sw) at flat index q + tapoff, q = (oh - oh0)*Wq + ow and
// tapoff = ((i*dh)/sh)*Wq + (j*dw)/sw: consecutive q read consecutive memory whatever the stride,
// so a vector of pixels is one load. q runs over whole rows of Wq >= Wo; the columns ow >= Wo are
// computed and never stored (a few % extra work, and no row tails in the microkernels).
//
// Two kernel families:
//  * int8 (blocks of >= 5 channels). Per block b and 4-channel group k4: one uint32 per q holding
//    4 mantissas + 128 as bytes (vpdpbusd multiplies u8 by s8; the weight streams pre-subtract
//    128 * sum(q)); the AMX path stores the mantissas themselves, signed bytes for TDPBSSD; the
//    AVX2 path (no VNNI) keeps the bytes for layers whose |q| <= kByteMaxQ (vpmaddubsw) and
//    otherwise two planes per k4 group, each uint32 holding two channels' mantissas as signed
//    int16 for vpmaddwd (IsaKernels::planes_per_k4 and ::bytes, Layout::kplanes); the Arm path
//    (kernel_neon.cpp) takes the + 128 bytes back to signed ones for SDOT. Per
//    block: `esc`, one float per q: 2^E, or E itself for the AVX-512 kernel (vscalefps), NaN for a
//    block holding NaN/Inf; `usum`, 2^E * (sum of the block's mantissas), for KDSb. Each (block,
//    tap) segment is an exact int32 dot product, then acc += alpha * 2^E * S (+ KDSb * usum). The
//    k4 planes are also exactly the B operand of AMX's TDPBSSD (one row per k4 group, 16 pixels of
//    4 bytes): kernel_amx.cpp.
//  * float (blocks of <= 4 channels: the 3-channel stem, tiny block sizes, and depthwise convs
//    on the portable path).
//    An int8 segment would hold <= 4 useful products and cost a whole float flush, so instead
//    each channel is stored as its BFP value m * 2^E (one float per q) and convolved with
//    weights alpha * q + KDSb in float: the same sum, rounded per product instead of per block.
// Everything outside the input (padding, phase tails, slack) is mantissa 0 with E = 0.
//
// Depthwise path (one input channel per group, the Detect head's convs; AVX2 and AVX-512). The
// float family above spent as long packing as convolving: a call per packed row, blocks of up to
// 4 channels, and one task per (channel, band) going through the generic band driver. Here one
// function runs a range of (image, channel, band) tasks: it quantises the channel's band straight
// from NCHW into the same q-space phase planes (a one-channel block's BFP value is the input
// rounded to m - 1 significant bits, done on the float itself), sized to stay in L1, then
// convolves it for each output channel of the group with the taps' weights held in registers,
// into an L1 output stage copied out a row at a time (only whole-vector stores: masked ones are
// slow on AMD cores). AVX-512 stores stride-1 3x3 bands in its own layout, rows a whole number
// of vectors apart, so that no load straddles two cache lines (kernel_avx512.cpp, dw_s1_tiles).
// The portable and Arm paths keep the float family for these convs.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dsconv2d_geometry.h"

namespace dsconv_ext {
namespace cpu {

// Grow-only, 64-byte aligned per-thread buffer: a fresh allocation per call would come back as
// untouched pages that fault in on every call.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr); }
  uint8_t* get(size_t want) {
    if (want > bytes) {
      std::free(ptr);
      const size_t rounded = (want + 4095) & ~size_t(4095);
      ptr = std::aligned_alloc(64, rounded);
      bytes = ptr ? rounded : 0;
      TORCH_CHECK(ptr != nullptr, "dsconv2d: out of memory for ", rounded, " bytes of scratch");
    }
    return static_cast<uint8_t*>(ptr);
  }
};

// kAmx: the AVX-512 path with its int8 layers on AMX tiles (kernel_amx.cpp). kAmxModel: the
// same kernel on a software model of the tiles, for AVX-512 machines without AMX (tests).
enum class Isa : int {
  kScalar = 0,
  kAvx2 = 1,
  kAvx512Vnni = 2,
  kAmx = 3,
  kAmxModel = 4,
  kNeonDot = 5,    // AArch64 with the dot-product instructions (kernel_neon.cpp)
  kNeonModel = 6,  // the same kernel on a software model of them (neon_dot.h), any CPU
};
// The x86 SIMD paths, whose CPUs all run AVX2 (the pooling and upsampling ops use it there).
inline bool isa_is_x86_simd(Isa isa) {
  return isa == Isa::kAvx2 || isa == Isa::kAvx512Vnni || isa == Isa::kAmx || isa == Isa::kAmxModel;
}

const char* isa_name(Isa isa);
// Best ISA of this CPU, lowered by DSCONV_EXT_CPU_ISA (read on every call so tests can switch);
// *amx_forced, if given, says whether DSCONV_EXT_CPU_ISA=amx asked for the tiles.
Isa select_isa(bool* amx_forced = nullptr);
// select_isa() for one layer: where it chose AMX by itself (not forced with
// DSCONV_EXT_CPU_ISA=amx), AVX-512 VNNI instead on layers where AMX does not pay off (fewer
// than kAmxMinChannels input channels per group).
constexpr int64_t kAmxMinChannels = 32;
bool amx_pays_off(int64_t Cg);
Isa select_isa_for_layer(int64_t Cg);
// Whether this CPU and OS run AMX-INT8 (CPUID, XCR0, and Linux's per-process permission for the
// tile data, requested here); if not, why not in *why.
bool amx_usable(const char** why);
// Whether this is an AArch64 CPU with the dot-product instructions (FEAT_DotProd: Linux
// HWCAP_ASIMDDP, macOS hw.optional.arm.FEAT_DotProd).
bool neon_dot_usable();

// Output channels per int8 microkernel tile, for every ISA (the weight streams are laid out
// for it), and per float-family tile (1 instead for groups with a single output channel).
constexpr int64_t kOTile = 4;
constexpr int64_t kFloatOTile = 8;

struct Layout {
  ConvGeometry g;
  bool kfloat;        // float family (see above)
  int64_t Hp, Wp;     // zero-padded input
  int64_t Hq, Wq;     // one stride phase of it
  int64_t P;          // phases, sh * sw
  int64_t K4;         // int8: 4-channel groups per block
  int64_t K4_last;    // of them, those holding channels in the last block (a partial block's
                      // other groups are zero: packed, and skipped by the VNNI kernels)
  int64_t kplanes;    // int8: activation planes per block, K4 * IsaKernels::planes_per_k4
  int64_t ntaps;      // kh * kw
  int64_t qtile;      // pixels per microkernel call
  int64_t band_rows;  // output rows per band (the last band may be shorter)
  int64_t nbands;
  int64_t nqt;                  // q tiles of a full band
  int64_t Hqb;                  // rows of a band's phase plane, halo and slack included
  int64_t Lq;                   // elements per phase plane: Hqb * Wq + slack
  std::vector<int64_t> tapoff;  // per tap: phase * Lq + in-phase offset

  // Per-thread buffer sizes, in elements.
  int64_t act_words() const { return kfloat ? 0 : g.nblk * kplanes * P * Lq; }
  int64_t esc_floats() const { return kfloat ? g.Cg * P * Lq : g.nblk * P * Lq; }
};

// Weight streams of one (group, o-tile) for the int8 kernels: for each block b, each tap t, a
// SegHeader and then K4 groups of kOTile x 4 channel weights (int8, or int16 for AVX2's
// vpmaddwd).
struct SegHeader {
  int32_t corr[kOTile];  // -128 * sum of the segment's q: undoes the +128 of the activations
                         // (unused by AVX2, whose int16 mantissas are signed)
  float alpha[kOTile];
  float kdsb[kOTile];
};

// The next segment of an int8 weight stream (`wbytes` = K4 * kOTile * 4): its header, with `*w`
// at its weights and `s` moved past them (the portable and Arm paths walk streams in order).
inline SegHeader next_segment(const uint8_t*& s, int64_t wbytes, const int8_t** w) {
  SegHeader hdr;
  std::memcpy(&hdr, s, sizeof(hdr));  // (a stream is bytes: no alignment to rely on)
  *w = reinterpret_cast<const int8_t*>(s + sizeof(SegHeader));
  s += sizeof(SegHeader) + wbytes;
  return hdr;
}

// AMX weight streams, per (group, 16-output tile) and then per block b and tap t: an
// AmxSegHeader, then the segment's A tiles (16 output rows x 4 * kc bytes of int8 weights, the
// 4 channels of one k4 group per dword, as TDPBSSD takes them against the packed activations'
// k4 planes as B rows). A block of K4 groups takes ceil(K4 / 16) A tiles of kc = min(K4, 16)
// groups; the last starts at K4 - kc so that its B rows stay inside the block, its rows already
// covered by the previous tile zero.
constexpr int64_t kAmxTile = 16;  // output channels per A / C tile, pixels per B / C tile
// No correction term (SegHeader's corr): the AMX path's activations are signed bytes.
struct AmxSegHeader {
  float alpha[kAmxTile];
  float kdsb[kAmxTile];
};
struct AmxK {
  int64_t kc, nchunk;
  explicit AmxK(int64_t K4) : kc(std::min<int64_t>(K4, 16)), nchunk((K4 + 15) / 16) {}
  // First k4 group of A tile j.
  int64_t start(int64_t K4, int64_t j) const { return std::min(16 * j, K4 - kc); }
  int64_t a_bytes() const { return kAmxTile * 4 * kc; }
  int64_t seg_bytes() const { return int64_t(sizeof(AmxSegHeader)) + nchunk * a_bytes(); }
};

// The AVX2 byte layout (kernel_avx2.cpp) takes the layers whose |q| <= kByteMaxQ (VQK widths up
// to 7 bits): its vpmaddubsw pair sums, each at most 255 * 2 * max|q| <= 32640, never saturate,
// and byte_k4_run(max|q|) groups of 4 channels of them add up in int16 without leaving
// [-32767, 32767] (8 or more groups at 4 bits and fewer; see kMinByteRun for the shorter runs).
constexpr int32_t kByteMaxQ = 64;
inline int64_t byte_k4_run(int32_t max_abs_q) {
  return 32767 / (255 * 2 * std::max<int32_t>(max_abs_q, 1));
}

struct PackedWeights {
  int64_t otiles = 0;        // per group
  int64_t stream_bytes = 0;  // per (group, o-tile)
  int elem_bytes = 1;        // of the SegHeader streams' weights: 1 (int8) or 2 (int16)
  int64_t k4_run = 0;        // AVX2 byte layout: byte_k4_run(largest |q|); else 0
  // Biased float exponents of the SegHeader alphas (a zero alpha is stored as 1 with its
  // segment's weights zeroed), and whether all of them are normal: what the exponent-add fold of
  // the AVX-512 kernel needs to know (ExponentRange).
  int32_t alpha_exp_min = 255, alpha_exp_max = 0;
  bool alpha_normal = true;
  std::vector<uint8_t> data;
  const uint8_t* stream(int64_t g, int64_t ot) const {
    return data.data() + (g * otiles + ot) * stream_bytes;
  }
};

// Per-output-channel epilogue constants of one group, padded to a multiple of kFloatOTile.
struct Epilogue {
  const float* cdsw;  // CDSw or ones
  const float* cb;    // CDSb + bias
  bool silu;
};

// One band of one (n, g) slice, packed.
struct Slice {
  const Layout* lay;
  const uint32_t* act;  // int8: k4 planes
  const float* esc;     // int8: per block; float: the BFP values, per channel
  const float* usum;    // int8, null without KDSb
  float* out;           // &y[n, g*Og, 0, 0]
  int64_t out_cstride;  // from one output plane to the next: Ho * Wo, or more in a wider buffer
  int64_t nout;         // output channels of the group (Og)
  int64_t oh0, oh1;     // the band's output rows
  int64_t nqt;          // q tiles of this band
  // AVX-512 int8: every alpha * 2^E of the band is a normal float, so the fold may add E to
  // alpha's exponent bits instead of scaling by 2^E (ExponentRange::exponent_add_exact).
  bool exponent_add;
  // AVX2 byte layout: 4-channel groups summed in int16 before widening (PackedWeights::k4_run).
  int64_t k4_run;
};

// Block exponents E packed for one band by an ISA whose esc holds E << 23 (IsaKernels::esc_shift):
// per-lane running minimum and maximum over finite blocks, and whether a block was NaN / Inf
// (its esc is then kEscNonFinite).
struct ExponentRange {
  int32_t lo[16], hi[16];
  int32_t nonfinite;
  void reset() {
    for (int i = 0; i < 16; ++i) lo[i] = INT32_MAX, hi[i] = INT32_MIN;
    nonfinite = 0;
  }
  // alpha * 2^E, for every alpha of `pw` and E of the band, is a normal float and equals
  // alpha's bit pattern plus E << 23.
  bool exponent_add_exact(const PackedWeights& pw) const {
    if (nonfinite || !pw.alpha_normal) return false;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int i = 0; i < 16; ++i) mn = std::min(mn, lo[i]), mx = std::max(mx, hi[i]);
    if (mn > mx) return true;  // nothing finite packed: no fold reads an exponent
    return pw.alpha_exp_min + mn >= 1 && pw.alpha_exp_max + mx <= 254;
  }
};
constexpr int32_t kEscNonFinite = INT32_MIN;

// The AVX2 SiLU epilogue's 2^f on [-1/2, 1/2] (kernel_avx2.cpp silu_ps): a
// degree-5 polynomial, highest power first, fitted for relative error (1.9e-7 in float32).
constexpr float kExp2Poly[6] = {1.3264656299725175e-3f, 9.671513922512531e-3f,
                                5.550733953714371e-2f,  2.4022242426872253e-1f,
                                6.931470036506653e-1f,  1.f};
// The same on [0, 1), for the AVX-512 SiLU, which reduces t to t - floor(t) in one vreduceps
// (1.6e-7 in float32).
constexpr float kExp2Poly01[6] = {1.8775906646624207e-3f, 8.989307098090649e-3f,
                                  5.5826347321271896e-2f, 2.4015361070632935e-1f,
                                  6.931530833244324e-1f,  9.999999403953552e-1f};
constexpr float kNegLog2E = -1.44269504088896341f;
// e^r on |r| <= ln(2) / 2 (Cephes expf): (((((p0 r + p1) r + p2) r + p3) r + p4) r + p5) r^2 +
// r + 1, about 2 ulp; r = x - n ln 2 with ln 2 split in two for an exact n ln 2 (the AVX-512
// exp_ps and the AVX2 exp for the box decoder).
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kLog2E = 1.44269504088896341f;

// Phase row (ry, yq) of the padded input, written as row yl of the band's planes, for the block
// at `x` (x[n, first channel of the block, 0, 0], `nch` channels). int8: every k4 plane, esc and
// usum. Float: the BFP values of the block's channels, one P * Lq plane each from `esc`.
struct PackRow {
  const Layout* lay;
  const float* x;
  int64_t nch;
  int64_t x_cstride;  // H * W
  int mant_bits;
  int64_t ry, yq, yl;
  int64_t yend;           // phase rows >= yend are only read for outputs never stored: left neutral
  uint32_t* act;          // (block) base
  float* esc;             // (block or channel) base
  float* usum;            // (block) base or null
  ExponentRange* erange;  // esc_shift ISAs, int8: updated with the exponents packed
};

// One depthwise call (groups with one input channel). Task t is (image, channel, band) =
// (t / (C * nbands), t / nbands % C, t % nbands); `buf` is the thread's dw_buf_floats(lay)
// floats, 64-byte aligned.
struct DwArgs {
  const Layout* lay;
  const float* x;  // [N, C, H, W]
  float* y;        // [N, O, Ho, Wo]: plane (n, o) at y + n * y_nstride + o * y_cstride
  int64_t y_nstride, y_cstride;
  const float* wf;    // [O][taps]: alpha * q + KDSb
  const float* cdsw;  // per group g: cdsw[g * epi_stride + r] for output channel g * Og + r
  const float* cb;
  int64_t epi_stride;
  bool silu;
  int mant_bits;
};

// The AVX-512 path's band for stride-1 3x3 convs: padded rows Wr (a whole number of vectors)
// apart, `rows` of them, `floats` with slack (see kernel_avx512.cpp, dw_s1_tiles).
struct DwS1 {
  int64_t Wr, rows, floats;
};
inline DwS1 dw_s1_layout(const Layout& lay) {
  const ConvGeometry& g = lay.g;
  DwS1 s;
  s.Wr = (lay.Wp + 15) / 16 * 16;
  s.rows = lay.band_rows + (g.kh - 1) * g.dh;
  s.floats = s.rows * s.Wr + 32;  // the row stores run up to a vector past the last row
  return s;
}

// A depthwise thread buffer: the band (phase planes, or the layout above), then from this float
// offset (a multiple of 16) an output stage of one band, in either layout.
inline int64_t dw_stage_offset(const Layout& lay) {
  return std::max((lay.P * lay.Lq + 15) / 16 * 16, dw_s1_layout(lay).floats);
}
inline int64_t dw_buf_floats(const Layout& lay) {
  return dw_stage_offset(lay) + std::max(lay.Lq, lay.band_rows * dw_s1_layout(lay).Wr);
}

// The float direct convolution of dsconv_ext::stem_conv2d: a dense conv reading few input
// channels (the RGB stem of a detector), bias and SiLU fused, stride 1 or 2, no dilation. oneDNN
// spends ~2 ms on yolo11n's 3 -> 16 stem at 640 px (2 threads), 3-4x the time of its
// arithmetic, and the SiLU is another pass over the output. Here each tile of output pixels x
// output channels is made in registers: per input (channel, kernel row, kernel column) one
// vector of the input pixels the tile reads per 8 or 16 pixels (stride 2: de-interleaved, by
// AVX2 once per input row of a band), one FMA per output channel with the weight broadcast,
// then the SiLU and one store per channel and vector.
struct StemArgs {
  const float* x;     // [N, C, H, W], contiguous
  const float* w;     // [otiles][C][kh][kw][stem_otile]: zero past O
  const float* bias;  // [otiles * stem_otile]: zero past O or without bias
  float* y;           // [N, O, Ho, Wo], contiguous
  int64_t C, H, W, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
  bool silu;
};

// Per-ISA entry points.
struct IsaKernels {
  int64_t qtile;  // pixels per microkernel call
  // Bytes per weight of the SegHeader streams: 1, 2, or 0 for AVX2: 1 where the weights allow
  // the byte layout (|q| <= kByteMaxQ; the call then takes the `bytes` kernels), else 2.
  int weight_elem_bytes;
  void (*pack_row)(const PackRow&);
  void (*pack_row_float)(const PackRow&);
  // int8: o-tile `ot` over q tiles [qt0, qt1) of one slice.
  void (*conv_tiles)(const Slice&, const uint8_t* wstream, const Epilogue&, int64_t ot, int64_t qt0,
                     int64_t qt1);
  // float: `R` (1 or kFloatOTile) output channels from o0, weights wf[c][tap][R].
  void (*float_tiles)(const Slice&, const float* wf, int R, const Epilogue&, int64_t o0,
                      int64_t qt0, int64_t qt1);
  // Depthwise tasks [t0, t1) (see DwArgs), or null: the ISA takes the float family instead.
  void (*depthwise)(const DwArgs&, float* buf, int64_t t0, int64_t t1);
  int64_t dw_qtile;  // pixels per depthwise tile
  // DFL expectation of one box side, anchors [a0, a1): y[a] = sum_i softmax_i(x[i * A + a]) w[i]
  // over c1 bins (dfl_cpu.cpp).
  void (*dfl_side)(const float* x, int64_t A, int64_t c1, const float* w, float* y, int64_t a0,
                   int64_t a1);
  // The int8 packer stores each block exponent E as the integer E << 23 (kEscNonFinite for NaN /
  // Inf blocks) rather than as a float, and fills PackRow::erange.
  bool esc_shift;
  // Pixels per float-family tile, where it differs from qtile (0: the same).
  int64_t float_qtile = 0;
  // int8 output channels per weight stream (o-tile).
  int64_t otile = kOTile;
  // int8 weights in the AMX layout (AmxSegHeader) instead of SegHeader.
  bool amx_weights = false;
  // int8 activation planes per 4-channel group: 1 (one uint32 of 4 bytes per q), or 2 for the
  // AVX2 layout of int16 pairs (one uint32 of 2 signed int16 mantissas per q).
  int64_t planes_per_k4 = 1;
  // If set, replaces conv_tiles: o-tiles [ot0, ot1) over every q tile of one slice in one call
  // (the AMX kernels load the tile configuration once per call, the AVX2 kernel finds each q
  // tile's store positions once for all its o-tiles). `wstreams` is o-tile 0 of the slice's
  // group, o-tile ot at wstreams + ot * stream_bytes.
  void (*conv_band)(const Slice&, const uint8_t* wstreams, int64_t stream_bytes, const Epilogue&,
                    int64_t ot0, int64_t ot1) = nullptr;
  // Float stem convolution (stem_conv_cpu.cpp): output rows [oy0, oy1) of image n for the
  // output-channel tiles [ot0, ot1) of stem_otile channels.
  void (*stem_rows)(const StemArgs&, int64_t n, int64_t ot0, int64_t ot1, int64_t oy0,
                    int64_t oy1) = nullptr;
  int64_t stem_otile = 0;
  // AVX2: the kernels of the byte layout, for int8 layers whose packed weights came out as
  // bytes (PackedWeights::elem_bytes == 1), or null.
  const IsaKernels* bytes = nullptr;
};

const IsaKernels& kernels_scalar();
const IsaKernels& kernels_avx2();
const IsaKernels& kernels_avx2_bytes();
const IsaKernels& kernels_avx512();
const IsaKernels& kernels_amx();
const IsaKernels& kernels_amx_model();
const IsaKernels& kernels_neon_dot();
const IsaKernels& kernels_neon_model();
// What a path compiled only for another CPU family (x86-64: kernel_avx2.cpp, kernel_avx512.cpp,
// kernel_amx.cpp; AArch64: NeonHw in kernel_neon.cpp) is in this build: an error naming it.
// select_isa() never picks such a path (best_vector_isa() finds none, DSCONV_EXT_CPU_ISA only
// lowers a path, and the forced paths are checked first).
const IsaKernels& kernels_not_built(const char* isa, const char* family);
const IsaKernels& kernels_for(Isa isa);
// The AVX-512 int8 packer with each mantissa stored as a signed byte instead of m + 128: the B
// operand of AMX's TDPBSSD, which multiplies signed by signed bytes, so the AMX kernel needs no
// -128 * sum(q) correction.
void pack_row_avx512_signed_bytes(const PackRow& r);

// Where band-local q of a slice is stored in output channel 0 of its group, or null where q is not
// a real output (a column past Wo, a row past the band).
inline float* slice_output(const Slice& sl, int64_t q) {
  const Layout& lay = *sl.lay;
  const int64_t oh = sl.oh0 + q / lay.Wq, ow = q % lay.Wq;
  return oh < sl.oh1 && ow < lay.g.Wo ? sl.out + oh * lay.g.Wo + ow : nullptr;
}

// Writes y for output channel o (within the group) at band-local q if it is a real output.
inline void store_output(const Slice& sl, const Epilogue& ep, int64_t o, int64_t q, float acc) {
  if (float* y = slice_output(sl, q))
    y[o * sl.out_cstride] = dsconv_epilogue(acc, ep.cdsw[o], ep.cb[o], 0.f, ep.silu);
}

// Input row of band-local phase row: -1 for padding and slack.
inline int64_t pack_input_row(const PackRow& r) {
  const ConvGeometry& g = r.lay->g;
  const int64_t h = r.yq * g.sh + r.ry - g.ph;
  return r.yq < r.yend && r.yq < r.lay->Hq && in_range(h, g.H) ? h : -1;
}

// The BFP exponent E of the block of channels 0..nch-1 at `px` (kNonFiniteExponent for a NaN or
// Inf among them).
inline int32_t pixel_block_exponent(const PackRow& r, const float* px) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t c = 0; c < r.nch; ++c) {
    const float v = px[c * r.x_cstride];
    finite = finite && std::isfinite(v);
    amax = std::fmax(amax, std::fabs(v));
  }
  return finite ? bfp_exponent(amax, r.mant_bits) : kNonFiniteExponent;
}

// The byte layout's pack of one pixel (input row h, column w; w < 0 for padding) into q `at`:
// per 4-channel group one dword of mantissas m + 128, 2^E into esc, 2^E * sum(m) into usum. The
// portable path packs every pixel so; the Arm path those its vector pack cannot take.
inline void pack_pixel_bytes(const PackRow& r, int64_t w, int64_t h, int64_t at, int32_t lim) {
  const Layout& lay = *r.lay;
  const int64_t kplane = lay.P * lay.Lq;
  if (w < 0) {
    for (int64_t k4 = 0; k4 < lay.K4; ++k4) r.act[k4 * kplane + at] = 0x80808080u;  // m = 0
    r.esc[at] = 1.f;                                                                // 2^0
    if (r.usum) r.usum[at] = 0.f;
    return;
  }
  const float* px = r.x + h * lay.g.W + w;
  const int32_t e = pixel_block_exponent(r, px);
  const bool finite = e != kNonFiniteExponent;
  int32_t msum = 0;
  for (int64_t k4 = 0; k4 < lay.K4; ++k4) {
    uint32_t word = 0;
    for (int64_t lane = 0; lane < 4; ++lane) {
      const int64_t c = k4 * 4 + lane;
      int32_t m = 0;
      if (c < r.nch && finite) m = bfp_mantissa(px[c * r.x_cstride], e, lim);
      msum += m;
      word |= uint32_t(uint8_t(m + 128)) << (8 * lane);
    }
    r.act[k4 * kplane + at] = word;
  }
  const float scale = bfp_scale(e);
  r.esc[at] = scale;
  if (r.usum) r.usum[at] = scale * float(msum);
}

}  // namespace cpu
}  // namespace dsconv_ext
