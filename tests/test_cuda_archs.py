"""Which GPU architectures a CUDA build compiles for (cmake/cuda_archs.cmake), run in CMake's script mode:
the TORCH_CUDA_ARCH_LIST translation, the order in which the settings win, and the default list."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODULE = os.path.join(ROOT, "cmake", "cuda_archs.cmake")

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


def _cmake(defines, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAARCHS")}
    env.update(env_extra or {})
    args = ["cmake"] + [f"-D{k}={v}" for k, v in defines.items()] + ["-P", MODULE]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)


def _archs(res):
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("archs=")]
    assert len(lines) == 1, res.stdout
    return lines[0][len("archs="):].split(";")


@pytest.mark.parametrize("value, expected", [
    ("8.6", ["86-real"]),                            # machine code only, as torch's "-gencode ... code=sm_86"
    ("7.5;8.6+PTX", ["75-real", "86"]),              # +PTX: machine code and PTX
    ("8.0 9.0", ["80-real", "90-real"]),             # torch also splits on spaces
    ("9.0a", ["90a-real"]),                          # arch-specific feature sets keep their letter
    ("Ampere", ["80-real", "86"]),                   # torch's names, expanded as torch expands them
    ("turing;9.0", ["75", "90-real"]),
    ("8.6;8.6+PTX;9.0", ["86", "90-real"]),          # "86" already holds sm_86's machine code
    ("  8.9  ", ["89-real"]),
    ("native", ["native"]),
])
def test_torch_arch_list_translation(value, expected):
    assert _archs(_cmake({"LD3_ARCH_LIST": value})) == expected


@pytest.mark.parametrize("value", ["sm_86", "86", "8.6+ptx", "8.x", "Amper", " "])
def test_unreadable_torch_arch_list_names_the_variable(value):
    res = _cmake({"LD3_ARCH_LIST": value})
    assert res.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST" in res.stderr


def test_default_covers_turing_to_hopper_with_ptx_for_newer_gpus():
    archs = _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON"}))
    assert archs == ["75-real", "80-real", "86-real", "89-real", "90"]


def test_settings_win_in_order():
    env = {"TORCH_CUDA_ARCH_LIST": "8.9", "CUDAARCHS": "86"}
    assert _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON"}, {"TORCH_CUDA_ARCH_LIST": "8.9"})) == ["89-real"]
    assert _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON"}, env)) == ["86"]
    assert _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON", "LD3_CUDA_ARCHS": "80-real"}, env)) == ["80-real"]
    assert _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON", "LD3_CUDA_ARCHS": "80-real",
                          "CMAKE_CUDA_ARCHITECTURES": "70"}, env)) == ["70"]


def test_project_uses_the_module():
    """The build itself must go through the module (a CMakeLists that set its own list would bypass the tests above)."""
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        text = f.read()
    assert 'include("${CMAKE_CURRENT_SOURCE_DIR}/cmake/cuda_archs.cmake")' in text
    assert "ld3_choose_cuda_archs()" in text
    assert text.index("ld3_choose_cuda_archs()") < text.index("enable_language(CUDA)")


def test_combined_names_and_suffixes():
    assert _archs(_cmake({"LD3_ARCH_LIST": "Ampere+Tegra;Ampere"})) == ["87-real", "80-real", "86"]  # Jetson Orin
    assert _archs(_cmake({"LD3_ARCH_LIST": "Volta+Tegra"})) == ["72-real"]
    res = _cmake({"LD3_ARCH_LIST": "10.0f"})  # neither torch nor CMake reads a family suffix: refused here, named
    assert res.returncode != 0 and "TORCH_CUDA_ARCH_LIST" in res.stderr


def test_cmake_cuda_architectures_off_is_kept():
    # OFF is CMake's own "pass no architecture flags": the user's, not "unset"
    assert _archs(_cmake({"LD3_CHOOSE_ARCHS": "ON", "CMAKE_CUDA_ARCHITECTURES": "OFF"})) == ["OFF"]


def test_pip_builds_pass_the_archs_on_every_configure():
    """scikit-build-core reuses build/{wheel_tag}: without a define on every configure, a cached LD3_CUDA_ARCHS
    (the old default "80;90", without the T4's sm_75) would outlive the user's TORCH_CUDA_ARCH_LIST."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        defines = tomllib.load(f)["tool"]["scikit-build"]["cmake"]["define"]
    assert defines["LD3_CUDA_ARCHS"] == {"env": "LD3_CUDA_ARCHS", "default": ""}


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed (the configure enables the CUDA language)")
def test_configure_uses_the_choice_and_does_not_cache_cudaarchs(tmp_path):
    """A real configure (compile-only, no build): CUDAARCHS in the environment must neither beat -DLD3_CUDA_ARCHS
    nor stick in the build folder, where CMake's own CUDA set-up would cache it (policy CMP0126 OLD)."""
    import sys
    build = tmp_path / "build"

    def configure(defines, env_extra):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAARCHS")}
        env.update(env_extra)
        args = ["cmake", "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                "-DLD3_CUDA_COMPILE_ONLY=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}"] + [f"-D{k}={v}" for k, v in defines.items()]
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        flags = set()
        for name in ("build.ninja", "CMakeFiles/ld3_cuda_kernels.dir/flags.make"):
            path = build / name
            if path.exists():
                flags |= set(__import__("re").findall(r"arch=compute_\w+,code=\[?[\w,]+\]?", path.read_text()))
        return res.stdout, flags

    out, flags = configure({"LD3_CUDA_ARCHS": "86-real"}, {"CUDAARCHS": "80"})
    assert "CUDA architectures 86-real (from LD3_CUDA_ARCHS)" in out
    assert flags == {"arch=compute_86,code=[sm_86]"}, flags
    out, flags = configure({"LD3_CUDA_ARCHS": ""}, {"TORCH_CUDA_ARCH_LIST": "8.9"})  # what pip passes next time
    assert "from TORCH_CUDA_ARCH_LIST" in out and flags == {"arch=compute_89,code=[sm_89]"}, (out, flags)
    out, flags = configure({"LD3_CUDA_ARCHS": ""}, {})
    assert "(from the default)" in out
    assert "arch=compute_75,code=[sm_75]" in flags and "arch=compute_90,code=[compute_90,sm_90]" in flags, flags
