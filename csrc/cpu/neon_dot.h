// The Arm dot-product operations the NEON int8 kernel uses (kernel_neon.cpp), behind one interface
// with two implementations:
//
//  * NeonHw: the Advanced SIMD instructions (AArch64 with FEAT_DotProd: Armv8.2-A and later
//    cores such as Cortex-A76 / Neoverse N1, Apple M1); only entered after the run-time check of
//    neon_dot_usable() (dsconv2d_cpu.cpp).
//  * NeonModel: a software model of the same operations, written from the pseudo-code of the Arm
//    Architecture Reference Manual for A-profile (SDOT (by element), EOR, LD1, ST1), compiled on
//    every CPU (DSCONV_EXT_CPU_ISA=neon_model).
//
// The microkernel (segment_sums below) is one template over these, so the kernel logic that runs
// on an Arm CPU also runs, through the model, here and in CI; tests/test_dsconv_cpu_neon.py also
// cross-compiles segment_sums<NeonHw> for AArch64 and runs the real instructions under emulation.
//
// This header needs nothing but <stdint.h> (and <arm_neon.h> on AArch64) so that the same code can
// be compiled freestanding for that test.
#pragma once

#include <stdint.h>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#if defined(__aarch64__) && defined(__clang__)
#define DSCONV_NEON_DOT __attribute__((target("dotprod")))
#elif defined(__aarch64__) && defined(__GNUC__)
#define DSCONV_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define DSCONV_NEON_DOT
#endif

namespace dsconv_ext {
namespace cpu {

// Pixels per NEON int8 tile: four 128-bit vectors of 4 pixels (one dword of 4 channel bytes each).
constexpr int64_t kNeonVecs = 4;
constexpr int64_t kNeonQTile = 4 * kNeonVecs;
// Output channels per tile: one 128-bit weight load holds one 4-byte group for each (kOTile).
constexpr int64_t kNeonOTile = 4;

struct NeonModel {
  static constexpr bool kModel = true;
  struct I8x16 {
    int8_t b[16];
  };
  struct I32x4 {
    int32_t s[4];
  };
  static I32x4 zero() { return I32x4{{0, 0, 0, 0}}; }
  // LD1 {Vt.16B}: 16 consecutive bytes, byte i from address + i.
  static I8x16 load(const void* p) {
    I8x16 v;
    const uint8_t* b = static_cast<const uint8_t*>(p);
    for (int i = 0; i < 16; ++i) v.b[i] = static_cast<int8_t>(b[i]);
    return v;
  }
  // EOR Vd.16B, Vn.16B, Vm.16B with every byte of Vm 0x80: m + 128 (stored as a byte) -> m.
  static I8x16 flip_sign_bits(I8x16 v) {
    for (int i = 0; i < 16; ++i) v.b[i] = static_cast<int8_t>(static_cast<uint8_t>(v.b[i]) ^ 0x80u);
    return v;
  }
  // SDOT Vd.4S, Vn.16B, Vm.4B[L]: for each 32-bit element e, Vd[e] += sum over i < 4 of
  // SInt(Vn.B[4e + i]) * SInt(Vm.B[4L + i]), the products and sum taken exactly, the add modulo
  // 2^32 (the ARM ARM's "res = res + element1 * element2" on 32-bit elements).
  template <int L>
  static I32x4 dot_lane(I32x4 acc, I8x16 n, I8x16 m) {
    for (int e = 0; e < 4; ++e) {
      int32_t sum = 0;
      for (int i = 0; i < 4; ++i) sum += int32_t(n.b[4 * e + i]) * int32_t(m.b[4 * L + i]);
      acc.s[e] = static_cast<int32_t>(static_cast<uint32_t>(acc.s[e]) + static_cast<uint32_t>(sum));
    }
    return acc;
  }
  // ST1 {Vt.4S}: 4 int32 elements, element e to address + 4e.
  static void store(int32_t* p, I32x4 v) {
    for (int e = 0; e < 4; ++e) p[e] = v.s[e];
  }

