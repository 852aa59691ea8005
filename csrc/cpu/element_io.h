// Loads and stores of the CPU loops' element types in their op-math type (float for half types).
//
// Why: c10's scalar Half/BFloat16 conversions contain control flow (and pass values through a
// struct), so GCC does not vectorise a loop that uses them; a float16 update ran ~25x slower per
// element than float32 and no faster than eager PyTorch.  These versions are straight-line integer
// and float arithmetic with selects, which the vectoriser turns into SIMD code in both copies of the
// loops (cpu_isa.h).  They round to nearest even like c10 and agree with it bit for bit on every
// half/bfloat16 pattern and on every float that does not convert to NaN; a NaN becomes the
// canonical quiet NaN (tests/test_cpu_isa.py checks all of this against torch's conversions).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace ld3 {
namespace element_io {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32 (exact).
// All-ones when c holds, else zero: selects written as masks, which GCC vectorises here where it
// leaves some ?: selects as branches.
inline uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7FFFu;
  // normal numbers: move exponent and mantissa into place, rebias the exponent by 127 - 15
  uint32_t out = (mag << 13) + (112u << 23);
  // infinity and NaN: exponent 31 -> 255, NaNs quieted (as a float conversion does)
  out += mask_if(mag >= 0x7C00u) & (112u << 23);
  out |= mask_if(mag > 0x7C00u) & 0x00400000u;
  // zero and subnormals: mantissa * 2^-24, exact in float
  const uint32_t sub = bits_of(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
  const uint32_t is_sub = mask_if(mag < 0x0400u);
  return float_of(sign | (is_sub & sub) | (~is_sub & out));
}

// IEEE binary32 -> binary16, round to nearest even; overflow -> infinity, NaN -> 0x7E00 (signed).
inline uint16_t float_to_half(float f) {
  const uint32_t w = bits_of(f);
  const uint32_t sign = (w >> 16) & 0x8000u;
  const uint32_t a = w & 0x7FFFFFFFu;
  // results that are normal half numbers (|f| >= 2^-14): drop 13 mantissa bits with rounding,
  // rebias the exponent; a carry out of the mantissa bumps the exponent, as it should
  const uint32_t rebased = a - (112u << 23);
  uint32_t normal = (rebased + 0x0FFFu + ((rebased >> 13) & 1u)) >> 13;
  normal = (mask_if(normal > 0x7C00u) & 0x7C00u) | (~mask_if(normal > 0x7C00u) & normal);  // too large -> inf
  // results that are subnormal (|f| < 2^-14): the mantissa is |f| * 2^24 rounded to an integer;
  // adding and subtracting 2^23 rounds it to nearest even in the default rounding mode
  const float scaled = float_of(a) * 0x1p24f;
  const float rounded = (scaled + 0x1p23f) - 0x1p23f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(rounded));
  const uint32_t is_sub = mask_if(a < 0x38800000u);
  const uint32_t is_nan = mask_if(a > 0x7F800000u);
  const uint32_t out = (is_sub & sub) | (~is_sub & normal);
  return static_cast<uint16_t>(sign | (is_nan & 0x7E00u) | (~is_nan & out));
}

inline float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as c10).
inline uint16_t float_to_bf16(float f) {
  const uint32_t w = bits_of(f);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

}  // namespace element_io

// p[i] in the op-math type.
template <typename T>
inline at::opmath_type<T> load(const T* p, int64_t i) {
  return static_cast<at::opmath_type<T>>(p[i]);
}
template <>
inline float load<c10::Half>(const c10::Half* p, int64_t i) {
  return element_io::half_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}
template <>
inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  return element_io::bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}

// p[i] = v rounded to T.
template <typename T>
inline void store(T* p, int64_t i, at::opmath_type<T> v) {
  p[i] = static_cast<T>(v);
}
template <>
inline void store<c10::Half>(c10::Half* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = element_io::float_to_half(v);
}
template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = element_io::float_to_bf16(v);
}

// v rounded to T and back: the value a store followed by a load would give.
template <typename T>
inline at::opmath_type<T> round_to(at::opmath_type<T> v) {
  return static_cast<at::opmath_type<T>>(static_cast<T>(v));
}
template <>
inline float round_to<c10::Half>(float v) {
  return element_io::half_to_float(element_io::float_to_half(v));
}
template <>
inline float round_to<c10::BFloat16>(float v) {
  return element_io::bf16_to_float(element_io::float_to_bf16(v));
}

}  // namespace ld3
