"""torch.distributed helpers for data-parallel LD3 training and teacher generation.

LD3 learns a handful of schedule parameters (xi, xi^c) from a per-sample loss, so data parallelism is
simple: every rank holds the same parameters, solves its own shard of the (noise, teacher) pairs, and the
parameter gradients are averaged across ranks before the (identical) optimizer step.  The relaxed noises
are per-sample and stay on the rank that owns them.

* ``init_from_env()`` -- join the process group torchrun (or any launcher) describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, nccl on GPU
  (each process takes ``cuda:LOCAL_RANK``).  Without those variables it is a no-op: a single process.
* ``shard_range(n)`` -- this rank's contiguous slice of ``range(n)`` (teacher pairs, cache chunks, batches).
* ``all_reduce_mean_(tensors, weight=None, flags=())`` -- in-place average across ranks (one coalesced
  all-reduce); with ``weight`` (e.g. this rank's sample count) a weighted mean, exact for uneven shards; the
  ``flags`` ride along and come back as "true on any rank".
* ``local_part(batch_idx)`` -- this rank's part of a global batch (batch-level data parallelism);
* ``reduce_scalars([...])`` / ``any_rank(flag)`` -- validation totals and control-flow flags that must agree;
* ``all_gather_batch_part(part, n, flag)`` -- the parts of a global batch back in order, plus a flag, in one
  collective;
* ``all_reduce_sum_``, ``all_gather_shards`` (concatenate unequal per-rank shards in rank order),
  ``broadcast_`` (rank 0's values everywhere), ``is_rank0()``, ``barrier()``, ``get_rank()``,
  ``get_world_size()``, ``destroy()``.

Every helper works (as the identity / the single-process answer) when no process group is initialised, so
the trainer can call them unconditionally.

Multi-node: launch the same script on every node with torchrun's c10d rendezvous, e.g.::

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0.example:29500 \\
             --rdzv-id=ld3-job-42 -m ld3_ext.cli train ...

torchrun agrees on ranks through the rendezvous and then exports RANK (global), LOCAL_RANK (within the node),
WORLD_SIZE (2*8), and MASTER_ADDR/MASTER_PORT (the store of global rank 0); ``init_from_env`` then calls
``init_process_group(init_method="env://")`` -- the same code path as one node (``--standalone``) or as the
2-process gloo test in ``tests/test_distributed.py``.  ``shard_range`` uses the GLOBAL rank, so shards are
disjoint across nodes; device placement uses LOCAL_RANK.
"""
from __future__ import annotations

import datetime
import hashlib
import numbers
import math
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from . import _checks

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """True on the process that should write files and print (and in a single process)."""
    return get_rank() == 0


