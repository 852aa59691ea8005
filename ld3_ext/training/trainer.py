"""LD3Trainer: learn a sampling schedule by soft teacher matching (LD3, ICLR 2025; LD3.md section 1).

One round (LD3.md 1.4):

1. (round > 0) reload the best xi, xi^c;
2. training pass over shuffled batches: student solve from the relaxed noise z' with autograd, per-sample
   loss vs. the teacher, backward; one SGD step on z' (lr ``shift_lr``); clipped RMSprop step on xi and
   (phase 2) clipped SGD step on xi^c; validation; then z' is projected onto the ball ||z' - z|| <= r
   (r = gamma d / NFE^2, on unit-variance noise) and kept per sample only if that sample's loss fell;
3. validation-latent pass: the same relaxation of the validation noises with xi, xi^c frozen (as the
   paper does -- this is the *soft* validation loss).

Our fix of the original's bug 6.5.4: we also compute a **hard** validation loss on the original,
un-relaxed validation noises, and it is the hard loss that drives best-schedule selection, the
plateau LR decay and early stopping (``select_on="hard"``, the default).  The soft one is reported.

Phase 1 trains xi only for ``rounds_v1`` rounds, phase 2 trains xi and xi^c for ``rounds_v2`` rounds.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import math
import numbers
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import distributed as D
from ..atomic_io import CorruptFileError, atomic_save_safetensors, canonical_json, json_safe, tensors_sha256, \
    load_safetensors_checked, tensor_bytes
from ..coefficients import step_orders
from .._finite import all_finite
from ..ops import _opmath
from ..schedule_file import LearnedSchedule
from .._checks import count, data_device, flag, holds_values, real, seed as check_seed
from ..schedules import NoiseSchedule
from ..solvers import MultistepSolver, Solver, as_solver
from ..wrappers import DiffusionModel, ModelOutputError, default_state_dtype, require_diffusion_model
from ..solvers.base import DegenerateGridError
from .losses import get_loss, loss_name, per_sample
from .parameterization import TIME_MODES, NonFiniteParameterError, TimeParameterization, init_timesteps
from .teacher import generate_teacher_data, make_teacher, model_call_settings, model_identity, rank_comparable

CHECKPOINT_FILE = "ld3_trainer_state.safetensors"
SCHEDULE_FILE = "schedule.json"
LAST_GOOD_FILE = "last_good_schedule.json"
# a time_mode="auto" trial's last good schedule: kept apart from LAST_GOOD_FILE (the run's own, possibly left by an
# earlier run) and removed once a mode is chosen, so a dropped trial's schedule is never taken for the run's output
TRIAL_LAST_GOOD_FILE = "last_good_schedule.{mode}-trial.json"


class NonFiniteLossError(FloatingPointError):
    """The loss (or a gradient) became NaN/Inf.  ``.iteration`` names the iteration, ``.schedule`` is the
    last good (best validated) schedule, also saved to ``.saved_to`` when a checkpoint_dir is set."""

    def __init__(self, msg: str, iteration: int, schedule: Optional[LearnedSchedule], saved_to: Optional[str]):
        super().__init__(msg)
        self.iteration = iteration
        self.schedule = schedule
        self.saved_to = saved_to


class CheckpointMismatchError(RuntimeError):
    """checkpoint_dir holds a training state made with other settings."""


# LD3 learns schedules for few-step sampling; far above this its initialisations (DMN's dense grid search) and a
# training round take hours or fail on memory, naming their own parameters rather than nfe
MAX_NFE = 1000


def check_nfe(solver: Solver, nfe: int) -> int:
    """Validate the NFE for ``solver`` and return the number of grid intervals N.

    Rules: NFE must be an int >= 2 and <= MAX_NFE (with one interval the grid is just [t_max, t_min]: nothing to
    learn); it must be reachable by the solver (Heun: an even number); and a multistep solver of
    order K needs N >= K steps (its first K-1 steps are the lower-order warm-up).  Short grids where the
    warm-up plus ``lower_order_final`` never reach order K (e.g. order 3 at NFE 4: orders 1,2,2,1) are
    allowed -- the paper trains such configurations -- and the orders used are recorded in the
    schedule's training settings (``step_orders``).
    """
    try:
        count("nfe", nfe, 2)  # a TypeError for what is not an int
    except ValueError:
        raise ValueError(f"nfe={nfe} is too small: LD3 needs two steps, nfe >= {max(solver.nfe(2), 2)} for "
                         f"{type(solver).__name__} (with one step the grid is fixed to [t_max, t_min] and there is "
                         "nothing to learn)") from None
    if nfe > MAX_NFE:
        raise ValueError(f"nfe={nfe} is beyond what LD3 is for: at most {MAX_NFE} network evaluations (it learns "
                         f"schedules for few-step sampling; the teacher is the many-step solve)")
    steps = solver.exact_steps(nfe, "nfe", min_steps=2)
    if steps < 2:
        raise ValueError(f"nfe={nfe} gives {type(solver).__name__} a single step: nothing to learn; use "
                         f"nfe >= {solver.nfe(2)}")
    if isinstance(solver, MultistepSolver) and steps < solver.order:
        raise ValueError(f"nfe={nfe} is below the warm-up of order-{solver.order} {type(solver).__name__}: "
                         f"its first {solver.order - 1} steps use lower orders, so {steps} steps never reach "
                         f"order {solver.order}. Use nfe >= {solver.order} or order <= {steps}")
    return steps


def _default_device(model):
    if isinstance(model, torch.nn.Module):
        for p in list(model.parameters()) + list(model.buffers()):
            return p.device
    return torch.device("cpu")


def _sha(t: Optional[torch.Tensor]) -> Optional[str]:
    return None if t is None else hashlib.sha256(bytes(tensor_bytes(t))).hexdigest()


def _data_sha256(data: Dict[str, Optional[torch.Tensor]]) -> str:
    """One hash of the training data (pairs and conditions), recorded in settings() and compared across ranks."""
    return hashlib.sha256("|".join(str(_sha(data[k])) for k in sorted(data)).encode()).hexdigest()


def _warn_noise_scale(z: torch.Tensor, prior: float) -> None:
    """fit(noise, target) takes noise in model space, prior_std * N(0, I): unit noise on EDM (prior 80) trained on a
    start 80x too close to the data without a word (API audit).  Said when the RMS is off by 2x or more and there are
    enough values (256: the RMS of N(0, 1) samples is then within ~4 % of 1)."""
    if z.numel() < 256 or not z.is_floating_point():
        return
    rms = float(z.detach().double().square().mean().sqrt())
    if not 0.5 <= rms <= 2.0:
        warnings.warn(f"noise has RMS {rms * prior:.4g}, but the schedule's prior std is {prior:.4g}: fit(noise, "
                      f"target) takes the noise in model space, i.e. schedule.prior_std() * torch.randn(...)",
                      stacklevel=4)


class LD3Trainer:
    """Learn a solver-specific time grid (and decoupled network times) for one NFE.

    Parameters (defaults: the paper's pixel configs, LD3.md 1.3, sized for CPU speed, except where measured
    better: ``loss="pseudo_huber"`` (paper: LPIPS), ``init="auto"`` and ``time_mode="auto"`` (paper: fixed),
    selection on the hard validation loss (original: relaxed) and the lambda-mode window on lambda gaps
    (original: on logit differences); the README's "Conventions and deliberate differences from the original
    LD3 code" lists each)
    ----------
    model : DiffusionModel (``ld3_ext.wrap_model``); its weights are never updated.
    schedule : its NoiseSchedule (default: ``model.schedule``; must agree with it).
    solver : an ld3_ext Solver or a name ("unipc", "dpmpp", "ipndm", "euler", "heun"; default UniPC(3, bh1)).
    nfe : network evaluations of the student (see :func:`check_nfe` for the rules).
    loss : "pseudo_huber" (default), "l2", "l1", "lpips" (the paper's) or a callable ``(pred, target) -> [B]``.
        Pseudo-Huber grows like the per-sample norm away from the target, so a few outlier samples do not
        dominate the batch as they do with the squared "l2" (measured: benchmarks/bench_ld3.py).
    time_mode : "auto" (default), "lambda" (the paper's pixel configs: the gaps, and the decoupling window, are in
        half log-SNR) or "time" (latent configs: in t).  "auto" selects the mode on the trainer's own validation set:
        each mode trains for ``time_mode_trial_rounds`` rounds from the same start (same init grid, data and seed),
        the one with the lower validation loss (the one ``select_on`` names, hard by default) is kept and continues
        to the end; the other is dropped.  The result is therefore bitwise the schedule of the explicit run of the
        chosen mode, and never worse on validation than the best trial.  The choice and both trial losses are recorded in the schedule
        (``metrics["time_mode_choice"]``, ``metrics["time_mode_candidates_valid_loss"]``,
        ``training["time_mode_chosen"]``) and in the training checkpoint.  "auto" meeting the checkpoint of an
        explicit-mode run with otherwise equal settings resumes it in that mode (with a warning; recorded as
        ``metrics["time_mode_source"] == "checkpoint"``).  A failed trial's last good schedule is kept in
        ``last_good_schedule.<mode>-trial.json`` until a mode is chosen, then removed.
    time_mode_trial_rounds : rounds of each "auto" trial (default ``rounds_v1 + 1``: phase 1 and the first round of
        phase 2, where the mode-dependent network-time shifts xi^c first train; measured in
        benchmarks/bench_ld3.py).  ``rounds_v1 + rounds_v2`` trains both modes fully.
    init : "auto" (default: the candidate among logSNR, EDM, time-quadratic, time-uniform and DMN with the
        lowest validation loss; the paper used logSNR-uniform in lambda mode, time-uniform in time mode), one of
        those names ("logsnr", "edm", "time_quadratic",
        "time_uniform", "dmn"; DMN uses the original's latent weighting when a decoder is set), or an explicit grid
        of N+1 timesteps.
    decoupled : learn the network-time shifts xi^c in phase 2.
    win_rate : window of the shifts as a fraction of the smallest gap (<= 0.5).
    gamma, radius : ball radius r = gamma * d / NFE^2 on the unit-variance noise (``radius`` overrides; 0 = hard loss).
    shift_lr : SGD step on the relaxed noise (default 12 / N); halved after a round where no validation noise moved.
    lr_xi, momentum, lr_xi_min : RMSprop on xi (0.005, 0.9, floor 5e-5).
    lr_xi_c, lr_xi_c_min : SGD on xi^c (default 0.1 / N, pixel configs; floor 1e-6).
    clip_norm : gradient-norm clip for xi and for xi^c, separately (1.0).
    lr_decay, patience : plateau decay: after ``patience`` validations without a new best, reload the best state
        (xi, xi^c and the relaxed noises) and multiply the LRs by ``lr_decay`` (xi^c only in phase 2).
    lr2_patience : stop after the xi^c LR has been decayed at its floor this many times (the original's rule).
    early_stop_patience : also stop after this many validations without improvement (None: off).
    rounds_v1, rounds_v2 : rounds of phase 1 (xi only) and phase 2 (xi and xi^c).
    batch_size, valid_batch_size : training batch (2) and validation batch (default 50).
    valid_every : validate every k training iterations; None = every iteration when n_valid <= 200 (the paper's
        choice, cheap for small validation sets), else about 10 times per round.  A validation always closes
        each round's training pass.
    select_on : "hard" (default: validation loss on un-relaxed noises, our fix) or "soft" (the original's).
    n_train, n_valid : teacher pairs generated by ``fit()`` without data (50 + 50, as the paper).
    teacher : "solver" (default: ``teacher_solver`` UniPC(``teacher_order`` 3, bh1) -- a Solver or a name --,
        ``teacher_nfe`` 20, ``teacher_discretization`` "logsnr"), "exact" (``reference`` = object with
        ``reference_solution(schedule, x_T)`` or callable; default ``model.testbed``), or a callable ``x_T -> target``.
    teacher_cache (alias teacher_dir) : directory for the on-disk teacher cache (default: ``<checkpoint_dir>/teacher`` when a
        checkpoint_dir is set, else in memory only).  ``regenerate_teacher`` replaces a mismatching cache;
        ``cache_max_bytes`` limits its size.
    sample_shape : shape of one sample (needed by ``fit()`` without data; default ``model.sample_shape`` or
        ``model.testbed.event_shape``).
    model_name : identity of models without weights (hashed into caches and schedule files).
    conditions, uncond : per-sample conditioning (n_train + n_valid entries) passed as ``model.cond_key``, and
        the unconditional input (one entry, broadcast) for classifier-free guidance.
    decoder : differentiable map applied to the solver output before the loss (latent models; checkpointed when
        ``checkpoint_decoder``).
    checkpoint_model : rematerialise each network evaluation in backward (memory flat in NFE, LD3 App. D.3).
    seed, device, dtype : determinism (shuffling and teacher noise), placement, solve precision (default the weights'
        dtype; float64 for the analytic test beds, float32 for other weight-less models).
    checkpoint_dir, checkpoint_every : atomic training checkpoints after every round (and every k iterations);
        ``fit()`` resumes from a matching one (``resume="auto"``), refuses a mismatching one unless
        ``resume="never"`` (start over, overwriting it).  Under torch.distributed give both to every rank (rank 0
        alone writes; the others wait for it).
    callback : ``callback(trainer, info: dict)`` after every training iteration.
    progress : tqdm progress bars.
    model_spec : how to rebuild the model (the CLI's ``--model`` value), recorded in the schedule files this trainer
        writes (``model["spec"]``) so that ``ld3 eval`` can reload the model from any of them; not a setting.
    """

    def __init__(self, model: DiffusionModel, schedule: Optional[NoiseSchedule] = None, solver: Any = None,
                 nfe: Optional[int] = None, loss: Any = "pseudo_huber", time_mode: str = "auto", init: Any = "auto",
                 decoupled: bool = True, *, win_rate: float = 0.5, gamma: float = 0.001,
                 radius: Optional[float] = None, shift_lr: Optional[float] = None, lr_xi: float = 0.005,
                 momentum: float = 0.9, lr_xi_min: float = 5e-5, lr_xi_c: Optional[float] = None,
                 lr_xi_c_min: float = 1e-6, clip_norm: float = 1.0, lr_decay: float = 0.8, patience: int = 5,
                 lr2_patience: int = 5, early_stop_patience: Optional[int] = None, rounds_v1: int = 2,
                 rounds_v2: int = 5, batch_size: int = 2, valid_batch_size: int = 50,
                 valid_every: Optional[int] = None, select_on: str = "hard", n_train: int = 50, n_valid: int = 50,
                 teacher: Any = "solver", teacher_solver: Any = None, teacher_order: int = 3, teacher_nfe: int = 20,
                 teacher_discretization: str = "logsnr", reference: Any = None, teacher_cache: Optional[str] = None,
                 teacher_dir: Optional[str] = None, regenerate_teacher: bool = False,
                 cache_max_bytes: Optional[int] = None,
                 sample_shape: Optional[Sequence[int]] = None, model_name: Optional[str] = None,
                 conditions: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
                 decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, checkpoint_decoder: bool = True,
                 checkpoint_model: bool = False, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None,
                 checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 resume: str = "auto", callback: Optional[Callable] = None, progress: bool = True,
                 time_mode_trial_rounds: Optional[int] = None, model_spec: Optional[str] = None):
        require_diffusion_model(model)
        if schedule is not None:
            if not isinstance(schedule, NoiseSchedule):
                raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
            if not schedule.same_as(model.schedule):
                raise ValueError(f"schedule {schedule!r} differs from the model's schedule {model.schedule!r}")
        solver = as_solver(solver, default="unipc", order=3, variant="bh1")
        if nfe is None:
            raise TypeError("nfe is required (the student's number of network evaluations)")
        self.model = model
        self.schedule = model.schedule
        # a private copy so that rematerialisation does not change the caller's solver
        self.solver = copy.copy(solver)
        self.solver.checkpoint_model = flag("checkpoint_model", checkpoint_model)
        self.nfe = nfe
        self.num_steps = check_nfe(self.solver, nfe)
        self.loss_spec = loss
        self.loss_fn = get_loss(loss)
        if time_mode not in TIME_MODES + ("auto",):
            raise ValueError(f"time_mode must be 'auto', 'lambda' or 'time', got {time_mode!r}")
        if select_on not in ("hard", "soft"):
            raise ValueError(f"select_on must be 'hard' or 'soft', got {select_on!r}")
        if resume not in ("auto", "never"):
            raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}")
        for name, v in (("batch_size", batch_size), ("valid_batch_size", valid_batch_size),
                        ("n_train", n_train), ("n_valid", n_valid), ("patience", patience)):
            count(name, v, 1, type_error=False)
        # the optimiser and stopping settings: checked here, not when (or after) training uses them
        real("momentum", momentum, at_least=0, below=1)
        real("lr_decay", lr_decay, above=0, at_most=1)
        real("clip_norm", clip_norm, above=0)
        for name, v in (("lr_xi_min", lr_xi_min), ("lr_xi_c_min", lr_xi_c_min)):
            real(name, v, at_least=0)
        # a floor above the starting rate made the plateau "decay" raise the rate (to the floor)
        if real("lr_xi", lr_xi, above=0) < float(lr_xi_min):  # no None: lr_xi has no derived default
            raise ValueError(f"lr_xi_min ({lr_xi_min}) must not exceed lr_xi ({lr_xi}): it is the floor the rate "
                             "decays to")
        if lr_xi_c is not None and real("lr_xi_c", lr_xi_c, above=0) < float(lr_xi_c_min):
            raise ValueError(f"lr_xi_c_min ({lr_xi_c_min}) must not exceed lr_xi_c ({lr_xi_c}): it is the floor "
                             "the rate decays to")
        for name, v in (("checkpoint_dir", checkpoint_dir), ("teacher_cache", teacher_cache),
                        ("teacher_dir", teacher_dir)):
            if v is not None and (not isinstance(v, (str, os.PathLike)) or isinstance(v, bytes) or not str(v)):
                # a number failed inside os.path.join; "" wrote into the working folder
                raise TypeError(f"{name} must be None or a non-empty path (str or os.PathLike), got {v!r}")
        if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
            raise TypeError(f"model_name must be None or a non-empty str, got {model_name!r}")
        # the counters are compared with ">=": 0 would act as 1, so at least one (as patience)
        count("lr2_patience", lr2_patience, 1)
        count("early_stop_patience", early_stop_patience, 1, none_ok=True)
        count("rounds_v1", rounds_v1, 0)
        count("rounds_v2", rounds_v2, 0)
        for name, v in (("callback", callback), ("decoder", decoder)):
            if v is not None and not callable(v):
                raise TypeError(f"{name} must be None or a callable, got {type(v).__name__}")
        for name, v in (("conditions", conditions), ("uncond", uncond)):
            # indexed and expanded per sample: a tensor with a batch dimension
            if v is not None and not isinstance(v, torch.Tensor):
                raise TypeError(f"{name} must be None or a tensor [N, ...], got {type(v).__name__}")
            if v is not None and v.dim() < 1:
                raise ValueError(f"{name} needs a batch dimension [N, ...], got a 0-d tensor")
        if uncond is not None and getattr(model, "guidance_scale", None) is None:
            raise ValueError("uncond is the unconditional input of classifier-free guidance, and the model has no "
                             "guidance_scale: wrap it with wrap_model(..., guidance_scale=...) to guide, or drop uncond")
        if uncond is not None and uncond.shape[0] != 1:
            # broadcast to every batch: more entries failed in the first teacher chunk (a bare expand error), or with
            # batches of exactly that size were taken per sample
            raise ValueError(f"uncond must hold one entry [1, ...] (broadcast to every batch), got shape "
                             f"{tuple(uncond.shape)}")
        if rounds_v1 < 0 or rounds_v2 < 0 or rounds_v1 + rounds_v2 < 1:
            raise ValueError(f"need rounds_v1, rounds_v2 >= 0 with at least one round, got {rounds_v1}, {rounds_v2}")
        for name, v in (("time_mode_trial_rounds", time_mode_trial_rounds), ("valid_every", valid_every),
                        ("checkpoint_every", checkpoint_every), ("cache_max_bytes", cache_max_bytes)):
            count(name, v, 1, none_ok=True, type_error=False)  # True is not 1
        for name, v in (("lr_xi", lr_xi), ("lr_xi_c", lr_xi_c), ("shift_lr", shift_lr)):  # issue 6 audit
            if v is not None:
                real(name, v, above=0)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        # named now: torch.device(3) raised a RuntimeError naming nothing, a CPU-only torch failed in the teacher
        device = data_device("LD3Trainer", device)
        for name, v in (("gamma", gamma), ("radius", radius)):
            if v is not None:
                real(name, v, at_least=0)
        decoupled = flag("decoupled", decoupled)
        self._check_init(init, decoupled, win_rate, time_mode)  # now, not after the teacher set has been generated
        # time_mode_request is what was asked for ("auto" included); time_mode is the mode of the active candidate
        self.time_mode_request = time_mode
        self.time_mode = TIME_MODES[0] if time_mode == "auto" else time_mode
        self.time_mode_trial_rounds = time_mode_trial_rounds
        self.init, self.decoupled, self.win_rate = init, decoupled, float(win_rate)
        self.gamma = float(gamma)
        self.radius_override = radius
        self.shift_lr0 = shift_lr
        self.lr_xi, self.momentum, self.lr_xi_min = float(lr_xi), float(momentum), float(lr_xi_min)
        self.lr_xi_c = float(lr_xi_c) if lr_xi_c is not None else 0.1 / self.num_steps
        if lr_xi_c is None and float(lr_xi_c_min) > self.lr_xi_c:
            raise ValueError(f"lr_xi_c_min ({lr_xi_c_min}) must not exceed lr_xi_c (default 0.1/N = {self.lr_xi_c:g}): "
                             "it is the floor the rate decays to")
        self.lr_xi_c_min, self.clip_norm = float(lr_xi_c_min), float(clip_norm)
        self.lr_decay, self.patience, self.lr2_patience = float(lr_decay), patience, lr2_patience
        self.early_stop_patience = early_stop_patience
        self.rounds_v1, self.rounds_v2 = int(rounds_v1), int(rounds_v2)
        self.batch_size, self.valid_batch_size, self.valid_every = batch_size, valid_batch_size, valid_every
        self.select_on = select_on
        self.n_train, self.n_valid = n_train, n_valid
        # the paper's teacher: UniPC order 3 with B(h) = bh1
        teacher_solver = as_solver(teacher_solver, name="teacher_solver", default="unipc", order=teacher_order,
                                   variant="bh1")
        if not callable(teacher) and not (isinstance(teacher, str) and teacher in ("solver", "exact")):  # named now
            raise ValueError(f"teacher must be 'solver', 'exact' or a callable, got {teacher!r}")
        if teacher == "solver":  # the NFE it spends exactly (Heun: an even one), before any work
            steps = teacher_solver.exact_steps(count("teacher_nfe", teacher_nfe, 1, type_error=False), "teacher_nfe")
            try:
                from .. import discretizations
                discretizations.get_discretization(teacher_discretization, self.schedule, steps)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"teacher_discretization: {exc}") from None
            if teacher_nfe <= self.nfe:  # LD3 fits the student to the teacher: one no finer teaches it nothing
                warnings.warn(f"teacher_nfe={teacher_nfe} is not above the student's nfe={self.nfe}: the teacher "
                              f"should be a much finer solve (e.g. teacher_nfe={max(20, 4 * self.nfe)})",
                              stacklevel=2)
        if teacher_dir is not None and teacher_cache is not None and teacher_dir != teacher_cache:
            raise ValueError("teacher_dir is an alias of teacher_cache; pass only one")
        teacher_cache = teacher_cache if teacher_cache is not None else teacher_dir
        if sample_shape is None:
            # registry/test-bed models say their shape themselves
            sample_shape = getattr(model, "sample_shape", None)
            tb = getattr(model, "testbed", None)
            if sample_shape is None and tb is not None:
                sample_shape = getattr(tb, "event_shape", None)
        if sample_shape is not None:
            # one sample's shape: a sequence of positive ints (not truncated, not a str)
            if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, (Sequence, torch.Size)) or any(
                    isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sample_shape):
                raise ValueError(f"sample_shape must be a sequence of ints >= 1 (one sample's shape), "
                                 f"got {sample_shape!r}")
            tb_dim = getattr(getattr(model, "testbed", None), "dim", None)
            if isinstance(tb_dim, int) and math.prod(sample_shape) != tb_dim:  # else the model's reshape fails later
                raise ValueError(f"sample_shape {tuple(sample_shape)} does not hold the {tb_dim} values of one sample "
                                 f"of the test bed {model.testbed.name!r} (its event shape is "
                                 f"{model.testbed.event_shape})")
        if teacher == "exact" and reference is None:
            reference = getattr(model, "testbed", None)
        self.teacher, self.teacher_solver, self.teacher_nfe = teacher, teacher_solver, teacher_nfe
        self.teacher_discretization, self.reference = teacher_discretization, reference
        self.teacher_cache = teacher_cache if teacher_cache is not None else (
            os.path.join(checkpoint_dir, "teacher") if checkpoint_dir is not None else None)
        self.regenerate_teacher = flag("regenerate_teacher", regenerate_teacher)
        self.cache_max_bytes = cache_max_bytes
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.model_name = model_name
        self.conditions, self.uncond = conditions, uncond
        self.decoder, self.checkpoint_decoder = decoder, flag("checkpoint_decoder", checkpoint_decoder)
        self.seed = check_seed("seed", seed)
        self.device = torch.device(device) if device is not None else _default_device(model)
        self.dtype = dtype if dtype is not None else default_state_dtype(model)
        if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            # found now, not when the first round's checkpoint is written
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} exists and is not a directory")
        self.checkpoint_dir, self.checkpoint_every, self.resume = checkpoint_dir, checkpoint_every, resume
        self.callback, self.progress = callback, flag("progress", progress)
        self.identity = model_identity(model, model_name)
        # the weights alone do not say how the wrapper calls them: a resumed run must use the same call
        self._model_call = model_call_settings(model)
        self.history: List[Dict[str, Any]] = []
        if model_spec is not None and (not isinstance(model_spec, str) or not model_spec.strip()):
            raise ValueError(f"model_spec must be a non-empty str or None, got {model_spec!r}")
        self.model_spec = model_spec
        self._teacher_record: Optional[Dict[str, Any]] = None  # what the pairs came from (set by fit)
        self.param: Optional[TimeParameterization] = None
        self._auto: Optional[Dict[str, Any]] = None  # time_mode="auto": trial losses, choice (see _train)
        self._candidates: Dict[str, Dict[str, Any]] = {}  # time_mode="auto": the candidates' training states
        # time_mode="auto" resuming an explicit-mode checkpoint: the mode it was written in (see _try_resume)
        self._mode_from_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    def generate_teacher(self) -> Dict[str, torch.Tensor]:
        """Generate (or load from the cache) n_train + n_valid teacher pairs: {"noise" (unit var), "target", ["cond"]}."""
        if self.sample_shape is None:
            raise ValueError("fit() without data generates the teacher and needs sample_shape=(C, H, W) (the shape of "
                             "one sample); or pass precomputed pairs: fit(noise, target)")
        fn, settings = make_teacher(self.model, self.teacher, self.teacher_solver, self.teacher_nfe,
                                    self.teacher_discretization, self.reference, nfe_name="teacher_nfe")
        self._teacher_record = settings  # recorded in the schedule files: the schedule is fitted to this teacher
        return generate_teacher_data(self.model, fn, settings, self.n_train + self.n_valid, self.sample_shape,
                                     seed=self.seed, dtype=self.dtype, device=self.device, batch_size=25,
                                     cache_dir=self.teacher_cache, identity=self.identity, conditions=self.conditions,
                                     uncond=self.uncond, max_bytes=self.cache_max_bytes,
                                     regenerate=self.regenerate_teacher, progress=self.progress)

    def __repr__(self) -> str:
        init = self.init if isinstance(self.init, str) else "custom grid"
        return (f"LD3Trainer(solver={self.solver!r}, nfe={self.nfe}, schedule={self.schedule!r}, "
                f"loss={loss_name(self.loss_spec)!r}, time_mode={self.time_mode_request!r}, init={init!r}, decoupled={self.decoupled}, n_train={self.n_train}, "
                f"n_valid={self.n_valid}, checkpoint_dir={self.checkpoint_dir!r})")

    def fit(self, noise: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
            valid_noise: Optional[torch.Tensor] = None, valid_target: Optional[torch.Tensor] = None, *,
            cond: Optional[torch.Tensor] = None, valid_cond: Optional[torch.Tensor] = None,
            target_decoded: bool = False) -> LearnedSchedule:
        """Train and return the best :class:`LearnedSchedule` (selected on the hard validation loss).

        Without arguments the teacher is generated (or reused from the cache).  Otherwise ``noise`` is x_T in
        model space (already multiplied by the prior std; a UserWarning says when its RMS is 2x or more off it) and
        ``target`` the teacher output for it (model space;
        decoded here when a decoder is set, unless ``target_decoded``).  Without ``valid_*`` the last
        min(n_valid, len // 2) pairs are held out for validation.

        LD3 never trains the network: while ``fit`` runs, the parameters of the model (``model.fn``, ``model.net``),
        of a decoder and of a loss network are set to ``requires_grad=False`` (no weight gradients are computed);
        their flags are restored when it returns or raises.
        """
        self._check_ranks_agree()
        self._check_folders(teacher=noise is None)
        frozen = self._freeze_weights()
        try:
            # training differentiates whatever the caller's mode: under torch.no_grad() (or inference_mode) the
            # noise gradient was missing (reported as "not finite") and with radius=0 nothing trained, silently
            with torch.inference_mode(False), torch.enable_grad():
                return self._fit(noise, target, valid_noise, valid_target, cond=cond, valid_cond=valid_cond,
                                 target_decoded=target_decoded)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _check_folders(self, teacher: bool) -> None:
        """checkpoint_dir and (when the teacher is generated and no cache is there yet) teacher_cache made and
        writable before any work, named in the error: os.makedirs failed later with an OSError naming only a path,
        or (a read-only folder) the first checkpoint write failed after a round of training.  A complete cache in a
        read-only folder stays usable (the cache opens it read-only).  Rank 0 writes both, so rank 0 checks, and
        every rank stops when it fails (one rank raising alone would leave the others in the next collective)."""
        from ..atomic_io import check_writable_dir
        from .teacher import cache_is_complete
        err: Optional[OSError] = None
        if D.is_rank0():
            for name, path in (("checkpoint_dir", self.checkpoint_dir), ("teacher_cache", self.teacher_cache)):
                if path is None or (name == "teacher_cache" and (
                        not teacher or cache_is_complete(path))):
                    continue
                try:
                    check_writable_dir(path)
                except OSError as exc:
                    text = f"{name} {path!r}: cannot create it or write there ({exc.strerror or exc})"
                    err = type(exc)(exc.errno, text) if exc.errno is not None else type(exc)(text)
                    break
                if name == "checkpoint_dir":  # a folder where a file of the run goes: found after the training
                    files = [CHECKPOINT_FILE, SCHEDULE_FILE, LAST_GOOD_FILE] + \
                        [TRIAL_LAST_GOOD_FILE.format(mode=m) for m in TIME_MODES]
                    taken = [f for f in files if os.path.isdir(os.path.join(path, f))]
                    if taken:
                        err = IsADirectoryError(errno.EISDIR, f"checkpoint_dir {path!r}: {taken[0]} there is a "
                                                "folder, and the run writes a file of that name; move it away")
                        break
        if D.get_world_size() > 1:
            if D.any_rank(err is not None):
                raise err if err is not None else RuntimeError(
                    "rank 0 cannot create or write checkpoint_dir / teacher_cache (its error names the folder)")
        elif err is not None:
            raise err

    def _check_ranks_agree(self, with_data: bool = False) -> None:
        """Under torch.distributed every rank must hold the same model (weights hash) and settings: a rank
        with an unseeded network would otherwise make teacher pairs and gradients of another model, silently, and
        ranks with other round counts, learning rates or losses waited for each other in different collectives
        (a hang until the collective timeout, or gloo's abort).  Every field of settings() (and, before the
        teacher, the teacher's own settings) is compared, and the ones that differ are named (callables by name, not
        by their code fingerprint, which a closure over the rank's device changes); ``with_data``: the pairs once
        loaded (before a decoder, which need not decode bitwise alike on two GPUs): their number and hash."""
        if D.get_world_size() <= 1:
            return
        if with_data:
            d = self._data
            fields = {"n_train": int(d["z_train"].shape[0]), "n_valid": int(d["z_valid"].shape[0]),
                      "data_sha256": _data_sha256(d)}
        else:
            fields = self.settings(declared_only=True)
            fields.setdefault("time_mode_trial_rounds", None)  # only for time_mode="auto": the same keys everywhere
            fields.update({k: getattr(self, k) for k in (
                "teacher", "teacher_solver", "teacher_nfe", "teacher_discretization", "sample_shape",
                "cache_max_bytes", "checkpoint_every")})
            # not a setting of the result, but each checkpoint write is a barrier: a checkpoint_dir (or checkpoint_every)
            # on rank 0 alone left the ranks in different collectives, a hang until the timeout. Whether it is given,
            # not its path: a node may mount the shared folder elsewhere
            fields["checkpoint_dir"] = None if self.checkpoint_dir is None else "given"
            fields = rank_comparable(fields)
        differ = D.differing_fields(fields)
        if differ:
            def shown(k):
                v = fields[k]
                if k == "model":
                    v = f"{self.identity.get('name')!r}, weights {str(self.identity.get('weights_hash'))[:12]}"
                text = str(v)
                return f"{k}={text if len(text) <= 80 else text[:77] + '...'}"
            raise CheckpointMismatchError(
                f"the ranks under torch.distributed differ in {', '.join(differ)} (rank {D.get_rank()}: "
                f"{'; '.join(shown(k) for k in differ)}): every rank must run the same command on the same model "
                f"(for 'model': seed the network's initialisation, or load a checkpoint)")

    def _weight_modules(self) -> List[torch.nn.Module]:
        """The modules whose weights a training run differentiates through but never updates."""
        cands = [self.model, getattr(self.model, "fn", None), getattr(self.model, "net", None),
                 getattr(getattr(self.model, "fn", None), "__self__", None),  # fn = a bound method of a network
                 self.decoder, getattr(self.decoder, "__self__", None), self.loss_fn]
        return [m for m in cands if isinstance(m, torch.nn.Module)]

    def _freeze_weights(self) -> List[torch.nn.Parameter]:
        """Set requires_grad=False on every weight that has it; returns those (to restore them afterwards)."""
        frozen, seen = [], set()
        for m in self._weight_modules():
            for p in m.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    frozen.append(p)
        for p in frozen:
            p.requires_grad_(False)
        return frozen

    def _fit(self, noise, target, valid_noise, valid_target, *, cond, valid_cond, target_decoded) -> LearnedSchedule:
        prior = self.schedule.prior_std()
        if noise is None:
            if target is not None or valid_noise is not None:
                raise ValueError("pass noise together with target (or neither)")
            data = self.generate_teacher()
            nt = self.n_train
            z, y = data["noise"], data["target"]
            c = data.get("cond")
            z_tr, y_tr, z_va, y_va = z[:nt], y[:nt], z[nt:], y[nt:]
            c_tr, c_va = (c[:nt], c[nt:]) if c is not None else (None, None)
            target_decoded = False
        else:
            if target is None:
                raise ValueError("fit(noise, target): target is missing")
            self._teacher_record = {"kind": "given", "note": "teacher pairs passed to fit()"}
            self._check_pair(noise, target, "noise", "target")
            if self.decoder is None and target.shape[1:] != noise.shape[1:]:
                # the sampler's output (noise-shaped) is compared with target: found at the first loss otherwise
                raise ValueError(f"target has per-sample shape {tuple(target.shape[1:])} but noise "
                                 f"{tuple(noise.shape[1:])}: without a decoder the targets are samples of the noise's "
                                 "shape")
            if self.decoder is not None and not target_decoded and target.shape[1:] != noise.shape[1:]:
                # the decoder is run on target below: decoded images failed inside it (a VAE's channel mismatch), or
                # were decoded again and refused by the loss, after the init grid search
                raise ValueError(f"target has per-sample shape {tuple(target.shape[1:])} but noise "
                                 f"{tuple(noise.shape[1:])}: with a decoder, target is decoded here (latents of the "
                                 "noise's shape); pass target_decoded=True for targets that are already decoded")
            if self.sample_shape is not None and tuple(noise.shape[1:]) != self.sample_shape:
                raise ValueError(f"noise has per-sample shape {tuple(noise.shape[1:])} but sample_shape is "
                                 f"{self.sample_shape}")
            if cond is None and self.conditions is not None:
                # conditions given to the constructor: one per pair (train pairs first, then valid pairs)
                n_all = noise.shape[0] + (0 if valid_noise is None else valid_noise.shape[0])
                if self.conditions.shape[0] != n_all:
                    raise ValueError(f"conditions hold {self.conditions.shape[0]} entries but {n_all} pairs were given; "
                                     "pass cond=/valid_cond= to fit()")
                cond = self.conditions[:noise.shape[0]]
                if valid_noise is not None and valid_cond is None:
                    valid_cond = self.conditions[noise.shape[0]:]
            self._check_cond(cond, valid_cond, noise, valid_noise)
            if valid_noise is None:
                if valid_target is not None:
                    raise ValueError("valid_target given without valid_noise")
                nv = min(self.n_valid, noise.shape[0] // 2)
                if nv < 1:
                    raise ValueError("need at least 2 pairs (one to train, one to validate), or pass valid_noise/target")
                z_tr, z_va = noise[:-nv], noise[-nv:]
                y_tr, y_va = target[:-nv], target[-nv:]
                c_tr, c_va = (cond[:-nv], cond[-nv:]) if cond is not None else (None, None)
            else:
                if valid_target is None:
                    raise ValueError("valid_noise given without valid_target")
                self._check_pair(valid_noise, valid_target, "valid_noise", "valid_target")
                for vn, v, tn, tr in (("valid_noise", valid_noise, "noise", noise),
                                      ("valid_target", valid_target, "target", target)):
                    if v.shape[1:] != tr.shape[1:]:  # else a model error mid-run, or silently another resolution
                        raise ValueError(f"{vn} has per-sample shape {tuple(v.shape[1:])}, {tn} "
                                         f"{tuple(tr.shape[1:])}: the validation pairs must be shaped as the training pairs")
                z_tr, y_tr, z_va, y_va, c_tr, c_va = noise, target, valid_noise, valid_target, cond, valid_cond
            # back to unit-variance noise (the ball lives there), divided in at least float32: a half-precision
            # quotient is rounded, and prior * z then missed the given noise in ~13% of the pixels (EDM's 80)
            z_tr, z_va = (v.to(_opmath(v.dtype)) / prior for v in (z_tr, z_va))
            _warn_noise_scale(z_tr, prior)
        # the noise LD3 relaxes is kept in float32 for a half-precision solve (cast when the solve starts): its
        # steps within the radius r = gamma d / NFE^2 are ~1e-3 a pixel, below bfloat16's spacing near 1
        dev, dt = self.device, _opmath(self.dtype)
        self._data = {
            "z_train": z_tr.detach().to(dev, dt).clone(), "y_train": y_tr.detach().to(dev),
            "z_valid": z_va.detach().to(dev, dt).clone(), "y_valid": y_va.detach().to(dev),
            # detached as the pairs are: conditions made by a network (an embedding's output) carry its graph, and
            # every loss.backward() then ran into it (the second one: "backward through the graph a second time")
            "c_train": None if c_tr is None else c_tr.detach().to(dev),
            "c_valid": None if c_va is None else c_va.detach().to(dev),
        }
        self._check_ranks_agree(with_data=True)  # pairs given to fit() may differ between ranks
        if self.decoder is not None and not target_decoded:
            with torch.no_grad():
                for k in ("y_train", "y_valid"):
                    self._data[k] = torch.cat([self.decoder(b) for b in self._data[k].split(self.valid_batch_size)])
                    # the targets were checked before decoding: a NaN now is the decoder's (e.g. a float16 VAE
                    # overflowing), not a learning rate's, as the first training loss would report it
                    bad = (~torch.isfinite(self._data[k].flatten(1))).any(1).nonzero().flatten()
                    if bad.numel():
                        raise ValueError(f"decoder returned NaN/Inf for {bad.numel()} teacher target(s) of the "
                                         f"{k[2:]} set (first: sample {int(bad[0])}); check the decoder")
        return self._train()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_cond(cond, valid_cond, noise, valid_noise):
        """One condition per pair, in the pairs' order: a longer cond was split at the wrong place (the validation
        pairs silently got other pairs' conditions) and a shorter one failed mid-training with an IndexError."""
        if valid_noise is None and valid_cond is not None:
            raise ValueError("valid_cond given without valid_noise (the held-out pairs take theirs from cond)")
        if valid_noise is not None and (cond is None) != (valid_cond is None):
            raise ValueError("pass cond and valid_cond together (or neither)")
        for name, c, z in (("cond", cond, noise), ("valid_cond", valid_cond, valid_noise)):
            if c is None:
                continue
            if not isinstance(c, torch.Tensor) or c.dim() < 1:
                raise TypeError(f"{name} must be a tensor [N, ...] (one condition per pair)")
            if c.shape[0] != z.shape[0]:
                raise ValueError(f"{name} holds {c.shape[0]} conditions for {z.shape[0]} pairs: one per pair, in "
                                 "the same order")

    @staticmethod
    def _check_pair(noise, target, nn, tn):
        if not isinstance(noise, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"{nn} and {tn} must be tensors")
        if noise.shape[0] != target.shape[0] or noise.shape[0] < 1:
            raise ValueError(f"{nn} and {tn} must hold the same number (>= 1) of samples, got "
                             f"{noise.shape[0]} and {target.shape[0]}")
        for name, t in ((nn, noise), (tn, target)):
            if not t.is_floating_point():  # complex lost its imaginary part to a cast; bool became 0/1 noise
                raise TypeError(f"{name} must be a real floating tensor, got {t.dtype}")
            holds_values(name, t)  # the finite check's item() failed naming no argument
        if not all_finite(noise) or not all_finite(target):
            raise ValueError(f"{nn}/{tn} contain NaN/Inf")

    def _loaded(self, what: str) -> Dict[str, torch.Tensor]:
        """The teacher data fit() loads; a clear error when asked before (it was a bare AttributeError)."""
        data = getattr(self, "_data", None)
        if data is None:
            raise RuntimeError(f"LD3Trainer.{what}() needs the teacher data: call fit() first")
        return data

    def radius(self) -> float:
        """r = gamma * d / NFE^2 on the unit-variance noise (LD3.md 1.1), d = numel of one sample (from the teacher
        data: after fit(), unless ``radius`` was given)."""
        if self.radius_override is not None:
            return float(self.radius_override)
        d = self._loaded("radius")["z_train"][0].numel()
        return self.gamma * d / self.nfe ** 2

    def settings(self, declared_only: bool = False) -> Dict[str, Any]:
        """Everything the result depends on (recorded in schedule files and matched on resume); after fit().
        ``declared_only``: what is known before the teacher pairs (radius as given, n_train/n_valid as asked, no
        data hash), for comparing ranks before any work."""
        if not declared_only:
            self._loaded("settings")
        data = None if declared_only else self._data
        init = self.init if isinstance(self.init, str) else [float(v) for v in torch.as_tensor(self.init).flatten()]
        out = {
            "nfe": self.nfe, "num_steps": self.num_steps, "solver": self.solver.config(),
            "step_orders": (step_orders(self.solver.spec(), self.num_steps)
                            if isinstance(self.solver, MultistepSolver) else None), "loss": loss_name(self.loss_spec),
            "time_mode": self._settings_time_mode(), "init": init, "decoupled": self.decoupled, "win_rate": self.win_rate,
            "gamma": self.gamma, "radius": self.radius() if data is not None else (
                None if self.radius_override is None else float(self.radius_override)),
            "shift_lr": self._shift_lr0(), "lr_xi": self.lr_xi,
            "momentum": self.momentum, "lr_xi_min": self.lr_xi_min, "lr_xi_c": self.lr_xi_c,
            "lr_xi_c_min": self.lr_xi_c_min, "clip_norm": self.clip_norm, "lr_decay": self.lr_decay,
            "patience": self.patience, "lr2_patience": self.lr2_patience, "early_stop_patience": self.early_stop_patience,
            "rounds_v1": self.rounds_v1, "rounds_v2": self.rounds_v2, "batch_size": self.batch_size,
            "valid_batch_size": self.valid_batch_size, "valid_every": self._valid_every() if data is not None else (
                None if self.valid_every is None else int(self.valid_every)),
            "select_on": self.select_on,
            "seed": self.seed, "dtype": str(self.dtype).replace("torch.", ""),
            "n_train": int(data["z_train"].shape[0]) if data is not None else int(self.n_train),
            "n_valid": int(data["z_valid"].shape[0]) if data is not None else int(self.n_valid),
            "decoder": None if self.decoder is None else getattr(self.decoder, "__qualname__", type(self.decoder).__name__),
            "model": self.identity, "model_call": self._model_call, "schedule": self.schedule.config(),
            "data_sha256": None if data is None else _data_sha256(data),
        }
        if out["time_mode"] == "auto":  # only then: explicit modes keep their settings (and checkpoints) as they were
            out["time_mode_trial_rounds"] = self._trial_rounds()
        if self.uncond is not None:  # only then, likewise: a resume with another uncond trained on other guidance
            u = self.uncond
            out["uncond_sha256"] = f"{_sha(u)}|{str(u.dtype).replace('torch.', '')}|{list(u.shape)}"
        return out

    def _settings_time_mode(self) -> str:
        """The time_mode the result depends on: the request, or the explicit mode a resumed checkpoint was written in
        (then the run is that explicit run, and keeps writing its checkpoint in that layout)."""
        return self._mode_from_checkpoint or self.time_mode_request

    def _trial_rounds(self) -> int:
        """Rounds of each time_mode="auto" trial, at most the whole run."""
        total = self.rounds_v1 + self.rounds_v2
        n = self.time_mode_trial_rounds if self.time_mode_trial_rounds is not None else self.rounds_v1 + 1
        return min(n, total)

    def _shift_lr0(self) -> float:
        return float(self.shift_lr0) if self.shift_lr0 is not None else 12.0 / self.num_steps

    def _valid_every(self) -> int:
        if self.valid_every is not None:
            return self.valid_every
        nv = self._data["z_valid"].shape[0]
        per_round = math.ceil(self._data["z_train"].shape[0] / self.batch_size)
        return 1 if nv <= 200 else max(1, per_round // 10)

    AUTO_INIT_CANDIDATES = ("logsnr", "edm", "time_quadratic", "time_uniform", "dmn")

    def _check_init(self, init, decoupled, win_rate, time_mode) -> None:
        """Raise ValueError for an init or win_rate that the training would refuse later (cheap: a grid a mode)."""
        named = isinstance(init, str) and init.lower() in ("auto", "dmn")
        # the settings that are not init's (win_rate, the number of steps) first, with a grid that always
        # exists: their errors are theirs, not init's
        TimeParameterization(self.schedule, self.num_steps, TIME_MODES[0], "logsnr", decoupled, win_rate)
        if named:
            return
        # in every mode that will start from it: the gaps are checked in that mode's units (a grid with a tiny t gap
        # passes in lambda), and time_mode="auto" builds the "time" candidate only after the "lambda" trial
        for mode in TIME_MODES if time_mode == "auto" else (time_mode,):
            try:
                TimeParameterization(self.schedule, self.num_steps, mode, init, decoupled, win_rate)
            except ValueError as exc:
                msg = str(exc)
                if isinstance(init, str) and msg.startswith("init must be"):
                    from .. import discretizations
                    raise ValueError(f"init must be 'auto', 'dmn', one of {sorted(discretizations.DISCRETIZATIONS)} "
                                     f"or a grid of N+1 = {self.num_steps + 1} timesteps, got {init!r}") from None
                msg = msg if msg.startswith("init") else f"init: {msg}"
                raise ValueError(f"{msg} (time_mode={mode!r})") from None

    def _dmn_init(self) -> torch.Tensor:
        """The DMN grid, weighted as the original weights it: sigma^2/alpha from uniform t for latent models (a
        decoder is set), sigma/alpha from uniform lambda for pixel models."""
        from ..baselines.dmn import dmn, order_for
        space = "pixel" if self.decoder is None else "latent"
        return dmn(self.schedule, self.num_steps, order=order_for(self.solver), space=space)

    def _auto_init(self) -> torch.Tensor:
        """init="auto": start from whichever candidate grid (hand-made or DMN) has the lowest hard
        validation loss, so training starts at least as good as the best of them."""
        d = self._data
        grids = {}
        for name in self.AUTO_INIT_CANDIDATES:
            try:
                if name == "dmn":
                    grids[name] = self._dmn_init()
                else:
                    grids[name] = init_timesteps(self.schedule, self.num_steps, name)
            except Exception as exc:  # a candidate that cannot be built is skipped, not fatal
                warnings.warn(f"init='auto': candidate {name!r} unavailable ({type(exc).__name__}: {exc})")
        scores, failures = {}, {}
        for name, g in grids.items():
            g = g.to(self.device)
            # a grid on which the model returns NaN/Inf is a bad candidate, not a failed run: skipped like a
            # grid with a non-finite loss (every rank still joins the loss reduction, so none waits forever)
            scores[name] = self._eval_set(d["z_valid"], d["y_valid"], d["c_valid"], g, g, failures=failures, key=name)
        finite = {k: v for k, v in scores.items() if math.isfinite(v)}
        for name, v in scores.items():
            if not math.isfinite(v):
                why = f"{type(failures[name]).__name__}: {failures[name]}" if name in failures else \
                    f"validation loss {v}"
                warnings.warn(f"init='auto': candidate {name!r} skipped: {why}")
        if not finite:
            if failures:
                raise next(iter(failures.values()))
            raise NonFiniteLossError("init='auto': every candidate grid gives a non-finite validation loss",
                                     0, None, None)
        self.init_choice = min(finite, key=finite.get)
        self.init_scores = scores  # a skipped candidate's NaN becomes None in the metrics (json_safe)
        return grids[self.init_choice]

    # the training state of one candidate: the attributes the training loop works on
    _CANDIDATE_ATTRS = ("time_mode", "param", "opt_xi", "opt_c", "gen", "st", "history")

    def _new_candidate(self, time_mode: str, init) -> Dict[str, Any]:
        """A fresh training state in ``time_mode`` starting from the grid ``init``; made the active one."""
        self.time_mode = time_mode
        self.param = TimeParameterization(self.schedule, self.num_steps, time_mode, init, self.decoupled,
                                          self.win_rate).to(self.device)
        self.opt_xi = torch.optim.RMSprop([self.param.xi], lr=self.lr_xi, momentum=self.momentum)
        self.opt_c = torch.optim.SGD([self.param.xi_c], lr=self.lr_xi_c)
        self.gen = torch.Generator().manual_seed(self.seed)  # every candidate sees the same shuffles
        self.history = []
        d = self._data
        self.st: Dict[str, Any] = {
            "round": 0, "stage": "start", "batch_pos": 0, "iteration": 0, "perm": torch.zeros(0, dtype=torch.long),
            "z_train_rel": d["z_train"].clone(), "z_valid_rel": d["z_valid"].clone(),
            "shift_lr": self._shift_lr0(), "patience_count": 0, "no_improve": 0, "lr2_floor_hits": 0,
            "valid_moved": False, "done": False, "stop_reason": None, "elapsed": 0.0,
            "best_metric": math.inf, "best_iteration": 0, "init_metric": None,
        }
        self._snapshot_best()
        return self._active()

    def _active(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self._CANDIDATE_ATTRS}

    def _activate(self, time_mode: str):
        """Make the candidate of ``time_mode`` the active one (time_mode="auto")."""
        if self.param is not None:
            self._candidates[self.time_mode] = self._active()
        for k, v in self._candidates[time_mode].items():
            setattr(self, k, v)

    # ------------------------------------------------------------------------------------------
    # pieces of an iteration
    # ------------------------------------------------------------------------------------------
    def _kwargs(self, cond: Optional[torch.Tensor], n: int) -> Dict[str, Any]:
        if cond is None:
            return {}
        kw = {self.model.cond_key: cond}
        if self.uncond is not None:
            u = self.uncond.to(self.device)
            kw["uncond"] = u.expand(n, *u.shape[1:])
        return kw

    def _student(self, z: torch.Tensor, t, tm, cond) -> torch.Tensor:
        x_T = self.schedule.prior_std() * z
        if x_T.dtype != self.dtype:  # float32 noise of a half-precision solve
            x_T = x_T.to(self.dtype)
        out = self.solver.sample(self.model, x_T, t, model_timesteps=tm, **self._kwargs(cond, z.shape[0]))
        if self.decoder is not None:
            if self.checkpoint_decoder and torch.is_grad_enabled():
                out = _checkpoint(self.decoder, out, use_reentrant=False)
            else:
                out = self.decoder(out)
        return out

    def _losses(self, z, target, cond, t, tm) -> torch.Tensor:
        return per_sample(self.loss_fn, self._student(z, t, tm, cond), target)

    @torch.no_grad()
    def _eval_set(self, z_all, y_all, c_all, t, tm, failures: Optional[Dict[str, Exception]] = None,
                  key: Optional[str] = None) -> float:
        """Mean loss over a set.  With ``failures``, a model output error or non-finite loss is stored there under
        ``key`` and the result is NaN (this rank still joins the reduction), instead of raised; a failure on
        another rank is stored too (as a ModelOutputError saying so), so every rank sees it."""
        tot, n, failed = 0.0, 0, 0.0
        mine = D.shard_range(z_all.shape[0])  # everything in one process; this rank's rows under torch.distributed
        try:
            for lo in range(mine.start, mine.stop, self.valid_batch_size):
                sl = slice(lo, min(lo + self.valid_batch_size, mine.stop))
                ls = self._losses(z_all[sl], y_all[sl], None if c_all is None else c_all[sl], t, tm)
                tot += float(ls.sum())
                n += ls.shape[0]
        except (FloatingPointError, ModelOutputError) as exc:
            if failures is None:
                raise
            failures[key] = exc
            tot, failed = math.nan, 1.0
        tot, n, failed = D.reduce_scalars([tot, n, failed])
        if failed and failures is not None and key not in failures:
            failures[key] = ModelOutputError("the model failed on another rank")
        return tot / n if n > 0 else math.nan  # n = 0: every rank failed on its first batch

    def _project(self, z: torch.Tensor, z_new: torch.Tensor) -> torch.Tensor:
        """Per-sample projection of z_new onto the L2 ball of radius r around z."""
        r = self.radius()
        diff = z_new - z
        norm = diff.reshape(diff.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (diff.dim() - 1))
        scale = torch.where(norm > r, r / norm.clamp_min(1e-300), torch.ones_like(norm))
        return z + diff * scale

    def _relax_step(self, idx, z_key, y_key, c_key, train_params: bool, phase: int):
        """Steps a-e of LD3.md 1.4 on one batch; returns (reference losses, proposed z') of this rank's part.

        ``idx`` is the global batch (the same on every rank); under torch.distributed each rank solves its part
        ``D.local_part(idx)`` and the schedule-parameter gradients are averaged, weighted by the part sizes, so
        every rank takes the single-process step."""
        d, st = self._data, self.st
        n_glob = len(idx)
        idx = D.local_part(idx)
        z_rel = st[z_key + "_rel"][idx].detach()  # a tensor index copies already: no second copy
        if z_rel._base is not None:  # a view (a slice index): the state must not be written through it
            z_rel = z_rel.clone()
        relax = self.radius() > 0
        if relax:
            z_rel.requires_grad_(True)
        cond = None if d[c_key] is None else d[c_key][idx]
        self.param.xi.requires_grad_(train_params)
        self.param.xi_c.requires_grad_(train_params and phase == 2 and self.decoupled)
        t, tm = self.param()
        self.opt_xi.zero_grad(set_to_none=True)
        self.opt_c.zero_grad(set_to_none=True)
        distributed = D.get_world_size() > 1
        model_err = None  # under torch.distributed a model failure rides in the step's flags: every rank stops
        if len(idx) > 0:
            try:
                losses = self._losses(z_rel, d[y_key][idx], cond, t, tm)
            except (ModelOutputError, DegenerateGridError) as exc:
                if not distributed:
                    raise
                model_err, losses, loss, bad = exc, z_rel.new_zeros(0), None, True
        if len(idx) > 0 and model_err is None:
            if not losses.requires_grad:  # z' or xi requires grad here: the chain to them was cut
                raise ValueError(f"loss={loss_name(self.loss_spec)!r}: the training loss carries no gradient; the loss "
                                 "(or the decoder, or the model) detaches its result (.detach(), .item(), numpy, "
                                 "torch.no_grad inside). LD3 differentiates through the model, decoder and loss")
            loss = losses.mean()
            bad = not bool(torch.isfinite(loss))
        elif len(idx) == 0:  # more ranks than samples in this batch: this rank only joins the collectives
            losses, bad = z_rel.new_zeros(0), False
        if bad and not distributed:
            self._nonfinite(f"the training loss is {float(loss.detach())}")
        if not bad and len(idx) > 0 and loss.requires_grad:
            loss.backward()
        g = None
        if relax:
            g = z_rel.grad
            if len(idx) == 0:
                g = torch.zeros_like(z_rel)
            elif g is not None and len(idx) != n_glob:
                g = g * (len(idx) / n_glob)  # d(global batch mean)/dz: this rank's mean covers len(idx) samples
        g_bad = relax and (g is None or not all_finite(g))
        if distributed:
            # one collective a step: the parameter gradients, weighted by the part sizes, with both
            # "not finite" flags riding along (every rank then takes the same branch)
            grads = []
            for p in (self.param.xi, self.param.xi_c):
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad if p.requires_grad else None)
            bad_any, g_bad_any = D.all_reduce_mean_(grads, weight=len(idx), flags=[bad, g_bad])
            if bad_any:
                self._nonfinite(f"the model failed: {model_err}" if model_err is not None else
                                f"the training loss is {float(loss.detach())}" if bad else
                                "the training loss is not finite on another rank (or the model failed on another rank)")
            g_bad = g_bad_any
        if g_bad:
            self._nonfinite("the gradient w.r.t. the starting noise is not finite")
        proposal = z_rel.detach() - st["shift_lr"] * g if relax else None
        if train_params:
            for p, opt in ((self.param.xi, self.opt_xi), (self.param.xi_c, self.opt_c)):
                if p.grad is None:
                    continue
                if not torch.isfinite(p.grad).all():
                    self._nonfinite("the gradient w.r.t. the schedule parameters is not finite")
                torch.nn.utils.clip_grad_norm_([p], self.clip_norm)
                opt.step()
        self.param.xi.requires_grad_(True)
        self.param.xi_c.requires_grad_(True)
        return losses.detach(), proposal

    @torch.no_grad()
    def _accept(self, idx, z_key, y_key, c_key, ref_losses, proposal) -> bool:
        """Step g: project, re-solve with the current parameters, keep per sample only if its loss fell."""
        if proposal is None:
            return False
        d, st = self._data, self.st
        cur = st[z_key + "_rel"]
        if D.get_world_size() > 1:
            # this rank decides for its part of the global batch ``idx``; the rows are then all-gathered so that
            # every rank holds the full relaxed noise (checkpoints, best-state reloads and the next round need it)
            loc = D.local_part(idx)
            rows = cur[loc]
            moved, model_err = False, None
            if len(loc) > 0:
                z_new = self._project(d[z_key][loc], proposal)
                t, tm = self.param()
                try:
                    new_losses = self._losses(z_new, d[y_key][loc], None if d[c_key] is None else d[c_key][loc], t,
                                              tm)
                except (ModelOutputError, DegenerateGridError) as exc:  # told to every rank in the gather's flags
                    model_err = exc
                else:
                    keep = torch.isfinite(new_losses) & (new_losses < ref_losses)
                    rows = torch.where(keep.reshape(-1, *[1] * (z_new.dim() - 1)), z_new, rows)
                    moved = bool(keep.any())
            rows, moved_any, (failed_any,) = D.all_gather_batch_part(rows, len(idx), moved,
                                                                      flags=[model_err is not None])
            if failed_any:
                self._nonfinite(f"the model failed: {model_err}" if model_err is not None
                                else "the model failed on another rank")
            if moved_any:
                cur[idx] = rows
                return True
            return False
        z_new = self._project(d[z_key][idx], proposal)
        t, tm = self.param()
        cond = None if d[c_key] is None else d[c_key][idx]
        new_losses = self._losses(z_new, d[y_key][idx], cond, t, tm)
        keep = torch.isfinite(new_losses) & (new_losses < ref_losses)
        if keep.any():
            mask = keep.reshape(-1, *[1] * (z_new.dim() - 1))
            cur[idx] = torch.where(mask, z_new, cur[idx])
        return bool(keep.any())

    def _snapshot_best(self):
        st = self.st
        st["best_xi"] = self.param.xi.detach().clone()
        st["best_xi_c"] = self.param.xi_c.detach().clone()
        st["best_z_train"] = st["z_train_rel"].clone()
        st["best_z_valid"] = st["z_valid_rel"].clone()

    @torch.no_grad()
    def _load_best_params(self, latents: bool):
        st = self.st
        self.param.xi.copy_(st["best_xi"])
        self.param.xi_c.copy_(st["best_xi_c"])
        if latents:
            st["z_train_rel"] = st["best_z_train"].clone()
            st["z_valid_rel"] = st["best_z_valid"].clone()

    def _validate(self, phase: int) -> Dict[str, float]:
        """Hard (un-relaxed) and soft (relaxed) validation losses, then best/plateau/early-stop bookkeeping."""
        d, st = self._data, self.st
        with torch.no_grad():
            t, tm = self.param()
        # a model failure on one rank comes back as NaN from the reduction, on every rank: all stop together
        fails: Dict[str, Exception] = {}
        hard = self._eval_set(d["z_valid"], d["y_valid"], d["c_valid"], t, tm, fails, "hard")
        alone = fails and D.get_world_size() == 1  # nobody to keep in step with: stop now
        soft = hard if self.radius() <= 0 or alone else self._eval_set(st["z_valid_rel"], d["y_valid"],
                                                                       d["c_valid"], t, tm, fails, "soft")
        metric = hard if self.select_on == "hard" else soft
        if fails:  # this rank's own failure, or another rank's: every rank has it in fails
            self._nonfinite(f"the model failed: {next(iter(fails.values()))}")
        if not math.isfinite(metric):
            self._nonfinite(f"the validation loss is {metric}")
        if metric < st["best_metric"]:
            st["best_metric"], st["best_iteration"] = metric, st["iteration"]
            st["patience_count"], st["no_improve"] = 0, 0
            self._snapshot_best()
        else:
            st["patience_count"] += 1
            st["no_improve"] += 1
            if st["patience_count"] >= self.patience:
                st["patience_count"] = 0
                self._load_best_params(latents=True)
                g = self.opt_xi.param_groups[0]
                g["lr"] = max(g["lr"] * self.lr_decay, self.lr_xi_min)
                if phase == 2:
                    g2 = self.opt_c.param_groups[0]
                    at_floor = g2["lr"] <= self.lr_xi_c_min
                    g2["lr"] = max(g2["lr"] * self.lr_decay, self.lr_xi_c_min)
                    if at_floor:
                        st["lr2_floor_hits"] += 1
                        if st["lr2_floor_hits"] >= self.lr2_patience:
                            st["done"], st["stop_reason"] = True, "xi_c learning rate at its floor"
            if self.early_stop_patience is not None and st["no_improve"] >= self.early_stop_patience:
                st["done"], st["stop_reason"] = True, f"no improvement in {st['no_improve']} validations"
        return {"valid_hard": hard, "valid_soft": soft}

    # ------------------------------------------------------------------------------------------
    # results, failures, checkpoints
    # ------------------------------------------------------------------------------------------
    def current_schedule(self, best: bool = True) -> LearnedSchedule:
        """The best (or the current) schedule as a LearnedSchedule; during or after fit()."""
        if getattr(self, "st", None) is None:
            raise RuntimeError("LD3Trainer.current_schedule() has no schedule yet: call fit() first")
        xi, xi_c = (self.st["best_xi"], self.st["best_xi_c"]) if best else (self.param.xi, self.param.xi_c)
        p = TimeParameterization(self.schedule, self.num_steps, self.time_mode, "logsnr", self.decoupled, self.win_rate)
        with torch.no_grad():
            p.xi.copy_(xi.cpu())
            p.xi_c.copy_(xi_c.cpu())
            t, tm = p()
        st = self.st
        init_m, best_m = st["init_metric"], st["best_metric"]
        metrics = {
            "selected_on": self.select_on,
            "valid_loss_init": init_m,
            "valid_loss_best": best_m,
            "relative_improvement": (1.0 - best_m / init_m) if init_m else None,
            "best_iteration": st["best_iteration"], "iterations": st["iteration"], "rounds": st["round"],
            "stop_reason": st["stop_reason"], "train_seconds": round(st["elapsed"], 3),
        }
        if getattr(self, "init_choice", None) is not None:
            metrics["init_choice"] = self.init_choice
            metrics["init_candidates_valid_loss"] = self.init_scores
        if self._auto is not None:
            a = self._auto
            metrics["time_mode_choice"] = a["choice"]
            metrics["time_mode_source"] = "validation"
            metrics["time_mode_candidates_valid_loss"] = dict(a["scores"])
            metrics["time_mode_trial_rounds"] = self._trial_rounds()
            # the dropped candidates' trials count too
            metrics["train_seconds"] = round(st["elapsed"] + sum(v for k, v in a["seconds"].items()
                                                                 if k != self.time_mode), 3)
        elif self._mode_from_checkpoint is not None:  # no trials ran: the checkpoint's mode was kept
            metrics["time_mode_choice"] = self._mode_from_checkpoint
            metrics["time_mode_source"] = "checkpoint"
        last = next((h for h in reversed(self.history) if "valid_hard" in h), None)
        if last is not None:
            metrics["valid_loss_hard_last"] = last["valid_hard"]
            metrics["valid_loss_soft_last"] = last["valid_soft"]
        training = {k: v for k, v in self.settings().items() if k not in ("model", "schedule", "solver")}
        if self._teacher_record is not None:  # not a setting (data_sha256 covers the pairs): a record for the reader
            training["teacher"] = self._teacher_record
        if self._auto is not None:
            training["time_mode_chosen"] = self._auto["choice"]
        elif self._mode_from_checkpoint is not None:
            # training["time_mode"] is the explicit mode (the settings of the run this one continued)
            training["time_mode_requested"] = self.time_mode_request
            training["time_mode_chosen"] = self._mode_from_checkpoint
            training["time_mode_source"] = "checkpoint"
        return LearnedSchedule(t.detach(), tm.detach(), solver_config=self.solver.config(), nfe=self.nfe,
                               schedule_config=self.schedule.config(), guidance_scale=self.model.guidance_scale,
                               # the prediction too: an exported diffusers scheduler needs it (prediction_type)
                               model={**self.identity, "prediction": self.model.prediction,
                                      **({"spec": self.model_spec} if self.model_spec is not None else {})},
                               time_mode=self.time_mode, decoupled=self.decoupled,
                               training=training,
                               metrics=json_safe(metrics))

    def _nonfinite(self, what: str):
        it = self.st["iteration"] + 1
        sched, saved = None, None
        try:
            sched = self.current_schedule(best=True)
            if self.checkpoint_dir is not None:
                saved = self._last_good_path()
                if D.is_rank0():  # every rank raises; one writes
                    saved = sched.save(saved)
        except Exception:  # the error below matters more than a failed rescue
            pass
        where = f"; the last good schedule was saved to {saved}" if saved else "; the last good schedule is in .schedule"
        raise NonFiniteLossError(f"non-finite loss at training iteration {it} (round {self.st['round'] + 1}): {what}"
                                 f"{where}. Lower the learning rates (lr_xi, lr_xi_c, shift_lr) or check the model.",
                                 it, sched, saved)

    def _last_good_path(self, mode: Optional[str] = None) -> str:
        """Where a failure saves the last good schedule: the run's LAST_GOOD_FILE, or, during a time_mode="auto"
        trial (or for ``mode``), that trial's own file."""
        if mode is None and self._auto is not None and self._auto["choice"] is None:
            mode = self.time_mode
        name = LAST_GOOD_FILE if mode is None else TRIAL_LAST_GOOD_FILE.format(mode=mode)
        return os.path.join(self.checkpoint_dir, name)

    def _remove_trial_files(self):
        """Remove the auto trials' last-good files (the trainer's own; LAST_GOOD_FILE is not touched)."""
        if self.checkpoint_dir is None or not D.is_rank0():
            return
        for mode in TIME_MODES:
            try:
                os.remove(self._last_good_path(mode))
            except FileNotFoundError:
                pass

    def _ckpt_path(self) -> Optional[str]:
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, CHECKPOINT_FILE)

    def _save_checkpoint(self):
        path = self._ckpt_path()
        if path is None:
            return
        if self._auto is not None and self.param is None and not self._candidates:
            return  # time_mode="auto" and every trial so far failed: nothing worth keeping
        if not D.is_rank0():  # all ranks hold the same state (see _accept); rank 0 writes it
            D.barrier()
            return
        if self._auto is None:
            tensors, cmeta = self._candidate_payload(self._active(), "")
            meta = {"settings": self.settings(), **cmeta}
        else:
            # every live candidate (a finished trial may still be the winner), each under its own prefix
            if self.param is not None:
                self._candidates[self.time_mode] = self._active()
            active = self.time_mode if self.param is not None else next(iter(self._candidates))
            tensors, cands = {}, {}
            for mode, cand in self._candidates.items():
                t, cands[mode] = self._candidate_payload(cand, f"{mode}/")
                tensors.update(t)
            meta = {"settings": self.settings(), "auto": {**self._auto, "active": active}, "candidates": cands}
        tensors["init_grid"] = self._init_grid  # resumed as it is (see _train)
        if getattr(self, "init_choice", None) is not None:
            meta["init"] = {"choice": self.init_choice, "scores": json_safe(self.init_scores)}
        atomic_save_safetensors(path, tensors, meta)
        D.barrier()

    _STATE_TENSORS = ("perm", "z_train_rel", "z_valid_rel", "best_xi", "best_xi_c", "best_z_train", "best_z_valid")

    def _candidate_payload(self, cand: Dict[str, Any], prefix: str):
        """(tensors, metadata) of one candidate's training state, tensor names prefixed with ``prefix``."""
        st, param = cand["st"], cand["param"]
        tensors = {prefix + "xi": param.xi.detach(), prefix + "xi_c": param.xi_c.detach(),
                   prefix + "rng": cand["gen"].get_state()}
        for k in self._STATE_TENSORS:
            tensors[prefix + k] = st[k]
        opt_meta = {}
        for name in ("opt_xi", "opt_c"):
            sd = cand[name].state_dict()
            for pid, s in sd["state"].items():
                for key, val in s.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"{prefix}{name}.{pid}.{key}"] = val
            opt_meta[name] = sd["param_groups"]
        scalars = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        # the history is a record (a non-finite soft loss is not checked under select_on="hard"): None in JSON
        return tensors, {"state": scalars, "optimizers": opt_meta, "history": json_safe(cand["history"])}

    def _load_candidate(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], prefix: str):
        """Load one candidate's training state (written by :meth:`_candidate_payload`) into the active one."""
        st = dict(meta["state"])
        for k in self._STATE_TENSORS:
            st[k] = tensors[prefix + k].to(self.device) if k != "perm" else tensors[prefix + k]
        self.st = st
        with torch.no_grad():
            self.param.xi.copy_(tensors[prefix + "xi"])
            self.param.xi_c.copy_(tensors[prefix + "xi_c"])
        self.gen.set_state(tensors[prefix + "rng"])
        for name, opt in (("opt_xi", self.opt_xi), ("opt_c", self.opt_c)):
            state: Dict[int, Dict[str, Any]] = {}
            for k, v in tensors.items():
                if k.startswith(prefix + name + "."):
                    _, pid, key = k[len(prefix):].split(".", 2)
                    state.setdefault(int(pid), {})[key] = v.to(self.device) if key != "step" else v
            opt.load_state_dict({"state": state, "param_groups": meta["optimizers"][name]})
        self.history = list(meta.get("history", []))

    def _read_checkpoint(self):
        """The checkpoint to resume as (path, tensors, meta, adopted time_mode or None), or None.  Its settings are
        compared here, before init="auto" evaluates its candidate grids: a mismatch is refused before that work."""
        path = self._ckpt_path()
        if path is None or not os.path.exists(path) or self.resume == "never":
            return None
        try:
            tensors, meta = load_safetensors_checked(path, what="training checkpoint")
        except CorruptFileError as e:
            raise CheckpointMismatchError(f"{e}. Remove it or pass resume='never' to start over.") from None
        mine = self.settings()
        theirs = meta.get("settings", {})
        adopt = None
        if self._auto is not None and theirs.get("time_mode") in TIME_MODES:
            # an explicit-mode checkpoint (e.g. from before "auto" became the default): "auto" means "pick for me"
            # and that run already picked, so it continues in its mode when everything else matches
            adopt = theirs["time_mode"]
            mine = {k: v for k, v in mine.items() if k != "time_mode_trial_rounds"}
            mine["time_mode"] = adopt
        if "uncond_sha256" in mine and "uncond_sha256" not in theirs and "model" in theirs:
            # a guided checkpoint written before the uncond's digest was recorded: it cannot be checked, so it is
            # resumed (as it was then) with a word, not refused as another run
            mine = {k: v for k, v in mine.items() if k != "uncond_sha256"}
            warnings.warn(f"{path} records no digest of uncond (written by an older ld3_ext): resuming it, assuming "
                          "the same unconditional input as this run's")
        if canonical_json(theirs) != canonical_json(mine):
            diff = [k for k in sorted(set(mine) | set(theirs)) if canonical_json(mine.get(k)) != canonical_json(theirs.get(k))]
            hint = ""
            if "time_mode" in diff:
                hint = (f"; it was written with time_mode={theirs.get('time_mode')!r}, this run asks for "
                        f"time_mode={mine.get('time_mode')!r}")
                others = [k for k in diff if k not in ("time_mode", "time_mode_trial_rounds")]
                if theirs.get("time_mode") == "auto" and not others:  # else that alone would be refused again
                    hint += " (pass time_mode='auto' to resume it)"
            raise CheckpointMismatchError(f"{path} was written with other settings (differs in: {', '.join(diff)})"
                                          f"{hint}; use another checkpoint_dir, or resume='never' to overwrite it")
        return path, tensors, meta, adopt

    def _stored_init(self, checkpoint) -> Optional[torch.Tensor]:
        """The init grid (and init="auto"'s choice and scores) a checkpoint was started from, or None."""
        if checkpoint is None or "init_grid" not in checkpoint[1]:
            return None
        rec = checkpoint[2].get("init") or {}
        if rec.get("choice") is not None:
            self.init_choice = rec["choice"]
            self.init_scores = {k: math.nan if v is None else v for k, v in rec["scores"].items()}
        return checkpoint[1]["init_grid"].to(torch.float64)

    def _try_resume(self, checkpoint) -> bool:
        """Load what ``_read_checkpoint`` returned (None: nothing to resume)."""
        if checkpoint is None:
            return False
        path, tensors, meta, adopt = checkpoint
        if adopt is not None:
            warnings.warn(f"time_mode='auto': {path} was written by a time_mode={adopt!r} run; resuming it in "
                          f"{adopt!r} (taken from the checkpoint, no trials). Pass resume='never' to let 'auto' "
                          "choose afresh.")
            self._auto, self._candidates, self.param = None, {}, None
            self._mode_from_checkpoint = adopt
            self._new_candidate(adopt, self._init_grid)
            self._load_candidate(tensors, meta, "")
            return True
        if self._auto is None:
            self._load_candidate(tensors, meta, "")
            return True
        auto, cands = meta.get("auto"), meta.get("candidates")
        if not isinstance(auto, dict) or not isinstance(cands, dict) or auto.get("active") not in cands:
            raise CheckpointMismatchError(f"{path} lacks the time_mode='auto' candidates; remove it or pass "
                                          "resume='never' to start over")
        self._candidates, self.param = {}, None
        for mode in cands:  # the live candidates; the active one is re-selected below
            self._new_candidate(mode, self._init_grid)
            self._load_candidate(tensors, cands[mode], f"{mode}/")
            self._candidates[mode] = self._active()
        self._auto = {k: v for k, v in auto.items() if k != "active"}
        self._activate(auto["active"])
        return True

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def _train(self) -> LearnedSchedule:
        init = self.init.lower() if isinstance(self.init, str) else None
        auto = self.time_mode_request == "auto"
        self._candidates, self.param, self._mode_from_checkpoint = {}, None, None
        self._auto = {"scores": {}, "seconds": {}, "choice": None} if auto else None
        checkpoint = self._read_checkpoint()  # settings compared before the init's work
        if D.get_world_size() > 1:
            # before any collective the ranks would make differently: a rank without the checkpoint runs
            # init="auto"'s evaluations, which a rank resuming never joins (a hang until the process group timed out)
            held = None if checkpoint is None else \
                tensors_sha256(checkpoint[1]) + canonical_json(json_safe(checkpoint[2]))
            if D.differing_fields({"checkpoint": held}):
                raise CheckpointMismatchError(
                    f"the ranks do not hold the same training checkpoint in {self.checkpoint_dir} (found by only some "
                    "ranks, different files, or resume='never' / --fresh on only some): under torch.distributed the "
                    "checkpoint_dir must be on a filesystem that every rank (every node) sees, and every rank must "
                    "be given the same resume setting")
        # a resumed run keeps the grid it started from (a later auto trial starts from it); recomputing init="auto"
        # could pick another grid (changed candidates, scipy's DMN) and mix two runs. Old checkpoints lack it.
        self._init_grid = self._stored_init(checkpoint)
        if self._init_grid is None:
            grid = self._auto_init() if init == "auto" else self._dmn_init() if init == "dmn" else self.init
            self._init_grid = init_timesteps(self.schedule, self.num_steps, grid)
            if D.get_world_size() > 1:
                # rank 0's grid on every rank: each rank computed its own (scipy's DMN, BLAS), whose last bits may
                # differ between nodes, and ranks starting apart would drift apart without an error
                self._init_grid = self._init_grid.clone()
                D.broadcast_([self._init_grid])
        first = self._new_candidate(TIME_MODES[0] if auto else self.time_mode_request, self._init_grid)
        if auto:
            self._candidates[first["time_mode"]] = first
        resumed = self._try_resume(checkpoint)
        if D.get_world_size() > 1:
            lo, hi = D.reduce_scalars([float(resumed)], op="min") + D.reduce_scalars([float(resumed)], op="max")
            if lo != hi:
                raise CheckpointMismatchError(
                    f"only some ranks found the training checkpoint in {self.checkpoint_dir}: under torch.distributed "
                    "the checkpoint_dir must be on a filesystem that every rank (every node) sees")
        total_rounds = self.rounds_v1 + self.rounds_v2
        if self._auto is not None and self._auto["choice"] is None:  # _auto is None if an explicit checkpoint was resumed
            self._select_time_mode()
        self._run_rounds(total_rounds, final=True)
        result = self.current_schedule(best=True)
        if self.checkpoint_dir is not None:
            if D.is_rank0():
                result.save(os.path.join(self.checkpoint_dir, SCHEDULE_FILE))
            D.barrier()
        return result

    def _select_time_mode(self):
        """time_mode="auto": train each mode for the trial rounds (resuming where a checkpoint left off), keep the one
        with the lower validation loss (select_on's, hard by default) as the active candidate and drop the others.
        Only the trainer's own validation set is used.  Ties go to the first mode ("lambda", the paper's pixel-space choice)."""
        a, trial = self._auto, self._trial_rounds()
        failure: Optional[Exception] = None
        for mode in TIME_MODES:
            if mode in a["scores"]:
                continue  # its trial finished before an interruption
            if mode in self._candidates:
                self._activate(mode)
            else:
                if self.param is not None:
                    self._candidates[self.time_mode] = self._active()
                self._candidates[mode] = self._new_candidate(mode, self._init_grid)
            try:
                self._run_rounds(trial, final=False)
                a["scores"][mode] = self.st["best_metric"]
            except (FloatingPointError, ModelOutputError) as e:  # a diverging mode is dropped (as init="auto" drops
                # a bad grid); NonFiniteLossError is a FloatingPointError
                warnings.warn(f"time_mode='auto': the {mode!r} trial failed ({e}); it is not a candidate")
                a["scores"][mode] = None
                failure = failure or e  # if every mode fails, the first error is raised
                del self._candidates[mode]
                self.param = None  # its state is never stored, checkpointed or activated again
            a["seconds"][mode] = round(self.st["elapsed"], 3)
            self._save_checkpoint()
        finite = {k: v for k, v in a["scores"].items() if v is not None and math.isfinite(v)}
        if not finite:
            if isinstance(failure, NonFiniteLossError) and failure.saved_to and failure.schedule is not None:
                # the run failed: the first trial's last good schedule becomes the run's own
                saved = os.path.join(self.checkpoint_dir, LAST_GOOD_FILE)
                if D.is_rank0():
                    saved = failure.schedule.save(saved)
                self._remove_trial_files()
                failure = NonFiniteLossError(str(failure).replace(failure.saved_to, saved), failure.iteration,
                                             failure.schedule, saved)
            raise failure or NonFiniteLossError("time_mode='auto': every candidate mode failed", 0, None, None)
        a["choice"] = min(finite, key=finite.get)
        self._activate(a["choice"])
        self._candidates = {a["choice"]: self._active()}  # the others are no longer needed
        self._remove_trial_files()  # before the checkpoint: once it records the choice, no selection runs again
        self._save_checkpoint()

    def _run_rounds(self, until: int, final: bool):
        """Train the active candidate until ``until`` rounds are done (or it stops early); ``final``: the end of
        training (record the stop reason)."""
        st, d = self.st, self._data
        if st["init_metric"] is None:  # a fresh candidate
            with torch.no_grad():
                t, tm = self.param()
            fails: Dict[str, Exception] = {}  # a model failure on one rank: NaN in the reduction, every rank stops
            st["init_metric"] = self._eval_set(d["z_valid"], d["y_valid"], d["c_valid"], t, tm, fails, "init")
            if fails and D.get_world_size() == 1:
                raise fails["init"]
            if not math.isfinite(st["init_metric"]):
                why = f"the model failed: {fails['init']}" if fails else "check the model/teacher"
                raise FloatingPointError(f"the initial validation loss is {st['init_metric']}: {why}")
            # at the start the relaxed noises are the original ones, so hard == soft
            st["best_metric"] = st["init_metric"]
        n_tr = d["z_train"].shape[0]
        n_batches = math.ceil(n_tr / self.batch_size)
        n_val_batches = math.ceil(d["z_valid"].shape[0] / self.batch_size)
        bar = None
        if self.progress and D.is_rank0() and st["round"] < until and not st["done"]:
            from tqdm.auto import tqdm
            desc = f"LD3 nfe={self.nfe}" + (f" {self.time_mode}" if self._auto is not None else "")
            bar = tqdm(total=until * n_batches, initial=min(st["iteration"], until * n_batches), desc=desc, leave=False)
        every = self._valid_every()
        t_start = time.perf_counter() - st["elapsed"]
        # a finished run entered again (a re-run of a finished training): nothing trains, so nothing is timed or
        # saved -- a few microseconds more in "elapsed" changed train_seconds at its third decimal now and then,
        # and with it the schedule file a re-run must leave untouched
        finished = st["done"] and st["stage"] == "start"
        if st["done"] and st["stage"] != "start":
            # resumed from a checkpoint written in the iteration that stopped training early (checkpoint_every),
            # before that round was counted: count it, as the run that went on did
            st["round"] += 1
            st["stage"] = "start"
        try:
            while st["round"] < until and not st["done"]:
                phase = 1 if st["round"] < self.rounds_v1 else 2
                if st["stage"] == "start":
                    if st["round"] > 0:
                        self._load_best_params(latents=False)
                    st["perm"] = torch.randperm(n_tr, generator=self.gen)
                    st["batch_pos"], st["valid_moved"], st["stage"] = 0, False, "train"
                if st["stage"] == "train":
                    while st["batch_pos"] < n_batches and not st["done"]:
                        pos = st["batch_pos"]
                        idx = st["perm"][pos * self.batch_size:(pos + 1) * self.batch_size].to(self.device)
                        ref, prop = self._relax_step(idx, "z_train", "y_train", "c_train", True, phase)
                        st["iteration"] += 1
                        info = {"iteration": st["iteration"], "round": st["round"] + 1, "phase": phase,
                                "train_loss": float(ref.mean())}
                        if D.get_world_size() > 1:  # ref holds this rank's part of the batch
                            tot, cnt = D.reduce_scalars([float(ref.sum()), ref.numel()])
                            info["train_loss"] = tot / cnt
                        if st["iteration"] % every == 0 or pos == n_batches - 1:
                            info.update(self._validate(phase))
                        self._accept(idx, "z_train", "y_train", "c_train", ref, prop)
                        st["batch_pos"] = pos + 1
                        st["elapsed"] = time.perf_counter() - t_start
                        self.history.append(info)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix({k: f"{v:.4g}" for k, v in info.items() if k.startswith(("train", "valid"))})
                        if self.checkpoint_every is not None and st["iteration"] % self.checkpoint_every == 0:
                            self._save_checkpoint()
                        if self.callback is not None:
                            self.callback(self, info)
                    st["stage"] = "valid_latents"
                if st["stage"] == "valid_latents":
                    if self.radius() > 0 and not st["done"]:
                        # the paper relaxes the validation noises too (soft validation loss); xi, xi^c frozen
                        for b in range(n_val_batches):
                            idx = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, d["z_valid"].shape[0]),
                                               device=self.device)
                            ref, prop = self._relax_step(idx, "z_valid", "y_valid", "c_valid", False, phase)
                            st["valid_moved"] |= self._accept(idx, "z_valid", "y_valid", "c_valid", ref, prop)
                        if not st["valid_moved"]:
                            st["shift_lr"] *= 0.5
                    st["round"] += 1
                    st["stage"] = "start"
                    st["elapsed"] = time.perf_counter() - t_start
                    self._save_checkpoint()
            if final and not finished:
                if st["stop_reason"] is None:
                    st["stop_reason"] = "max rounds"
                st["done"] = True
                st["elapsed"] = time.perf_counter() - t_start
                self._save_checkpoint()
        except ModelOutputError as e:
            self._nonfinite(f"the model failed: {e}")
        except DegenerateGridError as e:  # as a NaN loss would be: the last good schedule is saved first
            self._nonfinite(f"the grid degenerated: {e}")
        except NonFiniteParameterError as e:  # a diverged step left NaN logits or shifts: the same rescue
            self._nonfinite(f"{e}")
        finally:
            if bar is not None:
                bar.close()


__all__ = ["LD3Trainer", "NonFiniteLossError", "CheckpointMismatchError", "check_nfe"]
