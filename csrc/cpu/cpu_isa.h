// Which instruction set the CPU loops run with.
//
// The package is built for the baseline of its target (SSE2 on x86-64), so a wheel runs on any
// x86-64 CPU.  On x86-64 with GCC or Clang every loop also gets an AVX2 copy: invoke_for_isa()
// calls the loop through a target("avx2") trampoline that inlines it (flatten), so the
// compiler vectorises that copy with 256-bit registers.  The AVX2 copy is used when the running
// CPU has AVX2 (the adjoint step, bound by arithmetic, gains most: benchmarks/bench_cpu_isa.py).
// No FMA is used in either copy (-ffp-contract=off): element-wise results are bitwise identical
// for both; only the dot products' summation order differs (8 lanes instead of 4), and each copy
// on its own is bitwise reproducible for any thread count.
//
// LD3_CPU_ISA=base|avx2|auto picks at load, set_cpu_isa() at run time (tests run both).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define LD3_CPU_AVX2_PATH 1
#else
#define LD3_CPU_AVX2_PATH 0
#endif

namespace ld3 {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1 };

// The instruction set the loops use now (read once per kernel call).
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// Names of the instruction sets this build and this CPU can run ("base" always first).
std::vector<std::string> available_cpu_isas();
// Selects "base", "avx2" or "auto" (the best available); returns the previous name.  An unknown
// name or one this CPU or build cannot run is an error naming the argument.
std::string set_cpu_isa(const std::string& isa);

#if LD3_CPU_AVX2_PATH
// GCC inlines the loop (a lambda) into this function and compiles it for AVX2 here; the lambda's
// own out-of-line copy stays baseline.  Each instantiation is unique to its lambda type, so no
// AVX2 code can be merged into a baseline symbol by the linker.
template <typename F, typename... Args>
__attribute__((target("avx2"), flatten)) void invoke_avx2(const F& f, Args... args) {
  f(args...);
}
#endif

// f(args...) with the loop compiled for `isa`.
template <typename F, typename... Args>
inline void invoke_for_isa(CpuIsa isa, const F& f, Args... args) {
#if LD3_CPU_AVX2_PATH
  if (isa == CpuIsa::kAvx2) {
    invoke_avx2(f, args...);
    return;
  }
#endif
  (void)isa;
  f(args...);
}

}  // namespace ld3
