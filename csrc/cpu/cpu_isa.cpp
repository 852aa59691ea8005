// Run-time choice of the CPU loops' instruction set (cpu_isa.h says why there are two).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#if LD3_CPU_AVX2_PATH
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace ld3 {
namespace {

#if LD3_CPU_AVX2_PATH
// F16C from CPUID leaf 1 (ECX bit 29) itself: Clang's __builtin_cpu_supports has no "f16c" before
// Clang 16, and the float16 update of the AVX2 copy uses it (every AVX2 CPU has it; checked anyway)
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
}
#endif

bool cpu_has_avx2() {
#if LD3_CPU_AVX2_PATH
  __builtin_cpu_init();
  // the runtime's check (libgcc or compiler-rt) includes the OS side: YMM state enabled in XCR0
  return __builtin_cpu_supports("avx2") && cpu_has_f16c();
#else
  return false;
#endif
}

CpuIsa best_isa() { return cpu_has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kBase; }

// Parses a name; false for an unknown one.  "auto" is the best this CPU runs.
bool parse_isa(const char* name, CpuIsa& out) {
  if (std::strcmp(name, "auto") == 0) {
    out = best_isa();
  } else if (std::strcmp(name, "base") == 0) {
    out = CpuIsa::kBase;
  } else if (std::strcmp(name, "avx2") == 0) {
    out = CpuIsa::kAvx2;
  } else {
    return false;
  }
  return true;
}

std::atomic<int>& isa_state() {
  static std::atomic<int> value{[] {
    CpuIsa isa = best_isa();
    const char* env = std::getenv("LD3_CPU_ISA");
    CpuIsa asked;
    // an unknown or unsupported value falls back to the best one: the module must still load
    if (env != nullptr && *env != '\0' && parse_isa(env, asked) && (asked == CpuIsa::kBase || cpu_has_avx2()))
      isa = asked;
    return static_cast<int>(isa);
  }()};
  return value;
}

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_state().load(std::memory_order_relaxed)); }

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "base"; }

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names{"base"};
  if (cpu_has_avx2()) names.emplace_back("avx2");
  return names;
}

std::string set_cpu_isa(const std::string& isa) {
  CpuIsa asked;
  TORCH_CHECK(parse_isa(isa.c_str(), asked), "set_cpu_isa: isa must be 'base', 'avx2' or 'auto', got '", isa, "'");
  TORCH_CHECK(asked == CpuIsa::kBase || cpu_has_avx2(), "set_cpu_isa: isa='", isa,
              "' is not available on this CPU or build (available: base",
              cpu_has_avx2() ? ", avx2" : "", ")");
  return cpu_isa_name(static_cast<CpuIsa>(isa_state().exchange(static_cast<int>(asked))));
}

}  // namespace ld3
