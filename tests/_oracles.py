"""Load third-party reference implementations used as oracles.

k-diffusion 0.1.1.post1 is installed with ``--no-deps``; its package ``__init__`` imports
torchvision/skimage, which are not importable here.  ``k_diffusion/sampling.py`` itself only needs
``k_diffusion.utils.append_dims`` (plus scipy/torchsde/tqdm), so we register a stub ``k_diffusion``
package whose ``utils`` submodule provides ``append_dims`` and load ``sampling.py`` by path.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

_KD_SAMPLING = None


def _append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def import_kdiffusion_sampling():
    """Return the module ``k_diffusion.sampling``; ImportError (saying what is missing) without k-diffusion.

    Also used by benchmarks/bench_vs_libraries.py, which turns the ImportError into its own message."""
    global _KD_SAMPLING
    if _KD_SAMPLING is not None:
        return _KD_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")  # does NOT execute the package __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    path = pkg_dir / "sampling.py"
    if not path.is_file():
        raise ImportError(f"k_diffusion/sampling.py not found under {pkg_dir}")
    real_pkg = sys.modules.get("k_diffusion")
    real_utils = sys.modules.get("k_diffusion.utils")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []  # a namespace-less stub: nothing else can be imported from it
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    try:
        mspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:
        # leave no stub behind for other tests
        for name, real in (("k_diffusion", real_pkg), ("k_diffusion.utils", real_utils)):
            if real is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = real
        sys.modules.pop("k_diffusion.sampling", None)
    _KD_SAMPLING = mod
    return mod


def load_kdiffusion_sampling():
    """Return the module ``k_diffusion.sampling`` (or skip the calling test if k-diffusion is absent)."""
    try:
        return import_kdiffusion_sampling()
    except ImportError as exc:
        pytest.skip(str(exc))
