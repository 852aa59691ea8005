"""A network that returns one static buffer (CUDA-graph replay, TensorRT/ONNX Runtime IO binding) overwrote the
outputs a multistep solver keeps: every history term became the newest output and the sample was silently wrong
(fuzz audit: 0.32 off for DPM-Solver++(3), 19.9 for iPNDM(4), 114 for Heun).  It is now a ModelOutputError that
says to return a copy: any output overlapping memory of an earlier output the next update reads, whether torch saw
the write or not (IO binding writes behind torch's version counter).  Outputs in separate slots of one tensor, and
order-1 solvers without gradients, which read no earlier output, still run; with gradients the backward reads every
saved output, so any overlap is refused there (an order-1 solve's time gradient was 0.106 off, diff review)."""
import pytest
import torch

import ld3_ext
from ld3_ext import discretizations
from ld3_ext.wrappers import ModelOutputError

W = torch.randn(48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1


def _net(x, tt):
    return torch.tanh(x.reshape(x.shape[0], -1) @ W.to(x.dtype) * (1 + tt.view(-1, 1))).reshape(x.shape)


def _static(net):
    buf = {}

    def fn(x, tt):
        out = net(x, tt)
        b = buf.setdefault("b", torch.empty_like(out))
        with torch.no_grad():
            b.copy_(out)
        return b
    return fn


SOLVERS = [("x0", ld3_ext.DPMSolverPP(3)), ("x0", ld3_ext.UniPC(3)), ("x0", ld3_ext.UniPC(2, use_corrector=False)),
           ("eps", ld3_ext.IPNDM(4)), ("eps", ld3_ext.Heun())]


def _case():
    s = ld3_ext.VPLinear()
    x = s.prior_std() * torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return s, x, discretizations.logsnr_uniform(s, 6)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("pred, solver", SOLVERS, ids=lambda v: getattr(v, "name", v))
def test_a_static_output_buffer_is_refused(pred, solver, backend, grad):
    s, x, t = _case()
    solver.backend = backend
    model = ld3_ext.wrap_model(_static(_net), s, prediction=pred)
    tt = t.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad), pytest.raises(ModelOutputError, match=r"memory of an earlier output.*clone"):
        solver.sample(model, x, tt)


def _io_bound(net):
    """IO binding: the runtime writes into one buffer behind torch's back (no version bump) and hands back a new
    tensor over it each call (from_dlpack / from_numpy)."""
    import numpy as np
    buf = {}

    def fn(x, tt):
        out = net(x, tt).detach().numpy()
        b = buf.setdefault("b", np.empty_like(out))
        b[...] = out
        return torch.from_numpy(b)
    return fn


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("pred, solver", SOLVERS, ids=lambda v: getattr(v, "name", v))
def test_a_buffer_written_behind_torchs_back_is_refused_too(pred, solver, backend):
    """The version counter never moves there: a check that asked "written since?" let it through (0.42 off)."""
    s, x, t = _case()
    solver.backend = backend
    with torch.no_grad(), pytest.raises(ModelOutputError, match=r"memory of an earlier output.*clone"):
        solver.sample(ld3_ext.wrap_model(_io_bound(_net), s, prediction=pred), x, t)


@pytest.mark.parametrize("pred, solver", SOLVERS + [("x0", ld3_ext.Euler()), ("x0", ld3_ext.DPMSolverPP(1))],
                         ids=lambda v: getattr(v, "name", v))
