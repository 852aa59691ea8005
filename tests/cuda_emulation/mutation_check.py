#!/usr/bin/env python
"""Does tests/test_cuda_emulated.py catch bugs in the CUDA kernels?  Inject one at a time and see.

    python tests/cuda_emulation/mutation_check.py        # about a minute per mutation (a rebuild each)

Each mutation edits a copy of csrc/ (never the tree itself), rebuilds the emulated module and runs
the emulation tests; a mutation is caught when a test fails.  Prints one line per mutation.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# the misaligned fallback walking elements begin + t, begin + t + kThreads, ... (its mapping before the fix)
_UPDATE_PACKETWISE = """    for (int64_t q = ch.pbegin + threadIdx.x; q < ch.pend; q += kThreads) {
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        const int64_t i = q * P::N + e;"""
_UPDATE_ELEMENTWISE = """    for (int64_t i0 = ch.begin + threadIdx.x; i0 < ch.pend * P::N; i0 += kThreads) {
      {
        const int64_t i = i0;"""
_ADJOINT_PACKETWISE = """    for (int64_t q = ch.pbegin + threadIdx.x; q < ch.pend; q += kThreads)
#pragma unroll
      for (int e = 0; e < P::N; ++e) scalar_element(q * P::N + e);"""
_ADJOINT_ELEMENTWISE = "    for (int64_t i = ch.begin + threadIdx.x; i < ch.pend * P::N; i += kThreads) scalar_element(i);"

# (name, file under csrc/, text, replacement, expected: True = a real bug that must be caught)
MUTATIONS = [
    ("tree sum without the barrier between levels", "cuda/reduce_cuda.cuh",
     "    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];\n    __syncthreads();",
     "    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];", True),
    ("vector tail starts one element late", "cuda/multistep_cuda.cu",
     "tail_start = nvec * P::N;", "tail_start = nvec * P::N + 1;", True),
    ("adjoint partials accumulated into uninitialised memory", "cuda/adjoint_cuda.cu",
     "partials[int64_t(blockIdx.x) * (1 + J) + k] = tot;", "partials[int64_t(blockIdx.x) * (1 + J) + k] += tot;",
     True),
    ("forward grid-stride step doubled (skips elements)", "cuda/multistep_cuda.cu",
     "const int64_t stride = int64_t(gridDim.x) * blockDim.x;",
     "const int64_t stride = int64_t(gridDim.x) * blockDim.x * 2;", True),
    ("adjoint reads the wrong older adjoint", "cuda/adjoint_cuda.cu",
     "L[j] = static_cast<acc_t>(older[j - 1]);", "L[j] = static_cast<acc_t>(older[j > 1 ? j - 2 : 0]);",
     True),
    ("second pass sums only the first 256 blocks' partials", "cuda/reduce_cuda.cuh",
     "for (int64_t b = threadIdx.x; b < nblocks; b += kThreads)",
     "for (int64_t b = threadIdx.x; b < nblocks && b < kThreads; b += kThreads)", True),
    ("backward packet loop stops one packet early", "cuda/multistep_cuda.cu",
     "for (int64_t v = ch.pbegin + threadIdx.x; v < ch.pend; v += kThreads)",
     "for (int64_t v = ch.pbegin + threadIdx.x; v + 1 < ch.pend; v += kThreads)", True),
    ("adjoint skips the last chunk's leftover elements", "cuda/adjoint_cuda.cu",
     "for (int64_t i = ch.pend * P::N + threadIdx.x; i < ch.end;", "for (int64_t i = ch.end + threadIdx.x; i < ch.end;",
     True),
    # the misaligned fallback must give each thread the packet path's elements in its order (bitwise equal dots)
    ("backward's scalar fallback gives each thread every kThreads-th element, not its packets",
     "cuda/multistep_cuda.cu", _UPDATE_PACKETWISE, _UPDATE_ELEMENTWISE, True),
    ("adjoint's scalar fallback gives each thread every kThreads-th element, not its packets",
     "cuda/adjoint_cuda.cu", _ADJOINT_PACKETWISE, _ADJOINT_ELEMENTWISE, True),
    ("forward walks a history term laid out otherwise as if in x's layout", "cuda/multistep_cuda.cu",
     "for (const auto& m : history) hist.push_back(in_layout_of(m, x));",
     "for (const auto& m : history) hist.push_back(m);", True),
    ("adjoint step reads an x laid out otherwise as if in v's layout", "adjoint_step.h",
     "if (a.need_dots) in.x = in_layout_of(x, like);", "if (a.need_dots) in.x = x;", True),
    ("forward writes an out laid out otherwise as if in x's layout", "cuda/multistep_cuda.cu",
     "const bool direct = same_dense_layout(out, x);", "const bool direct = out.is_non_overlapping_and_dense();",
     True),
    ("backward reads an x laid out otherwise as if in grad's layout", "cuda/multistep_cuda.cu",
     "    x = in_layout_of(x_in, g);", "    x = x_in;", True),
    ("adjoint step reads an m laid out otherwise as if in v's layout", "adjoint_step.h",
     "in.m = in_layout_of(m, like);", "in.m = m;", True),
    ("backward walks a sliced grad as if dense", "cuda/multistep_cuda.cu",
     "const at::Tensor g = dense_or_copy(grad_in);", "const at::Tensor g = grad_in;", True),
    ("adjoint step without v walks a sliced lam_prev as if dense", "adjoint_step.h",
     ": dense_or_copy(lam_prev);", ": lam_prev;", True),
    # benign today: only thread 0 uses the block sum, and it reads smem[0] before rewriting it
    ("no barrier after reading the block sum", "cuda/reduce_cuda.cuh",
     "  const double r = smem[0];\n  __syncthreads();", "  const double r = smem[0];", False),
]


def main() -> int:
    work = tempfile.mkdtemp(prefix="ld3_mutation_")
    build = os.path.join(work, "build")
    missed = 0
    try:
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"))
        for name, rel, old, new, must_catch in MUTATIONS:
            csrc = os.path.join(work, "csrc")
            shutil.rmtree(csrc, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
            path = os.path.join(csrc, rel)
            text = open(path).read()
            if old not in text:
                print(f"STALE   {name}: the text to mutate is no longer in csrc/{rel}")
                missed += 1
                continue
            with open(path, "w") as fh:
                fh.write(text.replace(old, new, 1))
            env = dict(os.environ, LD3_CUDA_EMU_BUILD_DIR=build)
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   os.path.join(work, "tests", "test_cuda_emulated.py")],
                                  cwd=work, env=env, capture_output=True, text=True)
            caught = proc.returncode != 0
            last = (proc.stdout.strip().splitlines() or ["?"])[-1]
            verdict = "caught" if caught else ("MISSED" if must_catch else "benign, not caught")
            missed += int(must_catch and not caught)
            print(f"{verdict:18s} {name}  ({last})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
