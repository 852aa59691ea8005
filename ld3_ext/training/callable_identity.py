"""A name for a user's callable (teacher, reference, loss) that changes when what it computes changes.

Caches and checkpoints are keyed on these names; a bare ``__qualname__`` ("<lambda>", "partial") let a changed
callable reuse results made with the old one.  The fingerprint covers a function's code, constants and defaults,
the values its closure captured that cannot change (numbers, strings, tuples of them, tensors by content, nested
functions), the module-level values it reads by the same rule (a constant by value, a helper function of its
module by its own fingerprint), a ``functools.partial``'s function and arguments, and a callable object's class
code.  Captured
mutable state (a dict, a list, an object: call counters, caches, the model) is left out: it changes while the
callable runs, and a key that changed with it would refuse the cache the same run just wrote.  What cannot be
described (a partial argument printed with its address, say) leaves the callable described by name only, and
``describe_callable`` says so, so that the caller can warn.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import types
from typing import Any, Optional, Tuple

import torch

_MAX_DEPTH = 20  # each level of nesting counts about twice (a value, then its callable)


class _Unstable(Exception):
    """A value without a description that is the same in every process (an address, an open file, ...)."""


def _stable(v: Any, depth: int = 0) -> str:
    if depth > _MAX_DEPTH:
        raise _Unstable("nested too deeply")
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return repr(v)
    if isinstance(v, (list, tuple, frozenset, set)):
        items = [_stable(x, depth + 1) for x in v]
        return f"{type(v).__name__}[{','.join(sorted(items) if isinstance(v, (set, frozenset)) else items)}]"
    if isinstance(v, dict):
        return "dict{" + ",".join(sorted(f"{_stable(k, depth + 1)}:{_stable(x, depth + 1)}" for k, x in v.items())) + "}"
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return f"tensor({t.dtype},{tuple(v.shape)},{digest})"
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, types.CodeType):
        return _code(v, depth + 1)
    if isinstance(v, types.ModuleType):
        return f"module:{v.__name__}"
    if callable(v):
        return _callable(v, depth + 1)
    raise _Unstable(type(v).__qualname__)


def _code(code: types.CodeType, depth: int) -> str:
    consts = ",".join(_stable(c, depth + 1) for c in code.co_consts)
    h = hashlib.sha256(code.co_code + consts.encode() + ",".join(code.co_names).encode()).hexdigest()[:16]
    return f"code:{h}"


def _callable(fn: Any, depth: int) -> str:
    if isinstance(fn, functools.partial):
        return (f"partial({_callable(fn.func, depth + 1)};{_stable(fn.args, depth + 1)};"
                f"{_stable(fn.keywords, depth + 1)})")
    if isinstance(fn, types.MethodType):
        return f"method({_callable(fn.__func__, depth + 1)};{_stable(fn.__self__, depth + 1)})"
    if isinstance(fn, types.FunctionType):
        if fn in _visiting.functions:  # recursion, or two helpers calling each other: described once
            return f"{fn.__module__}.{fn.__qualname__}[recursive]"
        _visiting.functions.append(fn)
        try:
            cells = []
            for c in fn.__closure__ or ():
                try:
                    v = c.cell_contents
                except ValueError:  # an empty cell (a name assigned later)
                    continue
                cells.append(_stable(v, depth + 1) if _immutable(v) else f"<{type(v).__qualname__}>")
            reads = _globals_read(fn, depth + 1)  # none: the fingerprint of the versions before it was counted
            return (f"{fn.__module__}.{fn.__qualname__}[{_code(fn.__code__, depth + 1)};"
                    f"{_stable(fn.__defaults__, depth + 1)};{_stable(fn.__kwdefaults__, depth + 1)};"
                    f"{','.join(cells)}{';' + reads if reads else ''}]")
        finally:
            _visiting.functions.pop()
    if isinstance(fn, (types.BuiltinFunctionType, type)):
        return f"{getattr(fn, '__module__', '')}.{fn.__qualname__}"
    if isinstance(fn, torch.nn.Module):
        # by type and parameter shapes, not contents: a network held by a teacher is the trained model, whose
        # weights the cache key covers already (weights_hash), and hashing gigabytes per run would cost minutes
        from ..wrappers import legacy_parameter_name  # names as first fingerprinted (wrappers.legacy_state_dict)
        shapes = [(legacy_parameter_name(fn, k), tuple(p.shape)) for k, p in fn.named_parameters()]
        return f"{type(fn).__module__}.{type(fn).__qualname__}{_stable(shapes, depth + 1)}"
    call = getattr(type(fn), "__call__", None)  # a callable object: its class's code (its state may change)
    if not isinstance(call, types.FunctionType):
        raise _Unstable(type(fn).__qualname__)
    return f"{type(fn).__module__}.{type(fn).__qualname__}[{_code(call.__code__, depth + 1)}]"


def _global_names(code: types.CodeType) -> set:
    """The names a code object (and the comprehensions and lambdas nested in it) looks up globally."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _globals_read(fn: types.FunctionType, depth: int) -> str:
    """The module-level values ``fn`` reads that say what it computes, by the closure cells' rule: a constant
    (SCALE = 0.5) by value, so that editing it changes the fingerprint as editing a captured one does, and a helper
    function of the same module by its own fingerprint.  Left out: modules, classes and other packages' functions
    (their code comes with that package's version) and mutable state (it changes while the callable runs)."""
    g = fn.__globals__
    out = []
    for name in sorted(_global_names(fn.__code__)):
        if name not in g:  # a builtin, or an attribute name (x.flatten)
            continue
        v = g[name]
        if isinstance(v, (types.ModuleType, type)) or not _immutable(v):
            continue
        if isinstance(v, types.FunctionType) and v.__module__ != fn.__module__:
            continue
        out.append(f"{name}={_stable(v, depth + 1)}")
    return ",".join(out)


