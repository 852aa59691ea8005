"""Bridges to other libraries (optional dependencies are imported lazily by each submodule).

* ``ld3_ext.integrations.diffusers`` -- build ``(model, schedule)`` from a diffusers UNet and its
  scheduler config; ``load_diffusers_model(path)`` for a local diffusers folder.
* ``ld3_ext.integrations.diffusers_scheduler`` -- ``LD3Scheduler``, a diffusers scheduler that runs
  an ld3_ext time grid and solver inside an unmodified diffusers pipeline.
"""

import importlib

__all__ = ["diffusers", "diffusers_scheduler"]


def __getattr__(name):
    """``ld3_ext.integrations.diffusers`` works after a plain ``import ld3_ext`` (the submodule, and the optional
    library it needs, are imported on first use)."""
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
