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