  // The packer's operations on 4 pixels' floats (F32x4) and their 32-bit patterns (U32x4).
  struct F32x4 {
    float f[4];
  };
  struct U32x4 {
    uint32_t u[4];
  };
  static F32x4 load_f32(const float* p) { return F32x4{{p[0], p[1], p[2], p[3]}}; }
  // LD2 {Vt.4S, Vt2.4S}: 8 floats de-interleaved; Vt, the even ones, is returned.
  static F32x4 load_f32_even(const float* p) { return F32x4{{p[0], p[2], p[4], p[6]}}; }
  // AND with 0x7FFFFFFF on the bit patterns: |x| as integers, whose order is |x|'s, NaN above Inf.
  static U32x4 abs_bits(F32x4 v) {
    U32x4 r;
    for (int e = 0; e < 4; ++e) {
      __builtin_memcpy(&r.u[e], &v.f[e], 4);
      r.u[e] &= 0x7FFFFFFFu;
    }
    return r;
  }
  // UMAX Vd.4S.
  static U32x4 max_u32(U32x4 a, U32x4 b) {
    for (int e = 0; e < 4; ++e) a.u[e] = a.u[e] > b.u[e] ? a.u[e] : b.u[e];
    return a;
  }
  static void store_u32(uint32_t* p, U32x4 v) {
    for (int e = 0; e < 4; ++e) p[e] = v.u[e];
  }
  // FMUL / FADD Vd.4S (IEEE 754 single, round to nearest even), DUP Vd.4S from a float.
  static F32x4 mul_f32(F32x4 a, F32x4 b) {
    for (int e = 0; e < 4; ++e) a.f[e] = a.f[e] * b.f[e];
    return a;
  }
  static F32x4 add_f32(F32x4 a, F32x4 b) {
    for (int e = 0; e < 4; ++e) a.f[e] = a.f[e] + b.f[e];
    return a;
  }
  static F32x4 dup_f32(float x) { return F32x4{{x, x, x, x}}; }
  static void store_f32(float* p, F32x4 v) {
    for (int e = 0; e < 4; ++e) p[e] = v.f[e];
  }
  // SCVTF Vd.4S, Vn.4S: int32 to float, rounded to nearest even (exact below 2^24).
  static F32x4 cvt_f32(I32x4 v) {
    F32x4 r;
    for (int e = 0; e < 4; ++e) r.f[e] = static_cast<float>(v.s[e]);
    return r;
  }
  // FCVTNS Vd.4S, Vn.4S: to the nearest int32, ties to even, whatever FPCR's rounding mode;
  // NaN gives 0, out-of-range values saturate.
  static I32x4 cvt_nearest(F32x4 v) {
    I32x4 r;
    for (int e = 0; e < 4; ++e) {
      const float x = v.f[e];
      if (x != x) {
        r.s[e] = 0;
      } else if (x >= 2147483648.f) {
        r.s[e] = INT32_MAX;
      } else if (x < -2147483648.f) {
        r.s[e] = INT32_MIN;
      } else if (x >= 8388608.f || x <= -8388608.f) {  // |x| >= 2^23: already an integer
        r.s[e] = static_cast<int32_t>(x);
      } else {
        int32_t i = static_cast<int32_t>(x);  // toward zero
        const float frac = x - float(i);      // exact below 2^23
        if (frac > 0.5f || (frac == 0.5f && (i & 1))) ++i;
        if (frac < -0.5f || (frac == -0.5f && (i & 1))) --i;
        r.s[e] = i;
      }
    }
    return r;
  }
  // SMAX / SMIN Vd.4S with a duplicated bound: clamp to [-limit, limit].
  static I32x4 clamp_s32(I32x4 v, int32_t limit) {
    for (int e = 0; e < 4; ++e) v.s[e] = v.s[e] > limit ? limit : v.s[e] < -limit ? -limit : v.s[e];
    return v;
  }
  // ADD Vd.4S (modulo 2^32).
  static I32x4 add_s32(I32x4 a, I32x4 b) {
    for (int e = 0; e < 4; ++e)
      a.s[e] = static_cast<int32_t>(static_cast<uint32_t>(a.s[e]) + static_cast<uint32_t>(b.s[e]));
    return a;
  }
  // Four channels' mantissas (each in [-128, 127]) as one pixel's dword of m + 128 bytes, channel
  // j in byte j: AND 0xFF, SHL 8 j and ORR, then EOR 0x80808080.
  static U32x4 pack_bytes(I32x4 m0, I32x4 m1, I32x4 m2, I32x4 m3) {
    U32x4 r;
    for (int e = 0; e < 4; ++e) {
      const uint32_t w = (uint32_t(m0.s[e]) & 0xFFu) | (uint32_t(m1.s[e]) & 0xFFu) << 8 |
                         (uint32_t(m2.s[e]) & 0xFFu) << 16 | (uint32_t(m3.s[e]) & 0xFFu) << 24;
      r.u[e] = w ^ 0x80808080u;
    }
    return r;
  }
};

#if defined(__aarch64__)
#define DSCONV_HAVE_NEON_DOT_HW 1
struct NeonHw {
  static constexpr bool kModel = false;
  using I8x16 = int8x16_t;
  using I32x4 = int32x4_t;
  DSCONV_NEON_DOT static inline I32x4 zero() { return vdupq_n_s32(0); }
  DSCONV_NEON_DOT static inline I8x16 load(const void* p) {
    return vld1q_s8(static_cast<const int8_t*>(p));
  }
  DSCONV_NEON_DOT static inline I8x16 flip_sign_bits(I8x16 v) {
    return veorq_s8(v, vdupq_n_s8(static_cast<int8_t>(0x80)));
  }
  template <int L>
  DSCONV_NEON_DOT static inline I32x4 dot_lane(I32x4 acc, I8x16 n, I8x16 m) {
    return vdotq_laneq_s32(acc, n, m, L);
  }
  DSCONV_NEON_DOT static inline void store(int32_t* p, I32x4 v) { vst1q_s32(p, v); }

