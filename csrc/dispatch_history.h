// Compile-time dispatch on the number of history terms (0..kMaxHistory), shared by the CPU and
// CUDA launchers so that every loop is specialised and reads exactly the tensors it needs.
#pragma once

#include <cstdint>
#include <type_traits>

namespace ld3 {

template <typename F>
void dispatch_k(int64_t k, F&& f) {
  switch (k) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace ld3
