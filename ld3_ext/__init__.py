"""ld3_ext: learned time discretizations (LD3) and fast multistep ODE solvers for diffusion models."""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _started_as_ld3_script() -> bool:
    """This import was made by the ``ld3`` console script (its argv[0]), not by a user's program."""
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("ld3", "ld3.exe")


def _defer_signals():
    """For the ld3 script: while the imports run, Ctrl-C and SIGTERM only note themselves.  A KeyboardInterrupt
    raised inside torch's C-level numpy set-up is swallowed there (numpy is left half-imported and the command
    ran on, or crashed later); the noted signal is acted on once the imports are done.  Returns the old handlers."""
    import signal
    pending = []
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by the parent (a background job of a script: POSIX ignores SIGINT there)
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread: nothing to defer
        pass
    return old, pending


def _act_on_deferred(old, pending) -> None:
    import signal
    for sig, handler in old.items():
        signal.signal(sig, handler)
    if not pending:
        return
    if _os.environ.get("LD3_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise KeyboardInterrupt
    if pending[0] == signal.SIGTERM:
        print("ld3: terminated (SIGTERM)", file=_sys.stderr)
        raise SystemExit(128 + 15)
    print("ld3: interrupted", file=_sys.stderr)
    raise SystemExit(130)


_deferred = _defer_signals() if _started_as_ld3_script() else None
try:  # `import torch` takes seconds: a Ctrl-C there ends the ld3 script as one line and status 130
    from ._native import native_available, native_cuda_available
    from . import _native as _native_mod

    if not native_available():
        _native_mod.warn_missing_once()

    from .schedules import EDM, VPLinear, VPCosine, VPDiscrete, FlowMatching, NoiseSchedule, schedule_from_config
    from .wrappers import DiffusionModel, wrap_model, ModelOutputError
    from .solvers import DPMSolverPP, UniPC, IPNDM, Euler, Heun, Solver, make_solver, solver_from_config
    from .solvers.base import DegenerateGridError
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
finally:
    if _deferred is not None:
        _deferred, _pending_signals = None, _deferred
        _act_on_deferred(*_pending_signals)

__all__ = [
    "native_available", "native_cuda_available", "__version__",
    "EDM", "VPLinear", "VPCosine", "VPDiscrete", "FlowMatching", "NoiseSchedule", "schedule_from_config",
    "DiffusionModel", "wrap_model", "ModelOutputError",
    "DPMSolverPP", "UniPC", "IPNDM", "Euler", "Heun", "Solver", "make_solver", "solver_from_config",
    "DegenerateGridError", "discretizations", "testbeds", "schedules", "coefficients", "ops", "functional", "distributed",
    "integrations", "sample", "to_denoiser", "LearnedSchedule", "load_schedule", "LD3Trainer",
]