def test_order_1_solvers_read_no_earlier_output_and_take_a_static_buffer(pred, solver):
    s, x, t = _case()
    if solver.spec() is not None and solver.spec().order == 1:
        got = solver.sample(ld3_ext.wrap_model(_static(_net), s, prediction=pred), x, t)
        want = solver.sample(ld3_ext.wrap_model(_net, s, prediction=pred), x, t)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # the same buffer under a solver that reads it: refused
        with pytest.raises(ModelOutputError, match="memory of an earlier output"):
            solver.sample(ld3_ext.wrap_model(_static(_net), s, prediction=pred), x, t)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_ld3_ext_sample_on_a_diffusion_model_refuses_a_static_buffer(grad):
    """ld3_ext.sample wraps a DiffusionModel in a VE view whose own output check is off (the inner model checks):
    the solvers took that for check_output=False and skipped the static-buffer check (0.11 off; diff review)."""
    s, x, t = _case()
    model = ld3_ext.wrap_model(_static(_net), s, prediction="x0")
    sig = s.edm_sigma(t).clone().requires_grad_(grad)
    with pytest.raises(ModelOutputError, match="memory of an earlier output"):
        ld3_ext.sample(model, x, sig, solver="dpmpp_3m")
    with model.output_checks(False):  # the inner model's own setting still turns it off
        ld3_ext.sample(model, x, sig.detach(), solver="dpmpp_3m")
    ld3_ext.sample(model, x, sig.detach(), solver="dpmpp_3m", check_output=False)  # and so does the call's


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("solver", [ld3_ext.Euler(), ld3_ext.DPMSolverPP(1)], ids=lambda v: v.name)
def test_order_1_solvers_with_time_gradients_refuse_a_static_buffer(solver, backend):
    """The backward reads every saved output (dL/db = <lambda, m>): a buffer overwritten behind torch's back
    made the time gradient silently wrong while the sample was right."""
    s, x, t = _case()
    solver.backend = backend
    with pytest.raises(ModelOutputError, match=r"memory of an earlier output.*clone"):
        solver.sample(ld3_ext.wrap_model(_io_bound(_net), s, prediction="x0"), x, t.clone().requires_grad_())
    tt = t.clone().requires_grad_()  # fresh outputs: the same solve differentiates
    solver.sample(ld3_ext.wrap_model(_net, s, prediction="x0"), x, tt).sum().backward()
    assert torch.isfinite(tt.grad).all() and tt.grad.abs().max() > 0


def _static_view(net):
    """A static [B, 2C, ...] buffer (eps and a learned variance) whose first C channels are returned: a strided,
    non-dense view, as from_diffusers hands on for learned-variance networks."""
    buf = {}

    def fn(x, tt):
        out = net(x, tt)
        b = buf.setdefault("b", torch.empty(out.shape[0], 2 * out.shape[1], *out.shape[2:], dtype=out.dtype))
        with torch.no_grad():
            b[:, :out.shape[1]].copy_(out)
            b[:, out.shape[1]:].zero_()
        return b[:, :out.shape[1]]
    return fn


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("pred, solver", SOLVERS, ids=lambda v: getattr(v, "name", v))
def test_a_strided_view_of_a_static_buffer_is_refused(pred, solver, backend):
    """Non-dense outputs were let through unchecked (meant for expanded constants): iPNDM(4) 24.8 off, Heun 146 on
    the reference path.  The fused path copies a non-dense output into the state's layout before keeping it (one
    copy instead of one per update that reads it), so there the view is a fresh entry and samples exactly."""
    s, x, t = _case()
    solver.backend = backend
    with torch.no_grad():
        if backend == "reference":
            with pytest.raises(ModelOutputError, match="memory of an earlier output"):
                solver.sample(ld3_ext.wrap_model(_static_view(_net), s, prediction=pred), x, t)
        else:
            got = solver.sample(ld3_ext.wrap_model(_static_view(_net), s, prediction=pred), x, t)
            want = solver.sample(ld3_ext.wrap_model(_net, s, prediction=pred), x, t)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_constant_output_at_batch_size_1_runs_with_check_output_false(backend, grad):
    """const.expand(1, ...) is dense and overlaps the previous output: nothing tells it from a static buffer, so it
    is refused by default with a hint, and check_output=False lets it through (an expanded constant at batch > 1,
    stride 0, always passes)."""
    s = ld3_ext.EDM()
    const = torch.linspace(-1, 1, 5, dtype=torch.float64)
    grid = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.1, 0.002], dtype=torch.float64)
    x = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for solver in (ld3_ext.DPMSolverPP(3, backend=backend), ld3_ext.UniPC(3, backend=backend),
                   ld3_ext.Heun(backend=backend)):
        with pytest.raises(ModelOutputError, match="check_output=False"):
            solver.sample(ld3_ext.wrap_model(lambda xx, tt: const.expand(xx.shape[0], 5), s, prediction="x0"), x,
                          grid.clone().requires_grad_(grad))
        outs = []
        for fn, check in ((lambda xx, tt: const.expand(xx.shape[0], 5), False),
                          (lambda xx, tt: const.expand(xx.shape[0], 5).clone(), True)):
            tt = grid.clone().requires_grad_(grad)
            y = solver.sample(ld3_ext.wrap_model(fn, s, prediction="x0", check_output=check), x, tt)
            outs.append((y.detach(), torch.autograd.grad(y.sum(), tt)[0] if grad else None))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
        if grad:
            torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("prediction, solver", [("sample", ld3_ext.DPMSolverPP(3)), ("sample", ld3_ext.UniPC(3)),
                                                ("epsilon", ld3_ext.IPNDM(4)), ("epsilon", ld3_ext.Heun())],
                         ids=lambda v: getattr(v, "name", v))
