"""ld3_ext: learned time discretizations (LD3) and fast multistep ODE solvers for diffusion models."""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _started_as_ld3_script() -> bool:
    """This import was made by the ``ld3`` console script (its argv[0]), not by a user's program."""
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("ld3", "ld3.exe")


try:  # `import torch` takes seconds: a Ctrl-C there ends the ld3 script as one line and status 130
    from ._native import native_available, native_cuda_available
    from . import _native as _native_mod

    if not native_available():
        _native_mod.warn_missing_once()

    from .schedules import EDM, VPLinear, VPCosine, VPDiscrete, FlowMatching, NoiseSchedule, schedule_from_config
    from .wrappers import DiffusionModel, wrap_model, ModelOutputError
    from .solvers import DPMSolverPP, UniPC, IPNDM, Euler, Heun, Solver, make_solver, solver_from_config
    from . import discretizations, testbeds, schedules, coefficients, ops, functional, distributed, integrations
    from .functional import sample, to_denoiser
    from .schedule_file import LearnedSchedule, load_schedule
    from .training import LD3Trainer
except KeyboardInterrupt:  # the script's own entry (_cli_entry) is imported only after this package
    if not _started_as_ld3_script() or \
            _os.environ.get("LD3_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise
    print("ld3: interrupted", file=_sys.stderr)
    raise SystemExit(130) from None

__all__ = [
    "native_available", "native_cuda_available", "__version__",
    "EDM", "VPLinear", "VPCosine", "VPDiscrete", "FlowMatching", "NoiseSchedule", "schedule_from_config",
    "DiffusionModel", "wrap_model", "ModelOutputError",
    "DPMSolverPP", "UniPC", "IPNDM", "Euler", "Heun", "Solver", "make_solver", "solver_from_config",
    "discretizations", "testbeds", "schedules", "coefficients", "ops", "functional", "distributed",
    "integrations", "sample", "to_denoiser", "LearnedSchedule", "load_schedule", "LD3Trainer",
]
