// The AMX tile operations the int8 kernel uses, behind one interface with two implementations:
//
//  * AmxHw: the instructions themselves (Sapphire Rapids and later; only entered after the
//    CPUID / XCR0 / arch_prctl checks of amx_usable()).
//  * AmxModel: a software model of the same instructions, written from the pseudo-code of the
//    Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2 (LDTILECFG, TILELOADD,
//    TILESTORED, TILEZERO, TILERELEASE, TDPBSSD/TDPBSUD/TDPBUSD/TDPBUUD) and section 3 of the
//    Intel Architecture Instruction Set Extensions Programming Reference (palette 1: 8 tiles of
//    at most 16 rows x 64 bytes; TMUL limits K <= 16 dwords, N <= 16 dwords).
//    One rule the pseudo-code does not show, found on an AMX Xeon: TILELOADD, TILESTORED and
//    the TDPs raise #UD on a tile whose colsb is not a multiple of 4 (LDTILECFG and TILEZERO
//    accept it); the model raises it too.
//
// The microkernel (kernel_amx.cpp) is one template over these, so the exact kernel logic that
// runs on an AMX machine also runs, through the model, on any AVX-512 machine and in CI
// (DSCONV_EXT_CPU_ISA=amx_model). Tile numbers are template parameters because the instructions
// encode them in the opcode.
//
// The model raises a c10::Error where the hardware would fault (#GP on a bad configuration,
// #UD on an unconfigured tile or mismatched TDP shapes): a kernel bug that would crash on AMX
// hardware fails the tests here instead.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace dsconv_ext {
namespace cpu {

// The 64-byte operand of LDTILECFG (SDM vol. 2, LDTILECFG: "Memory Layout of the LDTILECFG
// Operand").
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads exactly 64 bytes");

// Palette 1 limits (CPUID leaf 0x1D) and TMUL limits (leaf 0x1E) of every AMX CPU so far.
constexpr int kTileNames = 8;
constexpr int kTileMaxRows = 16;
constexpr int kTileBytesPerRow = 64;
constexpr int kTmulMaxK = 16;  // dwords of A per row = rows of B
constexpr int kTmulMaxN = 16;  // dwords per row of B and C

// Which operands of a TDPB*D are signed bytes: tdpb<A><B>d.
enum class DpSign : int { kSS = 0, kSU = 1, kUS = 2, kUU = 3 };

namespace amx_model {
// The model's tile state is per thread, as the real tile registers are.
void loadconfig(const TileConfig& cfg);
void release();
void zero(int t);
void loadd(int t, const void* base, int64_t stride);
void stored(int t, void* base, int64_t stride);
void dp(DpSign sign, int c, int a, int b);
// Tile t's full kTileMaxRows x kTileBytesPerRow storage (bytes beyond rows / colsb included),
// or null while no configuration is loaded: what the self-test checks the zeroing rules with.
const uint8_t* tile_storage(int t);
}  // namespace amx_model

struct AmxModel {
  static constexpr bool kModel = true;
  static void config(const TileConfig& c) { amx_model::loadconfig(c); }
  static void release() { amx_model::release(); }
  template <int T>
  static void zero() {
    amx_model::zero(T);
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    amx_model::loadd(T, base, stride);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    amx_model::stored(T, base, stride);
  }
  template <DpSign S, int C, int A, int B>
  static void dp() {
    amx_model::dp(S, C, A, B);
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSCONV_HAVE_AMX_HW 1

// Inline asm rather than GCC 12's <immintrin.h> AMX intrinsics: those are macros that paste the
// tile number into the mnemonic (a template parameter cannot be passed), _tile_loadd declares no
// memory input (stores to the loaded buffer could be moved after it), and _tile_loadconfig
// declares an 8-byte operand (the other 56 bytes of the configuration could be left unwritten).
// %c prints an immediate without its '$'; both assembler dialects are given, as GCC's own
// intrinsics do. Asm needs no -mamx-tile / -mamx-int8 (the assembler takes every mnemonic), and
// nothing in the build is compiled with those flags, so the compiler never emits an AMX
// instruction of its own: the only ones in the binary are these, reached only through kernels_amx()
// after amx_usable() said yes.
struct AmxHw {
  static constexpr bool kModel = false;
  __attribute__((always_inline)) static inline void config(const TileConfig& c) {
    asm volatile("ldtilecfg %0" ::"m"(c));
  }
  __attribute__((always_inline)) static inline void release() {
    asm volatile("tilerelease" ::: "memory");
  }
  template <int T>
  __attribute__((always_inline)) static inline void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  __attribute__((always_inline)) static inline void load(const void* base, int64_t stride) {
    asm volatile("{tileloadd\t(%0,%1,1), %%tmm%c2|tileloadd\t%%tmm%c2, [%0+%1*1]}" ::"r"(base),
                 "r"(stride), "i"(T)
                 : "memory");
  }
  template <int T>
  __attribute__((always_inline)) static inline void store(void* base, int64_t stride) {
    asm volatile("{tilestored\t%%tmm%c2, (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm%c2}" ::"r"(base),
                 "r"(stride), "i"(T)
                 : "memory");
  }
  template <DpSign S, int C, int A, int B>
  __attribute__((always_inline)) static inline void dp() {
    if constexpr (S == DpSign::kSS)
      asm volatile(
          "{tdpbssd\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbssd\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(C),
          "i"(A), "i"(B));
    else if constexpr (S == DpSign::kSU)
      asm volatile(
          "{tdpbsud\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbsud\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(C),
          "i"(A), "i"(B));
    else if constexpr (S == DpSign::kUS)
      asm volatile(
          "{tdpbusd\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbusd\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(C),
          "i"(A), "i"(B));
    else
      asm volatile(
          "{tdpbuud\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbuud\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(C),
          "i"(A), "i"(B));
  }
};
#else
#define DSCONV_HAVE_AMX_HW 0
#endif

// One instruction of a self-test program (torch.ops.dsconv_ext._amx_tile_selftest): the opcode,
// up to three tile numbers, and for loads and stores a byte offset into the test buffer and a
// row stride.
enum class TileOp : int64_t {
  kLoadConfig = 0,  // the program's configuration
  kLoad = 1,
  kStore = 2,
  kZero = 3,
  kDpSS = 4,
  kDpSU = 5,
  kDpUS = 6,
  kDpUU = 7,
  kRelease = 8,
};
struct TileInsn {
  int64_t op, t0, t1, t2, offset, stride;
};

// Runs `n` instructions on tile layer T against `mem`, with tile numbers from the program: each
// runtime number is turned into the template argument the instruction needs.
template <class T>
struct TileProgram {
  template <int I, class F>
  static void with_tile(int t, F&& f) {
    if constexpr (I < kTileNames) {
      if (t == I) return f(std::integral_constant<int, I>{});
      with_tile<I + 1>(t, f);
    }
  }
  template <DpSign S>
  static void dp(const TileInsn& in) {
    with_tile<0>(int(in.t0), [&](auto c) {
      with_tile<0>(int(in.t1), [&](auto a) {
        with_tile<0>(int(in.t2), [&](auto b) {
          constexpr int C = decltype(c)::value, A = decltype(a)::value, B = decltype(b)::value;
          // The assembler rejects a TDP naming a tile twice; only the model can be asked to
          // fault on one (the real tiles only run programs the model ran without error).
          if constexpr (C != A && C != B && A != B)
            T::template dp<S, C, A, B>();
          else if constexpr (T::kModel)
            amx_model::dp(S, C, A, B);
          else
            throw std::logic_error("TDP with repeated tiles on the real tiles");
        });
      });
    });
  }
  static void run(const TileConfig& cfg, uint8_t* mem, const TileInsn* prog, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const TileInsn& in = prog[i];
      switch (static_cast<TileOp>(in.op)) {
        case TileOp::kLoadConfig:
          T::config(cfg);
          break;
        case TileOp::kLoad:
          with_tile<0>(int(in.t0), [&](auto t) {
            T::template load<decltype(t)::value>(mem + in.offset, in.stride);
          });
          break;
        case TileOp::kStore:
          with_tile<0>(int(in.t0), [&](auto t) {
            T::template store<decltype(t)::value>(mem + in.offset, in.stride);
          });
          break;
        case TileOp::kZero:
          with_tile<0>(int(in.t0), [&](auto t) { T::template zero<decltype(t)::value>(); });
          break;
        case TileOp::kDpSS:
          dp<DpSign::kSS>(in);
          break;
        case TileOp::kDpSU:
          dp<DpSign::kSU>(in);
          break;
        case TileOp::kDpUS:
          dp<DpSign::kUS>(in);
          break;
        case TileOp::kDpUU:
          dp<DpSign::kUU>(in);
          break;
        case TileOp::kRelease:
          T::release();
          break;
      }
    }
  }
};

}  // namespace cpu
}  // namespace dsconv_ext
