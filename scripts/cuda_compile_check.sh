#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU and no CUDA torch needed): configures the project
# with LD3_CUDA_COMPILE_ONLY=ON in a temporary build dir and compiles every csrc/cuda/*.cu to an
# sm_90 object (LD3_CUDA_ARCHS=... for others) against the installed torch's headers.  Exits non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ ! -x "$NVCC" ]]; then
  echo "cuda_compile_check: nvcc not found (set CUDACXX)" >&2
  exit 2
fi
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/ld3_cuda_check.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DLD3_CUDA_COMPILE_ONLY=ON \
  -DLD3_CUDA_ARCHS="${LD3_CUDA_ARCHS:-90}" \
  -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "cuda_compile_check: OK ($(ls "$BUILD"/CMakeFiles/ld3_cuda_kernels.dir/csrc/cuda/*.o 2>/dev/null | wc -l) objects)"
