// Just enough of CUDA to run csrc/cuda/*.cu on the CPU, for tests on machines without a GPU.
//
// tests/cuda_emulation/build.py rewrites each kernel launch `k<<<grid, block, ...>>>(args)` into
// `ld3emu::launch(grid, block, [&] { k(args); })`, device checks `is_cuda()` into `is_cpu()`, and
// includes this header.  A launch runs the grid's blocks one after another; the threads of a block
// run as real threads (a pool made once) meeting at __syncthreads() on a barrier, so the block
// reductions' shared-memory protocol is exercised as written.  What this cannot show: warp timing,
// memory coalescing, the device's own exp/log, anything the CUDA compiler does differently.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one after another: one array serves every block in turn

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT
};

namespace ld3emu {

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;

// A reusable barrier for the threads of one block (C++17: no std::barrier).  Waiters yield
// instead of sleeping on a condition variable: with 256 threads on a few cores, waking them all
// through the kernel at every __syncthreads() cost several times more.
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    const unsigned gen = gen_.load(std::memory_order_acquire);
    if (waiting_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      waiting_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
    } else {
      while (gen_.load(std::memory_order_acquire) == gen) std::this_thread::yield();
    }
  }

 private:
  const unsigned n_;
  std::atomic<unsigned> waiting_{0}, gen_{0};
};

inline Barrier* current_barrier = nullptr;
inline int64_t launches = 0;  // kernel launches so far (the launch-count tests read it)

// The threads of a block: 1024 workers made once (thread creation would dominate the tests' time).
// Worker t runs the block's body when t < blockDim.x; blocks run one after another.
class BlockPool {
 public:
  static BlockPool& get() {
    static BlockPool* pool = new BlockPool();  // never destroyed: workers outlive static teardown
    return *pool;
  }

  void run_block(unsigned block, unsigned nthreads, const std::function<void()>& body) {
    std::unique_lock<std::mutex> lk(mu_);
    body_ = &body;
    block_ = block;
    nthreads_ = nthreads;
    done_ = 0;
    errors_.assign(nthreads, nullptr);
    ++job_;
    cv_.notify_all();
    done_cv_.wait(lk, [&] { return done_ == nthreads_; });
    body_ = nullptr;
    for (auto& e : errors_)
      if (e) std::rethrow_exception(e);
  }

 private:
  BlockPool() {
    for (unsigned t = 0; t < kMaxThreads; ++t) std::thread([this, t] { work(t); }).detach();
  }

  void work(unsigned t) {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return job_ != seen; });
      seen = job_;
      if (t >= nthreads_) continue;
      const std::function<void()>* body = body_;
      const unsigned block = block_;
      lk.unlock();
      thread_idx = dim3(t);
      block_idx = dim3(block);
      std::exception_ptr err;
      try {
        (*body)();
      } catch (...) {
        err = std::current_exception();
      }
      lk.lock();
      errors_[t] = err;
      if (++done_ == nthreads_) done_cv_.notify_one();
    }
  }

  static constexpr unsigned kMaxThreads = 1024;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void()>* body_ = nullptr;
  unsigned block_ = 0, nthreads_ = 0, done_ = 0;
  uint64_t job_ = 0;
  std::vector<std::exception_ptr> errors_;
};

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (grid.x == 0 || block.x == 0 || grid.y != 1 || block.y != 1 || grid.z != 1 || block.z != 1)
    throw std::runtime_error("ld3emu: only 1-D, non-empty launches are emulated");
  if (block.x > 1024) throw std::runtime_error("ld3emu: more than 1024 threads per block");
  ++launches;
  grid_dim = grid;
  block_dim = block;
  for (unsigned b = 0; b < grid.x; ++b) {
    Barrier bar(block.x);
    current_barrier = &bar;
    BlockPool::get().run_block(b, block.x, body);
    current_barrier = nullptr;
  }
}

inline void syncthreads() { current_barrier->wait(); }

}  // namespace ld3emu

#define threadIdx (::ld3emu::thread_idx)
#define blockIdx (::ld3emu::block_idx)
#define blockDim (::ld3emu::block_dim)
#define gridDim (::ld3emu::grid_dim)
#define __syncthreads() ::ld3emu::syncthreads()

// --- the CUDA runtime and c10::cuda pieces the launchers use --------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 2;  // a small "GPU": the forward's grid-stride loops then wrap several times
  return cudaSuccess;
}
// blocks resident per SM: 3 here, so the forward's grid (2 SMs x 3) is small and its grid-stride loops wrap
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 3;
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  template <typename T>
  explicit CUDAGuard(const T&) {}
};
inline int getCurrentCUDAStream(int = -1) { return 0; }
}  // namespace cuda
}  // namespace c10
