"""Resource limits: repeated sampling (fused and reference backends) and repeated short training
calls do not grow the process's memory, the non-finite guards fire with useful messages, and the
teacher cache stays within cache_max_bytes."""
from __future__ import annotations

import ctypes
import gc
import math
import os

import pytest
import torch

import ld3_ext
from ld3_ext import _native, discretizations as D
from ld3_ext.solvers import DPMSolverPP, IPNDM, UniPC
from ld3_ext.training import LD3Trainer, NonFiniteLossError
from ld3_ext.training.teacher import TeacherCacheTooLarge, generate_teacher_data, make_teacher
from ld3_ext.wrappers import ModelOutputError

pytestmark = pytest.mark.usefixtures("single_thread")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


def _rss() -> int:
    gc.collect()
    try:  # give freed arenas back so fragmentation is not mistaken for a leak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")


def _growth(fn, warmup: int, iters: int) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # timing only: thread pools are created once, during warm-up
    try:
        for _ in range(warmup):
            fn()
        before = _rss()
        for _ in range(iters):
            fn()
        return _rss() - before
    finally:
        torch.set_num_threads(threads)


@needs_proc
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_repeated_sampling_does_not_grow_memory(ring, backend):
    if backend == "fused" and not _native.native_available():
        pytest.skip("ld3_ext._C is not built")
    mix, s, model = ring
    grid = D.edm(s, 5)
    x = torch.randn(64, 2, dtype=torch.float64)
    solvers = [DPMSolverPP(3, backend=backend), UniPC(2, backend=backend), IPNDM(3, backend=backend)]

    def once():
        for solver in solvers:
            solver.sample(model, x, grid)
        # with autograd too: the graph must be freed after backward
        t = grid.clone().requires_grad_()
        solvers[0].sample(model, x, t).sum().backward()

    grew = _growth(once, warmup=20, iters=200)
    assert grew < 8 * MB, f"RSS grew by {grew / MB:.1f} MiB over 200 sampling rounds ({backend})"


@needs_proc
def test_repeated_short_training_does_not_grow_memory(ring):
    mix, s, model = ring

    def once():
        LD3Trainer(model, None, DPMSolverPP(2, backend="auto"), 4, teacher="exact", reference=mix,
                   sample_shape=mix.event_shape, model_name="ring", n_train=4, n_valid=2, rounds_v1=1,
                   rounds_v2=1, batch_size=2, progress=False).fit()

    grew = _growth(once, warmup=3, iters=15)
    assert grew < 16 * MB, f"RSS grew by {grew / MB:.1f} MiB over 15 training calls"


# ---------------------------------------------------------------------------------------------
# non-finite guards
# ---------------------------------------------------------------------------------------------
def _flaky(model, bad_after: int, value=math.nan):
    calls = {"n": 0}

    def fn(x, t):
        calls["n"] += 1
        out = model.fn(x, t)
        return out * value if calls["n"] > bad_after else out

    return ld3_ext.wrap_model(fn, model.schedule, prediction="x0", time_input="t", name="flaky"), calls


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_model_output_mid_sampling_names_step_and_time(ring, backend, value):
    mix, s, model = ring
    bad, _ = _flaky(model, 2, value)
    grid = D.edm(s, 6)
    with pytest.raises(ModelOutputError, match=r"NaN/Inf at step 2 \(t=\d"):
        DPMSolverPP(3, backend=backend).sample(bad, torch.randn(3, 2, dtype=torch.float64), grid)


