"""ld3_ext.distributed.all_reduce_mean_ on complex tensors across 2 gloo processes: with a weight or flags the
buffer is complex, and the total weight and the flags are read from its real parts."""
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


def _complex_mean_worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        # with a weight it failed on torch's clamp/finfo, with flags on Python's complex comparison -- in the
        # process group only (one process returns early)
        w = torch.tensor([1 + 2j * rank], dtype=torch.complex128)
        f = torch.tensor([0.5 * rank], dtype=torch.float32)
        got_w = D.all_reduce_mean_([w, f], weight=(1, 3)[rank])
        u = torch.tensor([1 + 2j * rank], dtype=torch.complex64)
        got_f = D.all_reduce_mean_([u], flags=[rank == 1, False])
        torch.save({"w": w, "f": f, "u": u, "flags": (got_w, got_f)}, os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_complex_tensors_are_averaged_with_a_weight_and_flags(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_complex_mean_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["w"].dtype == torch.complex128 and r["u"].dtype == torch.complex64
        assert torch.allclose(r["w"], torch.tensor([1 + 1.5j], dtype=torch.complex128))  # (1*1 + 3*(1+2j)) / 4
        assert torch.allclose(r["f"], torch.tensor([0.375]))  # (1*0 + 3*0.5) / 4
        assert torch.allclose(r["u"], torch.tensor([1 + 1j], dtype=torch.complex64))
        assert r["flags"] == ([], [True, False])
