"""A k-diffusion user's path (k-diffusion integration audit): learned sigmas into k-diffusion's own samplers with a
float32 network, model sigmas given as the list to_diffusers() returns, and an ld3 DiffusionModel handed to a
k-diffusion sampler by mistake.  Oracle: the same solve in float64 (ld3's own sample, k-diffusion's samplers)."""
import pytest
import torch

import ld3_ext
from ld3_ext import EDM, VPDiscrete, LearnedSchedule, discretizations, wrap_model
from ld3_ext import functional as F


class _ConvDenoiser(torch.nn.Module):
    """A float32 k-diffusion-style denoiser D(x, sigma[B]) -> x0 with parameters (its dtype is the network's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, sigma):
        c = 1.0 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1.0)
        return c * x + 0.1 * torch.tanh(self.conv(x * c.sqrt()))


def _schedule(n=5):
    s = EDM()
    return LearnedSchedule(discretizations.logsnr_uniform(s, n), solver_config=ld3_ext.Euler().config(), nfe=n,
                           schedule_config=s.config())


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_heun", "sample_lms", "sample_dpmpp_2m"])
def test_default_sigmas_run_k_diffusions_samplers_on_a_float32_network(sampler):
    """float64 CPU sigmas made k-diffusion's append_dims'd sigma float64: the state turned float64 and the
    float32 conv failed ("Input type (double) and bias type (float)") in Euler, Heun and LMS."""
    from _oracles import load_kdiffusion_sampling
    K = load_kdiffusion_sampling()
    L, net = _schedule(), _ConvDenoiser()
    sig = L.to_k_diffusion()
    assert sig.dtype == torch.get_default_dtype() == torch.float32 and sig.device.type == "cpu"
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * float(sig[0])
    out = getattr(K, sampler)(net, x, sig, disable=True)
    assert out.dtype == torch.float32
    ref = getattr(K, sampler)(net.double(), x.double(), L.to_k_diffusion(dtype=torch.float64), disable=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_to_k_diffusion_dtype_device_and_bad_arguments():
    L = _schedule()
    s64 = L.to_k_diffusion(dtype=torch.float64)
    assert s64.dtype == torch.float64 and torch.equal(s64, L.timesteps)  # EDM: sigma = t, unrounded
    z = L.to_k_diffusion(True, dtype=torch.float16, device="cpu")
    assert z.dtype == torch.float16 and z.numel() == 7 and float(z[-1]) == 0.0
    with pytest.raises(TypeError, match="to_k_diffusion: dtype must be a floating torch.dtype"):
        L.to_k_diffusion(dtype=torch.int64)
    with pytest.raises(TypeError, match="to_k_diffusion: dtype"):
        L.to_k_diffusion(dtype="float32")
    with pytest.raises(ValueError, match="to_k_diffusion: device='gpu0' names no torch device"):
        L.to_k_diffusion(device="gpu0")


def test_model_sigmas_as_a_python_list_are_not_rounded_to_float32():
    """to_diffusers()['model_sigmas'] is a list of Python floats: torch.as_tensor made it float32, so the network
    ran at sigma 23.627836227 instead of 23.627836437 and the sample was 3e-8 off the schedule's own."""
    s = VPDiscrete.linear()
    model = wrap_model(lambda x, t: 0.3 * x + 0.01 * t.reshape(-1, 1) * x, s, prediction="eps")
    t = discretizations.logsnr_uniform(s, 5)
    tm = t.clone()
    tm[1:-1] = tm[1:-1] * 0.97  # decoupled network times (LD3's t~; the ends stay)
    L = LearnedSchedule(t, tm, solver_config=ld3_ext.DPMSolverPP(2).config(), nfe=5, schedule_config=s.config())
    x_T = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = L.sample(model, x_T)
    d = L.to_diffusers()
    assert isinstance(d["model_sigmas"], list) and isinstance(d["sigmas"], list)
    a0, a_end = s.alpha(t[[0, -1]])
    with pytest.warns(UserWarning, match="decoupled model times"):
        sig = L.to_k_diffusion(dtype=torch.float64)
    for sigmas in (sig, d["sigmas"]):
        out = F.sample(model, x_T / a0, sigmas, solver=ld3_ext.DPMSolverPP(2), model_sigmas=d["model_sigmas"]) * a_end
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)


