"""The CUDA test module's code, run on the CPU (LD3_CUDA_TESTS_ON_CPU=1) in a child pytest.

Without a GPU tests/test_cuda_ops.py skips as a whole, so nothing in it runs on the machines the
suite usually runs on: a renamed function, a changed signature or a typo there would only show up
on a GPU session, which is scarce and short.  This dry run executes every test of that module that
does not need CUDA itself, with the CPU as the device.  It checks the test code, not the CUDA
kernels: their parity tests compare the CPU with itself here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ld3_ext import _native

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cuda_test_module_runs_on_the_cpu(tmp_path):
    if not _native.native_available():
        pytest.fail(f"ld3_ext._C is not built ({_native.load_error()}): the CUDA tests' dry run needs the extension")
    env = dict(os.environ, LD3_CUDA_TESTS_ON_CPU="1")
    # cwd outside the source tree: the child imports the installed package (with its _C)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           os.path.join(HERE, "test_cuda_ops.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    skipped = re.search(r"(\d+) skipped", out)
    assert passed and int(passed.group(1)) >= 100, out[-4000:]
    # only the tests marked as needing CUDA itself may skip (graphs, streams, device-only behaviour): -rs lists
    # every skip with its reason
    reasons = re.findall(r"^SKIPPED \[(\d+)\] .*?: (.*)$", out, flags=re.M)
    assert skipped is None or sum(int(n) for n, _ in reasons) == int(skipped.group(1)), out[-4000:]
    assert all("needs CUDA itself" in why for _, why in reasons), reasons
    assert "failed" not in out.splitlines()[-1], out[-4000:]