def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0, device: Optional[str] = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (see module docstring).

    ``backend``: default "nccl" when CUDA is available (and ``device`` is not "cpu"), else "gloo".
    ``device``: None (cuda:LOCAL_RANK when CUDA is available, else the CPU), "cpu", "cuda", "cuda:N", or another
    accelerator ("mps", "xpu"), which a process group needs its ``backend`` named for.
    Returns a :class:`DistInfo` (world_size 1 and no process group when WORLD_SIZE is unset or 1).
    Calling it again after a successful init returns the current group's info.
    """
    # checked before the single-process return: the same call must not fail only once there is a process group
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not math.isfinite(timeout_s) \
            or not 0 < timeout_s <= MAX_TIMEOUT_S:
        # above ~1e9 s torch's store overflows: an OverflowError, or a connection "timed out" at once
        raise ValueError(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:.0e}], got {timeout_s!r}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be None or one of {_BACKENDS}, got {backend!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:  # with WORLD_SIZE=1 too: a stray RANK=5 is another job's setting, not rank 0's
        raise ValueError(f"environment variable RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    if local < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local} must be >= 0")
    asked_gpu = None  # device="cuda:N": that GPU, not cuda:LOCAL_RANK (the index was ignored)
    if device is not None:
        try:
            asked = torch.device(device)
            kind = asked.type  # "cpu:0" and torch.device("cpu") are the CPU too
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        if kind == "meta":
            raise ValueError(f"device={device!r} holds no data: use None, 'cpu', 'cuda' or 'cuda:N'")
        if kind == "cuda" and not torch.cuda.is_available():  # it fell back to the CPU without a word
            raise ValueError(f"device={device!r} but this torch sees no CUDA GPU; use device='cpu'")
        if kind == "cuda" and asked.index is not None:
            visible = torch.cuda.device_count()
            if asked.index >= visible:
                raise ValueError(f"device={device!r} but this process sees {visible} GPU(s) "
                                 f"(cuda:0..cuda:{visible - 1})")
            asked_gpu = asked
    use_cuda = torch.cuda.is_available() and (device is None or kind == "cuda")
    if backend == "nccl" and not use_cuda:  # torch's "Expected a cuda device, but got: cpu" names neither
        raise ValueError("backend='nccl' needs CUDA GPUs" + (f" (device={device!r})" if device is not None else
                                                              ", and this torch sees none") + "; use backend='gloo'")
    backend_given = backend
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    # another accelerator ("mps", "xpu"): that device, as asked (it was the CPU, silently); under a process group
    # only with the backend for it named (gloo and nccl, the defaults, move CPU and CUDA tensors)
    other = torch.device(device) if device is not None and kind not in ("cpu", "cuda") else None
    if other is not None:  # as device="cuda" on a CPU-only torch: named now, not by torch at the first use
        _checks.usable_device("init_from_env: ", other)
    if world <= 1:
        return DistInfo(0, 1, 0, other or ((asked_gpu or _local_gpu(local)) if use_cuda else torch.device("cpu")),
                        None)
    if other is not None and backend_given is None:
        raise ValueError(f"device={device!r} under torch.distributed: name the process group's backend for it "
                         f"(backend=...); the defaults are gloo for 'cpu' and nccl for 'cuda'")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    # without RANK every process would be rank 0 (one fails to bind the store, the others wait out the timeout);
    # LOCAL_RANK picks the GPU (cuda:LOCAL_RANK): the global rank is the wrong one on every node but the first
    needed = ("RANK", "LOCAL_RANK") if use_cuda else ("RANK",)
    missing = [v for v in (*needed, "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, or set "
                           f"{', '.join(ENV_VARS)}")
    port = _env_int("MASTER_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"environment variable MASTER_PORT={port} is not a TCP port (1..65535)")
    dev = other or ((asked_gpu or _local_gpu(local)) if use_cuda else torch.device("cpu"))
    if backend == "nccl":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend())


def _local_gpu(local: int) -> torch.device:
    """cuda:LOCAL_RANK, or cuda:0 for a process that sees one GPU only (Slurm, CUDA_VISIBLE_DEVICES per rank: its
    own); with several visible, a LOCAL_RANK beyond them is named (set_device failed with CUDA's "invalid device
    ordinal")."""
    visible = torch.cuda.device_count()
    if local < visible:
        return torch.device(f"cuda:{local}")
    if visible == 1:
        # ranks sharing one GPU (torchrun --nproc_per_node 2 on it) are told so by NCCL ("Duplicate GPU detected");
        # whether CUDA_VISIBLE_DEVICES was set per rank or for the whole job cannot be told from here
        return torch.device("cuda:0")
    raise ValueError(f"environment variable LOCAL_RANK={local} but this process sees {visible} GPUs "
                     f"(cuda:0..cuda:{visible - 1}): launch at most {visible} processes per node, or give each its "
                     "own GPU through CUDA_VISIBLE_DEVICES")


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")
MAX_TIMEOUT_S = 1e8  # about three years; torch's store overflows above ~1e9 s


def _count(v, name: str) -> int:
    """``v`` as an int >= 0 (numpy ints too), else an error naming it."""
    v = _whole(v, name)
    if v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v}")
    return v


