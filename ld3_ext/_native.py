"""Loading of the compiled extension ``ld3_ext._C`` (optional: the pure-PyTorch path always works)."""
from __future__ import annotations

import warnings

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
