// Internal interfaces of the DSConv CPU kernel: packed layouts and the per-ISA entry points.
//
// Data flow of one call (dsconv2d_cpu.cpp):
//   1. activations -> BFP mantissas + exponents, packed once per call (pack_* below);
//   2. weights -> per output-channel-tile streams (weight_pack.cpp, cached across calls);
//   3. a register-blocked microkernel per (output-channel tile, pixel tile) (conv_tile_*).
//
// Packed activations ("q-space"). Per (image n, group g, block b) and per 4-channel group k4 of
// the block, the zero-padded input is split into stride phases (ry, rx) in [0,sh) x [0,sw): phase
// plane (ry, rx) holds padded pixel (y*sh + ry, x*sw + rx) at flat index y*Wq + x. Output pixel
// (oh, ow) at tap (i, j) then reads phase ((i*dh) % sh, (j*dw) % sw) at flat index
// q + tapoff, with q = oh*Wq + ow and tapoff = ((i*dh)/sh)*Wq + (j*dw)/sw: consecutive q read
// consecutive memory whatever the stride, so a vector of pixels is one load. q runs over whole
// rows of Wq >= Wo; the columns ow >= Wo are computed and never stored (a few % extra work, and
// no row-tail handling in the microkernels).
//   act:  one uint32 per (k4 plane, phase, q): 4 channels as bytes mantissa + 128 (VNNI's
//         vpdpbusd multiplies u8 by s8; the weight streams pre-subtract 128 * sum(q)).
//   esc:  one float per (block, phase, q): the block's scale 2^E, or E itself for the AVX-512
//         kernel (vscalefps), NaN for a block holding NaN/Inf.
//   usum: one float per (block, phase, q): 2^E * (sum of the block's mantissas), for KDSb.
// Everything outside the input (padding, phase tails, slack) is mantissa 0 with E = 0.
//
// Blocks of a single channel (groups == C, i.e. depthwise) take a float path instead: the int8
// segment would hold one useful channel, so x is rounded to its BFP value per element and a float
// depthwise conv runs on the same q-space planes with weights alpha * q + KDSb.
#pragma once

#include <cstdint>
#include <algorithm>
#include <memory>
#include <vector>

#include "dsconv2d_geometry.h"

namespace dsconv_ext {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

const char* isa_name(Isa isa);
// Best ISA of this CPU, lowered by DSCONV_EXT_CPU_ISA (read on every call so tests can switch).
Isa select_isa();

// Output channels per microkernel tile, for every ISA (the weight streams are laid out for it).
constexpr int64_t kOTile = 4;
// Largest pixel tile of any microkernel: q-space planes carry this much slack past the last row.
constexpr int64_t kMaxQTile = 64;

struct Layout {
  ConvGeometry g;
  int64_t Hp, Wp;               // zero-padded input
  int64_t Hq, Wq;               // one stride phase of it
  int64_t Hqx;                  // rows per phase plane, slack rows included
  int64_t P;                    // phases, sh * sw
  int64_t Lq;                   // elements per phase plane: Hqx * Wq
  int64_t K4;                   // 4-channel groups per block (0 on the depthwise path)
  int64_t ntaps;                // kh * kw
  int64_t Qlen;                 // Ho * Wq: the q range that holds outputs
  int64_t qtile;                // pixels per microkernel call
  int64_t nqt;                  // q tiles: ceil(Qlen / qtile)
  bool depthwise;               // Cg == 1: float path
  std::vector<int64_t> tapoff;  // per tap: phase * Lq + in-phase offset

  int64_t act_words() const { return g.nblk * K4 * P * Lq; }  // per (n, g)
  int64_t esc_floats() const { return g.nblk * P * Lq; }      // per (n, g)
};

// Weight streams of one (group, o-tile): for each block b, each tap t, a SegHeader and then K4
// groups of kOTile x 4 channel weights (int8, or int16 for the AVX2 kernel's vpmaddwd).
struct SegHeader {
  int32_t corr[kOTile];  // -128 * sum of the segment's q: undoes the +128 of the activations
  float alpha[kOTile];
  float kdsb[kOTile];
};

struct PackedWeights {
  int64_t otiles = 0;        // per group
  int64_t stream_bytes = 0;  // per (group, o-tile)
  std::vector<uint8_t> data;
  const uint8_t* stream(int64_t g, int64_t ot) const {
    return data.data() + (g * otiles + ot) * stream_bytes;
  }
};

// Per-output-channel epilogue constants of one group, padded to a multiple of kOTile.
struct Epilogue {
  const float* cdsw;  // CDSw or ones
  const float* cb;    // CDSb + bias
  bool silu;
};

// Everything a pixel-tile task needs about one (n, g) slice.
struct Slice {
  const Layout* lay;
  const uint32_t* act;  // int path
  const float* esc;     // int path
  const float* usum;    // int path, null without KDSb
  const float* xq;      // depthwise path: BFP-rounded activations of the group's channel
  float* out;           // &y[n, g*Og, 0, 0]
  int64_t out_cstride;  // Ho * Wo
  int64_t nout;         // output channels of the group (Og)
};

// Phase row (ry, yq) of block b of one (n, g) slice: quantise and write every k4 plane and every
// column phase. `x` points at x[n, first channel of the block, 0, 0]; `nch` channels are real.
// On the depthwise path (nch == 1) `xq` receives the BFP-rounded floats instead.
struct PackRow {
  const Layout* lay;
  const float* x;
  int64_t nch;
  int64_t x_cstride;  // H * W
  int mant_bits;
  int64_t ry, yq;
  uint32_t* act;  // (n, g, b) base
  float* esc;     // (n, g, b) base
  float* usum;    // (n, g, b) base or null
  float* xq;      // depthwise: channel base
};

// Per-ISA entry points.
struct IsaKernels {
  int64_t qtile;        // pixels per microkernel call
  bool exponent_scale;  // esc holds E (true) or 2^E (false)
  int weight_elem_bytes;
  void (*pack_row)(const PackRow&);
  void (*pack_row_dw)(const PackRow&);
  // o-tile `ot` over q tiles [qt0, qt1) of one slice.
  void (*conv_tiles)(const Slice&, const uint8_t* wstream, const Epilogue&, int64_t ot, int64_t qt0,
                     int64_t qt1);
  // Output channels [o0, o1) of one depthwise slice, weights wdw[o][tap].
  void (*dw_tiles)(const Slice&, const float* wdw, const Epilogue&, int64_t o0, int64_t o1,
                   int64_t qt0, int64_t qt1);
};

const IsaKernels& kernels_scalar();
const IsaKernels& kernels_avx2();
const IsaKernels& kernels_avx512();

// Maps q-space results to NCHW: for the `len` values of q range [q0, q0 + len), the output
// (oh, ow) with oh < Ho and ow < Wo. Calls emit(row, ow, first, count) per contiguous run.
template <typename F>
inline void for_each_output_run(const Layout& lay, int64_t q0, int64_t len, F&& emit) {
  int64_t oh = q0 / lay.Wq, ow = q0 - oh * lay.Wq, i = 0;
  while (i < len && oh < lay.g.Ho) {
    const int64_t n = std::min(len - i, lay.Wq - ow);
    const int64_t valid = std::min(n, lay.g.Wo - ow);
    if (valid > 0) emit(oh, ow, i, valid);
    i += n;
    ++oh;
    ow = 0;
  }
}

}  // namespace cpu
}  // namespace dsconv_ext