def test_nonfinite_model_mid_training_raises_and_keeps_last_good_schedule(ring, tmp_path):
    mix, s, model = ring
    bad, calls = _flaky(model, 10 ** 9)

    def trip(tr, info):  # after the first iterations, the network starts returning NaN
        if info["iteration"] == 3:
            calls["n"] = 10 ** 10

    tr = LD3Trainer(bad, None, DPMSolverPP(2, backend="reference"), 4, teacher="exact", reference=mix,
                    sample_shape=mix.event_shape, model_name="ring", n_train=8, n_valid=4, rounds_v1=1,
                    rounds_v2=2, batch_size=2, progress=False, checkpoint_dir=str(tmp_path), callback=trip)
    with pytest.raises(NonFiniteLossError, match=r"iteration \d+.*NaN/Inf at step \d+ \(t=") as ei:
        tr.fit()
    err = ei.value
    assert err.schedule is not None and bool((err.schedule.timesteps[1:] < err.schedule.timesteps[:-1]).all())
    assert bool(torch.isfinite(err.schedule.timesteps).all())
    assert err.saved_to and os.path.exists(err.saved_to)
    from ld3_ext.schedule_file import load_schedule
    assert torch.equal(load_schedule(err.saved_to).timesteps, err.schedule.timesteps)


# ---------------------------------------------------------------------------------------------
# teacher cache size limit
# ---------------------------------------------------------------------------------------------
def _dir_bytes(d) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))


def test_teacher_cache_respects_cache_max_bytes(ring, tmp_path, monkeypatch):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    n, chunk = 40, 8
    ident = {"name": "ring", "weights_hash": "x", "hash_source": "name"}

    def gen(d, limit):
        return generate_teacher_data(model, fn, settings, n, (2,), seed=0, dtype=torch.float64, batch_size=chunk,
                                     cache_dir=str(d), identity=ident, progress=False, max_bytes=limit)

    # the up-front estimate: tensor bytes plus 4 KiB per file
    estimate = n * 2 * 2 * 8 + 4096 * (math.ceil(n / chunk) + 1)
    gen(tmp_path / "ok", estimate)
    assert _dir_bytes(tmp_path / "ok") <= estimate
    with pytest.raises(TeacherCacheTooLarge, match="cache_max_bytes"):
        gen(tmp_path / "small", estimate - 1)
    assert not os.path.exists(tmp_path / "small" / "meta.json")
    small = tmp_path / "small"
    assert not small.exists() or not any(f.startswith("chunk_") for f in os.listdir(small))
    # the trainer passes its limit through
    with pytest.raises(TeacherCacheTooLarge, match="cache_max_bytes"):
        LD3Trainer(model, None, DPMSolverPP(2, backend="reference"), 4, teacher="exact", reference=mix,
                   sample_shape=mix.event_shape, model_name="ring", n_train=30, n_valid=10, rounds_v1=1,
                   rounds_v2=1, batch_size=2, progress=False, teacher_cache=str(tmp_path / "tr"),
                   cache_max_bytes=1000).fit()


def test_a_degenerate_grid_mid_training_keeps_last_good_schedule(ring, tmp_path):
    """A training step whose grid degenerates (DegenerateGridError from the solver's grid check: two times of one
    float64 lambda) ends the run as a NaN loss would, with the last good schedule saved; it escaped raw before,
    with no file written.  Simulated: the solver raises it from the fourth iteration on."""
    from ld3_ext import DegenerateGridError

    mix, s, model = ring
    solver = DPMSolverPP(2, backend="reference")
    real_sample, state = solver.sample, {"bad": False}

    def sample(*args, **kwargs):
        if state["bad"] and torch.is_grad_enabled():
            raise DegenerateGridError("timesteps: entries 1 and 2 (...) have the same log-SNR in float64")
        return real_sample(*args, **kwargs)

    def trip(tr, info):
        if info["iteration"] == 3:
            state["bad"] = True

    solver.sample = sample
    tr = LD3Trainer(model, None, solver, 4, teacher="exact", reference=mix, sample_shape=mix.event_shape,
                    model_name="ring", n_train=8, n_valid=4, rounds_v1=1, rounds_v2=2, batch_size=2, progress=False,
                    checkpoint_dir=str(tmp_path), callback=trip)
    with pytest.raises(NonFiniteLossError, match=r"the grid degenerated: timesteps: entries 1 and 2") as ei:
        tr.fit()
    assert ei.value.saved_to and os.path.exists(ei.value.saved_to)
