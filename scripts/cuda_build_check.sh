#!/usr/bin/env bash
# Full CUDA build without a GPU: builds and links the extension with the CUDA kernels against a CUDA
# torch, imports it, and runs the fused-kernel tests on the CPU with that build (the CUDA tests skip).
#
# Why: scripts/cuda_compile_check.sh compiles each .cu to an object, but only a link and an import
# show a missing symbol between the .cu and .cpp sides, and a GPU session (15 minutes, by chance) is
# too dear to find that out.  Needs nvcc and `pip install torch==2.14.1` (a 5.4 GB CUDA build; from
# the local disk on the project's machines), so CI does not run it: run it before a GPU session.
#   scripts/cuda_build_check.sh [VENV_DIR]      (default: a temporary one, removed afterwards)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${LD3_CUDA_TORCH:-torch==2.14.1}"
if [[ $# -ge 1 ]]; then
  VENV="$1"
else
  VENV="$(mktemp -d "${TMPDIR:-/tmp}/ld3_cuda_build.XXXXXX")"
  trap 'rm -rf "$VENV" "$SRC"' EXIT
fi
SRC="$(mktemp -d "${TMPDIR:-/tmp}/ld3_cuda_src.XXXXXX")"
# build from a clean copy of the committed tree, so the check sees what CI and the GPU box see
git -C "$ROOT" archive HEAD | tar -x -C "$SRC"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip install -q "$TORCH_SPEC" scikit-build-core pybind11 ninja numpy pytest
LD3_WITH_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  pip install -q --no-build-isolation --no-deps --config-settings=cmake.define.LD3_CUDA_ARCHS="${LD3_CUDA_ARCHS:-90}" "$SRC"
cd "$SRC/tests"  # no ld3_ext/ here: `python -` imports the installed build (with its CUDA kernels)
python - <<'PYEOF'
import torch, ld3_ext._native as n
assert n.native_available(), f"extension failed to load: {n.load_error()}"
assert n.native_cuda_available(), "the extension was built without its CUDA kernels"
import os
want = os.environ.get("LD3_CUDA_ARCHS", "90").replace(";", ",")
assert n.get().cuda_archs() == want, f"_C.cuda_archs() is {n.get().cuda_archs()!r}, built for {want!r}"
from ld3_ext.build_info import build_info, format_build_info
print(format_build_info(build_info()))
print(f"cuda_build_check: torch {torch.__version__}, CUDA kernels linked and imported (GPU present: "
      f"{torch.cuda.is_available()})")
PYEOF
cd "$SRC"  # pytest (not python -m pytest) imports the installed package, as in CI
pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_fused_ops.py tests/test_adjoint_sampler.py
echo "cuda_build_check: OK"
