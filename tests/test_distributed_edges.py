"""ld3_ext.distributed edge cases: exact integer sums across 2 gloo processes, RANK/LOCAL_RANK required when
WORLD_SIZE > 1, and the argument checks made in one process as with a process group."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from ld3_ext import distributed as D

from conftest import join_gloo  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BIG = 16_777_217  # 2**24 + 1: not a float32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        c = torch.tensor([BIG + rank, 2 ** 53 + 1], dtype=torch.int64)
        i32 = torch.tensor([BIG + rank], dtype=torch.int32)
        f = torch.tensor([0.5 * (rank + 1)], dtype=torch.float64)
        b = torch.tensor([rank == 1, False])
        D.all_reduce_sum_([c, None, f, i32, b])  # mixed: integers exact, floats in their own dtype
        alone = torch.tensor([BIG + rank], dtype=torch.int64)
        D.all_reduce_sum_([alone])
        errs = []
        for call in (lambda: D.reduce_scalars([1.0], "mean"), lambda: D.all_reduce_mean_([torch.ones(2)], weight=-1),
                     lambda: D.broadcast_([torch.ones(2)], src=2)):
            try:
                call()
                errs.append(None)
            except Exception as e:  # noqa: BLE001 -- the type is what is compared
                errs.append(type(e).__name__)
        torch.save({"c": c, "i32": i32, "f": f, "b": b, "alone": alone, "errs": errs},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_two_process_integer_sums_are_exact_and_checks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["c"].dtype == torch.int64 and res["c"].tolist() == [2 * BIG + 1, 2 ** 54 + 2]
        assert res["i32"].dtype == torch.int32 and res["i32"].tolist() == [2 * BIG + 1]
        assert res["alone"].tolist() == [2 * BIG + 1]
        assert res["f"].dtype == torch.float64 and res["f"].tolist() == [1.5]
        assert res["b"].tolist() == [True, False]
        assert res["errs"] == ["ValueError", "ValueError", "ValueError"]
    # one process raises the same errors
    assert not D.is_initialized()
    with pytest.raises(ValueError, match="op must be one of"):
        D.reduce_scalars([1.0], "mean")
    with pytest.raises(ValueError, match="weight"):
        D.all_reduce_mean_([torch.ones(2)], weight=-1)
    with pytest.raises(ValueError, match="src"):
        D.broadcast_([torch.ones(2)], src=1)


@pytest.mark.parametrize("weight", [-1, -0.5, float("nan"), float("inf")])
def test_single_process_refuses_bad_weight_even_without_tensors(weight):
    with pytest.raises(ValueError, match="weight"):
        D.all_reduce_mean_([torch.ones(2)], weight=weight)
    with pytest.raises(ValueError, match="weight"):
        D.all_reduce_mean_([], weight=weight)


def test_single_process_good_arguments_are_identity():
    g = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean_([g], weight=0, flags=[True]) == [True] and g.tolist() == [1.0, 2.0]
    assert D.reduce_scalars([1.0, 2.0], "min") == [1.0, 2.0]
    c = torch.tensor([BIG], dtype=torch.int64)
    D.all_reduce_sum_([c])
    D.broadcast_([c], src=0)
    assert c.tolist() == [BIG]


def _clear_env(monkeypatch):
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)


def test_world_size_without_rank_is_an_error(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but RANK not set"):
        D.init_from_env(device="cpu", timeout_s=5)
    monkeypatch.setenv("RANK", "")
    with pytest.raises(RuntimeError, match="RANK not set"):
        D.init_from_env(device="cpu", timeout_s=5)
    assert not D.is_initialized()


def test_world_size_without_local_rank_is_an_error_when_it_picks_the_gpu(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU is touched: the check comes first
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        D.init_from_env(device="cuda")
    # on the CPU (gloo) LOCAL_RANK picks nothing: not required (MASTER_ADDR still is)
    with pytest.raises(RuntimeError, match=r"but MASTER_ADDR, MASTER_PORT not set"):
        D.init_from_env(device="cpu")


@pytest.mark.parametrize("kw, name", [(dict(rank=1.5, world_size=2), "rank"), (dict(rank=0, world_size=2.5), "world_size"),
                                      (dict(rank=1.0, world_size=2), "rank"), (dict(rank=True, world_size=2), "rank"),
                                      (dict(rank=0, world_size=True), "world_size"), (dict(rank="1", world_size=2), "rank")])
def test_shard_range_refuses_a_rank_or_world_size_that_is_not_an_int(kw, name):
    """int() would truncate 1.5 to rank 1 (another rank's shard) and take True as 1: refused, naming the argument."""
    with pytest.raises(TypeError, match=rf"^{name} must be an int"):
        D.shard_range(10, **kw)


def test_shard_range_takes_numpy_and_python_ints():
    np = pytest.importorskip("numpy")
    assert D.shard_range(10, np.int64(1), np.int32(2)) == D.shard_range(10, 1, 2) == range(5, 10)
    assert D.local_part(torch.arange(10), rank=np.int64(0), world_size=2).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kw,exc,name", [({"timeout_s": "x"}, ValueError, "timeout_s"),
                                         ({"timeout_s": -1}, ValueError, "timeout_s"),
                                         ({"timeout_s": float("nan")}, ValueError, "timeout_s"),
                                         ({"timeout_s": True}, ValueError, "timeout_s"),
                                         ({"backend": "bogus"}, ValueError, "backend")])