def test_a_diffusion_model_handed_to_a_k_diffusion_sampler_is_refused_with_the_way_out():
    """k-diffusion calls model(x, sigma * s_in): at batch 1 sigma 14.6 was read as time 14.6 of a [0.001, 1]
    schedule and extrapolated, silently; at batch 2 predict's message did not say what to do."""
    from _oracles import load_kdiffusion_sampling
    K = load_kdiffusion_sampling()
    s = VPDiscrete.linear()
    model = wrap_model(lambda x, t: 0.5 * x, s, prediction="eps")
    L = LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=ld3_ext.Euler().config(), nfe=4,
                        schedule_config=s.config())
    sig = L.to_k_diffusion()
    for batch in (1, 2):
        x = torch.randn(batch, 3) * float(sig[0])
        with pytest.raises(ValueError, match=r"k-diffusion samplers pass per-sample sigmas.*to_denoiser\(model\)"):
            K.sample_euler(model, x, sig, disable=True)
    out = K.sample_euler(F.to_denoiser(model), torch.ones(1, 3) * float(sig[0]), sig, disable=True)
    assert torch.isfinite(out).all()
    # on EDM sigma is a time of the schedule, so no range check fires: a batch above 1 met predict's message,
    # which named no way out (README walkthrough)
    e = ld3_ext.EDM()
    edm_model = wrap_model(lambda x, t: 0.5 * x, e, prediction="x0")
    sig_e = LearnedSchedule(discretizations.edm(e, 4), solver_config=ld3_ext.Euler().config(), nfe=4,
                            schedule_config=e.config()).to_k_diffusion()
    with pytest.raises(ValueError, match=r"one time for the whole batch.*to_denoiser\(model\)"):
        K.sample_euler(edm_model, torch.randn(2, 3) * float(sig_e[0]), sig_e, disable=True)
    # the module call itself at a time of the schedule, and at its ends, is unchanged
    x = torch.randn(2, 3)
    for tt in (torch.tensor(0.5), torch.tensor([s.t_min]), torch.tensor(s.t_max, dtype=torch.float64)):
        torch.testing.assert_close(model(x, tt), model.x0(x, tt))
    with pytest.raises(ValueError, match=r"t=nan is outside"):
        model(x, torch.tensor(float("nan")))


def test_the_module_call_with_a_number_time_compiles_to_one_graph():
    """The number check built a tensor and read it back: torch.compile of model(x, 0.5) broke into 4 graphs."""
    from torch._dynamo.testing import CompileCounter
    model = ld3_ext.wrap_model(lambda x, t: torch.tanh(x) * 0.1, ld3_ext.VPLinear(), prediction="eps")
    counter = CompileCounter()
    torch._dynamo.reset()
    fn = torch.compile(lambda xx: model(xx, 0.5) * 2, backend=counter)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(fn(x), model(x, 0.5) * 2)
    assert counter.frame_count == 1


def test_the_module_call_checks_a_plain_number_time_as_a_tensor_one():
    """model(x, 0.0) below VPLinear's t_min was let through while model(x, torch.tensor(0.0)) was refused."""
    s = ld3_ext.VPLinear()
    model = ld3_ext.wrap_model(lambda x, t: torch.tanh(x) * 0.1, s, prediction="eps")
    x = torch.randn(2, 3, dtype=torch.float64)
    for bad in (0.0, 0, 5.0, float("nan")):
        with pytest.raises(ValueError, match="is outside the schedule's times"):
            model(x, bad)
    torch.testing.assert_close(model(x, 0.5), model(x, torch.tensor(0.5, dtype=torch.float64)), rtol=0, atol=0)


def test_the_module_call_checks_numpy_and_integer_times_too():
    """np.float32 is no float and a 0-d array no number, an integer tensor no floating one: all three skipped every
    check and gave an extrapolated x0 (diff review)."""
    import numpy as np
    from fractions import Fraction
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: torch.tanh(x) * 0.1, s, prediction="x0")
    x = torch.randn(2, 3, dtype=torch.float64)
    for bad in (np.float32(80.8), np.float64(80.8), np.array(80.8), np.array([80.8]), np.int64(81),
                torch.tensor(81), Fraction(161, 2)):
        with pytest.raises(ValueError, match="is outside the schedule's times"):
            model(x, bad)
    ref = model(x, torch.tensor(0.5, dtype=torch.float64))
    for good in (np.float32(0.5), np.array(0.5), Fraction(1, 2)):
        torch.testing.assert_close(model(x, good), ref, rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.tensor(1)), model(x, 1.0), rtol=0, atol=0)
    # float32 round-off of an end passes, as for a float32 tensor
    assert torch.isfinite(model(x, np.float32(s.t_max))).all()
    for bad in (np.array(True), np.bool_(True), np.complex128(1.0)):
        with pytest.raises(TypeError, match="real time"):
            model(x, bad)
    for bad in (np.str_("0.5"), np.array(["0.5"])):  # not numbers: predict's own message
        with pytest.raises(TypeError, match="t must be a number or a tensor"):
            model(x, bad)
    # converted as predict converts a float: x's dtype (and device), not numpy's -- a float32 state's outputs are
    # those of the same time given as a float (the review of the first version of this check)
    seen = []
    for sched in (ld3_ext.VPCosine(), ld3_ext.VPLinear()):
        m32 = ld3_ext.wrap_model(lambda xx, tt: seen.append(tt.dtype) or torch.tanh(xx) * 0.1, sched, prediction="eps")
        x32 = torch.randn(4, 3)
        ref = m32(x32, 0.37)
        for same in (np.float64(0.37), np.array(0.37), np.longdouble(0.37)):
            torch.testing.assert_close(m32(x32, same), ref, rtol=0, atol=0)
    assert set(seen) == {torch.float32}
    with pytest.raises(TypeError, match="t must be a number or a tensor"):  # as before: predict's message
        model(x, np.array(0.5, dtype=">f8"))
    # a numpy half time is a half tensor's: put on the end it was rounded past (FlowMatching's 0.9999 is 1.0 in
    # float16, where alpha = 0: x0 was inf); several numpy times get the tensor call's messages
    flow = ld3_ext.FlowMatching(t_max=0.9999)
    fm = ld3_ext.wrap_model(lambda xx, tt: torch.tanh(xx) * 0.1, flow, prediction="velocity")
    half = fm(x, np.float16(0.9999))
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, fm(x, torch.tensor(0.9999, dtype=torch.float16)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="is outside the schedule's times"):
        model(x, np.array([80.8, 80.8]))
    with pytest.raises(ValueError, match="t holds 2 different times"):
        model(x, np.array([0.5, 0.7]))
    for bad in (np.array([0.5, 0.5], dtype=">f8"), np.array([0.5, None]), np.array(["0.5", "0.5"])):
        with pytest.raises(TypeError, match="t must be a number or a tensor"):  # predict's message, as before
            model(x, bad)


