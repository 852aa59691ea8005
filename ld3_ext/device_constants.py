"""Constant tensors made on a device once, not on every call.

Why: a tensor built from host data on a GPU (``torch.tensor(values, device="cuda")``, ``cpu_tensor.to("cuda")``)
is a blocking copy, which waits for the stream: inside a sampler step it stalls the step, and under CUDA-graph
capture it fails.  The copies are kept per (key, device, dtype), and only when made outside any trace, fake mode
or torch.func transform: a tensor of those would break every later call outside it.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Tuple

import torch

_functorch_depth = getattr(getattr(torch._C, "_functorch", None), "get_dynamic_layer_stack_depth", None)


def func_transform_active() -> bool:
    """A torch.func transform (vmap, grad, jvp, ...) is active, eager or traced by torch.compile (dynamo runs
    the transform's layers while tracing, and folds this depth to a constant with a guard)."""
    return _functorch_depth is not None and _functorch_depth() > 0


def tracing() -> bool:
    """This thread is tracing a graph (torch.compile, torch.export): value checks, read-backs and the native calls
    a trace cannot take are skipped.

    torch.compiler.is_compiling() alone is a process-wide flag that torch holds for a whole compile session: a
    torch.compile in one thread turned off the value checks (NaN outputs, grids) and the fused paths of eager code
    in every other thread (concurrency audit).  It counts only with evidence of a trace in this thread: Dynamo
    tracing, a compile or tracing context (thread-local), or a fake-tensor or proxy dispatch mode (AOTAutograd,
    make_fx, non-strict export)."""
    if not torch.compiler.is_compiling():
        return False
    if torch.compiler.is_dynamo_compiling():
        return True
    return _this_thread_traces()


def _this_thread_traces() -> bool:
    try:
        from torch._guards import CompileContext, TracingContext
        if CompileContext.try_get() is not None or TracingContext.try_get() is not None:
            return True
        keys = torch._C._TorchDispatchModeKey
        return torch._C._get_dispatch_mode(keys.FAKE) is not None or torch._C._get_dispatch_mode(keys.PROXY) is not None
    except (ImportError, AttributeError):  # a torch without these: the process-wide flag, as before
        return True


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream: nothing may be read back, nor copied from the host."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def plain_context() -> bool:
    """No trace (torch.compile), no torch.func transform: a tensor made now may serve any later call."""
    return not tracing() and not func_transform_active()


def cached_constants(cache: Dict, key: Hashable, device: torch.device, dtype: torch.dtype,
                     make: Callable[[torch.device, torch.dtype], Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, ...]:
    """``make(device, dtype)``, kept in ``cache`` under (key, device, dtype) where that is safe (see above).
    Made as plain tensors even under inference_mode, so that a later call with autograd can use them."""
    full_key = (key, device, dtype)
    found = cache.get(full_key)
    if found is not None:
        return found
    if device.type == "cuda" and not tracing() and capturing():
        # the copy from host memory would fail inside the capture with torch's generic "operation not permitted"
        raise RuntimeError(f"ld3_ext: constant tensors (a schedule's, a solver's or a test bed's) are first needed on "
                           f"{device} ({dtype}) inside a CUDA-graph capture, where they cannot be copied to the device: "
                           f"run the same call once before capturing, outside any torch.func transform (the warm-up "
                           f"a capture needs anyway)")
    with torch.inference_mode(False):
        made = make(device, dtype)
    if plain_context() and all(type(t) is torch.Tensor for t in made):  # not a fake mode's FakeTensor
        cache[full_key] = made
    return made
