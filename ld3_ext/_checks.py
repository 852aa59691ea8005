"""Argument checks shared by the public API: each returns the checked value or raises an exception naming the
argument (a TypeError for a value of the wrong kind, a ValueError for one out of range).

* :func:`count` -- an int (a bool or a float is not truncated) >= a minimum (and optionally <= a maximum);
* :func:`real` -- a real number (as :func:`ld3_ext.schedules._num` reads one: 0-d tensors and numpy scalars too,
  not bools or strings), finite, optionally within bounds;
* :func:`flag` -- a bool (``bool("False")`` is True: strings, numbers and None are refused, numpy bools are bools);
* :func:`seed` -- an int in [0, 2**63) (what ``torch.Generator.manual_seed`` takes);
* :func:`guidance` -- a classifier-free guidance scale: None or a finite real number (never a parsed string);
* :func:`holds_values` -- a tensor that is not on the meta device (which holds no values: a check or solve on it
  fails later, inside torch, naming nothing).
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Optional

from .schedules import _num

if TYPE_CHECKING:  # the annotation of torch_device (which imports torch where it runs)
    import torch

#: seeds are ints in [0, SEED_END)
SEED_END = 2 ** 63


def count(name: str, v, least: int = 1, most: Optional[int] = None, *, none_ok: bool = False,
          type_error: bool = True) -> Optional[int]:
    """``v`` as an int in [least, most] (``most=None``: no upper bound); None passes when ``none_ok``.

    A value that is not an int (a bool, a float, a str) raises TypeError, or ValueError with
    ``type_error=False`` (the older checks' exception, which their callers keep)."""
    if v is None and none_ok:
        return None
    rule = f"an int >= {least}" if most is None else f"an int in {least}..{most}"
    rule = f"None or {rule}" if none_ok else rule
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise (TypeError if type_error else ValueError)(f"{name} must be {rule}, got {v!r}")
    if v < least or (most is not None and v > most):
        raise ValueError(f"{name} must be {rule}, got {v!r}")
    return int(v)


def _bound(x: float) -> str:
    return f"{x:g}"


def real(name: str, v, *, above: Optional[float] = None, at_least: Optional[float] = None,
         below: Optional[float] = None, at_most: Optional[float] = None) -> float:
    """``float(v)`` for a finite real number within the bounds given (``above``/``below`` exclusive,
    ``at_least``/``at_most`` inclusive); TypeError for what is not a real number, ValueError for NaN, Inf or a
    value out of range (an int too large for a float too)."""
    lo, lo_open = (above, True) if above is not None else (at_least, False)
    hi, hi_open = (below, True) if below is not None else (at_most, False)
    if lo is not None and hi is not None:
        rule = f"a number in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"a finite number {'>' if lo_open else '>='} {_bound(lo)}"
    elif hi is not None:
        rule = f"a finite number {'<' if hi_open else '<='} {_bound(hi)}"
    else:
        rule = "a finite number"
    try:
        x = _num(name, v, finite=False)
    except TypeError:
        raise TypeError(f"{name} must be {rule}, got {v!r}") from None
    except ValueError:  # an int beyond the float range
        raise ValueError(f"{name} must be {rule}, got {v!r}") from None
    ok = math.isfinite(x) and (lo is None or (x > lo if lo_open else x >= lo)) and \
        (hi is None or (x < hi if hi_open else x <= hi))
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {v!r}")
    return x


def flag(name: str, v) -> bool:
    """``v`` as a bool, or a TypeError naming the flag: ``bool("False")`` is True, so strings, numbers and None are
    refused rather than coerced (numpy bools are real bools)."""
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool")):
        return bool(v)
    raise TypeError(f"{name} must be a bool (True or False), got {v!r}")


def seed(name: str, v) -> int:
    """``v`` as an int in [0, 2**63) (a bool or a float is not a seed); ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < SEED_END:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
    return int(v)


__all__ = ["count", "real", "flag", "seed", "SEED_END"]


def holds_values(name: str, t) -> None:
    """A ValueError naming ``name`` for a tensor on the meta device (shapes only, no values)."""
    if getattr(getattr(t, "device", None), "type", None) == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no values); use a cpu or cuda tensor")


def guidance(name: str, v) -> Optional[float]:
    """None, or ``v`` as a finite float: a str ("7.5") is refused, not parsed, and True is not a scale of 1.0."""
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or type(v).__name__ in ("bool_", "bool") \
            or not isinstance(v, numbers.Real) and not hasattr(v, "__float__"):
        raise TypeError(f"{name} must be a number or None, got {v!r}")
    try:
        return real(name, v)
    except TypeError:
        raise TypeError(f"{name} must be a number or None, got {v!r}") from None


def torch_device(where: str, device) -> "torch.device":
    """``device`` (a torch.device, "cuda:0", an index) as a torch.device, or a ValueError naming ``where``'s
    ``device`` argument (torch's own message names no argument)."""
    import torch
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{where}: device={device!r} names no torch device ({exc})") from None


def data_device(where: str, device):
    """``device`` (None kept) as a torch.device that holds data and this torch can use, or a ValueError naming
    ``where``'s ``device``: what LD3Trainer and the teacher generators check before any work."""
    if device is None:
        return None
    device = torch_device(where, device)
    if device.type == "meta":
        raise ValueError(f"{where}: device='meta' holds no data: a real device (cpu/cuda) is needed")
    usable_device(f"{where}: ", device)
    return device


def usable_device(where: str, dev) -> None:
    """A device this torch can use, or a ValueError naming ``where``'s ``device`` with torch's reason ("not compiled
    with CUDA enabled", "not linked with support for mps devices", an invalid CUDA ordinal, a bad name).  A zero-size
    allocation is the probe: the calls that then use the device fail with torch's bare error otherwise."""
    import torch
    try:
        d = torch.device(dev)
        if d.type == "cuda" and d.index is not None and torch.cuda.is_available() \
                and d.index >= torch.cuda.device_count():
            raise RuntimeError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.empty(0, device=d)
    except Exception as e:  # noqa: BLE001 - AssertionError (no CUDA), RuntimeError (backend, ordinal, bad name)
        raise ValueError(f"{where}device={str(dev)!r} cannot be used: {e}") from e
