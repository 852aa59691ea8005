"""Loading of the compiled extension ``ld3_ext._C`` (optional: the pure-PyTorch path always works)."""
from __future__ import annotations

import sys
import warnings
from typing import Dict

import torch  # noqa: F401  -- must be imported before _C: the extension links against libtorch

_C = None
_error = None
_warned = False

try:
    from . import _C as _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:
    _C = None
    # only a missing module means "not built"; any other ImportError (a mismatched torch's undefined
    # symbol, a truncated file) is kept, since it names the real cause
    missing = isinstance(exc, ModuleNotFoundError) or str(exc).startswith("cannot import name '_C'")
    _error = ImportError("ld3_ext._C was not built or not installed") if missing else exc
except Exception as exc:  # an OSError/undefined symbol from a broken or mismatched build
    _C = None
    _error = exc


def native_available() -> bool:
    """True when the compiled kernels could be loaded."""
    return _C is not None


def native_cuda_available() -> bool:
    """True when the extension was built with CUDA kernels."""
    return _C is not None and bool(getattr(_C, "has_cuda", lambda: False)())


_cuda_covered: Dict[int, bool] = {}  # device index -> can this build's kernels run there (asked once)


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result(fn) without importing Dynamo, which that call does: 1.7 s of every
    ``import ld3_ext`` and ``ld3`` command, most of which never compile.  The decorator only sets this attribute,
    which Dynamo reads when it meets fn (tests/test_import_time.py checks that both mark a function alike)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# constant for torch.compile: Dynamo runs it once while tracing (it cannot trace the pybind has_cuda(), nor the
# warning), and the compiled code keeps the answer; a traced tensor's device is guarded anyway
@_constant_under_compile
def native_runs_on(device: "torch.device | str | int") -> bool:
    """True when the compiled kernels can run on ``device``: the CPU whenever the extension loaded; a GPU when
    the extension has CUDA kernels compiled for its architecture.

    Why the per-GPU check: kernels built for other architectures fail at their first launch with CUDA's
    "no kernel image is available".  An uncovered GPU instead takes the reference path, with one warning
    that says how to rebuild (``ld3 info`` says the same)."""
    if not isinstance(device, torch.device):
        from ._checks import torch_device  # here: _checks imports the schedules, which load after this module
        device = torch_device("native_runs_on", device)
    if device.type == "cpu":
        return _C is not None
    if device.type != "cuda" or not native_cuda_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    covered = _cuda_covered.get(index)
    if covered is None:
        covered = _cuda_covered[index] = _check_cuda_device(index)
    return covered


def _check_cuda_device(index: int) -> bool:
    from .build_info import cuda_archs_cover, parse_cuda_archs, rebuild_command  # build_info imports this module
    archs = parse_cuda_archs(_C.cuda_archs()) if hasattr(_C, "cuda_archs") else []
    capability = tuple(torch.cuda.get_device_capability(index))
    if cuda_archs_cover(archs, capability) is not False:  # None: the list cannot tell ("native"): trust it
        return True
    cap = f"{capability[0]}.{capability[1]}"
    warnings.warn(
        f"ld3_ext: the CUDA kernels were built for {', '.join(archs)}, which do not cover GPU {index} "
        f"({torch.cuda.get_device_name(index)}, compute capability {cap}); its tensors take the pure-PyTorch "
        f"reference path. Rebuild for it with {rebuild_command(cap)}",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def load_error():
    return _error


def warn_missing_once() -> None:
    global _warned
    if _warned or _C is not None:
        return
    _warned = True
    warnings.warn(
        "ld3_ext: the native extension ld3_ext._C is not available "
        f"({type(_error).__name__}: {_error}); using the pure-PyTorch reference path. "
        "Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=3,
    )


def get():
    if _C is None:
        raise RuntimeError(f"ld3_ext._C is not available: {_error}")
    return _C
