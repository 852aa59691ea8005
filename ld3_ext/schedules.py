"""Continuous-time noise schedules.

Every schedule describes the forward process x_t = alpha(t) x_0 + sigma(t) eps through
differentiable torch functions of t, in the schedule's own time unit:

* ``alpha(t)``, ``sigma(t)``, ``lambda_(t)`` = log(alpha/sigma) (half log-SNR),
* ``inverse_lambda(lam)`` -- the exact inverse of ``lambda_``,
* ``edm_sigma(t)`` = sigma/alpha -- the "variance exploding" view used by EDM / k-diffusion,
* ``t_from_edm_sigma(s)`` -- its inverse,
* ``t_min`` / ``t_max`` -- the sampling range (t_max is the noisiest time).

Closed-form schedules also expose ``native_spec()`` = (kind id, params) so the C++ extension can
recompute alpha/sigma/lambda itself (see ``csrc/solver_coefficients.h``).  Everything works in
float64 when t is float64.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence

import torch

from .device_constants import cached_constants

# Kind ids shared with the native coefficient code (csrc/noise_schedule_math.h).
KIND_EDM = 0
KIND_VP_LINEAR = 1
KIND_VP_COSINE = 2
KIND_FLOW = 3


def _as_tensor(t, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


_LN2 = math.log(2.0)


#: relative tolerance of NoiseSchedule.same_as on each number of two configs
SAME_AS_RTOL = 1e-5


def _close_configs(a, b, rtol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close_configs(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close_configs(x, y, rtol) for x, y in zip(a, b))
    real = (numbers.Real,)
    if isinstance(a, real) and isinstance(b, real) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return type(a) is type(b) and a == b


def describe_schedule(cfg) -> str:
    """A short description of a schedule config for messages: lists (a VPDiscrete's 1000 alphas_cumprod) are
    summarised by their length and ends, not printed."""
    if not isinstance(cfg, dict):
        return repr(cfg)[:200]

    def show(v):
        if isinstance(v, (list, tuple)) and len(v) > 4:
            return f"[{len(v)} values, {v[0]:.6g} .. {v[-1]:.6g}]" if all(
                isinstance(x, numbers.Real) for x in (v[0], v[-1])) else f"[{len(v)} values]"
        return repr(v) if isinstance(v, str) else str(v)
    fields = ", ".join(f"{k}={show(v)}" for k, v in cfg.items() if k != "type")
    return f"{cfg.get('type', '?')}({fields})"


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012): log(-expm1(x)) for x > -ln 2, and
    log1p(-exp(x)) below, where 1 - exp(x) rounds towards 1 and its log (and the gradient of expm1, which
    autograd forms as expm1(x) + 1) loses relative precision.  A VP schedule's log sigma = log1mexp(2 log alpha) / 2.
    Each branch gets a clamped x, so the unused one stays finite (and so does its zero gradient).
    Same switch as log1mexp in csrc/noise_schedule_math.h."""
    near0 = torch.log(-torch.expm1(torch.clamp(x, min=-_LN2)))
    below = torch.log1p(-torch.exp(torch.clamp(x, max=-_LN2)))
    return torch.where(x > -_LN2, near0, below)


def _num(name: str, v, finite: bool = True) -> float:
    """float(v), or a TypeError (not a number) / ValueError (NaN, Inf or too large) naming the argument."""
    if isinstance(v, (bool, str)) or not hasattr(v, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{name} must be a finite number, got an int too large for a float") from None
    except (TypeError, ValueError) as e:  # complex, multi-element arrays
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}: {e}") from None
    if finite and not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


# the primitives the coefficient table reads, which the C++ code replaces with its own closed form when
# native_spec() names one (lambda_, alpha and sigma derive from them; a subclass may restate those for precision)
_NATIVE_FORMULAS = ("log_alpha", "log_sigma")


def _unless_patched(native_spec):
    """native_spec, but None for an instance whose formulas were replaced on the instance itself
    (``s.log_sigma = ...``): the C++ code would not see the replacement."""
    def checked(self):
        if any(name in self.__dict__ for name in _NATIVE_FORMULAS):
            return None
        return native_spec(self)
    checked.__name__, checked.__qualname__, checked.__doc__ = (native_spec.__name__, native_spec.__qualname__,
                                                               native_spec.__doc__)
    checked.__wrapped__ = native_spec
    return checked


class NoiseSchedule:
    """Base class. Subclasses implement ``log_alpha``, ``sigma``-side and ``inverse_lambda``."""

    name = "base"
    #: the time range used for sampling; subclasses set these
    t_min: float
    t_max: float

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # native_spec() names the closed form the C++ coefficient code computes: a subclass whose log_alpha or
        # log_sigma comes from a class more derived than the one giving native_spec (its own body, or a mixin
        # listed before the parent) would silently get its parent's coefficients there
        def owner(attr):
            return next(i for i, k in enumerate(cls.__mro__) if attr in k.__dict__)
        if min(owner(a) for a in _NATIVE_FORMULAS) < owner("native_spec"):
            cls.native_spec = NoiseSchedule.native_spec
        elif "native_spec" in cls.__dict__:
            cls.native_spec = _unless_patched(cls.__dict__["native_spec"])

    # --- the three primitives -------------------------------------------------------
    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- derived quantities ---------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def sigma(self, t) -> torch.Tensor:
        return torch.exp(self.log_sigma(_as_tensor(t)))

    def lambda_(self, t) -> torch.Tensor:
        t = _as_tensor(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def edm_sigma(self, t) -> torch.Tensor:
        """sigma/alpha: the noise level in the scaled (variance exploding) view."""
        t = _as_tensor(t)
        return torch.exp(self.log_sigma(t) - self.log_alpha(t))

    def t_from_edm_sigma(self, s) -> torch.Tensor:
        return self.inverse_lambda(-torch.log(_as_tensor(s)))

    @property
    def lambda_min(self) -> float:
        """lambda at t_max (noisiest)."""
        return float(self.lambda_(torch.tensor(self.t_max, dtype=torch.float64)))

    @property
    def lambda_max(self) -> float:
        """lambda at t_min (cleanest)."""
        return float(self.lambda_(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of x at t_max when the data has unit scale: sqrt(alpha^2 + sigma^2)."""
        t = torch.tensor(self.t_max, dtype=torch.float64)
        return float(torch.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2))

    def prior_std(self) -> float:
        """Std of the Gaussian that x_T is drawn from (sigma(t_max))."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def native_spec(self):
        """(kind id, [params]) for the C++ coefficient code, or None when only Python can do it."""
        return None

    def _check_ends(self):
        """Constructor check: alpha and sigma finite and > 0 at t_min and t_max, lambda decreasing.  Finite
        parameters can still be extreme enough (beta_max=1e300, t_max=1e10) for alpha to underflow to 0,
        which turns every grid and solver coefficient into NaN/Inf later, far from the cause."""
        t = torch.tensor([self.t_min, self.t_max], dtype=torch.float64)
        la, ls = self.log_alpha(t), self.log_sigma(t)
        ok = bool(torch.isfinite(la).all() and torch.isfinite(ls).all() and torch.exp(la).gt(0).all()
                  and torch.exp(ls).gt(0).all())
        if not ok or not float(la[1] - ls[1]) < float(la[0] - ls[0]):
            raise ValueError(f"{type(self).__name__}: parameters {self.config()} give alpha(t)={torch.exp(la).tolist()}, "
                             f"sigma(t)={torch.exp(ls).tolist()} at (t_min, t_max); need both finite and > 0 "
                             "and lambda decreasing (a parameter is out of its usable range)")

    def config(self) -> dict:
        """JSON-serialisable description (used by schedule files)."""
        raise NotImplementedError

    def to(self, device) -> "NoiseSchedule":
        return self

    # --- comparisons and grid checks (one definition for solvers, files, training and the CLI) ------
    def same_as(self, other) -> bool:
        """True when ``other`` (a NoiseSchedule or a config dict) describes the same noise levels: times of a
        grid learned on one mean the same alpha and sigma on the other.  Compared field by field, numbers to
        ``SAME_AS_RTOL`` relative: the same schedule built two ways (``VPDiscrete.linear`` in float64, or from a
        diffusers config, whose betas diffusers makes in float32) differs by ~1e-6 and is the same schedule."""
        if isinstance(other, NoiseSchedule):
            other = other.config()
        elif isinstance(other, dict):
            try:  # with its defaults filled in: {"type": "EDM"} is EDM() (a file may hold the short form)
                other = schedule_from_config(dict(other)).config()
            except (TypeError, ValueError, KeyError):
                pass  # compared as it is (and found different)
        else:
            return False
        return _close_configs(self.config(), other, SAME_AS_RTOL)

    def time_slack(self) -> float:
        """Round-off allowed when checking a grid against [t_min, t_max] or its fixed endpoints: 1e-6 of the
        time span (a float32 grid, or one read back from a file, may miss an endpoint by an ulp)."""
        return 1e-6 * (self.t_max - self.t_min) + 1e-12

    def __repr__(self) -> str:
        return describe_schedule(self.config())


class EDM(NoiseSchedule):
    """Variance exploding, t = sigma (Karras et al. 2022): alpha = 1, sigma = t."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        sigma_min, sigma_max = _num("EDM: sigma_min", sigma_min), _num("EDM: sigma_max", sigma_max)
        if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
            raise ValueError(f"EDM: need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def log_alpha(self, t):
        return torch.zeros_like(t)

    def log_sigma(self, t):
        return torch.log(t)

    def inverse_lambda(self, lam):
        return torch.exp(-_as_tensor(lam))

    # sigma = sigma/alpha = t exactly: exp(log t) is off by an ulp for about half of all t, so k-diffusion
    # sigmas exported from a grid (and the sigma a denoiser is called with) would not be the grid's values
    def sigma(self, t) -> torch.Tensor:
        return _as_tensor(t).clone()

    def edm_sigma(self, t) -> torch.Tensor:
        return _as_tensor(t).clone()

    def t_from_edm_sigma(self, s) -> torch.Tensor:
        return _as_tensor(s).clone()

    def native_spec(self):
        return KIND_EDM, [0.0, 0.0]

    def config(self):
        return {"type": "EDM", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPLinear(NoiseSchedule):
    """Continuous VP-SDE with linear beta(t) (Song et al. 2021)."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_max: float = 1.0, t_min: float = 1e-3):
        beta_min, beta_max = _num("VPLinear: beta_min", beta_min), _num("VPLinear: beta_max", beta_max)
        t_min, t_max = _num("VPLinear: t_min", t_min), _num("VPLinear: t_max", t_max)
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"VPLinear: need 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        if not (0 < t_min < t_max):
            raise ValueError(f"VPLinear: need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._check_ends()

    def log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t):
        # sigma^2 = 1 - alpha^2, precise near t = 0 and where alpha is small
        return 0.5 * _log1mexp(2.0 * self.log_alpha(t))

    def inverse_lambda(self, lam):
        lam = _as_tensor(lam)
        b0, b1 = self.beta_min, self.beta_max
        L = torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))  # = -2 log alpha
        # sqrt(b0^2 + 2 (b1 - b0) L) as sqrt(c) sqrt(b0 (b0/c) + 2 ((b1 - b0)/c) L), c = max(b0, b1 - b0): the
        # squares underflowed for betas below ~1e-154, which the constructor accepts (VPLinear(0, 1e-160) mapped
        # lambda(1e-3) back to t = 4e141)
        c = max(b0, b1 - b0)
        den = math.sqrt(c) * torch.sqrt(b0 * (b0 / c) + 2.0 * ((b1 - b0) / c) * L) + b0
        # den is 0 only at L = 0 with beta_min = 0 (sigma = 0: t = 0, not 0/0); L = inf is t = inf, not inf/inf
        t = 2.0 * L / den.clamp_min(torch.finfo(den.dtype).tiny)
        return torch.where(torch.isinf(L), L, t)

    def native_spec(self):
        return KIND_VP_LINEAR, [self.beta_min, self.beta_max]

    def config(self):
        return {"type": "VPLinear", "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min, "t_max": self.t_max}


class VPCosine(NoiseSchedule):
    """Cosine VP schedule (Nichol & Dhariwal 2021), continuous time in [t_min, t_max]."""

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_max: Optional[float] = None, t_min: float = 1e-3):
        self.s = _num("VPCosine: s", s)
        if not 0 <= self.s < 1.0:
            raise ValueError(f"VPCosine: need 0 <= s < 1, got s={s}")
        # alpha reaches 0 at t = 1; DPM-Solver's end time T = 0.9946 (lambda(T) = -4.78 for s = 0.008)
        if t_max is None:
            t_max = 0.9946
        t_min, t_max = _num("VPCosine: t_min", t_min), _num("VPCosine: t_max", t_max)
        if not (0 < t_min < t_max < 1.0):
            raise ValueError(f"VPCosine: need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        # theta(t) = (t + s) c with c = (pi/2)/(1 + s); alpha = cos(theta)/cos(theta0), theta0 = s c.
        # Same constants, in the same order, as csrc/noise_schedule_math.h.
        self._c = (math.pi / 2.0) / (1.0 + self.s)
        theta0 = self.s * self._c
        self._sin0, self._cos0, self._tan0 = math.sin(theta0), math.cos(theta0), math.tan(theta0)
        self._log_alpha0 = math.log(self._cos0)
        self._check_ends()

    def log_alpha(self, t):
        """log(cos(theta0 + t c) / cos(theta0)) without cancellation at either end (each branch keeps float32
        relative precision; log(cos(theta)) - log(cos(theta0)) lost it near t = 0, cos(theta) near t = 1):

        * t < 1/2: cos(theta0 + d)/cos(theta0) = 1 - 2 sin^2(d/2) - tan(theta0) sin(d), d = t c, through log1p;
        * t >= 1/2: cos(theta) = sin((1 - t) c), where 1 - t is exact.
        Each branch gets a clamped t, so the unused one stays finite (and so does its zero gradient)."""
        d = torch.clamp(t, max=0.5) * self._c
        h = torch.sin(0.5 * d)
        near0 = torch.log1p(-2.0 * (h * h) - self._tan0 * torch.sin(d))
        near1 = torch.log(torch.sin((1.0 - torch.clamp(t, min=0.5)) * self._c)) - self._log_alpha0
        return torch.where(t < 0.5, near0, near1)

    def log_sigma(self, t):
        return 0.5 * _log1mexp(2.0 * self.log_alpha(t))

    def inverse_lambda(self, lam):
        """t = d / c with d = theta - theta0, cos(theta) = alpha cos(theta0), from an atan2 of sin(d) and cos(d)
        written with positive terms only (t = 2(1+s)/pi arccos(alpha cos(theta0)) - s loses float32 precision
        where alpha ~ 1, and the - s near t = 0):
        sin(theta) = sqrt(sin0^2 + cos0^2 sigma^2), sin(d) = cos0 sigma^2 / (sin(theta) + alpha sin0),
        cos(d) = alpha cos0^2 + sin(theta) sin0, with alpha^2 = sigmoid(2 lam), sigma^2 = sigmoid(-2 lam)."""
        lam = _as_tensor(lam)
        alpha = torch.exp(-0.5 * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam)))
        if self.s == 0.0:  # theta0 = 0, d = theta: the form below would divide 0 by 0 where sigma underflows
            return torch.atan2(torch.exp(0.5 * torch.nn.functional.logsigmoid(-2.0 * lam)), alpha) / self._c
        # sigma^2 = sigmoid(-2 lam); where it nears 1 (lam < 0) through logsigmoid, whose gradient keeps its digits
        # (sigmoid's, y (1 - y), loses them as y -> 1)
        sigma2 = torch.where(lam < 0, torch.exp(torch.nn.functional.logsigmoid(-2.0 * lam)), torch.sigmoid(-2.0 * lam))
        sin0, cos0 = self._sin0, self._cos0
        sin_theta = torch.sqrt(sin0 * sin0 + cos0 * cos0 * sigma2)
        d = torch.atan2(cos0 * sigma2 / (sin_theta + alpha * sin0), alpha * (cos0 * cos0) + sin_theta * sin0)
        return d / self._c

    def native_spec(self):
        return KIND_VP_COSINE, [self.s, 0.0]

    def config(self):
        return {"type": "VPCosine", "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


class FlowMatching(NoiseSchedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t.

    ``shift`` applies the SD3/Flux time shift to the time-based discretizations ("time_uniform",
    "time_quadratic": t' = shift t / (1 + (shift-1) t)); the schedule itself is unchanged, and so are the grids
    defined by the schedule's own quantities ("logsnr" uniform in lambda, "edm" in sigma/alpha), which a shift
    of t does not move.
    """

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3, shift: float = 1.0):
        t_min, t_max = _num("FlowMatching: t_min", t_min), _num("FlowMatching: t_max", t_max)
        shift = self.check_shift(shift)
        if not (0 < t_min < t_max < 1.0):
            raise ValueError(f"FlowMatching: need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        # discretizations map the shifted [t_min, t_max] affinely back onto itself: an extreme shift
        # (1e300, 1e-300) maps both ends to the same float, a division by zero there and no resolution before
        def f(u):
            return shift * u / (1.0 + (shift - 1.0) * u)
        if not f(t_max) - f(t_min) > 1e-8:
            raise ValueError(f"FlowMatching: shift={shift} is too extreme: it maps t_min and t_max to "
                             f"{f(t_min)} and {f(t_max)}, which float64 cannot resolve")
        self.t_min, self.t_max, self.shift = float(t_min), float(t_max), float(shift)

    @staticmethod
    def check_shift(shift) -> float:
        """``shift`` as a float: a finite number > 0, else a TypeError / ValueError naming it.  The one rule for
        a shift, wherever it is read (the diffusers integration raises this error as its config error)."""
        shift = _num("FlowMatching: shift", shift)
        if not shift > 0:
            raise ValueError(f"FlowMatching: shift must be > 0, got {shift}")
        return shift

    def log_alpha(self, t):
        return torch.log1p(-t)

    def log_sigma(self, t):
        return torch.log(t)

    def inverse_lambda(self, lam):
        return torch.sigmoid(-_as_tensor(lam))

    def native_spec(self):
        return KIND_FLOW, [0.0, 0.0]

    def config(self):
        return {"type": "FlowMatching", "t_min": self.t_min, "t_max": self.t_max, "shift": self.shift}


def _real_1d(name: str, values) -> torch.Tensor:
    """``values`` as a 1-D float64 tensor, or an exception naming ``name`` (complex values lost their imaginary
    part to the cast, a 2-D table was flattened, a string failed inside torch)."""
    dtype = getattr(values, "dtype", None)  # a tensor's or an array's: checked before any cast
    if dtype is not None:
        kind = getattr(dtype, "kind", None)  # numpy
        real = (kind in ("f", "i", "u")) if kind is not None else (
            isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype in _INT_DTYPES))
        if not real:
            raise TypeError(f"VPDiscrete: {name} must be real numbers, got {dtype}")
    try:  # straight to float64: a list of Python floats must not pass through float32
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # OverflowError: an int like 10**400
        raise TypeError(f"VPDiscrete: {name} must be a 1-D sequence of real numbers, got "
                        f"{type(values).__name__}") from None
    if t.dim() != 1:
        raise ValueError(f"VPDiscrete: {name} must be 1-D, got shape {tuple(t.shape)}")
    return t


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class VPDiscrete(NoiseSchedule):
    """A discrete-time DDPM schedule (betas or alphas_cumprod) made continuous as DPM-Solver does.

    log alpha is piecewise linear in t on the knots t_n = (n+1)/N, n = 0..N-1; t in [1/N, 1].
    The network's integer-index input is ``index = t*N - 1`` (``model_index``), 0..N-1.
    """

    name = "vp_discrete"

    def __init__(self, betas: Optional[Sequence[float]] = None, alphas_cumprod: Optional[Sequence[float]] = None,
                 t_min: Optional[float] = None, t_max: float = 1.0):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VPDiscrete: give exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            b = _real_1d("betas", betas)
            if b.numel() < 2 or not torch.all((b > 0) & (b < 1)):
                raise ValueError("VPDiscrete: betas must hold at least 2 values in (0, 1)")
            log_ac = torch.cumsum(torch.log1p(-b), 0)
            # config() stores alphas_cumprod, which must read back as a valid schedule: not rounded to 1 (a beta
            # below float64's resolution), not underflowed to 0 (thousands of large betas), strictly decreasing
            ac = torch.exp(log_ac)
            if not (torch.all((ac > 0) & (ac < 1)) and torch.all(ac[1:] < ac[:-1])):
                raise ValueError("VPDiscrete: betas give alphas_cumprod that float64 cannot hold as a strictly "
                                 "decreasing sequence in (0, 1) (a beta below ~1e-16, or alphas_cumprod underflowing "
                                 "to 0): such a schedule could not be saved and loaded again")
        else:
            ac = _real_1d("alphas_cumprod", alphas_cumprod)
            if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)):
                raise ValueError("VPDiscrete: alphas_cumprod must hold at least 2 values in (0, 1)")
            if not torch.all(ac[1:] < ac[:-1]):
                raise ValueError("VPDiscrete: alphas_cumprod must be strictly decreasing")
            log_ac = torch.log(ac)
        self.num_train_timesteps = int(log_ac.numel())
        n = self.num_train_timesteps
        self._t_knots = torch.linspace(1.0, n, n, dtype=torch.float64) / n
        self._log_alpha_knots = 0.5 * log_ac
        self.t_min = float(1.0 / n) if t_min is None else _num("VPDiscrete: t_min", t_min)
        self.t_max = _num("VPDiscrete: t_max", t_max)
        if not (1.0 / n - 1e-12 <= self.t_min < self.t_max <= 1.0 + 1e-12):
            raise ValueError(f"VPDiscrete: need 1/N <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        lam = self._log_alpha_knots - 0.5 * _log1mexp(2.0 * self._log_alpha_knots)
        self._lambda_knots = lam  # decreasing in t
        self._knots_on: Dict = {}  # device copies of the knots (device_constants.cached_constants)

    def _knots(self, like):
        """The knots on ``like``'s device in its dtype, copied there once (``device_constants``): a sampler reads
        them about twice a step (alpha and sigma of the eps/v conversion)."""
        if not like.is_floating_point():  # integer times: the knots must not be truncated to integers
            raise TypeError(f"VPDiscrete: times must be a floating tensor, got {like.dtype} (use t.double(); the "
                            "network's integer index is model_index(t))")
        return cached_constants(self._knots_on, "knots", like.device, like.dtype, lambda device, dtype: (
            self._t_knots.to(device=device, dtype=dtype), self._log_alpha_knots.to(device=device, dtype=dtype)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_knots_on"] = {}  # device copies: a pickle made on a GPU machine must load on a CPU-only one
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_knots_on", {})  # a pickle of an earlier version has none

    @staticmethod
    def _interp(x, xp, fp):
        """Piecewise-linear interpolation (linear extrapolation at the ends), differentiable in x."""
        idx = torch.searchsorted(xp.contiguous(), x.detach().contiguous()).clamp(1, xp.numel() - 1)
        # take(), not xp[idx]: indexing by a 0-dim tensor (a sampler's scalar time) reads idx back to the host,
        # a stream sync on a GPU for every read of the schedule, and impossible in a CUDA-graph capture
        x0, x1 = torch.take(xp, idx - 1), torch.take(xp, idx)
        y0, y1 = torch.take(fp, idx - 1), torch.take(fp, idx)
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def log_alpha(self, t):
        tk, lk = self._knots(t)
        return self._interp(t, tk, lk)

    def log_sigma(self, t):
        return 0.5 * _log1mexp(2.0 * self.log_alpha(t))

    def inverse_lambda(self, lam):
        lam = _as_tensor(lam)
        log_alpha = -0.5 * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        tk, lk = self._knots(lam)
        # log alpha decreases in t: interpolate t on the flipped (increasing) arrays
        return self._interp(log_alpha, torch.flip(lk, [0]), torch.flip(tk, [0]))

    def model_index(self, t: torch.Tensor) -> torch.Tensor:
        """The continuous version of the network's integer time index (0..N-1)."""
        return t * self.num_train_timesteps - 1.0

    def t_from_index(self, index) -> torch.Tensor:
        return (_as_tensor(index) + 1.0) / self.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.exp(2.0 * self._log_alpha_knots)

    def config(self):
        return {"type": "VPDiscrete", "alphas_cumprod": self.alphas_cumprod.tolist(),
                "t_min": self.t_min, "t_max": self.t_max}

    @classmethod
    def linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
               scaled: bool = True, **kw) -> "VPDiscrete":
        """Linear betas: by default (``scaled=True``, SD's betas) the LDM/SD "scaled_linear" (linspace in sqrt
        beta); ``scaled=False`` is DDPM's plain "linear" (linspace in beta, e.g. ``linear(1e-4, 0.02,
        scaled=False)``)."""
        betas = []
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            try:  # read as _num reads the constructors' numbers (a 0-d tensor too), not only numbers.Real
                x = _num(name, v)
            except (TypeError, ValueError):
                x = math.nan
            if not 0.0 < x < 1.0:
                raise ValueError(f"VPDiscrete.linear: {name} must be a number in (0, 1), got {v!r}")
            betas.append(x)
        beta_start, beta_end = betas
        if beta_start > beta_end:  # decreasing betas: no published schedule, most likely the two swapped
            raise ValueError(f"VPDiscrete.linear: beta_start ({beta_start}) must not exceed beta_end ({beta_end}); "
                             f"swapped? (SD's are beta_start=0.00085, beta_end=0.012)")
        # any integer (numpy's too, as _checks.count takes): np.int64(10) was refused as "must be an int"
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
                or num_train_timesteps < 2:
            raise ValueError(f"VPDiscrete.linear: num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        num_train_timesteps = int(num_train_timesteps)
        if scaled:
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(betas=betas, **kw)


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    """Rebuild a schedule from ``NoiseSchedule.config()``."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"schedule config must be a dict with a 'type' key, got {cfg!r}")
    kw = {k: v for k, v in cfg.items() if k != "type"}
    types = {"EDM": EDM, "VPLinear": VPLinear, "VPCosine": VPCosine, "FlowMatching": FlowMatching,
             "VPDiscrete": VPDiscrete}
    if not isinstance(cfg["type"], str) or cfg["type"] not in types:  # a list or dict type is unhashable
        raise ValueError(f"unknown schedule type {cfg['type']!r}; expected one of {sorted(types)}")
    return types[cfg["type"]](**kw)


__all__ = ["NoiseSchedule", "EDM", "VPLinear", "VPCosine", "FlowMatching", "VPDiscrete", "schedule_from_config"]
