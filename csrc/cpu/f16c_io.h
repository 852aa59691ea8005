// float16 loads, stores and rounding 8 elements at a time with F16C, for the AVX2 copy of the loops.
//
// Why: GCC does not vectorise _Float16 conversions, and the portable branch-free conversion of
// element_io.h costs ~15 integer operations per element, so float16 loops ran ~10x slower per
// element than float32.  Every AVX2 CPU has F16C: one instruction converts 8 halves.  The rounding
// (to nearest even) and the exact half -> float widening are those of element_io.h, so loops built
// on these give bitwise the same element-wise results (NaN payloads aside: F16C keeps them, the
// portable store writes the canonical quiet NaN).
//
// Only the float16 loops' hot bodies use these; callers pick them when cpu_isa() is kAvx2.
#pragma once

#include "cpu/cpu_isa.h"

#if LD3_CPU_AVX2_PATH
#include <immintrin.h>

#include <c10/util/Half.h>

#define LD3_TARGET_F16C __attribute__((target("avx2,f16c")))

namespace ld3 {
namespace f16c {

LD3_TARGET_F16C inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

LD3_TARGET_F16C inline __m128i to_half8(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

LD3_TARGET_F16C inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half8(v));
}

// Stores v rounded to float16 and returns the stored value widened back (what a reload gives).
LD3_TARGET_F16C inline __m256 store8_and_reload(c10::Half* p, __m256 v) {
  const __m128i h = to_half8(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  return _mm256_cvtph_ps(h);
}

// The 8 lanes summed in one fixed order (the dot products stay reproducible).
LD3_TARGET_F16C inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace f16c
}  // namespace ld3
#endif