def test_ld3_scheduler_refuses_a_static_output_buffer_and_keeps_no_spare_sample(prediction, solver):
    """The diffusers scheduler keeps the earlier outputs too; and it kept the sample before each step for every
    solver, where only UniPC's corrector reads it (one latent held through the solve)."""
    diffusers = pytest.importorskip("diffusers")
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    # the history holds the network's raw output where no conversion is needed: x0 networks for DPM-Solver++ and
    # UniPC, noise networks for iPNDM and Heun
    cfg = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction).config
    sch = LD3Scheduler.from_config(cfg, solver_config=solver.config())
    sch.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    buf = torch.empty(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, generator=g) * sch.init_noise_sigma
    with pytest.raises(ModelOutputError, match="memory of an earlier output"):
        for tt in sch.timesteps:
            buf.copy_(0.1 * torch.tanh(x))  # the network's output written into one buffer, as IO binding does
            x = sch.step(buf, tt, x).prev_sample
    sch.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, generator=g) * sch.init_noise_sigma
    for tt in sch.timesteps:
        x = sch.step(0.1 * torch.tanh(x), tt, x).prev_sample
        if solver.spec() is not None:
            assert (sch._x_before is not None) == solver.spec().has_corrector
    assert torch.isfinite(x).all()


def test_separate_slots_of_one_tensor_are_not_an_overwrite_and_inference_mode_is_checked_too():
    """Outputs written to their own slots of one preallocated tensor share its storage and version counter but
    never overlap: they sample as plain outputs (the first version of the check refused them, diff review).  Under
    torch.inference_mode() there is no version counter: a static buffer was let through (0.42 off)."""
    s, x, t = _case()

    def slotted():
        traj = torch.empty(64, *x.shape, dtype=x.dtype)
        k = [0]

        def fn(xx, tt):
            o = traj[k[0]]
            k[0] += 1
            with torch.no_grad():
                o.copy_(_net(xx, tt))
            return o
        return fn
    for pred, solver in SOLVERS:
        want = solver.sample(ld3_ext.wrap_model(_net, s, prediction=pred), x, t)
        got = solver.sample(ld3_ext.wrap_model(slotted(), s, prediction=pred), x, t)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.inference_mode(), pytest.raises(ModelOutputError, match="memory of an earlier output"):
            solver.sample(ld3_ext.wrap_model(_static(_net), s, prediction=pred), x, t)
        with torch.inference_mode():
            got = solver.sample(ld3_ext.wrap_model(slotted(), s, prediction=pred), x, t)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_output_ledger_keeps_outputs_only_while_a_backward_will_read_them():
    # the one helper every per-step solver loop uses (wrappers.OutputLedger)
    from ld3_ext.wrappers import OutputLedger
    buf = torch.zeros(2, 3)
    table = torch.zeros(1, 2)
    x = torch.ones(2, 3)
    ledger = OutputLedger(True)
    ledger.admit(buf, 0, x, table, [])
    assert ledger.saved == []  # no gradients: nothing kept
    ledger.admit(buf, 1, x, table, [torch.ones(2, 3)])  # overlaps only an output nobody reads any more
    with pytest.raises(ModelOutputError, match="at step 2"):
        ledger.admit(buf, 2, x, table, [buf])
    xg = x.clone().requires_grad_()
    ledger = OutputLedger(True)
    ledger.admit(buf, 0, xg, table, [])
    assert len(ledger.saved) == 1
    with pytest.raises(ModelOutputError, match="at step 1"):
        ledger.admit(buf, 1, xg, table, [])  # the backward still reads step 0's output
    with torch.no_grad():
        OutputLedger(True, saved=[buf]).admit(buf, 1, xg, table, [])  # no backward will read it
    off = OutputLedger(False)
    off.admit(buf, 0, xg, table, [])
    off.admit(buf, 1, xg, table, [buf])
    assert off.saved == []
