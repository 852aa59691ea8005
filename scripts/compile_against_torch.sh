#!/usr/bin/env bash
# Compiles every C++ and CUDA source against the headers of another torch release, without
# installing it: downloads that torch wheel (no dependencies), unpacks only torch/include, then
# syntax-checks the .cpp files with g++ and compiles the .cu files to sm_90 objects with nvcc.
#
# Why: the lent GPU machine has torch 2.11 (CUDA 13.0), while we build against 2.13/2.14 here; an
# API that moved between releases would otherwise first show up in a GPU session.
#   scripts/compile_against_torch.sh [VERSION]     (default 2.11.0; the wheel is ~530 MB)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${1:-2.11.0}"
PY="${PYTHON:-python3}"
NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ld3_torch_headers.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps "torch==$VERSION" -d "$WORK"
unzip -q "$WORK"/torch-*.whl 'torch/include/*' -d "$WORK/x"
INC="$WORK/x/torch/include"
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
FLAGS=(-std=c++20 -isystem "$INC" -isystem "$INC/torch/csrc/api/include" -isystem "$PYINC" -I"$ROOT/csrc"
       -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H)
fail=0
for f in "$ROOT"/python/*.cpp "$ROOT"/csrc/cpu/*.cpp; do
  g++ -fsyntax-only -fopenmp -DLD3_WITH_CUDA_KERNELS=1 "${FLAGS[@]}" "$f" || { echo "FAILED: $f"; fail=1; }
done
if [[ -x "$NVCC" ]]; then
  for f in "$ROOT"/csrc/cuda/*.cu; do
    "$NVCC" --expt-relaxed-constexpr -arch=sm_90 -Xcompiler=-fPIC -c -o "$WORK/$(basename "$f").o" "${FLAGS[@]}" "$f" \
      || { echo "FAILED: $f"; fail=1; }
  done
else
  echo "compile_against_torch: nvcc not found, .cu files not compiled"
fi
[[ $fail == 0 ]] && echo "compile_against_torch: OK against torch $VERSION headers"
exit $fail
