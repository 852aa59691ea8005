"""``import ld3_ext`` (and so every ``ld3`` command) does not import Dynamo: that took 1.7 s of a 4 s start.

The one place that asked for it, ``_native.native_runs_on``'s assume_constant_result, marks the function the way
the decorator does; these tests check the mark is torch's own and that torch.compile still folds the call.
Each runs in a fresh interpreter: in this one Dynamo is imported already."""
import os
import subprocess
import sys
import textwrap

import pytest

from ld3_ext import _native


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))  # not a source checkout
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_and_cli_modules_do_not_import_dynamo():
    out = _run("""
        import sys
        import ld3_ext, ld3_ext.cli
        print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
    """)
    assert out.strip() == "[]"


def test_native_runs_on_carries_the_mark_assume_constant_result_sets():
    out = _run("""
        import ld3_ext
        from ld3_ext import _native
        ours = {k: v for k, v in vars(_native.native_runs_on).items() if k != "__wrapped__"}
        import torch, torch._dynamo
        def f():
            return True
        before = set(vars(f))
        marked = torch.compiler.assume_constant_result(f)
        assert marked is f, "the decorator now wraps: mark with it instead of setting the attribute"
        theirs = {k: v for k, v in vars(f).items() if k not in before}
        print(ours == theirs, theirs)
    """)
    assert out.startswith("True {'_dynamo_marked_constant': True}"), out


@pytest.mark.skipif(not _native.native_available(), reason="needs the native extension (CI requires it)")
def test_compile_folds_native_runs_on_when_ld3_ext_came_first(tmp_path):
    """Dynamo cannot trace the pybind has_cuda() inside native_runs_on: fullgraph=True fails unless the mark holds
    (the second run takes the mark off, to show the check can fail)."""
    code = """
        import sys
        import ld3_ext
        from ld3_ext import _native
        import torch
        if sys.argv[1] == "unmarked":
            del _native.native_runs_on._dynamo_marked_constant
        dev = torch.device("cuda")
        want = _native.native_runs_on(dev)
        def f(x):
            return x * 2 if _native.native_runs_on(dev) else x * 3
        try:
            got = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(3))
        except Exception as exc:
            print("fails", type(exc).__name__)
        else:
            print(got.tolist() == ([2.0] * 3 if want else [3.0] * 3))
    """
    # from another folder: `python -c` puts the working directory first on sys.path, and in a source checkout
    # (CI's) that is the package without its compiled extension
    run = lambda mode: subprocess.run([sys.executable, "-c", textwrap.dedent(code), mode], capture_output=True,
                                      text=True, timeout=600, cwd=tmp_path)
    marked, unmarked = run("marked"), run("unmarked")
    assert marked.returncode == 0, marked.stderr[-3000:]
    assert marked.stdout.strip() == "True", marked.stdout + marked.stderr[-2000:]
    assert unmarked.stdout.strip().startswith("fails"), unmarked.stdout + unmarked.stderr[-2000:]
