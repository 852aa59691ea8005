"""The fused ops and samplers under every autograd mode a user can reach, against the reference path:
in-place rules for out= (version counter, requires_grad, inference tensors), forward-mode AD,
torch.func transforms (vmap, grad, jvp), double backward (gradgradcheck, Hessian-vector products)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import ld3_ext
from ld3_ext import _native, adjoint, fused, ops
from ld3_ext.coefficients import SolverSpec

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="needs the native extension ld3_ext._C")

SCHED = ld3_ext.EDM()
GRID = torch.tensor([80.0, 20.0, 4.0, 0.7, 0.05], dtype=torch.float64)


def _inputs(dtype=torch.float64, shape=(2, 3, 5), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    hist = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(k)]
    coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
    return x, coef, hist


def _model():
    mix = ld3_ext.testbeds.ring2d()
    return mix.model(SCHED), mix


# ----------------------------------------------------------------------------------------------
# out= follows ATen's in-place rules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_out_bumps_the_version_counter(layout):
    """A graph that saved the out tensor refuses to backward through the overwritten values."""
    x, coef, hist = _inputs(torch.float32)
    buf = torch.randn(2, 3, 5) if layout == "contiguous" else torch.randn(2, 3, 10)[..., ::2]
    w = torch.randn(2, 3, 5, requires_grad=True)
    y = (w * buf).sum()  # saves buf for the backward
    v0 = buf._version
    fused.multistep_update(x, coef, hist, out=buf)
    assert buf._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_out_requiring_grad_or_inference_is_refused():
    x, coef, hist = _inputs(torch.float32)
    leaf = torch.zeros(2, 3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="out is written in place and must not require grad"):
        fused.multistep_update(x, coef, hist, out=leaf)
    with torch.no_grad():  # as for ATen's in-place ops, allowed when nothing is recorded
        fused.multistep_update(x, coef, hist, out=leaf)
    torch.testing.assert_close(leaf.detach(), ops.multistep_update_reference(x, coef, hist), rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        inf = torch.zeros(2, 3, 5)
        fused.multistep_update(x, coef, hist, out=inf)  # inside inference mode: fine
    torch.testing.assert_close(inf, ops.multistep_update_reference(x, coef, hist), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="out is an inference tensor"):
        fused.multistep_update(x, coef, hist, out=inf)


def test_adjoint_step_refuses_overlapping_dots():
    x, coef, hist = _inputs()
    lam, v, older = torch.randn_like(x), torch.randn_like(x), [torch.randn_like(x)]
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    dots = torch.zeros(1, dtype=torch.float64).expand(4)
    with pytest.raises(RuntimeError, match="dots has entries that share memory"):
        adjoint.multistep_adjoint_step(lam, v, torch.tensor(0.9, dtype=torch.float64), older, x, hist[0], w, dots)


def test_sparse_inputs_are_named():
    x, coef, hist = _inputs()
    with pytest.raises(TypeError, match="x must be a dense"):
        fused.multistep_update(x.to_sparse(), coef, hist)
    with pytest.raises(TypeError, match=r"history\[1\] must be a dense"):
        fused.multistep_update(x, coef, [hist[0], hist[1].to_sparse(), hist[2]])
    with pytest.raises(RuntimeError, match="out must be a dense"):
        fused.multistep_update(x, coef, hist, out=torch.zeros_like(x).to_sparse())


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP, ld3_ext.Heun])
def test_a_sparse_x_T_is_named_by_sample(solver, backend):
    """It failed inside torch (aten::ne.Scalar has no SparseCPU kernel), naming no argument."""
    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, ld3_ext.EDM(), prediction="x0")
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([80.0, 10.0, 0.002], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x_T must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        solver(backend=backend).sample(model, x.to_sparse(), t)


# ----------------------------------------------------------------------------------------------
# forward-mode AD and torch.func: the reference's plain ops serve, with the same values
# ----------------------------------------------------------------------------------------------
def test_forward_ad_carries_tangents_through_the_update():
    x, coef, hist = _inputs()
    tx, tc, th = _inputs(seed=1)
    want = ops.multistep_update_reference(x, tc, hist) + ops.multistep_update_reference(tx, coef, th)
    with fwAD.dual_level():
        y = fused.multistep_update(fwAD.make_dual(x, tx), fwAD.make_dual(coef, tc),
                                   [fwAD.make_dual(m, t) for m, t in zip(hist, th)])
        p, t = fwAD.unpack_dual(y)
    torch.testing.assert_close(p, ops.multistep_update_reference(x, coef, hist), rtol=1e-12, atol=1e-12)
    assert t is not None
    torch.testing.assert_close(t, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("what", ["x_T", "timesteps"])
def test_forward_ad_through_a_fused_sampler_matches_the_reference(what):
    model, mix = _model()
    x_T = mix.prior_noise(SCHED, 6, generator=torch.Generator().manual_seed(3))
    tangent = torch.randn_like(x_T) if what == "x_T" else torch.linspace(0.5, -0.3, 5, dtype=torch.float64) * 0.1
    tangent[0:1] = 0 if what == "timesteps" else tangent[0:1]  # t_max stays the start time
    outs = {}
    for backend in ("fused", "reference"):
        with fwAD.dual_level():
            xs = fwAD.make_dual(x_T, tangent) if what == "x_T" else x_T
            ts = fwAD.make_dual(GRID, tangent) if what == "timesteps" else GRID
            y = ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, xs, ts)
            outs[backend] = [u.clone() for u in fwAD.unpack_dual(y)]
    assert outs["fused"][1] is not None
    for a, b in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_the_fused_update():
    xs = torch.randn(4, 2, 3, dtype=torch.float64)
    hs = torch.randn(4, 2, 2, 3, dtype=torch.float64)
    coef = torch.tensor([0.9, 0.2, -0.1], dtype=torch.float64)
    got = torch.func.vmap(lambda x, h: fused.multistep_update(x, coef, list(h.unbind(0))))(xs, hs)
    want = torch.stack([ops.multistep_update_reference(x, coef, list(h.unbind(0))) for x, h in zip(xs, hs)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_func_grad_and_jvp_through_a_fused_sampler():
    model, mix = _model()
    x_T = mix.prior_noise(SCHED, 4, generator=torch.Generator().manual_seed(5))

    def loss(t, backend):
        return ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, x_T, t).pow(2).sum()

    g_f = torch.func.grad(lambda t: loss(t, "fused"))(GRID)
    g_r = torch.func.grad(lambda t: loss(t, "reference"))(GRID)
    torch.testing.assert_close(g_f, g_r, rtol=1e-10, atol=1e-12)
    v = torch.tensor([0.0, 0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    _, jv_f = torch.func.jvp(lambda t: loss(t, "fused"), (GRID,), (v,))
    _, jv_r = torch.func.jvp(lambda t: loss(t, "reference"), (GRID,), (v,))
    torch.testing.assert_close(jv_f, jv_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jv_f, (g_r * v).sum(), rtol=1e-10, atol=1e-12)


def test_vmap_over_x_T_through_the_reference_sampler():
    """The x_T NaN/Inf check reads x_T back: skipped under vmap (no read-back of a batched tensor), as the
    model-output check is (here it is off as well)."""
    _, mix = _model()
    model = ld3_ext.wrap_model(lambda x, s: torch.tanh(x / (1 + s.reshape(-1, 1))), SCHED, prediction="x0",
                               time_input="sigma", check_output=False)
    xs = mix.prior_noise(SCHED, 6, generator=torch.Generator().manual_seed(4)).reshape(3, 2, -1)
    solver = ld3_ext.DPMSolverPP(order=3, backend="reference")
    got = torch.func.vmap(lambda x: solver.sample(model, x, GRID))(xs)
    torch.testing.assert_close(got, torch.stack([solver.sample(model, x, GRID) for x in xs]), rtol=1e-12, atol=1e-12)
    from ld3_ext import functional as F
    sig = SCHED.edm_sigma(GRID)
    euler = ld3_ext.Euler(backend="reference")
    got = torch.func.vmap(lambda x: F.sample(model, x, sig, solver=euler, check_output=False))(xs)
    torch.testing.assert_close(got, torch.stack([F.sample(model, x, sig, solver=euler) for x in xs]),
                               rtol=1e-12, atol=1e-12)


SOLVERS = {"dpmpp1": lambda b: ld3_ext.DPMSolverPP(order=1, backend=b),
           "dpmpp2": lambda b: ld3_ext.DPMSolverPP(order=2, backend=b),
           "dpmpp3": lambda b: ld3_ext.DPMSolverPP(order=3, backend=b),
           "unipc": lambda b: ld3_ext.UniPC(order=3, backend=b),
           "ipndm": lambda b: ld3_ext.IPNDM(order=4, backend=b),
           "euler": lambda b: ld3_ext.Euler(backend=b),
           "heun": lambda b: ld3_ext.Heun(backend=b)}


def _tanh_model(check_output=True):
    return ld3_ext.wrap_model(lambda x, s: torch.tanh(x / (1 + s.reshape(-1, 1))), SCHED, prediction="x0",
                              time_input="sigma", check_output=check_output)


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_over_x_T_through_the_fused_sampler(name):
    """While a torch.func transform is active, autograd.Function.apply refuses the kernels' Functions even on
    plain inputs (the grid, while vmap maps x_T): the fused backend takes the reference's ops there."""
    model = _tanh_model(check_output=False)
    xs = torch.randn(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 80
    solver = SOLVERS[name]("fused")
    got = torch.func.vmap(lambda x: solver.sample(model, x, GRID))(xs)
    torch.testing.assert_close(got, torch.stack([solver.sample(model, x, GRID) for x in xs]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_over_every_sample_input_with_the_output_check_on(name, backend):
    """vmap over x_T, timesteps or model_timesteps: the value checks (model outputs, x_T, the grids) skip the
    vmapped tensors, which hold one value per mapped sample and cannot be read back; the samples are the loop's."""
    model = _tanh_model()
    solver = SOLVERS[name](backend)
    xs = torch.randn(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 80
    grids = torch.stack([GRID, GRID * 0.9, GRID.pow(0.95)])
    for f, batch in ((lambda x: solver.sample(model, x, GRID), xs),
                     (lambda t: solver.sample(model, xs[0], t), grids),
                     (lambda tm: solver.sample(model, xs[0], GRID, tm), grids)):
        want = torch.stack([f(b) for b in batch])
        torch.testing.assert_close(torch.func.vmap(f)(batch), want, rtol=1e-12, atol=1e-12)


def test_wrong_output_shape_under_vmap_over_the_grids_is_named():
    """The error message reads the model time back: a vmapped time is named as such, not read."""
    bad = ld3_ext.wrap_model(lambda x, s: x[..., :1], SCHED, prediction="x0", time_input="sigma")
    solver = ld3_ext.DPMSolverPP(order=3)
    x = torch.randn(2, 2, dtype=torch.float64)
    grids = torch.stack([GRID, GRID * 0.9])
    with pytest.raises(ld3_ext.wrappers.ModelOutputError, match=r"shape \(2, 1\) at step 0 \(t=vmapped\)"):
        torch.func.vmap(lambda tm: solver.sample(bad, x, GRID, tm))(grids)
    with pytest.raises(ld3_ext.wrappers.ModelOutputError, match=r"shape \(2, 1\) at step 0 \(t=vmapped\)"):
        torch.func.vmap(lambda t: solver.sample(bad, x, t))(grids)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_vmap_over_x_through_functional_sample(backend):
    from ld3_ext import functional as F
    xs = torch.randn(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 80
    sig = SCHED.edm_sigma(GRID)
    denoiser = lambda x, s: torch.tanh(x / (1 + s.reshape(-1, 1)))  # noqa: E731 -- checked by functional itself
    for net, sigmas in ((_tanh_model(), sig), (denoiser, sig), (denoiser, torch.cat([sig, sig.new_zeros(1)]))):
        for solver in ("dpmpp_3m", "heun", "unipc", "ipndm"):
            def f(x):
                return F.sample(net, x, sigmas, solver=solver, backend=backend)
            torch.testing.assert_close(torch.func.vmap(f)(xs), torch.stack([f(x) for x in xs]), rtol=1e-12, atol=1e-12)


def test_vmap_over_a_k_diffusion_loop_on_to_denoiser():
    """to_denoiser's sigma checks read the sigma back: skipped for a vmapped sigma (k-diffusion's
    sigma * x.new_ones([B]) under vmap over x), so the loop's samples come out."""
    from ld3_ext import functional as F
    denoiser = F.to_denoiser(_tanh_model())
    sigmas = SCHED.edm_sigma(GRID)

    def euler(x):  # k-diffusion's sample_euler, deterministic
        s_in = x.new_ones([x.shape[0]])
        for i in range(sigmas.numel() - 1):
            x = x + (x - denoiser(x, sigmas[i] * s_in)) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x
    xs = torch.randn(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13)) * 80
    torch.testing.assert_close(torch.func.vmap(euler)(xs), torch.stack([euler(x) for x in xs]), rtol=1e-12, atol=1e-12)


def test_functional_sample_refuses_vmapped_sigmas_by_name():
    """functional.sample builds its schedule from the sigmas' values: a vmapped grid is refused, naming it."""
    from ld3_ext import functional as F
    x = torch.randn(2, 2, dtype=torch.float64)
    sigmas = torch.stack([SCHED.edm_sigma(GRID)] * 2)
    with pytest.raises(ValueError, match="sigmas cannot be vmapped"):
        torch.func.vmap(lambda s: F.sample(_tanh_model(), x, s))(sigmas)
    with pytest.raises(ValueError, match="model_sigmas cannot be vmapped"):
        torch.func.vmap(lambda s: F.sample(_tanh_model(), x, sigmas[0], model_sigmas=s))(sigmas)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", ["dpmpp3", "unipc", "heun"])
def test_torch_func_over_network_parameters(name, backend):
    """torch.func.functional_call: an ensemble of networks vmapped over their stacked parameters, and the
    gradient w.r.t. the parameters, match the loop and torch.autograd."""
    nets = [torch.nn.Linear(2, 2, dtype=torch.float64) for _ in range(3)]
    for k, net in enumerate(nets):
        torch.nn.init.normal_(net.weight, std=0.5, generator=torch.Generator().manual_seed(10 + k))

    def model_with(net, params):
        def fn(x, s):
            return torch.tanh(torch.func.functional_call(net, params, (x,)) / (1 + s.reshape(-1, 1)))
        return ld3_ext.wrap_model(fn, SCHED, prediction="x0", time_input="sigma")
    solver = SOLVERS[name](backend)
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 80
    stacked, _ = torch.func.stack_module_state(nets)
    got = torch.func.vmap(lambda p: solver.sample(model_with(nets[0], p), x, GRID))(stacked)
    want = torch.stack([solver.sample(model_with(n, dict(n.named_parameters())), x, GRID) for n in nets])
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    params = {k: v.detach() for k, v in nets[0].named_parameters()}
    got = torch.func.grad(lambda p: solver.sample(model_with(nets[0], p), x, GRID).pow(2).sum())(params)
    out = solver.sample(model_with(nets[0], dict(nets[0].named_parameters())), x, GRID).pow(2).sum()
    want = torch.autograd.grad(out, [nets[0].weight, nets[0].bias])
    torch.testing.assert_close((got["weight"], got["bias"]), want, rtol=1e-10, atol=1e-12)


def test_value_checks_still_run_under_grad_and_jvp():
    """Only vmapped tensors skip the value checks: under grad/jvp the values read back, so bad input is named."""
    from ld3_ext import functional as F
    x = torch.randn(2, 2, dtype=torch.float64) * 80
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
    with pytest.raises(ValueError, match="x_T: contains NaN or Inf"):
        torch.func.grad(lambda x: solver.sample(_tanh_model(), x, GRID).sum())(bad_x)
    with pytest.raises(ValueError, match="x contains NaN/Inf"):
        torch.func.grad(lambda x: F.sample(_tanh_model(), x, SCHED.edm_sigma(GRID)).sum())(bad_x)
    with pytest.raises(ValueError, match="timesteps: must be strictly decreasing"):
        torch.func.grad(lambda t: solver.sample(_tanh_model(), x, t).sum())(GRID.flip(0))
    with pytest.raises(ValueError, match="coefficient_table: timesteps: must be strictly decreasing"):
        torch.func.grad(lambda t: fused.coefficient_table(SCHED, t, SolverSpec("dpmpp", 3)).sum())(GRID.flip(0))
    nan_model = ld3_ext.wrap_model(lambda x, s: x * float("nan"), SCHED, prediction="x0", time_input="sigma")
    with pytest.raises(ld3_ext.wrappers.ModelOutputError, match="NaN/Inf at step 0"):
        torch.func.jvp(lambda x: solver.sample(nan_model, x, GRID), (x,), (x,))


@pytest.mark.parametrize("name", ["dpmpp3", "unipc", "ipndm", "euler", "heun"])
def test_grid_made_under_inference_mode_gives_the_references_gradient(name):
    """A grid (or model times) made under torch.inference_mode cannot be saved for backward: the whole-sampler
    node declines it and the fused backend gives the reference's gradient w.r.t. x_T instead of failing."""
    with torch.inference_mode():
        grid = GRID.clone()
        model_times = GRID * 0.99
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 80
    for tm in (None, model_times):
        grads = {}
        for backend in ("fused", "reference"):
            xx = x.clone().requires_grad_()
            SOLVERS[name](backend).sample(_tanh_model(), xx, grid, tm).pow(2).sum().backward()
            grads[backend] = xx.grad
        assert grads["fused"].abs().max() > 1e-3
        torch.testing.assert_close(grads["fused"], grads["reference"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", ["dpmpp3", "unipc", "heun"])
def test_checkpoint_model_under_torch_func_grad(name, backend):
    """torch.func.grad/jacrev/hessian disable the saved-tensor hooks that checkpointing uses: there the network
    evaluations keep their graphs, with the gradients of checkpoint_model=False.  Likewise under vmap, whose
    batched tensors a later backward's recomputation could not use."""
    model = _tanh_model()
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * 80
    plain, ckpt = SOLVERS[name](backend), SOLVERS[name](backend)
    ckpt.checkpoint_model = True
    for transform in (lambda s: torch.func.grad(lambda x: s.sample(model, x, GRID).pow(2).sum())(x),
                      lambda s: torch.func.jacrev(lambda t: s.sample(model, x, t))(GRID),
                      lambda s: torch.func.hessian(lambda x: s.sample(model, x, GRID).pow(2).sum())(x)):
        want = transform(plain)
        assert want.abs().max() > 1e-5
        torch.testing.assert_close(transform(ckpt), want, rtol=1e-12, atol=1e-12)
    grads = []
    for solver in (plain, ckpt):
        xs = torch.stack([x, -x]).requires_grad_()
        torch.func.vmap(lambda x: solver.sample(model, x, GRID))(xs).pow(2).sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ckpt_model", [False, True])
@pytest.mark.parametrize("name", ["dpmpp3", "unipc", "ipndm"])
def test_checkpointed_sample_under_save_on_cpu(name, ckpt_model):
    """torch.utils.checkpoint (non-reentrant) under save_on_cpu re-runs the sample with inputs unpacked through the
    hooks: new tensor objects that share the originals' gradient accumulators.  The whole-sampler node took them for
    foreign leaves and declined in the recomputation only, so the recomputation saved other tensors than the
    forward had (CheckpointError).  Gradients as the reference's."""
    model = _tanh_model()
    grads = {}
    for backend in ("fused", "reference"):
        solver = SOLVERS[name](backend)
        solver.checkpoint_model = ckpt_model
        x = (torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80).requires_grad_()
        t = GRID.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu():
            y = torch.utils.checkpoint.checkpoint(lambda xx, tt: solver.sample(model, xx, tt), x, t,
                                                  use_reentrant=False)
        y.pow(2).sum().backward()
        grads[backend] = (x.grad, t.grad)
    assert grads["reference"][1].abs().max() > 1e-5
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# double backward
# ----------------------------------------------------------------------------------------------
def test_gradgradcheck_of_the_fused_update():
    x, coef, hist = _inputs(shape=(2, 3), k=2)
    args = [x.requires_grad_(), coef.requires_grad_(), *[m.requires_grad_() for m in hist]]
    assert torch.autograd.gradgradcheck(lambda x, c, *h: fused.multistep_update(x, c, list(h)), args)


def test_gradgradcheck_of_the_fused_coefficient_table():
    t = GRID.clone().requires_grad_()
    for spec in (SolverSpec("dpmpp", 3), SolverSpec("unipc", 2, variant="bh2"), SolverSpec("ipndm", 4)):
        assert torch.autograd.gradgradcheck(lambda t: fused.coefficient_table(SCHED, t, spec), [t])


@pytest.mark.parametrize("solver", [lambda b: ld3_ext.DPMSolverPP(order=3, backend=b),
                                    lambda b: ld3_ext.UniPC(order=2, backend=b),
                                    lambda b: ld3_ext.IPNDM(order=3, backend=b)], ids=["dpmpp3", "unipc2", "ipndm3"])
def test_hessian_vector_product_through_the_whole_sampler(solver):
    """create_graph=True through the one-node fused sampler gives the reference path's second derivatives
    (it used to return None for the timestep path: a gradient penalty would have been silently wrong)."""
    model, mix = _model()
    x0 = mix.prior_noise(SCHED, 4, generator=torch.Generator().manual_seed(7))
    v_t = torch.tensor([0.0, 0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
    v_x = torch.randn_like(x0)
    res = {}
    for b in ("fused", "reference"):
        t = GRID.clone().requires_grad_()
        tm = GRID.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        y = solver(b).sample(model, x, t, model_timesteps=tm)
        gt, gtm, gx = torch.autograd.grad(y.pow(2).sum(), [t, tm, x], create_graph=True)
        res[b] = torch.autograd.grad((gt * v_t).sum() + (gtm * v_t).sum() + (gx * v_x).sum(), [t, tm, x])
    for a, r in zip(res["fused"], res["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
    assert res["fused"][0].abs().max() > 0 and res["fused"][2].abs().max() > 0


@pytest.mark.parametrize("solver", [lambda b: ld3_ext.DPMSolverPP(order=3, backend=b),
                                    lambda b: ld3_ext.UniPC(order=2, backend=b),
                                    lambda b: ld3_ext.UniPC(order=3, variant="bh2", backend=b),
                                    lambda b: ld3_ext.IPNDM(order=3, backend=b),
                                    lambda b: ld3_ext.Euler(backend=b)],
                         ids=["dpmpp3", "unipc2", "unipc3bh2", "ipndm3", "euler"])
def test_create_graph_with_the_default_model_timesteps(solver):
    """sample(model, x, t) with no model_timesteps: the network times are t itself, an ancestor of the table.
    The double backward asked for the table's and t's gradients at once, so t got the table path twice."""
    model, mix = _model()
    x0 = mix.prior_noise(SCHED, 4, generator=torch.Generator().manual_seed(7))
    v_t = torch.tensor([0.0, 0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
    res = {}
    for b in ("fused", "reference"):
        for cg in (False, True):
            t = GRID.clone().requires_grad_()
            y = solver(b).sample(model, x0, t)
            (gt,) = torch.autograd.grad(y.pow(2).sum(), [t], create_graph=cg)
            res[b, cg] = gt.detach()
            if cg:  # and the Hessian-vector product built on it
                res[b, "hvp"] = torch.autograd.grad((gt * v_t).sum(), [t])[0]
    for key in ((b, cg) for b in ("fused", "reference") for cg in (False, True)):
        torch.testing.assert_close(res[key], res["reference", False], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res["fused", "hvp"], res["reference", "hvp"], rtol=1e-9, atol=1e-11)
    assert res["reference", False].abs().max() > 0 and res["reference", "hvp"].abs().max() > 0


# ----------------------------------------------------------------------------------------------
# the ops layer checks its arguments on both backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("case, exc, match", [
    ("broadcasting history", ValueError, r"history\[0\] has shape \(3, 4\) but x has shape \(1, 4\)"),
    ("too many history terms", ValueError, "history holds 6 tensors, at most 4"),
    ("mixed dtypes", TypeError, r"history\[1\] has dtype torch.float32 but x has dtype torch.float64"),
    ("short coef", ValueError, "coef must be 1-D with between 1 \\+ len\\(history\\) = 3"),
    ("history None", TypeError, "history must be a sequence of tensors, got NoneType"),
])
def test_ops_update_checks_arguments_on_both_backends(backend, case, exc, match):
    x = torch.randn(1, 4, dtype=torch.float64)
    coef = torch.ones(5, dtype=torch.float64)
    hist = {"broadcasting history": [torch.randn(3, 4, dtype=torch.float64)],
            "too many history terms": [x.clone() for _ in range(6)],
            "mixed dtypes": [x.clone(), x.float()],
            "short coef": [x.clone(), x.clone()],
            "history None": None}[case]
    if case == "short coef":
        coef = torch.ones(2, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        ops.multistep_update(x, coef, hist, backend)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_ops_coefficient_table_checks_arguments(backend):
    spec = SolverSpec("dpmpp", 2)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule, got str"):
        ops.coefficient_table("edm", GRID, spec, backend)
    with pytest.raises(TypeError, match="spec must be a SolverSpec, got dict"):
        ops.coefficient_table(SCHED, GRID, {"kind": "dpmpp"}, backend)
    with pytest.raises(ValueError, match="timesteps must be a 1-D tensor with at least 2 entries, got list"):
        ops.coefficient_table(SCHED, [80.0, 1.0], spec, backend)
    with pytest.raises(TypeError, match="timesteps must be real numbers, got torch.complex128"):
        ops.coefficient_table(SCHED, GRID.to(torch.complex128), spec, backend)
    for validate in (True, False):  # the type checks run either way
        with pytest.raises(TypeError, match="timesteps must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"):
            ops.coefficient_table(SCHED, GRID.to_sparse(), spec, backend, validate=validate)


def test_adjoint_refuses_v_sharing_memory_with_scale_or_w():
    """On CUDA every block reads scale and w while earlier blocks already write v: refused everywhere."""
    x, coef, hist = _inputs()
    buf = torch.randn(x.numel() + 4, dtype=torch.float64)
    v = buf[: x.numel()].view_as(x)
    lam = torch.randn_like(x)
    w = torch.tensor([0.3, -0.2], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="v must not share memory with scale or w"):
        adjoint.multistep_adjoint_step(lam, v, buf[:1], [], x, hist[0], w, None)
    with pytest.raises(RuntimeError, match="v must not share memory with scale or w"):
        adjoint.multistep_adjoint_step(lam, v, torch.tensor(0.9, dtype=torch.float64), [], x, hist[0], buf[:2], None)


def test_coefficient_table_step_count_bound():
    """The native table's offsets are int: more than 10^7 steps is refused, not overflowed."""
    t = torch.linspace(80.0, 0.002, 10_000_002, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="at most 10,000,000 steps"):
        fused.coefficient_table(SCHED, t, SolverSpec("euler", 1))
