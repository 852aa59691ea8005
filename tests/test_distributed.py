"""ld3_ext.distributed: 2 CPU processes (gloo) reproduce the single-process schedule-parameter gradient and update.

Each rank solves its shard of a Gaussian-mixture problem through an ld3_ext solver whose time grid depends
on parameters xi (as LD3's do), back-propagates, all-reduces the gradient, and takes an SGD step; the result
must equal one process on the full data.  The ranks get their identity the way torchrun gives it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and join through ``init_from_env``.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

import ld3_ext
from ld3_ext import distributed as D

from conftest import join_gloo  # noqa: E402

N_EVEN, N_UNEVEN = 8, 7


# tiny tensors on a shared 2-core box: extra threads only add contention
pytestmark = pytest.mark.usefixtures("single_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    """Noises, teacher targets and the initial parameters of a small LD3-like problem (float64)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, generator=g, dtype=torch.float64)
    mix = ld3_ext.testbeds.GaussianMixture(means, torch.full_like(means, 0.4))
    sched = ld3_ext.EDM(0.002, 80.0)
    model = mix.model(sched)
    z = 80.0 * torch.randn(N_EVEN, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        target = ld3_ext.DPMSolverPP(3, backend="reference").sample(model, z,
                                                                   ld3_ext.discretizations.edm(sched, 20))
    lam0 = sched.lambda_(ld3_ext.discretizations.logsnr_uniform(sched, 4))
    xi0 = 0.3 * torch.randn(3, generator=g, dtype=torch.float64)
    return model, sched, z, target, lam0, xi0


def _loss(problem, xi, idx):
    """Mean per-sample L2 loss over ``idx`` of a 4-step DPM-Solver++(2M) solve on the grid lambda0 + (0, xi, 0)."""
    model, sched, z, target, lam0, _ = problem
    lam = torch.cat([lam0[:1], lam0[1:-1] + xi, lam0[-1:]])
    t = sched.inverse_lambda(lam)
    out = ld3_ext.DPMSolverPP(2, backend="reference").sample(model, z[idx], t)
    return (out - target[idx]).pow(2).flatten(1).sum(1).mean()


def _step(problem, n, weighted):
    """Gradient (averaged across ranks when distributed) and the parameters after one SGD step."""
    xi = problem[-1].clone().requires_grad_(True)
    idx = list(D.shard_range(n))
    loss = _loss(problem, xi, idx)
    loss.backward()
    D.all_reduce_mean_([xi.grad, None], weight=len(idx) if weighted else None)
    with torch.no_grad():  # plain SGD (torch.optim's first step imports torch._dynamo: seconds per process)
        xi -= 0.05 * xi.grad
    return xi.grad.detach().clone(), xi.detach().clone()


def _worker(rank, world, port, out_dir):
    info = join_gloo(rank, world, port)
    try:
        assert info.backend == "gloo" and info.world_size == world and info.rank == rank
        problem = _problem()
        g_even, xi_even = _step(problem, N_EVEN, weighted=False)    # equal shards: plain mean
        g_uneven, xi_uneven = _step(problem, N_UNEVEN, weighted=True)  # 4 + 3 samples: weighted mean
        # teacher-style: each rank makes its shard of targets, everyone assembles the full set
        idx = D.shard_range(N_UNEVEN)
        gathered = D.all_gather_shards(problem[3][idx.start: idx.stop] * 1.0, N_UNEVEN)
        b = torch.full((2,), float(rank + 1))
        D.broadcast_([b], src=0)
        s = torch.tensor([float(rank + 1)])
        D.all_reduce_sum_([s])
        scal = D.reduce_scalars([rank + 1.0, 1.0]) + D.reduce_scalars([rank], op="max")
        anys = [D.any_rank(rank == 1), D.any_rank(False)]
        part = D.local_part(torch.arange(10, 15))
        # gradients with flags in the same all-reduce; a flags-only reduce; a batch part plus a flag
        fg = torch.tensor([float(rank + 1), 2.0], dtype=torch.float64)
        flags = D.all_reduce_mean_([fg], weight=rank + 1, flags=[rank == 1, False, True])
        flags_only = D.all_reduce_mean_([None], flags=[rank == 0, False])
        rows = torch.arange(2 * N_UNEVEN, dtype=torch.float32).reshape(N_UNEVEN, 2)[idx.start: idx.stop] + 0.5
        gathered_rows, moved = D.all_gather_batch_part(rows, N_UNEVEN, flag=rank == 1)
        _, not_moved = D.all_gather_batch_part(rows, N_UNEVEN, flag=False)
        torch.save({"g_even": g_even, "xi_even": xi_even, "g_uneven": g_uneven, "xi_uneven": xi_uneven,
                    "gathered": gathered, "rank0": D.is_rank0(), "bcast": b, "sum": s, "shard": (idx.start, idx.stop),
                    "scal": scal, "anys": anys, "part": part, "fg": fg, "flags": flags, "flags_only": flags_only,
                    "gathered_rows": gathered_rows, "moved": (moved, not_moved)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.destroy()


def test_two_process_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # single process on the full data (no process group: the helpers are no-ops)
    assert not D.is_initialized() and D.get_world_size() == 1
    problem = _problem()
    g_even, xi_even = _step(problem, N_EVEN, weighted=False)
    g_uneven, xi_uneven = _step(problem, N_UNEVEN, weighted=True)
    assert g_even.abs().sum() > 0
    for r in res:
        torch.testing.assert_close(r["g_even"], g_even, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["xi_even"], xi_even, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["g_uneven"], g_uneven, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["xi_uneven"], xi_uneven, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["gathered"], problem[3][:N_UNEVEN])
        torch.testing.assert_close(r["bcast"], torch.ones(2))
        torch.testing.assert_close(r["sum"], torch.tensor([3.0]))
    assert [r["rank0"] for r in res] == [True, False]
    assert all(r["scal"] == [3.0, 2.0, 1.0] and r["anys"] == [True, False] for r in res)
    assert [r["part"].tolist() for r in res] == [[10, 11, 12], [13, 14]]
    for r in res:
        # weights 1 and 2: (1*[1, 2] + 2*[2, 2]) / 3
        torch.testing.assert_close(r["fg"], torch.tensor([5.0 / 3.0, 2.0], dtype=torch.float64), rtol=1e-15, atol=0)
        assert r["flags"] == [True, False, True] and r["flags_only"] == [True, False]
        assert torch.equal(r["gathered_rows"], torch.arange(2 * N_UNEVEN, dtype=torch.float32).reshape(N_UNEVEN, 2) + 0.5)
        assert r["moved"] == (True, False)
    # one process: the helpers answer for this process alone
    assert D.all_reduce_mean_([torch.ones(2)], weight=3, flags=[True, False]) == [True, False]
    rows = torch.ones(3, 2)
    got, flag = D.all_gather_batch_part(rows, 3, flag=True)
    assert got is rows and flag is True
    assert [r["shard"] for r in res] == [(0, 4), (4, 7)]
    # an unweighted mean over uneven shards is NOT the full-data gradient: the weight matters
    assert not torch.allclose(0.5 * (_grad_on(problem, range(0, 4)) + _grad_on(problem, range(4, 7))), g_uneven)


def _grad_on(problem, idx):
    xi = problem[-1].clone().requires_grad_(True)
    _loss(problem, xi, list(idx)).backward()
    return xi.grad


@pytest.mark.parametrize("n,world", [(0, 3), (2, 3), (7, 2), (10, 4), (9, 1)])
def test_shard_range_covers_disjointly(n, world):
    shards = [D.shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_defaults(monkeypatch):
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    info = D.init_from_env()
    assert info.world_size == 1 and info.rank == 0 and info.is_rank0 and not info.distributed
    g = torch.tensor([1.0, 2.0])
    D.all_reduce_mean_([g], weight=3)
    D.barrier()
    assert D.is_rank0() and list(D.shard_range(5)) == [0, 1, 2, 3, 4] and torch.equal(g, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="rank"):
        D.shard_range(4, rank=2, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_from_env()


def test_all_gather_batch_part_rejects_bad_arguments():
    with pytest.raises(TypeError, match="part must be a floating tensor"):
        D.all_gather_batch_part(torch.arange(3), 3)
    with pytest.raises(TypeError, match="part must be a floating tensor"):
        D.all_gather_batch_part([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="n must be an int"):
        D.all_gather_batch_part(torch.ones(3, 2), -1)
    with pytest.raises(ValueError, match=r"part holds 3 rows, this rank's part of n = 4 is 4"):
        D.all_gather_batch_part(torch.ones(3, 2), 4)


def test_all_gather_batch_part_carries_extra_flags_in_the_same_call():
    rows, moved, extra = D.all_gather_batch_part(torch.ones(3, 2), 3, flag=True, flags=[False, True])
    assert torch.equal(rows, torch.ones(3, 2)) and moved is True and extra == [False, True]
    assert len(D.all_gather_batch_part(torch.ones(3, 2), 3)) == 2  # without flags: the pair, as before


@pytest.mark.parametrize("bad", ["ab", [1, 0], (True, None), 5])
def test_all_gather_batch_part_names_bad_flags(bad):
    with pytest.raises(TypeError, match="all_gather_batch_part: flags must be a sequence of bools"):
        D.all_gather_batch_part(torch.ones(3, 2), 3, flags=bad)


@pytest.mark.parametrize("device, on_gpu", [(None, True), ("cpu", False), ("cpu:0", False), (torch.device("cpu"), False),
                                            ("cuda", True), ("cuda:1", True), (torch.device("cuda", 0), True)])
def test_the_device_picks_the_cpu_or_the_gpu_by_its_type(device, on_gpu, monkeypatch):
    """On a machine with a GPU, only device 'cpu' kept training on the CPU: 'cpu:0' or torch.device('cpu')
    compared unequal to the string and took cuda:LOCAL_RANK (with NCCL under torchrun)."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    info = D.init_from_env(device=device)
    assert info.device.type == ("cuda" if on_gpu else "cpu")


@pytest.mark.parametrize("visible, local, want", [(2, 1, "cuda:1"), (1, 3, "cuda:0"), (2, 2, None), (4, 0, "cuda:0")])
def test_local_rank_beyond_the_visible_gpus(visible, local, want, monkeypatch):
    """cuda:LOCAL_RANK for a rank given one GPU of its own (Slurm, CUDA_VISIBLE_DEVICES per rank) was an invalid
    device ordinal; with several GPUs visible, too few of them is named (desk check of the CUDA-only paths)."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if want is None:
        with pytest.raises(ValueError, match=rf"LOCAL_RANK={local} but this process sees {visible} GPUs"):
            D.init_from_env()
    else:
        assert D.init_from_env().device == torch.device(want)
    assert D.init_from_env(device="cpu").device == torch.device("cpu")  # the CPU takes no GPU


@pytest.mark.parametrize("device", ["gpu0", "meta", torch.device("meta")])
def test_an_unknown_device_is_refused_naming_the_argument(device, monkeypatch):
    """The meta device returned the CPU with gloo, silently (torchrun audit)."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ValueError, match=r"device.* 'cpu', 'cuda'"):
        D.init_from_env(device=device)


@pytest.mark.parametrize("device", ["mps", "xpu:0"])
def test_another_accelerator_is_the_device_returned(device, monkeypatch):
    """An accelerator other than CUDA came back as the CPU, silently (`ld3 train --device mps` ran on the CPU);
    under a process group the backend for it must be named (gloo and nccl move CPU and CUDA tensors only)."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(D._checks, "usable_device", lambda where, dev: None)  # as on a machine that has one
    assert D.init_from_env(device=device).device == torch.device(device)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=rf"device='{device}' under torch.distributed: name the process group's backend"):
        D.init_from_env(device=device)


def _given_pairs_worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        import ld3_ext
        from ld3_ext.training import CheckpointMismatchError, LD3Trainer
        model = ld3_ext.testbeds.ring2d().model(ld3_ext.EDM())
        tr = LD3Trainer(model, solver=ld3_ext.DPMSolverPP(2), nfe=3, rounds_v1=1, rounds_v2=0, progress=False,
                        init="logsnr", time_mode="lambda", batch_size=2, valid_batch_size=2)
        g = torch.Generator().manual_seed(rank)  # other pairs on each rank
        noise = torch.randn(6, 2, generator=g, dtype=torch.float64)
        try:
            tr.fit(noise, 0.5 * noise)
            result = "trained"
        except CheckpointMismatchError as e:
            result = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        D.destroy()


def test_pairs_given_to_fit_that_differ_between_ranks_are_refused(tmp_path):
    """fit(noise, target) with other pairs on each rank trained on a mixture of two data sets without a word: after
    the pairs are loaded every rank compares their hash, and all refuse, naming it."""
    import torch.multiprocessing as mp

    mp.spawn(_given_pairs_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "ranks under torch.distributed differ in data_sha256" in text, text


def _key_set_worker(rank, world, port, out_dir):
    join_gloo(rank, world, port)
    try:
        results = []
        for fields in ({"a": 1, "b": rank} if rank else {"a": 1, "b": 0, "c": None},  # other names on each rank
                       {"a": 1, "b": rank, "n": 3}):
            try:
                results.append(D.differing_fields(fields))
            except RuntimeError as e:
                results.append(str(e))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.destroy()


def test_differing_fields_refuses_other_field_names_without_a_gloo_abort(tmp_path):
    """Ranks holding other field names reduced tensors of other lengths (gloo aborts the process); the names are
    compared first, and both ranks get the error, then go on to compare values."""
    import torch.multiprocessing as mp

    mp.spawn(_key_set_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        first, second = torch.load(tmp_path / f"rank{r}.pt")
        assert "compare different settings" in first and second == ["b"]


def test_rank_comparable_cuts_code_fingerprints_only():
    from ld3_ext.training.teacher import rank_comparable
    got = rank_comparable({"loss": "<lambda>#b390165ed2d04053", "teacher": {"name": "callable:f#0123456789abcdef"},
                           "tags": ["x#12", 3], "n": 4})
    assert got == {"loss": "<lambda>", "teacher": {"name": "callable:f"}, "tags": ["x#12", 3], "n": 4}
    import numpy as np
    t = torch.arange(3.0)
    got = rank_comparable([np.int64(5), np.float32(0.5), ld3_ext.UniPC(3), t, (lambda x: x), object()])
    assert got[:2] == [5, 0.5] and type(got[0]) is int and got[2] == ld3_ext.UniPC(3).config()
    assert got[3] == rank_comparable(t.clone()) != rank_comparable(t + 1)
    assert got[4].endswith("<lambda>") and got[5] == "object"


def test_differing_fields_names_bad_input_and_is_empty_in_one_process():
    assert D.differing_fields({"a": 1, "b": [2, None]}) == []
    for bad in ([("a", 1)], {1: "a"}, None):
        with pytest.raises(TypeError, match="differing_fields: fields must be a mapping of setting names"):
            D.differing_fields(bad)


@pytest.mark.parametrize("local", [0, 1])
def test_a_gpu_index_in_device_is_the_gpu_taken(local, monkeypatch):
    """init_from_env(device="cuda:1") gave cuda:LOCAL_RANK (cuda:0 for a single process): the index asked for was
    ignored; one past the visible GPUs is named (review)."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.init_from_env(device="cuda:1").device == torch.device("cuda:1")
    assert D.init_from_env(device=torch.device("cuda", 0)).device == torch.device("cuda:0")
    assert D.init_from_env(device="cuda").device == torch.device(f"cuda:{local}")  # no index: LOCAL_RANK's
    with pytest.raises(ValueError, match=r"device='cuda:2' but this process sees 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        D.init_from_env(device="cuda:2")


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_another_accelerator_this_torch_cannot_use_is_named(device, monkeypatch):
    """As device="cuda" on a CPU-only torch: it was returned, and torch's own error at its first use ("PyTorch is not
    linked with support for mps devices", "Torch not compiled with XPU enabled") named no argument."""
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    try:
        torch.empty(0, device=device)
    except Exception:  # noqa: BLE001 -- this torch cannot use it: the case under test
        with pytest.raises(ValueError, match=rf"init_from_env: device='{device}' cannot be used"):
            D.init_from_env(device=device)
    else:
        pytest.skip(f"this torch can use {device}")
