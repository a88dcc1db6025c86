// Element types of the CPU backend and their conversions to the compute
// type (float for f32/f16/bf16, double for f64). Internal to csrc/cpu.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_fused.h"

namespace moe {
namespace cpu {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t b) { return f32_from_bits(uint32_t(b) << 16); }
// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half <-> float, exact and round-to-nearest-even (bit manipulation
// with float arithmetic for the subnormal cases; needs no -ffast-math).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = f32_from_bits(0x7800000u);  // 2^-112
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(result);
}
inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = f32_from_bits(0x77800000u);   // 2^112
  const float scale_to_zero = f32_from_bits(0x08800000u);  // 2^-110
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// to_c<C>(x): element -> compute type. from_c<T>(c): compute type -> element.
template <class C> inline C to_c(float x) { return C(x); }
template <class C> inline C to_c(double x) { return C(x); }
template <class C> inline C to_c(bf16_t x) { return C(bf16_to_f32(x.bits)); }
template <class C> inline C to_c(f16_t x) { return C(f16_to_f32(x.bits)); }

template <class T> struct FromC;
template <> struct FromC<float> {
  template <class C> static float go(C c) { return float(c); }
};
template <> struct FromC<double> {
  template <class C> static double go(C c) { return double(c); }
};
template <> struct FromC<bf16_t> {
  template <class C> static bf16_t go(C c) { return bf16_t{f32_to_bf16(float(c))}; }
};
template <> struct FromC<f16_t> {
  template <class C> static f16_t go(C c) { return f16_t{f32_to_f16(float(c))}; }
};
template <class T, class C> inline T from_c(C c) { return FromC<T>::go(c); }

// Rounds a compute value through element type T (identity for f32/f64).
template <class T, class C> inline C round_through(C c) { return to_c<C>(from_c<T>(c)); }

// Compute type of an activation type.
template <class T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

// Calls f(T{}) with the element type of a float dtype. Returns false if the
// dtype is not a float dtype.
template <class F> inline bool dispatch_float(int32_t dtype, F &&f) {
  switch (dtype) {
    case MOE_DTYPE_F32: f(float{}); return true;
    case MOE_DTYPE_F64: f(double{}); return true;
    case MOE_DTYPE_BF16: f(bf16_t{}); return true;
    case MOE_DTYPE_F16: f(f16_t{}); return true;
    default: return false;
  }
}

// Generic (slow-path) scalar access by dtype, for small arrays such as the
// routing weights and indices.
inline double load_scalar(const void *base, int32_t dtype, int64_t off) {
  switch (dtype) {
    case MOE_DTYPE_F32: return static_cast<const float *>(base)[off];
    case MOE_DTYPE_F64: return static_cast<const double *>(base)[off];
    case MOE_DTYPE_BF16: return bf16_to_f32(static_cast<const uint16_t *>(base)[off]);
    case MOE_DTYPE_F16: return f16_to_f32(static_cast<const uint16_t *>(base)[off]);
    case MOE_DTYPE_I32: return static_cast<const int32_t *>(base)[off];
    case MOE_DTYPE_I64: return double(static_cast<const int64_t *>(base)[off]);
    default: return 0.0;
  }
}
inline void store_scalar(void *base, int32_t dtype, int64_t off, double v) {
  switch (dtype) {
    case MOE_DTYPE_F32: static_cast<float *>(base)[off] = float(v); break;
    case MOE_DTYPE_F64: static_cast<double *>(base)[off] = v; break;
    case MOE_DTYPE_BF16: static_cast<uint16_t *>(base)[off] = f32_to_bf16(float(v)); break;
    case MOE_DTYPE_F16: static_cast<uint16_t *>(base)[off] = f32_to_f16(float(v)); break;
    default: break;
  }
}
inline int64_t load_index(const void *base, int32_t dtype, int64_t off) {
  return dtype == MOE_DTYPE_I64 ? static_cast<const int64_t *>(base)[off]
                                : int64_t(static_cast<const int32_t *>(base)[off]);
}

}  // namespace cpu
}  // namespace moe
