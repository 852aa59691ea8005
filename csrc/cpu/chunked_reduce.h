// Deterministic parallel reductions on the CPU: the range is cut into fixed chunks of
// kReduceChunk elements (independent of the thread count), each chunk writes its own row of
// partial sums, and the rows are summed in chunk order, so results are bitwise identical for any
// number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {

// Accumulates the five block sums of a range (each block's dot products are summed in double by
// the loops themselves: the products of float or half values are exact in double, and the dots
// cancel), in block order.
struct BlockSums {
  double s[kTableWidth] = {0, 0, 0, 0, 0};
  void add(double f0, double f1, double f2, double f3, double f4) {
    s[0] += f0;
    s[1] += f1;
    s[2] += f2;
    s[3] += f3;
    s[4] += f4;
  }
  void store(double* partial) const {
    for (int k = 0; k < kTableWidth; ++k) partial[k] = s[k];
  }
};

// range_fn(begin, end, partial) processes [begin, end) and, when `width` > 0, writes kTableWidth
// partial sums to `partial`; out[k] (k < width) receives their chunk-ordered totals.
template <typename F>
void chunked_reduce(int64_t n, int width, double* out, F&& range_fn) {
  const int64_t nchunks = (n + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partials(width > 0 ? nchunks * kTableWidth : 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t b = ch * kReduceChunk;
      range_fn(b, std::min(n, b + kReduceChunk), width > 0 ? partials.data() + ch * kTableWidth : nullptr);
    }
  });
  for (int k = 0; k < width; ++k) {
    double acc = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) acc += partials[ch * kTableWidth + k];
    out[k] = acc;
  }
}

}  // namespace ld3