class _Visiting(threading.local):
    def __init__(self):
        self.functions = []


_visiting = _Visiting()


def _module_weights(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    from ..wrappers import legacy_state_dict  # the layout fingerprints were first made over (wrappers.py)
    for k, v in legacy_state_dict(module).items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}:{t.dtype}:{tuple(v.shape)}:".encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _immutable(v: Any) -> bool:
    """A captured value that cannot change while the callable runs (so it may key a cache)."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, types.CodeType)):
        return True
    if isinstance(v, (tuple, frozenset)):
        return all(_immutable(x) for x in v)
    return isinstance(v, (torch.Tensor, types.FunctionType, functools.partial))


def describe_callable(fn: Any) -> Tuple[str, bool]:
    """``(name, identified)``: ``name`` is the callable's qualified name plus a fingerprint of what it computes
    when ``identified``, else the name alone (the caller should warn that a changed callable of that name would
    not be told apart)."""
    base = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    try:
        desc = _callable(fn, 0)
        if isinstance(fn, torch.nn.Module):
            # the callable itself is a network (a teacher network, a loss network): a retrained one has the same
            # type and shapes, so its weights count (a module captured deeper is the trained model; see _callable)
            desc += ":" + _module_weights(fn)
        fingerprint = hashlib.sha256(desc.encode()).hexdigest()[:16]
    except (_Unstable, RecursionError, ValueError, TypeError, RuntimeError):
        return base, False
    return f"{base}#{fingerprint}", True


def unidentified_note(what: str, name: str) -> Optional[str]:
    return (f"{what} {name!r} cannot be fingerprinted (a value it holds has no stable description), so it is "
            f"identified by its name only: a cache or checkpoint made with another {what} of that name would be "
            "reused. Give it a distinct name (a def), or clear the cache after changing it.")


__all__ = ["describe_callable", "unidentified_note"]
