// Software model of the AMX tile instructions (see amx_tiles.h), and the test-only op that runs
// tile programs on it or on the real tiles.
//
// Each function follows the "Operation" pseudo-code of its instruction in the Intel SDM vol. 2
// (LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TILERELEASE, TDPBSSD/TDPBSUD/TDPBUSD/TDPBUUD),
// with palette 1 (amx_tiles.h), plus the hardware's #UD on rows that are not whole dwords
// (check_whole_dwords). What the pseudo-code calls #GP / #UD is a c10::Error here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/dsconv2d_cpu.h"

namespace dsconv_ext {
namespace cpu {
namespace amx_model {
namespace {

struct State {
  TileConfig cfg{};  // all zero: TILES_CONFIGURED = 0
  bool configured = false;
  uint8_t tile[kTileNames][kTileMaxRows][kTileBytesPerRow] = {};
};
thread_local State st;

void zero_all() { std::memset(st.tile, 0, sizeof(st.tile)); }

// zero_upper_rows(t, nrows): rows nrows.. of the palette's maximum.
void zero_upper_rows(int t, int nrows) {
  for (int r = nrows; r < kTileMaxRows; ++r) std::memset(st.tile[t][r], 0, kTileBytesPerRow);
}

// write_row_and_zero(t, row, data, nbytes): the row's first nbytes from data, the rest zero.
void write_row_and_zero(int t, int row, const uint8_t* data, int nbytes) {
  std::memmove(st.tile[t][row], data, size_t(nbytes));
  std::memset(st.tile[t][row] + nbytes, 0, size_t(kTileBytesPerRow - nbytes));
}

// The AMX-E* exception classes' "tile not configured / beyond max_names / not valid" #UD.
void check_tile(int t, const char* insn) {
  TORCH_CHECK(st.configured, "AMX model: #UD: ", insn, " with no tile configuration loaded");
  TORCH_CHECK(t >= 0 && t < kTileNames, "AMX model: #UD: ", insn, " names tmm", t,
              " (palette 1 has ", kTileNames, ")");
  TORCH_CHECK(st.cfg.rows[t] != 0 && st.cfg.colsb[t] != 0, "AMX model: #UD: ", insn, " on tmm", t,
              ", which the configuration leaves empty");
}

int rows(int t) { return st.cfg.rows[t]; }
int colsb(int t) { return st.cfg.colsb[t]; }

// A tile whose row is not whole dwords: LDTILECFG and TILEZERO accept it, but TILELOADD,
// TILESTORED and every TDP*D naming it raise #UD on the hardware (seen on an AMX Xeon: SIGILL,
// "trap invalid opcode", for colsb 1-3, 5, 6, 33, 62, 63; none for 4, 8, 12, 36, 60, 64).
void check_whole_dwords(int t, const char* insn) {
  TORCH_CHECK(colsb(t) % 4 == 0, "AMX model: #UD: ", insn, " on tmm", t, ", whose colsb ", colsb(t),
              " is not a multiple of 4");
}

uint32_t dword(const uint8_t* row, int i) {
  uint32_t v;
  std::memcpy(&v, row + 4 * i, 4);
  return v;
}

// DPBD: c + the four byte products of x and y, each byte sign- or zero-extended to 32 bits; the
// sum wraps modulo 2^32 (unsigned arithmetic: no signed overflow).
uint32_t dpbd(uint32_t c, uint32_t x, uint32_t y, bool x_signed, bool y_signed) {
  for (int j = 0; j < 4; ++j) {
    const uint8_t xb = uint8_t(x >> (8 * j)), yb = uint8_t(y >> (8 * j));
    const int32_t xv = x_signed ? int32_t(int8_t(xb)) : int32_t(xb);
    const int32_t yv = y_signed ? int32_t(int8_t(yb)) : int32_t(yb);
    c += uint32_t(xv * yv);  // |xv * yv| <= 2^16: exact in int32
  }
  return c;
}

}  // namespace

void loadconfig(const TileConfig& in) {
  TileConfig cfg;
  std::memcpy(&cfg, &in, sizeof(cfg));
  if (cfg.palette_id == 0) {  // "equivalent to TILERELEASE"
    release();
    return;
  }
  TORCH_CHECK(cfg.palette_id == 1, "AMX model: #GP: LDTILECFG palette ", int(cfg.palette_id),
              " (palette 1 is the only one)");
  TORCH_CHECK(cfg.start_row < kTileMaxRows, "AMX model: #GP: LDTILECFG start_row ",
              int(cfg.start_row), " >= ", kTileMaxRows);
  for (int i = 0; i < 14; ++i)
    TORCH_CHECK(cfg.reserved[i] == 0, "AMX model: #GP: LDTILECFG reserved byte ", i + 2,
                " is not zero");
  for (int t = 0; t < 16; ++t) {
    if (t >= kTileNames) {
      TORCH_CHECK(cfg.rows[t] == 0 && cfg.colsb[t] == 0, "AMX model: #GP: LDTILECFG configures tmm",
                  t, " beyond palette 1's ", kTileNames, " tiles");
      continue;
    }
    TORCH_CHECK(cfg.rows[t] <= kTileMaxRows, "AMX model: #GP: LDTILECFG tmm", t, " rows ",
                int(cfg.rows[t]), " > ", kTileMaxRows);
    TORCH_CHECK(cfg.colsb[t] <= kTileBytesPerRow, "AMX model: #GP: LDTILECFG tmm", t, " colsb ",
                int(cfg.colsb[t]), " > ", kTileBytesPerRow);
    TORCH_CHECK((cfg.rows[t] == 0) == (cfg.colsb[t] == 0), "AMX model: #GP: LDTILECFG tmm", t,
                " has rows ", int(cfg.rows[t]), " but colsb ", int(cfg.colsb[t]));
  }
  st.cfg = cfg;
  zero_all();
  st.configured = true;
}

void release() {
  st.cfg = TileConfig{};
  zero_all();
  st.configured = false;
}

void zero(int t) {
  check_tile(t, "TILEZERO");
  std::memset(st.tile[t], 0, sizeof(st.tile[t]));  // every row and byte, not just the configured
  st.cfg.start_row = 0;
}

void loadd(int t, const void* base, int64_t stride) {
  check_tile(t, "TILELOADD");
  check_whole_dwords(t, "TILELOADD");
  const uint8_t* mem = static_cast<const uint8_t*>(base);
  zero_upper_rows(t, rows(t));
  // Rows before start_row are kept: a load restarted after a fault resumes there.
  for (int r = st.cfg.start_row; r < rows(t); ++r)
    write_row_and_zero(t, r, mem + r * stride, colsb(t));
  st.cfg.start_row = 0;
}

void stored(int t, void* base, int64_t stride) {
  check_tile(t, "TILESTORED");
  check_whole_dwords(t, "TILESTORED");
  uint8_t* mem = static_cast<uint8_t*>(base);
  for (int r = st.cfg.start_row; r < rows(t); ++r)
    std::memcpy(mem + r * stride, st.tile[t][r], size_t(colsb(t)));
  st.cfg.start_row = 0;
}

void dp(DpSign sign, int c, int a, int b) {
  static const char* const names[] = {"TDPBSSD", "TDPBSUD", "TDPBUSD", "TDPBUUD"};
  const char* insn = names[int(sign)];
  check_tile(c, insn);
  check_tile(a, insn);
  check_tile(b, insn);
  for (int t : {c, a, b}) check_whole_dwords(t, insn);
  // AMX-E4 #UD conditions: C = m x n, A = m x k, B = k x n (in dwords), within the TMUL limits.
  TORCH_CHECK(c != a && c != b && a != b, "AMX model: #UD: ", insn, " tmm", c, ", tmm", a, ", tmm",
              b, " repeats a tile");
  TORCH_CHECK(colsb(a) / 4 == rows(b), "AMX model: #UD: ", insn, " A colsb / 4 = ", colsb(a) / 4,
              " != B rows = ", rows(b));
  TORCH_CHECK(colsb(c) == colsb(b), "AMX model: #UD: ", insn, " C colsb ", colsb(c), " != B colsb ",
              colsb(b));
  TORCH_CHECK(rows(c) == rows(a), "AMX model: #UD: ", insn, " C rows ", rows(c), " != A rows ",
              rows(a));
  TORCH_CHECK(colsb(a) <= 4 * kTmulMaxK && rows(b) <= kTmulMaxK && colsb(c) <= 4 * kTmulMaxN,
              "AMX model: #UD: ", insn, " beyond the TMUL limits");
  const bool as = sign == DpSign::kSS || sign == DpSign::kSU;
  const bool bs = sign == DpSign::kSS || sign == DpSign::kUS;
  const int K = colsb(a) / 4, N = colsb(c) / 4;
  for (int m = 0; m < rows(c); ++m) {
    uint8_t tmp[kTileBytesPerRow];
    std::memcpy(tmp, st.tile[c][m], sizeof(tmp));
    for (int k = 0; k < K; ++k) {
      const uint32_t x = dword(st.tile[a][m], k);
      for (int n = 0; n < N; ++n) {
        const uint32_t v = dpbd(dword(tmp, n), x, dword(st.tile[b][k], n), as, bs);
        std::memcpy(tmp + 4 * n, &v, 4);
      }
    }
    write_row_and_zero(c, m, tmp, colsb(c));
  }
  zero_upper_rows(c, rows(c));
  st.cfg.start_row = 0;
}

const uint8_t* tile_storage(int t) {
  return st.configured && t >= 0 && t < kTileNames ? &st.tile[t][0][0] : nullptr;
}

}  // namespace amx_model

namespace {

// Runs `program` (6 ints per instruction, TileInsn) with configuration `config` (the 64 bytes
// of LDTILECFG's operand) on a copy of `mem`: on the model (path "amx_model"; it starts from
// the released state), or on the real tiles (path "amx"; the program first runs on the model,
// so that what would fault there is an error instead). Returns the buffer after the program and,
// for the model, every tile's full 16 x 64 byte storage [8, 16, 64] (empty for "amx").
std::vector<at::Tensor> amx_tile_selftest(const std::string& path, c10::IntArrayRef config,
                                          const at::Tensor& mem, c10::IntArrayRef program) {
  TORCH_CHECK(path == "amx_model" || path == "amx",
              "_amx_tile_selftest: path must be amx_model or amx, got '", path, "'");
  TORCH_CHECK(config.size() == sizeof(TileConfig), "_amx_tile_selftest: config must have ",
              sizeof(TileConfig), " bytes, got ", config.size());
  TORCH_CHECK(mem.device().is_cpu() && mem.scalar_type() == at::kByte && mem.dim() == 1,
              "_amx_tile_selftest: mem must be a 1-D uint8 CPU tensor");
  TORCH_CHECK(program.size() % 6 == 0,
              "_amx_tile_selftest: program must have 6 ints per "
              "instruction, got ",
              program.size());
  if (path == "amx") {
    const char* why = nullptr;
    TORCH_CHECK(DSCONV_HAVE_AMX_HW && amx_usable(&why),
                "_amx_tile_selftest: this machine cannot run AMX: ", why ? why : "not x86-64");
  }
  TileConfig cfg;
  uint8_t* cb = reinterpret_cast<uint8_t*>(&cfg);
  for (size_t i = 0; i < config.size(); ++i) {
    TORCH_CHECK(config[i] >= 0 && config[i] <= 255, "_amx_tile_selftest: config byte ", i,
                " is not a byte: ", config[i]);
    cb[i] = uint8_t(config[i]);
  }
  const int64_t n = int64_t(program.size() / 6), size = mem.numel();
  std::vector<TileInsn> prog(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    TileInsn& in = prog[size_t(i)];
    const int64_t* p = program.data() + 6 * i;
    in = TileInsn{p[0], p[1], p[2], p[3], p[4], p[5]};
    TORCH_CHECK(in.op >= 0 && in.op <= int64_t(TileOp::kRelease), "_amx_tile_selftest: opcode ",
                in.op, " at instruction ", i);
    TORCH_CHECK(in.t0 >= 0 && in.t0 < kTileNames && in.t1 >= 0 && in.t1 < kTileNames &&
                    in.t2 >= 0 && in.t2 < kTileNames,
                "_amx_tile_selftest: tile numbers must be in [0, ", kTileNames, ") at instruction ",
                i);
    if (in.op == int64_t(TileOp::kLoad) || in.op == int64_t(TileOp::kStore)) {
      // Every row the configuration could give this tile must lie in the buffer.
      const int64_t r = cfg.rows[in.t0], w = cfg.colsb[in.t0];
      const int64_t lo = in.offset + std::min<int64_t>(0, (r - 1) * in.stride);
      const int64_t hi = in.offset + std::max<int64_t>(0, (r - 1) * in.stride) + w;
      TORCH_CHECK(r == 0 || (lo >= 0 && hi <= size), "_amx_tile_selftest: instruction ", i,
                  " reaches bytes [", lo, ", ", hi, ") of a ", size, "-byte buffer");
    }
  }
  at::Tensor out = mem.contiguous().clone();
  amx_model::release();
  if (path == "amx_model") {
    TileProgram<AmxModel>::run(cfg, out.data_ptr<uint8_t>(), prog.data(), n);
    at::Tensor tiles = at::empty({kTileNames, kTileMaxRows, kTileBytesPerRow}, mem.options());
    for (int t = 0; t < kTileNames; ++t) {
      const uint8_t* s = amx_model::tile_storage(t);
      uint8_t* d = tiles.data_ptr<uint8_t>() + t * kTileMaxRows * kTileBytesPerRow;
      if (s)
        std::memcpy(d, s, kTileMaxRows * kTileBytesPerRow);
      else
        std::memset(d, 0, kTileMaxRows * kTileBytesPerRow);
    }
    amx_model::release();
    return {out, tiles};
  }
#if DSCONV_HAVE_AMX_HW
  {
    at::Tensor dry = mem.contiguous().clone();
    TileProgram<AmxModel>::run(cfg, dry.data_ptr<uint8_t>(), prog.data(), n);
    amx_model::release();
  }
  TileProgram<AmxHw>::run(cfg, out.data_ptr<uint8_t>(), prog.data(), n);
  AmxHw::release();
#endif
  return {out, at::empty({0}, mem.options())};
}

}  // namespace
}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // Test hook: runs a tile program on the AMX model or the real tiles (see amx_tile_selftest).
  m.def("_amx_tile_selftest(str path, int[] config, Tensor mem, int[] program) -> Tensor[]",
        &dsconv_ext::cpu::amx_tile_selftest);
}