@pytest.mark.parametrize("call", ["solver", "trainer", "teacher", "to_denoiser"])
def test_a_plain_network_is_named_with_the_prediction_a_denoiser_takes(call, tmp_path):
    net = _ConvDenoiser()
    x = torch.randn(1, 2, 4, 4)
    t = discretizations.logsnr_uniform(EDM(), 3)
    with pytest.raises(TypeError, match=r"model must be a DiffusionModel, got _ConvDenoiser: .*prediction='edm'"):
        if call == "solver":
            ld3_ext.Euler().sample(net, x, t)
        elif call == "trainer":
            ld3_ext.LD3Trainer(net, EDM(), ld3_ext.Euler(), nfe=3, sample_shape=(2, 4, 4))
        elif call == "teacher":
            from ld3_ext.training.teacher import load_or_generate_teacher
            load_or_generate_teacher(net, EDM())
        else:
            F.to_denoiser(net)


@pytest.mark.parametrize("schedule", [ld3_ext.FlowMatching(), ld3_ext.VPCosine()], ids=["flow", "vp_cosine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_module_call_takes_a_half_precision_time_at_the_schedule_ends(schedule, dtype):
    """t in x's half dtype rounds t_max by up to an ulp (bfloat16 makes 0.999 a 1.0): the range check of
    DiffusionModel.forward allows that rounding (diff review), as predict() does, and evaluates at the end itself
    (at bfloat16's 1.0 FlowMatching's alpha is 0: x0 was inf from both, which this test compared equal); farther
    out is refused."""
    model = ld3_ext.wrap_model(lambda x, t: 0.5 * x, schedule, prediction="eps")
    x = torch.randn(2, 3).to(dtype)
    for end in (schedule.t_min, schedule.t_max):
        t = torch.tensor(end, dtype=dtype)
        want = model.x0(x, torch.tensor(end, dtype=torch.float64))
        assert torch.isfinite(want).all()
        torch.testing.assert_close(model(x, t), want, rtol=0, atol=0)
        torch.testing.assert_close(model.x0(x, t), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="is outside the schedule's times"):
        model(x, torch.tensor(schedule.t_max + 0.05, dtype=dtype))


class _TimeLinear(torch.nn.Module):
    """A network (x, t) -> eps defined at module level, so that it pickles."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return 0.1 * self.lin(x) * (1 + t.reshape(-1, 1))


def test_to_denoiser_pickles_and_gives_the_same_predictions():
    """to_denoiser returned a closure: torch.save of it (or handing it to a multiprocessing worker) failed with
    "Can't pickle local object"."""
    import io
    import pickle
    import torch
    import ld3_ext
    torch.manual_seed(0)
    model = ld3_ext.wrap_model(_TimeLinear(), ld3_ext.VPLinear(), prediction="eps")
    den = ld3_ext.to_denoiser(model)
    x, sigma = torch.randn(3, 4), torch.full((3,), 2.5)
    again = pickle.loads(pickle.dumps(den))
    buf = io.BytesIO()
    torch.save(den, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    want = den(x, sigma)
    assert torch.equal(again(x, sigma), want) and torch.equal(loaded(x, sigma), want)
    assert den.__name__ == f"denoiser_{model.name}" and again.__name__ == den.__name__


def test_to_denoiser_passes_its_keyword_arguments_to_the_model():
    """D(x, sigma, y=labels): a conditional model's conditions reach its network (the Denoiser class forwards
    **kw as the closure did)."""
    import ld3_ext
    seen = []

    def net(x, t, y=None):
        seen.append(y)
        return 0.1 * x + y.to(x.dtype).reshape(-1, 1)
    model = ld3_ext.wrap_model(net, ld3_ext.VPLinear(), prediction="eps", cond_key="y")
    den = ld3_ext.to_denoiser(model)
    x, sigma = torch.randn(3, 4), torch.full((3,), 2.5)
    y = torch.tensor([0, 1, 2])
    a, b = den(x, sigma, y=y), den(x, sigma, y=y + 1)
    assert seen and all(s is not None for s in seen) and not torch.equal(a, b)
