"""Drop-in ODE solvers that run on any float time grid (see ``base.Solver.sample``)."""
from .base import Solver, MultistepSolver, validate_timesteps
from .dpm_solver_pp import DPMSolverPP
from .euler import Euler
from .heun import Heun
from .ipndm import IPNDM
from .unipc import UniPC

SOLVERS = {"dpmpp": DPMSolverPP, "unipc": UniPC, "ipndm": IPNDM, "euler": Euler, "heun": Heun}


def solver_from_config(cfg: dict, **overrides) -> Solver:
    """Rebuild a solver from ``Solver.config()`` (as stored in schedule files)."""
    if not isinstance(cfg, dict) or cfg.get("name") not in SOLVERS:
        raise ValueError(f"solver config must name one of {sorted(SOLVERS)}, got {cfg!r}")
    kw = {k: v for k, v in cfg.items() if k != "name"}
    kw.update(overrides)
    return SOLVERS[cfg["name"]](**kw)


def make_solver(name: str, order: int = 3, **kw) -> Solver:
    """Solver by short name: "dpmpp", "unipc", "ipndm", "euler", "heun"."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if name in ("euler", "heun"):
        return SOLVERS[name](**kw)
    return SOLVERS[name](order=order, **kw)


__all__ = ["Solver", "MultistepSolver", "DPMSolverPP", "UniPC", "IPNDM", "Euler", "Heun", "SOLVERS",
           "solver_from_config", "make_solver", "validate_timesteps"]
