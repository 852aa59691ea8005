"""Drop-in ODE solvers that run on any float time grid (see ``base.Solver.sample``)."""
from typing import Optional, Union

from .base import Solver, MultistepSolver, validate_timesteps
from .dpm_solver_pp import DPMSolverPP
from .euler import Euler
from .heun import Heun
from .ipndm import IPNDM
from .unipc import UniPC

SOLVERS = {"dpmpp": DPMSolverPP, "unipc": UniPC, "ipndm": IPNDM, "euler": Euler, "heun": Heun}
#: the solvers without an order setting (each has its own order)
ORDERLESS = ("euler", "heun")
# options (besides the order, see make_solver) only some named solvers take: as_solver leaves them out for the others
_OWN_OPTIONS = {"variant": ("unipc",)}


def solver_from_config(cfg: dict, **overrides) -> Solver:
    """Rebuild a solver from ``Solver.config()`` (as stored in schedule files)."""
    # a non-string name (e.g. a list from a damaged file) would fail the lookup as "unhashable type"
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str) or cfg["name"] not in SOLVERS:
        raise ValueError(f"solver config must name one of {sorted(SOLVERS)}, got {cfg!r}")
    kw = {k: v for k, v in cfg.items() if k != "name"}
    kw.update(overrides)
    return SOLVERS[cfg["name"]](**kw)


def make_solver(name: str, order: int = 3, **kw) -> Solver:
    """Solver by short name: "dpmpp", "unipc", "ipndm", "euler", "heun" (``order`` is not passed to the
    :data:`ORDERLESS` ones)."""
    if not isinstance(name, str) or name not in SOLVERS:  # a list/dict would fail as "unhashable type"
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if name in ORDERLESS:
        return SOLVERS[name](**kw)
    return SOLVERS[name](order=order, **kw)


def as_solver(solver: Union[Solver, str, None], *, name: str = "solver", default: Union[Solver, str, None] = None,
              **defaults) -> Optional[Solver]:
    """A Solver argument that may also be given by name: a Solver is returned as it is, a name is built with
    :func:`make_solver` and ``defaults`` (e.g. ``order=3, variant="bh1"``; an option the named solver does not
    have -- the order of the :data:`ORDERLESS` solvers, the variant of all but UniPC -- is left out), None gives
    ``default`` (itself a Solver, a name or None).  TypeError / ValueError name the argument ``name``."""
    if solver is None:
        solver = default
    if solver is None or isinstance(solver, Solver):
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"{name} must be an ld3_ext Solver or a solver name, got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"{name} must be an ld3_ext Solver or one of {sorted(SOLVERS)}, got {solver!r}")
    kw = {k: v for k, v in defaults.items() if k not in _OWN_OPTIONS or solver in _OWN_OPTIONS[k]}
    return make_solver(solver, **kw)


__all__ = ["Solver", "MultistepSolver", "DPMSolverPP", "UniPC", "IPNDM", "Euler", "Heun", "SOLVERS", "ORDERLESS",
           "solver_from_config", "make_solver", "as_solver", "validate_timesteps"]
