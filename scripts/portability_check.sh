#!/usr/bin/env bash
# Portability of the C++ sources beyond this machine's GCC build (CI runs it when the compilers exist):
#
#  1. aarch64: every C++ source compiled to objects by aarch64-linux-gnu-g++ with warnings as errors
#     (LD3_CPU_COMPILE_ONLY: a cross compiler cannot link against this machine's torch).  Arm hosts
#     (Graviton, GH200) take the loops' baseline copy: no x86 intrinsic may leak out of its #if.
#  2. Clang: the module built by clang++ with the default options, warnings as errors, which must come
#     out without OpenMP (Clang's runtime, libomp, is not torch's libgomp: CMakeLists.txt), then the
#     native-op tests run against it -- the two instruction-set copies, bitwise determinism and the
#     fused-vs-reference checks under another compiler, on one thread.
#
#   bash scripts/portability_check.sh            # both (a missing compiler fails the run)
#   LD3_PORT_CHECKS=aarch64 bash scripts/portability_check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
checks=${LD3_PORT_CHECKS:-"aarch64 clang"}
work=$(mktemp -d "${TMPDIR:-/tmp}/ld3_port.XXXXXX")
trap 'rm -rf "$work"' EXIT
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
pyexe=$(command -v "$python")

for check in $checks; do
  case "$check" in
    aarch64)
      cxx=${LD3_AARCH64_CXX:-aarch64-linux-gnu-g++}
      command -v "$cxx" >/dev/null || { echo "portability_check: $cxx not found" >&2; exit 2; }
      echo "== aarch64 compile-only check ($cxx) =="
      cmake -S "$root" -B "$work/aarch64" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLD3_WITH_CUDA=OFF \
        -DLD3_CPU_COMPILE_ONLY=ON -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS=-Werror \
        -DPython_EXECUTABLE="$pyexe" >"$work/aarch64.cmake.log" 2>&1 || { cat "$work/aarch64.cmake.log"; exit 1; }
      cmake --build "$work/aarch64" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$work/aarch64.build.log" 2>&1 \
        || { tail -60 "$work/aarch64.build.log"; exit 1; }
      mapfile -t objs < <(find "$work/aarch64" -name '*.o')
      [ "${#objs[@]}" -gt 0 ] || { echo "portability_check: no objects were built" >&2; exit 1; }
      for o in "${objs[@]}"; do  # the ELF header's machine field (bytes 18-19, little-endian): 183 = AArch64
        machine=$(od -An -tu2 -j18 -N2 "$o" | tr -d ' ')
        [ "$machine" = 183 ] || { echo "portability_check: $o is not an AArch64 object (e_machine $machine)" >&2; exit 1; }
      done
      echo "aarch64: OK (${#objs[@]} objects)"
      ;;
    clang)
      cxx=${LD3_CLANG_CXX:-clang++}
      command -v "$cxx" >/dev/null || { echo "portability_check: $cxx not found" >&2; exit 2; }
      echo "== Clang build, default options: no OpenMP ($cxx) =="
      t0=$(date +%s)
      cmake -S "$root" -B "$work/clang" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLD3_WITH_CUDA=OFF \
        -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS=-Werror \
        -DPython_EXECUTABLE="$pyexe" >"$work/clang.cmake.log" 2>&1 || { cat "$work/clang.cmake.log"; exit 1; }
      cmake --build "$work/clang" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$work/clang.build.log" 2>&1 \
        || { tail -60 "$work/clang.build.log"; exit 1; }
      so=$(ls "$work"/clang/_C*.so)
      echo "built $so in $(( $(date +%s) - t0 )) s"
      site="$work/site"
      mkdir -p "$site"
      cp -r "$root/ld3_ext" "$site/ld3_ext"
      find "$site/ld3_ext" -name '_C*.so' -delete
      find "$site/ld3_ext" -name '__pycache__' -prune -exec rm -rf {} +
      cp "$so" "$site/ld3_ext/"
      tests=${LD3_PORT_TESTS:-"tests/test_cpu_isa.py tests/test_fused_ops.py tests/test_determinism.py tests/test_adjoint_sampler.py tests/test_native_input_kinds.py tests/test_build_info.py"}
      cd "$root"
      # An editable install puts a meta-path redirect for ld3_ext in front of sys.path: drop it, then
      # import the Clang copy and check that it is the one actually loaded, built without OpenMP.
      LD3_PORT_SITE="$site" LD3_REQUIRE_NATIVE=1 "$python" - $tests <<'EOF'
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, os.environ["LD3_PORT_SITE"])
import ld3_ext._C as C
assert C.__file__.startswith(os.environ["LD3_PORT_SITE"]), f"wrong _C loaded: {C.__file__}"
assert C.openmp is False, "the Clang build reports OpenMP: a second runtime beside torch's libgomp"
print("clang module:", C.__file__, flush=True)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", *sys.argv[1:]]))
EOF
      echo "clang: OK"
      ;;
    *)
      echo "portability_check: unknown check '$check' (aarch64, clang)" >&2
      exit 2
      ;;
  esac
done
