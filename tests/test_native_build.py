"""Build-system behaviour that does not need a full rebuild: the clear error of an isolated build
(torch not importable by the build Python) and the CUDA flag of the built module."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

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


def test_native_extension_loaded_when_required():
    """CI sets LD3_REQUIRE_NATIVE=1: there the compiled kernels must really be in use, so that the
    fused-path tests cannot pass by silently skipping."""
    import os
    import ld3_ext
    if os.environ.get("LD3_REQUIRE_NATIVE") != "1":
        pytest.skip("LD3_REQUIRE_NATIVE is not set")
    assert ld3_ext.native_available(), f"ld3_ext._C failed to load: {_native.load_error()}"
    from ld3_ext import ops
    assert ops.resolve_backend("auto") == "fused"


def test_main_build_has_openmp_threads_when_required():
    """CI's build (GCC on Linux) must have OpenMP, or the thread-count determinism tests would compare one
    thread with itself; a compiler without it builds a one-thread module (scripts/portability_check.sh)."""
    if os.environ.get("LD3_REQUIRE_OPENMP") != "1":
        pytest.skip("LD3_REQUIRE_OPENMP is not set")
    assert _native.native_available(), f"ld3_ext._C failed to load: {_native.load_error()}"
    assert _native.get().openmp is True


@pytest.mark.parametrize("script", ["cuda_compile_check.sh", "portability_check.sh", "sanitizer_check.sh"])
def test_check_scripts_are_executable(script):
    assert os.access(os.path.join(ROOT, "scripts", script), os.X_OK)


def test_import_without_native_extension_falls_back_and_says_so(tmp_path):
    """With a broken _C, `import ld3_ext` still works on the reference path and warns once."""
    import subprocess
    import sys
    code = (
        "import sys, warnings\n"
        "sys.modules['ld3_ext._C'] = None  # makes `from . import _C` fail as a missing build would\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ld3_ext\n"
        "msgs = [str(x.message) for x in w if 'native extension' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not ld3_ext.native_available()\n"
        "import torch\n"
        "mix = ld3_ext.testbeds.ring2d(); s = ld3_ext.EDM()\n"
        "x = ld3_ext.DPMSolverPP(3).sample(mix.model(s), mix.prior_noise(s, 4), ld3_ext.discretizations.edm(s, 4))\n"
        "assert torch.isfinite(x).all()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_broken_extension_reports_the_real_load_error(tmp_path):
    """A _C that exists but cannot be loaded (a build against another torch, a truncated file) is
    reported with the loader's own message, not as a missing build."""
    import importlib.machinery
    pkg = tmp_path / "ld3_ext"
    shutil.copytree(os.path.join(ROOT, "ld3_ext"), pkg, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not an ELF file")
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from ld3_ext import _native\n"
            "print(repr(_native.load_error()))\n")
    # -S: no site hooks, so an editable install's import finder cannot divert ld3_ext to the checkout;
    # torch is found through its own folder on PYTHONPATH, after the copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(torch.__file__))])}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert "not built" not in out.stdout and "_C" in out.stdout, out.stdout
    # and a really missing build still says so
    (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).unlink()
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert out.returncode == 0 and "was not built or not installed" in out.stdout, (out.stdout, out.stderr)