  using F32x4 = float32x4_t;
  using U32x4 = uint32x4_t;
  DSCONV_NEON_DOT static inline F32x4 load_f32(const float* p) { return vld1q_f32(p); }
  DSCONV_NEON_DOT static inline F32x4 load_f32_even(const float* p) { return vld2q_f32(p).val[0]; }
  DSCONV_NEON_DOT static inline U32x4 abs_bits(F32x4 v) {
    return vandq_u32(vreinterpretq_u32_f32(v), vdupq_n_u32(0x7FFFFFFFu));
  }
  DSCONV_NEON_DOT static inline U32x4 max_u32(U32x4 a, U32x4 b) { return vmaxq_u32(a, b); }
  DSCONV_NEON_DOT static inline void store_u32(uint32_t* p, U32x4 v) { vst1q_u32(p, v); }
  DSCONV_NEON_DOT static inline F32x4 mul_f32(F32x4 a, F32x4 b) { return vmulq_f32(a, b); }
  DSCONV_NEON_DOT static inline F32x4 add_f32(F32x4 a, F32x4 b) { return vaddq_f32(a, b); }
  DSCONV_NEON_DOT static inline F32x4 dup_f32(float x) { return vdupq_n_f32(x); }
  DSCONV_NEON_DOT static inline void store_f32(float* p, F32x4 v) { vst1q_f32(p, v); }
  DSCONV_NEON_DOT static inline F32x4 cvt_f32(I32x4 v) { return vcvtq_f32_s32(v); }
  DSCONV_NEON_DOT static inline I32x4 cvt_nearest(F32x4 v) { return vcvtnq_s32_f32(v); }
  DSCONV_NEON_DOT static inline I32x4 clamp_s32(I32x4 v, int32_t limit) {
    return vminq_s32(vmaxq_s32(v, vdupq_n_s32(-limit)), vdupq_n_s32(limit));
  }
  DSCONV_NEON_DOT static inline I32x4 add_s32(I32x4 a, I32x4 b) { return vaddq_s32(a, b); }
  DSCONV_NEON_DOT static inline U32x4 pack_bytes(I32x4 m0, I32x4 m1, I32x4 m2, I32x4 m3) {
    const uint32x4_t ff = vdupq_n_u32(0xFFu);
    uint32x4_t w = vandq_u32(vreinterpretq_u32_s32(m0), ff);
    w = vorrq_u32(w, vshlq_n_u32(vandq_u32(vreinterpretq_u32_s32(m1), ff), 8));
    w = vorrq_u32(w, vshlq_n_u32(vandq_u32(vreinterpretq_u32_s32(m2), ff), 16));
    w = vorrq_u32(w, vshlq_n_u32(vreinterpretq_u32_s32(m3), 24));
    return veorq_u32(w, vdupq_n_u32(0x80808080u));
  }
};
#else
#define DSCONV_HAVE_NEON_DOT_HW 0
#endif

// One (block, tap) segment of a tile: S[r][q] = sum over the K4 groups k of the 4 channels'
// m * w, for the kNeonOTile outputs r and kNeonQTile pixels q from `a`. `a` holds the packed
// activations (k4 planes `plane` words apart; per pixel one dword of 4 bytes m + 128), `w` the
// segment's weights (per group, output r's 4 signed bytes at 16k + 4r). The mantissas are turned
// back into signed bytes (m + 128 ^ 0x80 = m), so the sums need no -128 * sum(q) correction:
// they equal the scalar path's corr + sum((m + 128) * q) exactly. |S| < 2^24 (semantics.md).
template <class Ops>
DSCONV_NEON_DOT inline void segment_acc(const uint32_t* a, int64_t plane, const int8_t* w,
                                        int64_t K4,
                                        typename Ops::I32x4 (&acc)[kNeonOTile][kNeonVecs]) {
  for (int r = 0; r < kNeonOTile; ++r)
    for (int v = 0; v < kNeonVecs; ++v) acc[r][v] = Ops::zero();
  for (int64_t k = 0; k < K4; ++k) {
    const typename Ops::I8x16 wk = Ops::load(w + 16 * k);
    for (int v = 0; v < kNeonVecs; ++v) {
      const typename Ops::I8x16 m = Ops::flip_sign_bits(Ops::load(a + k * plane + 4 * v));
      acc[0][v] = Ops::template dot_lane<0>(acc[0][v], m, wk);
      acc[1][v] = Ops::template dot_lane<1>(acc[1][v], m, wk);
      acc[2][v] = Ops::template dot_lane<2>(acc[2][v], m, wk);
      acc[3][v] = Ops::template dot_lane<3>(acc[3][v], m, wk);
    }
  }
}

// The sums S[r][q] themselves (the emulation test's view of segment_acc).
template <class Ops>
DSCONV_NEON_DOT inline void segment_sums(const uint32_t* a, int64_t plane, const int8_t* w,
                                         int64_t K4, int32_t (*S)[kNeonQTile]) {
  typename Ops::I32x4 acc[kNeonOTile][kNeonVecs];
  segment_acc<Ops>(a, plane, w, K4, acc);
  for (int r = 0; r < kNeonOTile; ++r)
    for (int v = 0; v < kNeonVecs; ++v) Ops::store(S[r] + 4 * v, acc[r][v]);
}

// One segment's sums folded into the tile's float accumulators f[r][q], in the portable path's
// order (kernel_scalar.cpp): f += (float(S) * alpha[r]) * scale[q], then, with a KDS bias,
// f += kdsb[r] * usum[q] (usum null without). Each product and sum rounded on its own (no FMA),
// so the outputs are that path's bit for bit.
template <class Ops>
DSCONV_NEON_DOT inline void segment_fold(const uint32_t* a, int64_t plane, const int8_t* w,
                                         int64_t K4, const float* alpha, const float* scale,
                                         const float* kdsb, const float* usum,
                                         float (*f)[kNeonQTile]) {
  typename Ops::I32x4 acc[kNeonOTile][kNeonVecs];
  segment_acc<Ops>(a, plane, w, K4, acc);
  for (int r = 0; r < kNeonOTile; ++r) {
    const typename Ops::F32x4 al = Ops::dup_f32(alpha[r]);
    for (int v = 0; v < kNeonVecs; ++v) {
      const typename Ops::F32x4 t =
          Ops::mul_f32(Ops::mul_f32(Ops::cvt_f32(acc[r][v]), al), Ops::load_f32(scale + 4 * v));
      typename Ops::F32x4 y = Ops::add_f32(Ops::load_f32(f[r] + 4 * v), t);
      if (usum)
        y = Ops::add_f32(y, Ops::mul_f32(Ops::dup_f32(kdsb[r]), Ops::load_f32(usum + 4 * v)));
      Ops::store_f32(f[r] + 4 * v, y);
    }
  }
}

// 4 pixels' floats, kStride apart.
template <class Ops, int kStride>
DSCONV_NEON_DOT inline typename Ops::F32x4 load_pixels(const float* p) {
  if constexpr (kStride == 1) {
    return Ops::load_f32(p);
  } else {
    return Ops::load_f32_even(p);
  }
}

// The BFP pack of 4 pixels of one block, kStride floats apart in the input row (1, or 2 for a
// stride-2 conv's phase rows: 8 floats read) (semantics.md; the portable path's pack_pixel_bytes,
// lane for lane): x points at channel 0 of the 4 pixels, channels `cstride` floats apart, nch of
// them; K4 groups of 4 channels (those past nch as mantissa 0) go to
// act[k * kplane] as one dword per pixel, 2^E to esc[0..3] and, where usum is given,
// 2^E * sum(m) to usum[0..3]. Returns false, storing nothing, where a pixel's block is not finite
// or its 2^E or 2^-E is not a normal float: the caller packs those pixels one by one.
template <class Ops, int kStride>
DSCONV_NEON_DOT inline bool pack_quad(const float* x, int64_t cstride, int64_t nch, int64_t K4,
                                      int mant_bits, uint32_t* act, int64_t kplane, float* esc,
                                      float* usum) {
  static_assert(kStride == 1 || kStride == 2, "stride 1 or 2");
  typename Ops::U32x4 amax = Ops::abs_bits(load_pixels<Ops, kStride>(x));
  for (int64_t c = 1; c < nch; ++c)
    amax = Ops::max_u32(amax, Ops::abs_bits(load_pixels<Ops, kStride>(x + c * cstride)));
  uint32_t bits[4];
  Ops::store_u32(bits, amax);
  float inv[4], scale[4];
  for (int l = 0; l < 4; ++l) {
    int32_t e = 0;
    if (bits[l] != 0) {
      if (bits[l] < 0x00800000u || bits[l] > 0x7F7FFFFFu) return false;  // subnormal / Inf / NaN
      e = int32_t(bits[l] >> 23) - 127 - (mant_bits - 2);
      if (e < -126 || e > 126) return false;
    }
    const uint32_t up = uint32_t(127 + e) << 23, down = uint32_t(127 - e) << 23;
    __builtin_memcpy(&scale[l], &up, 4);
    __builtin_memcpy(&inv[l], &down, 4);
  }
  const typename Ops::F32x4 inv_v = Ops::load_f32(inv);
  const int32_t limit = (1 << (mant_bits - 1)) - 1;
  typename Ops::I32x4 msum = Ops::zero();
  for (int64_t k = 0; k < K4; ++k) {
    typename Ops::I32x4 m[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t c = 4 * k + j;
      if (c < nch) {
        m[j] = Ops::clamp_s32(
            Ops::cvt_nearest(Ops::mul_f32(load_pixels<Ops, kStride>(x + c * cstride), inv_v)),
            limit);
        msum = Ops::add_s32(msum, m[j]);
      } else {
        m[j] = Ops::zero();
      }
    }
    Ops::store_u32(act + k * kplane, Ops::pack_bytes(m[0], m[1], m[2], m[3]));
  }
  for (int l = 0; l < 4; ++l) esc[l] = scale[l];
  if (usum) {
    int32_t ms[4];
    Ops::store(ms, msum);
    for (int l = 0; l < 4; ++l) usum[l] = scale[l] * float(ms[l]);
  }
  return true;
}

}  // namespace cpu
}  // namespace dsconv_ext