def test_init_from_env_checks_its_arguments_without_a_process_group(monkeypatch, kw, exc, name):
    """Accepted in one process, they failed only under torchrun (a timedelta TypeError, a -1000 ms timeout)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(exc, match=name):
        D.init_from_env(**kw)


def test_init_from_env_single_process_defaults_still_work(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_from_env(backend="gloo", timeout_s=30)
    assert info.world_size == 1


def test_shard_helpers_take_numpy_ints_and_name_bad_counts():
    import numpy as np
    assert D.shard_range(np.int64(5), 0, 1) == range(5)
    rows, _ = D.all_gather_batch_part(torch.ones(3, 2), np.int64(3))
    assert rows.shape == (3, 2)
    with pytest.raises(TypeError, match="n"):
        D.all_gather_shards(torch.zeros(3, 2), "3")
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        D.all_gather_shards(torch.zeros(3, 2), -1)
    with pytest.raises(TypeError, match="shard must be a tensor"):
        D.all_gather_shards([1.0, 2.0])
    torch.testing.assert_close(D.all_gather_shards(torch.zeros(3, 2), np.int64(3)), torch.zeros(3, 2))


@pytest.mark.parametrize("env, match", [
    (dict(WORLD_SIZE="0", RANK="7"), r"WORLD_SIZE=0 must be >= 1"),
    (dict(WORLD_SIZE="-3"), r"WORLD_SIZE=-3 must be >= 1"),
    (dict(WORLD_SIZE="1", RANK="5"), r"RANK=5 is outside 0..WORLD_SIZE-1=0"),
    (dict(WORLD_SIZE="2", RANK="-1"), r"RANK=-1 is outside 0..WORLD_SIZE-1=1"),
    (dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="-1"), r"LOCAL_RANK=-1 must be >= 0"),
    (dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="notaport"),
     r"environment variable MASTER_PORT='notaport' is not an integer"),
    (dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="70000"),
     r"MASTER_PORT=70000 is not a TCP port"),
])
def test_malformed_torchrun_environment_is_named(monkeypatch, env, match):
    """These were taken as one process (WORLD_SIZE 0 or -3, RANK 5 of 1) or failed inside torch naming nothing."""
    _clear_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        D.init_from_env(device="cpu", timeout_s=5)
    assert not D.is_initialized()


def test_timeout_beyond_what_torch_can_wait_is_refused_in_one_process(monkeypatch):
    """1e30 s raised OverflowError, 1e10 s timed out at once, and only under torchrun: refused in one process too."""
    _clear_env(monkeypatch)
    for t in (1e10, 1e30):
        with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds in \(0, 1e\+08\]"):
            D.init_from_env(timeout_s=t)
    assert D.init_from_env(timeout_s=D.MAX_TIMEOUT_S).world_size == 1


def test_cuda_requests_without_a_gpu_are_named(monkeypatch):
    """device='cuda' without CUDA returned a CPU DistInfo without a word; backend='nccl' on the CPU failed in torch
    ('Expected a cuda device, but got: cpu')."""
    _clear_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' but this torch sees no CUDA GPU"):
        D.init_from_env(device="cuda")
    with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA GPUs, and this torch sees none; use backend='gloo'"):
        D.init_from_env(backend="nccl")
    with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA GPUs \(device='cpu'\)"):
        D.init_from_env(backend="nccl", device="cpu")
    assert D.init_from_env(device="cpu").device == torch.device("cpu")


def _init_worker(rank, world, port, out_dir):
    """Rank 1 computes an init grid that differs in its last bits (another node's scipy/BLAS)."""
    join_gloo(rank, world, port)
    try:
        import ld3_ext
        from ld3_ext import testbeds
        from ld3_ext.training import trainer as T
        if rank == 1:
            real = T.init_timesteps

            def jittered(*a, **k):
                g = real(*a, **k)
                g[1:-1] = g[1:-1] * (1 + 1e-9)
                return g
            T.init_timesteps = jittered
        mix = testbeds.ring2d()
        s = ld3_ext.EDM()
        model = mix.model(s)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(8, 2, dtype=torch.float64, generator=g)
        target = mix.reference_solution(s, noise * s.prior_std())
        tr = ld3_ext.LD3Trainer(model, s, ld3_ext.DPMSolverPP(2), nfe=4, n_train=5, n_valid=3, init="logsnr",
                                time_mode="lambda", rounds_v1=1, rounds_v2=1, progress=False, sample_shape=(2,))
        learned = tr.fit(noise, target)
        torch.save({"init": tr._init_grid, "t": learned.timesteps}, os.path.join(out_dir, f"init{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_ranks_start_from_rank_0s_init_grid(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_init_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"init{r}.pt") for r in range(2))
    assert torch.equal(r0["init"], r1["init"]) and torch.equal(r0["t"], r1["t"])


def _checkpoint_worker(rank, world, port, out_dir, which):
    """``which`` = "dir": checkpoint_dir on rank 0 only (rank 0 alone writes, so why give it to the others?);
    "every": checkpoint_every on rank 0 only.  Each checkpoint write is a barrier that the other rank never joined:
    both waited in different collectives until the process group's timeout."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_from_env(device="cpu", timeout_s=20)  # a hang shows as gloo's timeout, not as the test's
    try:
        import ld3_ext
        from ld3_ext import testbeds
        mix = testbeds.ring2d()
        s = ld3_ext.EDM()
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(8, 2, dtype=torch.float64, generator=g) * s.prior_std()
        target = mix.reference_solution(s, noise)
        kw = dict(checkpoint_dir=os.path.join(out_dir, "ckpt") if rank == 0 or which == "every" else None)
        if which == "every":
            kw["checkpoint_every"] = 1 if rank == 0 else None
        tr = ld3_ext.LD3Trainer(mix.model(s), s, ld3_ext.DPMSolverPP(2), nfe=4, init="logsnr", time_mode="lambda",
                                rounds_v1=1, rounds_v2=0, progress=False, sample_shape=(2,), **kw)
        try:
            tr.fit(noise[:5], target[:5], noise[5:], target[5:])
            got = "trained"
        except Exception as e:  # noqa: BLE001 -- the message is what is compared
            got = f"{type(e).__name__}: {e}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(got)
    finally:
        D.destroy()


@pytest.mark.parametrize("which,field", [("dir", "checkpoint_dir"), ("every", "checkpoint_every")])
def test_a_checkpoint_setting_on_only_some_ranks_is_refused_not_a_hang(tmp_path, which, field):
    import torch.multiprocessing as mp

    mp.spawn(_checkpoint_worker, args=(2, _free_port(), str(tmp_path), which), nprocs=2, join=True)
    for rank in range(2):
        got = (tmp_path / f"rank{rank}.txt").read_text()
        assert got.startswith("CheckpointMismatchError") and f"ranks under torch.distributed differ in {field}" in got, got
