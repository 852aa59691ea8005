"""ld3_ext.distributed's collectives across 2 gloo processes, at their edges (torchrun audit):
* broadcast_ into tensors that are not contiguous (a strided slice, a transposed matrix): every rank gets rank 0's
  values (a strided slice got other elements of rank 0's storage);
* all_gather_shards of shards whose rows differ in shape or dtype between the ranks: a ValueError on every rank
  (gloo aborted the process with SIGABRT, or, same numel, gave each rank its own shape); a row count alone may differ;
* all_reduce_mean_ of complex tensors with a weight or flags: the total weight and the flags are read from the
  buffer's real parts (torch's clamp/finfo and Python's complex comparison failed, in a process group only)."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from ld3_ext import distributed as D

from conftest import join_gloo  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _broadcast(rank):
    base = torch.arange(6.0) + 10 * rank
    strided = base[::2]
    mat = (torch.arange(6.0).reshape(2, 3) + 10 * rank).t()
    D.broadcast_([strided, mat], src=0)
    return {"strided": strided.clone(), "base": base, "mat": mat.clone()}


def _gather(rank):
    got = {}
    for name, shard in (("width", torch.ones(2, 3 + rank)),
                        ("dtype", torch.ones(2, 3, dtype=(torch.float32, torch.float64)[rank])),
                        ("ndim", torch.ones(2, 3) if rank == 0 else torch.ones(2, 3, 1))):
        try:
            got[name] = tuple(D.all_gather_shards(shard).shape)
        except ValueError as e:
            got[name] = str(e)
    got["rows"] = D.all_gather_shards(torch.full((rank + 1, 2), float(rank)), 3).tolist()
    got["empty"] = tuple(D.all_gather_shards(torch.ones(2 * (1 - rank), 2), 2).shape)
    return got


def _complex_mean(rank):
    w = torch.tensor([1 + 2j * rank], dtype=torch.complex128)
    f = torch.tensor([0.5 * rank], dtype=torch.float32)
    got_w = D.all_reduce_mean_([w, f], weight=(1, 3)[rank])
    u = torch.tensor([1 + 2j * rank], dtype=torch.complex64)
    got_f = D.all_reduce_mean_([u], flags=[rank == 1, False])
    return {"w": w, "f": f, "u": u, "flags": (got_w, got_f)}


CASES = {"broadcast": _broadcast, "gather": _gather, "complex_mean": _complex_mean}


def _worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        torch.save({name: case(rank) for name, case in CASES.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("collectives")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_broadcast_into_views_gives_rank_0s_values(results):
    for rank, res in enumerate(results):
        r = res["broadcast"]
        assert r["strided"].tolist() == [0.0, 2.0, 4.0]
        # written through the view: the elements between its own keep this rank's values
        assert r["base"].tolist() == [0.0, 1.0 + 10 * rank, 2.0, 3.0 + 10 * rank, 4.0, 5.0 + 10 * rank]
        assert torch.equal(r["mat"], torch.arange(6.0).reshape(2, 3).t())


def test_shards_with_other_rows_on_another_rank_are_refused(results):
    for res in results:
        got = res["gather"]
        for name in ("width", "dtype", "ndim"):
            assert "differ in their row shape or dtype" in got[name], (name, got[name])
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert got["empty"] == (2, 2)


def test_complex_tensors_are_averaged_with_a_weight_and_flags(results):
    for res in results:
        r = res["complex_mean"]
        assert r["w"].dtype == torch.complex128 and r["u"].dtype == torch.complex64
        assert torch.allclose(r["w"], torch.tensor([1 + 1.5j], dtype=torch.complex128))  # (1*1 + 3*(1+2j)) / 4
        assert torch.allclose(r["f"], torch.tensor([0.375]))  # (1*0 + 3*0.5) / 4
        assert torch.allclose(r["u"], torch.tensor([1 + 1j], dtype=torch.complex64))
        assert r["flags"] == ([], [True, False])
