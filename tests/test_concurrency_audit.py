"""Several threads sharing a model and a solver (concurrency audit).

torch holds torch.compiler.is_compiling() True for a whole compile session, process-wide: a torch.compile in one
thread turned off the value checks (a NaN network output, a grid with equal times) and the fused whole-sampler
node of eager code in every other thread.  ld3_ext now asks whether *this* thread traces
(device_constants.tracing).  The other thread's session is emulated here by holding torch's flag, as its compile
session does."""
import contextlib
import threading

import pytest
import torch

import ld3_ext
from ld3_ext import ModelOutputError, discretizations
from ld3_ext.device_constants import tracing


@contextlib.contextmanager
def _another_threads_compile_session():
    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        assert torch.compiler.is_compiling()
        yield
    finally:
        torch.compiler._is_compiling_flag = old


def test_eager_checks_and_fused_node_run_while_another_thread_compiles():
    s = ld3_ext.VPLinear()
    grid = discretizations.logsnr_uniform(s, 5)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    bad = ld3_ext.wrap_model(lambda xx, tt: xx * float("nan"), s, prediction="eps")
    good = ld3_ext.wrap_model(lambda xx, tt: torch.tanh(xx) * 0.1, s, prediction="eps")
    solver = ld3_ext.DPMSolverPP(3)
    t = grid.clone().requires_grad_()
    want_y = solver.sample(good, x, t)
    want_g, = torch.autograd.grad(want_y.sum(), t)
    with _another_threads_compile_session():
        assert not tracing()
        with pytest.raises(ModelOutputError, match="NaN"):
            solver.sample(bad, x, grid)
        with pytest.raises(ValueError, match="strictly decreasing"):
            solver.sample(good, x, torch.cat([grid[:2], grid[1:]]))
        t = grid.clone().requires_grad_()
        y = solver.sample(good, x, t)
        assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"  # the fused node, as outside a session
        g, = torch.autograd.grad(y.sum(), t)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(g, want_g, rtol=0, atol=0)


def test_tracing_is_true_inside_a_trace_of_this_thread():
    seen = []

    def f(x):
        seen.append(tracing())
        return x * 2
    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    assert seen and all(seen)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with _another_threads_compile_session():  # AOTAutograd's tracing in this thread: a fake-tensor mode is active
        with FakeTensorMode():
            assert tracing()
        assert not tracing()
    assert not tracing()


def test_a_real_compile_in_another_thread_leaves_eager_checks_on():
    s = ld3_ext.VPLinear()
    grid = discretizations.logsnr_uniform(s, 4)
    bad = ld3_ext.wrap_model(lambda xx, tt: xx * float("nan"), s, prediction="eps")
    stop = threading.Event()

    def compile_loop():
        k = 0
        while not stop.is_set():
            k += 1
            torch.compile(lambda v: torch.sin(v) * k, backend="eager")(torch.randn(4 + k % 3))
    th = threading.Thread(target=compile_loop, daemon=True)
    th.start()
    try:
        for _ in range(20):
            with pytest.raises(ModelOutputError):
                ld3_ext.Euler().sample(bad, torch.randn(2, 3), grid)
    finally:
        stop.set()
        th.join(timeout=60)


def test_a_deferred_check_block_in_one_thread_does_not_take_another_threads_checks():
    """The queue was a model attribute: thread B's NaN check went into thread A's block, B's sample came back NaN
    without a word and A raised B's error (on CUDA every sample() opens such a block)."""
    s = ld3_ext.VPLinear()
    grid = discretizations.logsnr_uniform(s, 4)
    # NaN for thread B's batch of 3, finite for thread A's batch of 2
    model = ld3_ext.wrap_model(lambda xx, tt: torch.tanh(xx) * (float("nan") if xx.shape[0] == 3 else 0.1), s,
                               prediction="eps")
    inside, release = threading.Event(), threading.Event()
    errors = {}

    def thread_a():
        try:
            with model.deferred_output_checks():
                inside.set()
                release.wait(30)
                ld3_ext.Euler().sample(model, torch.full((2, 3), 0.5), grid)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors["a"] = e
    th = threading.Thread(target=thread_a)
    th.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ModelOutputError, match="NaN"):
            ld3_ext.Euler().sample(model, torch.full((3, 3), 0.5), grid)
    finally:
        release.set()
        th.join(30)
    assert "a" not in errors, errors


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_a_backward_on_another_thread_keeps_the_forwards_output_checks_setting(backend):
    """On CUDA autograd runs the backward on its own device thread: the network re-evaluations of a checkpointed
    solve there did not see the caller's output_checks(False) and raised (emulated: backward from a thread)."""
    s = ld3_ext.VPLinear()
    grid = discretizations.logsnr_uniform(s, 4)
    model = ld3_ext.wrap_model(lambda xx, tt: torch.where(xx.abs() > 50, xx * float("inf"), torch.tanh(xx) * 0.1),
                               s, prediction="eps")
    x = torch.full((2, 3), 100.0)
    for solver in (ld3_ext.DPMSolverPP(3, backend=backend, checkpoint_model=True),
                   ld3_ext.Heun(backend=backend, checkpoint_model=True)):
        t = grid.clone().requires_grad_()
        with model.output_checks(False):
            y = solver.sample(model, x, t)
        result = {}

        def backward():
            try:
                y.sum().backward()
                result["ok"] = True
            except Exception as e:  # noqa: BLE001
                result["error"] = e
        th = threading.Thread(target=backward)
        th.start()
        th.join(60)
        assert result.get("ok"), result
        t2 = grid.clone().requires_grad_()  # with checks on (the default), the same solve is refused at once
        with pytest.raises(ModelOutputError):
            solver.sample(model, x, t2)


@pytest.mark.skipif(not ld3_ext._native.native_available(), reason="needs the native extension ld3_ext._C")
def test_the_native_kernels_release_the_gil_while_they_run():
    """They held it: every other Python thread of a server stalled for each kernel (a 1 ms sleep took up to 98 ms)
    and kernels of several threads could not overlap.  A thread that only runs Python now runs during a call."""
    import time
    from ld3_ext import _native
    x = torch.randn(16_000_000)
    hist = [torch.randn_like(x) for _ in range(3)]
    coef = torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=torch.float64)
    stamps, stop, started = [], threading.Event(), threading.Event()

    def ticker():
        started.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)
    th = threading.Thread(target=ticker)
    th.start()
    started.wait(10)
    windows = []
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            _native._C.multistep_update(x, coef, hist)
            windows.append((t0, time.perf_counter()))
    finally:
        stop.set()
        th.join(10)
    # the middle half of each call: with the GIL held the other thread can only run at a call's edges (between
    # the clock read and the call, for up to one 5 ms switch interval)
    inside = [s for s in stamps for a, b in windows if a + (b - a) / 4 < s < b - (b - a) / 4]
    assert inside, f"no Python ran in another thread while a kernel ran ({[b - a for a, b in windows]} s calls)"
