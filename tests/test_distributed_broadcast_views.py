"""ld3_ext.distributed.broadcast_ across 2 gloo processes into tensors that are not contiguous (a strided slice, a
transposed matrix): every rank gets rank 0's values (a strided slice got other elements of rank 0's storage)."""
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


def _broadcast_worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        base = torch.arange(6.0) + 10 * rank
        strided = base[::2]
        mat = (torch.arange(6.0).reshape(2, 3) + 10 * rank).t()
        D.broadcast_([strided, mat], src=0)
        torch.save({"strided": strided.clone(), "base": base, "mat": mat.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_broadcast_into_views_gives_rank_0s_values(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["strided"].tolist() == [0.0, 2.0, 4.0]
        # written through the view: the elements between its own keep this rank's values
        assert r["base"].tolist() == [0.0, 1.0 + 10 * rank, 2.0, 3.0 + 10 * rank, 4.0, 5.0 + 10 * rank]
        assert torch.equal(r["mat"], torch.arange(6.0).reshape(2, 3).t())
