// float16 loads, stores and rounding 8 elements at a time through F16C, for the AVX2 copy of the
// loops (every AVX2 CPU also has F16C; cpu_isa.cpp asks for both).
//
// Why: GCC does not vectorise _Float16 conversions, and the portable branch-free conversion of
// element_io.h costs ~15 integer operations per float16 element, so float16 loops ran ~15-19x
// slower than these (benchmarks/bench_cpu_isa.py).  One F16C instruction converts 8 halves, with
// the rounding (to nearest even) and exact widening of element_io.h, so loops built on these give
// bitwise the same element-wise results (NaN payloads aside: F16C keeps them, the portable store
// writes the canonical quiet NaN).  bfloat16 needs no such help: its element_io.h conversions are a
// shift and an add, which GCC vectorises; an explicit AVX2 version measured no faster.
//
//   HalfVec8<T>::load(p)            8 elements of T as 8 floats
//   HalfVec8<T>::store(p, v)        v rounded to T
//   HalfVec8<T>::store_reload(p, v) store, and return the stored values widened back (a reload)
//   DotAcc8 / dot_add / dot_sum     8 float lanes (products of float16 values, exact in float) summed
//                                   in double, the lanes then in one fixed order
#pragma once

#include "cpu/cpu_isa.h"

#if LD3_CPU_AVX2_PATH
#include <immintrin.h>

#include <c10/util/Half.h>

#define LD3_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))

namespace ld3 {

template <typename T>
struct HalfVec8;

template <>
struct HalfVec8<c10::Half> {
  LD3_TARGET_AVX2_F16C static __m256 widen(__m128i h) { return _mm256_cvtph_ps(h); }
  LD3_TARGET_AVX2_F16C static __m128i narrow(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  LD3_TARGET_AVX2_F16C static __m256 load(const c10::Half* p) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  LD3_TARGET_AVX2_F16C static void store(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v));
  }
  LD3_TARGET_AVX2_F16C static __m256 store_reload(c10::Half* p, __m256 v) {
    const __m128i h = narrow(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return widen(h);
  }
};

// A dot product's running sum in double, 8 lanes wide (two 4-double halves).
struct DotAcc8 {
  __m256d lo, hi;
};

LD3_TARGET_AVX2_F16C inline DotAcc8 dot_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }

LD3_TARGET_AVX2_F16C inline void dot_add(DotAcc8& a, __m256 prod) {
  a.lo = _mm256_add_pd(a.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(prod)));
  a.hi = _mm256_add_pd(a.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1)));
}

LD3_TARGET_AVX2_F16C inline double dot_sum(const DotAcc8& a) {
  const __m256d s = _mm256_add_pd(a.lo, a.hi);
  __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
  return _mm_cvtsd_f64(t);
}

}  // namespace ld3
#endif
