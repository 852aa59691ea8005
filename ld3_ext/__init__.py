"""ld3_ext: learned time discretizations (LD3) and fast multistep ODE solvers for diffusion models."""
from ._native import native_available, native_cuda_available
from . import _native as _native_mod

__version__ = "0.1.0"

if not native_available():
    _native_mod.warn_missing_once()

from .schedules import EDM, VPLinear, VPCosine, VPDiscrete, FlowMatching, NoiseSchedule, schedule_from_config
from .wrappers import DiffusionModel, wrap_model, ModelOutputError
from .solvers import DPMSolverPP, UniPC, IPNDM, Euler, Heun, Solver, make_solver, solver_from_config
from . import discretizations, testbeds, schedules, coefficients, ops, functional, distributed, integrations
from .functional import sample, to_denoiser
from .schedule_file import LearnedSchedule, load_schedule
from .training import LD3Trainer

__all__ = [
    "native_available", "native_cuda_available", "__version__",
    "EDM", "VPLinear", "VPCosine", "VPDiscrete", "FlowMatching", "NoiseSchedule", "schedule_from_config",
    "DiffusionModel", "wrap_model", "ModelOutputError",
    "DPMSolverPP", "UniPC", "IPNDM", "Euler", "Heun", "Solver", "make_solver", "solver_from_config",
    "discretizations", "testbeds", "schedules", "coefficients", "ops", "functional", "distributed",
    "integrations", "sample", "to_denoiser", "LearnedSchedule", "load_schedule", "LD3Trainer",
]
