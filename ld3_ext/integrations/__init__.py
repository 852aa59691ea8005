"""Bridges to other libraries (optional dependencies are imported lazily by each submodule).

* ``ld3_ext.integrations.diffusers`` -- build ``(model, schedule)`` from a diffusers UNet and its
  scheduler config; ``load_diffusers_model(path)`` for a local diffusers folder.
* ``ld3_ext.integrations.diffusers_scheduler`` -- ``LD3Scheduler``, a diffusers scheduler that runs
  an ld3_ext time grid and solver inside an unmodified diffusers pipeline.
"""

__all__ = ["diffusers", "diffusers_scheduler"]
