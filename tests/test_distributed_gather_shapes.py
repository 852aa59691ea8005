"""ld3_ext.distributed.all_gather_shards across 2 gloo processes: shards whose rows differ in shape or dtype between
the ranks are refused with a ValueError on every rank (gloo aborted the process with SIGABRT, or, same numel,
gave each rank its own shape), while shards differing in their row count only are gathered."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from ld3_ext import distributed as D

from conftest import join_gloo  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        got = {}
        for name, shard in (("width", torch.ones(2, 3 + rank)), ("dtype", torch.ones(2, 3, dtype=(torch.float32,
                                                                                                    torch.float64)[rank])),
                            ("ndim", torch.ones(2, 3) if rank == 0 else torch.ones(2, 3, 1))):
            try:
                got[name] = tuple(D.all_gather_shards(shard).shape)
            except ValueError as e:
                got[name] = str(e)
        got["rows"] = D.all_gather_shards(torch.full((rank + 1, 2), float(rank)), 3).tolist()
        got["empty"] = tuple(D.all_gather_shards(torch.ones(2 * (1 - rank), 2), 2).shape)
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_shards_with_other_rows_on_another_rank_are_refused(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("width", "dtype", "ndim"):
            assert "differ in their row shape or dtype" in got[name], (name, got[name])
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert got["empty"] == (2, 2)
