"""Build-system behaviour that does not need a full rebuild: the clear error of an isolated build
(torch not importable by the build Python) and the CUDA flag of the built module."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ld3_ext import _native

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_has_cuda_flag_is_consistent():
    if not _native.native_available():
        pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}")
    assert isinstance(_native.get().has_cuda(), bool)
    assert _native.native_cuda_available() == _native.get().has_cuda()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_configure_without_torch_says_no_build_isolation(tmp_path):
    # a Python that cannot import torch, like pip's isolated build env: -S drops site-packages
    wrapper = tmp_path / "python_no_site"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    wrapper.chmod(0o755)
    probe = subprocess.run([str(wrapper), "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("torch importable without site-packages here")
    res = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={wrapper}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "--no-build-isolation" in res.stdout + res.stderr


def test_cuda_compile_check_script_is_executable():
    path = os.path.join(ROOT, "scripts", "cuda_compile_check.sh")
    assert os.access(path, os.X_OK)