def _whole(v, name: str) -> int:
    """``v`` as an int; int() would truncate 1.5 to 1 (another rank's shard) and take True as 1."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


def shard_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> range:
    """Contiguous, balanced shard of ``range(n)`` for ``rank`` (the first n % W ranks get one extra item).

    The shards of all ranks are disjoint, cover ``range(n)`` in rank order, and may be empty when n < W.
    """
    n = _count(n, "n")
    rank = get_rank() if rank is None else _whole(rank, "rank")
    world_size = get_world_size() if world_size is None else _whole(world_size, "world_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))


def _present(tensors: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    return [t for t in tensors if t is not None]


def _flatten(tensors: List[torch.Tensor]) -> torch.Tensor:
    """All tensors in one flat buffer of the widest dtype (at least float32; float64 when an integer tensor is
    among them, exact to 2**53), in order."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype if t.is_floating_point() or t.is_complex() else torch.float64)
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def all_reduce_sum_(tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """In-place sum across ranks (None entries are skipped).  Integer (and bool) tensors are summed exactly,
    in an int64 buffer of their own (a float buffer would round counts beyond 2**24); floating tensors in one
    buffer of the widest floating dtype (two collectives when both kinds are given).  Every rank must pass
    tensors of the same shapes and dtypes in the same order."""
    ts = _present(tensors)
    if not ts or get_world_size() == 1:
        return
    exact = [t for t in ts if not (t.is_floating_point() or t.is_complex())]
    floats = [t for t in ts if t.is_floating_point() or t.is_complex()]
    if exact:
        flat = torch.cat([t.detach().reshape(-1).to(torch.int64) for t in exact])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _scatter_back(exact, flat)
    if floats:
        flat = _flatten(floats)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _scatter_back(floats, flat)


def all_reduce_mean_(tensors: Sequence[Optional[torch.Tensor]], weight: Optional[float] = None,
                     flags: Sequence[bool] = ()) -> List[bool]:
    """In-place average of ``tensors`` across ranks -- e.g. ``[xi.grad, xi_c.grad]`` after ``backward()``.

    Without ``weight`` every rank counts equally (right when all shards have the same size, or when each rank
    already holds a sum).  With ``weight`` = this rank's sample count (or any non-negative weight) the result
    is sum_r w_r g_r / sum_r w_r: the gradient of the mean loss over the union of the shards, also for uneven
    shards.  A single process leaves the tensors unchanged.  Every rank must pass tensors of the same shapes
    in the same order (None entries are skipped -- they must be None on every rank).

    ``flags`` (the same number on every rank) travel in the same collective; the result says, for each,
    whether it was true on any rank -- a training step's "loss not finite" checks cost no extra round trip.
    """
    ts = _present(tensors)
    flags = [bool(f) for f in flags]
    # checked before the single-process return: the same call must not fail only once there is a process group
    w = None if weight is None else _checks.real("weight", weight, at_least=0)
    if get_world_size() == 1 or (not ts and not flags):
        return flags
    if not ts:
        return [v > 0 for v in reduce_scalars([1.0 if f else 0.0 for f in flags], op="sum")]
    flat = _flatten(ts)
    if weight is not None:
        # the total weight travels with the tensors: flat = w * [g..., 1]
        flat = torch.cat([flat, flat.new_ones(1)]) * w
    k = flat.numel()
    flat = torch.cat([flat, torch.tensor([1.0 if f else 0.0 for f in flags], device=flat.device, dtype=flat.dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    # .real: a complex buffer (complex gradients) holds the flags and the total weight in its real parts (Python's
    # complex has no ">", torch no clamp or finfo for complex)
    out_flags = [v > 0 for v in flat[k:].real.tolist()] if flags else []  # one host sync, only when flags are asked
    flat = flat[:k]
    if weight is None:
        flat = flat / get_world_size()
    else:
        flat = flat[:-1] / flat[-1].real.clamp_min(torch.finfo(flat.real.dtype).tiny)
    _scatter_back(ts, flat)
    return out_flags


def _scatter_back(ts: List[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for t in ts:
            k = t.numel()
            t.copy_(flat[off: off + k].reshape(t.shape).to(t.dtype))
            off += k


_SCALAR_OPS = ("max", "min", "sum")


def reduce_scalars(values: Sequence[float], op: str = "sum") -> List[float]:
    """Python floats reduced across ranks ("sum", "max" or "min") in one collective -- e.g. validation
    ``[loss_total, count]`` so that every rank takes the same best/patience/early-stop decision.  One host sync
    (a setup/validation-time operation, not for the per-step path)."""
    vals = [float(v) for v in values]
    if op not in _SCALAR_OPS:  # checked before the single-process return, as the distributed path needs it
        raise ValueError(f"op must be one of {list(_SCALAR_OPS)}, got {op!r}")
    if get_world_size() == 1 or not vals:
        return vals
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(vals, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def differing_fields(fields: Mapping[str, Any]) -> List[str]:
    """The names of the fields whose values are not the same on every rank (sorted; [] in one process).  Values
    are compared by a 48-bit hash of their canonical JSON.  The field names are compared first (one reduction of
    two numbers), so ranks holding other names raise instead of reducing tensors of other lengths, which gloo
    aborts on; then the values (two reductions).  Callers give every rank the same names (absent = None).
    Collective: every rank must call it."""
    if not isinstance(fields, Mapping) or not all(isinstance(k, str) for k in fields):
        raise TypeError(f"differing_fields: fields must be a mapping of setting names (str) to values, got "
                        f"{type(fields).__name__}")
    if get_world_size() == 1:
        return []
    from .atomic_io import canonical_json, json_safe

    def key(v) -> float:  # 48 bits: exact in float64
        return float(int(hashlib.sha256(canonical_json(json_safe(v)).encode()).hexdigest()[:12], 16))
    names = sorted(fields)
    head = [key(names), float(len(names))]
    if reduce_scalars(head, op="min") != reduce_scalars(head, op="max"):
        raise RuntimeError("the ranks under torch.distributed compare different settings (another version of "
                           "ld3_ext on some node?): install the same version on every node")
    keys = [key(fields[k]) for k in names]
    lo, hi = reduce_scalars(keys, op="min"), reduce_scalars(keys, op="max")
    return [k for k, a, b in zip(names, lo, hi) if a != b]


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (control flow that must agree everywhere, e.g. 'a noise moved',
    'a loss was non-finite')."""
    return reduce_scalars([1.0 if flag else 0.0], op="max")[0] > 0


def local_part(batch_idx, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's contiguous part of a global batch (a tensor/list of sample indices, identical on all ranks
    when the shuffling generator is seeded the same): ``batch_idx[shard_range(len(batch_idx))]``."""
    r = shard_range(len(batch_idx), rank, world_size)
    return batch_idx[r.start: r.stop]


def broadcast_(tensors: Sequence[Optional[torch.Tensor]], src: int = 0) -> None:
    """In-place: every rank gets rank ``src``'s values (e.g. the initial schedule parameters)."""
    _checks.count("src", src, least=0, most=get_world_size() - 1)  # also in one process: src=1 fails in two
    ts = _present(tensors)
    if not ts or get_world_size() == 1:
        return
    # NCCL moves only CUDA tensors: a CPU tensor (a grid, a setting) goes through the current device
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for t in ts:
            if dev is not None and t.device.type != "cuda":
                tmp = t.to(dev).contiguous()
            elif not t.is_contiguous():
                # the backend moves numel elements from the data pointer on: a strided view (x[::2]) got the
                # elements of its storage instead, silently
                tmp = t.contiguous()
            else:
                tmp = t
            dist.broadcast(tmp, src=src)
            if tmp is not t:
                t.copy_(tmp)


def all_gather_shards(shard: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """Concatenate every rank's ``shard`` (leading dims may differ, e.g. from ``shard_range``) in rank order.

    With ``n`` the result is checked to hold n rows.  Used to assemble teacher targets generated shard-wise.
    """
    if not isinstance(shard, torch.Tensor) or shard.dim() < 1:
        raise TypeError(f"all_gather_shards: shard must be a tensor with a leading (row) dimension, got "
                        f"{tuple(shard.shape) if isinstance(shard, torch.Tensor) else type(shard).__name__}")
    if n is not None:
        n = _count(n, "all_gather_shards: n")
    if get_world_size() == 1:
        out = shard
    else:
        # the row's shape and dtype travel with the row count (48 bits of a hash): other ones on another rank made
        # gloo abort the process (SIGABRT, no Python error), or gave each rank its own shape of the same numbers
        row = f"{shard.dtype}{tuple(shard.shape[1:])}"
        size = torch.tensor([shard.shape[0], int(hashlib.sha256(row.encode()).hexdigest()[:12], 16)],
                            device=shard.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
        dist.all_gather(sizes, size)
        table = torch.stack(sizes).tolist()  # one sync per gather: a setup-time operation
        sizes_l = [row_count for row_count, _ in table]
        if len({row_key for _, row_key in table}) > 1:
            raise ValueError(f"all_gather_shards: the ranks' shards differ in their row shape or dtype (rank "
                             f"{get_rank()}: {shard.dtype}, shape {tuple(shard.shape)}); only the leading (row) "
                             "dimension may differ")
        out = _gather_padded(shard, sizes_l)
    if n is not None and out.shape[0] != n:
        raise ValueError(f"all_gather_shards: expected {n} rows in total, got {out.shape[0]}")
    return out


def _gather_padded(shard: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    m = max(sizes)
    padded = shard.new_zeros((m, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded.contiguous())
    return torch.cat([b[:k] for b, k in zip(bufs, sizes)])


def all_gather_batch_part(part: torch.Tensor, n: int, flag: bool = False, flags: Optional[Sequence[bool]] = None):
    """Concatenate every rank's ``local_part`` of an n-row global batch, and whether ``flag`` was true on
    any rank, in one collective: the part sizes follow from ``shard_range(n)`` (no size exchange) and the
    flag rides in the floating-point buffer (a training step's "a noise moved").  Returns (rows, any_flag);
    with ``flags`` (the same number on every rank, e.g. "this rank's model failed"), which ride along too,
    (rows, any_flag, [whether each was true on any rank])."""
    if not isinstance(part, torch.Tensor) or part.dim() < 1 or not part.is_floating_point():
        raise TypeError(f"all_gather_batch_part: part must be a floating tensor with a batch dimension, got "
                        f"{(part.dtype, tuple(part.shape)) if isinstance(part, torch.Tensor) else type(part).__name__}")
    n = _count(n, "all_gather_batch_part: n")
    world = get_world_size()
    sizes = [len(shard_range(n, r, world)) for r in range(world)]
    if part.shape[0] != sizes[get_rank()]:
        raise ValueError(f"all_gather_batch_part: part holds {part.shape[0]} rows, this rank's part of n = {n} "
                         f"is {sizes[get_rank()]}")
    if flags is not None and (isinstance(flags, (str, bytes)) or not isinstance(flags, Sequence)
                              or not all(isinstance(f, bool) for f in flags)):
        raise TypeError(f"all_gather_batch_part: flags must be a sequence of bools, got {flags!r}")
    extra = list(flags) if flags is not None else []
    if world == 1:
        return (part, bool(flag)) if flags is None else (part, bool(flag), extra)
    row = 1
    for d in part.shape[1:]:
        row *= d
    m = max(sizes)
    k_flags = 1 + len(extra)
    buf = part.new_zeros(m * row + k_flags)
    buf[: part.numel()] = part.reshape(-1)
    buf[m * row:] = torch.tensor([flag] + extra, dtype=buf.dtype)
    bufs = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    rows = torch.cat([b[: k * row].reshape(k, *part.shape[1:]) for b, k in zip(bufs, sizes)])
    anys = [bool(v > 0) for v in torch.stack([b[m * row:] for b in bufs]).amax(0).tolist()]
    return (rows, anys[0]) if flags is None else (rows, anys[0], anys[1:])


__all__ = ["DistInfo", "init_from_env", "destroy", "is_initialized", "get_rank", "get_world_size", "is_rank0",
           "barrier", "shard_range", "local_part", "all_reduce_mean_", "all_reduce_sum_", "reduce_scalars", "any_rank",
           "broadcast_", "all_gather_shards", "all_gather_batch_part", "ENV_VARS"]
