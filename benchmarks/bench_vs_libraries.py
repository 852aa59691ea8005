"""ld3_ext's samplers against the same solvers in k-diffusion and diffusers, end to end.

    python benchmarks/bench_vs_libraries.py [--json PATH] [--threads 1] [--shapes 64x3x32x32,...] [--quick]

What a user choosing a library would time: one 10-step deterministic sample on the same float sigma grid
(EDM, rho = 7, sigma 80 -> 0.002), float32, with a trivial denoiser (x0 = 0.9 x in the VE view), so that
the numbers are the samplers' own cost.  Solvers, as the oracle tests pair them (tests/test_oracle_kdiffusion.py,
tests/test_oracle_diffusers.py):

  dpmpp_2m  DPMSolverPP(2, midpoint)   k-diffusion sample_dpmpp_2m              diffusers DPMSolverMultistep(order 2)
  dpmpp_3m  DPMSolverPP(3, heun)       k-diffusion sample_dpmpp_3m_sde(eta=0)   diffusers DPMSolverMultistep(order 3)
  unipc_3   UniPC(3, bh2)              (none)                                   diffusers UniPCMultistep(order 3)

(all with lower_order_final=False, since k-diffusion has no such switch; diffusers runs with
final_sigmas_type="sigma_min" and its sigmas overwritten by the grid, as in the oracle tests).

Modes:
  sample  no gradient.  ld3_ext with its defaults (fused backend, output NaN/Inf checks on) and with
          backend="reference"; k-diffusion's samplers, its 3M given a noise sampler that returns 0 (at eta = 0
          it never uses it, but as shipped builds a Brownian tree first: this favours k-diffusion); diffusers'
          scheduler loop, set_timesteps included (a pipeline calls it for every image; it is a small part of
          diffusers' time).  diffusers keeps its state in VP coordinates: it gets the same noise scaled by
          alpha_T and a denoiser returning the same x0.
  grad    forward + backward w.r.t. the sigma grid, what LD3 training does: ld3_ext fused and reference
          against autograd through k-diffusion's sampler (its @torch.no_grad unwrapped), which is how research
          code differentiates a sampler (UniPC: ld3_ext's two backends only).  diffusers' step() reads its
          sigmas from the scheduler and is not differentiable w.r.t. them: no diffusers grad row.

Before timing, every variant's output is compared with ld3_ext's float64 reference solve of the same problem
(max |difference| / max |reference|): above 1e-5 for samples or 1e-3 for grid gradients the run stops, since
timing different computations would mean nothing.  The grid gradients are compared as sigma * dL/dsigma (the
gradient w.r.t. log sigma): dL/dsigma itself spans five orders of magnitude along the grid, so a variant that
dropped the gradient of most grid points would still pass on it.  The errors are in the JSON.

Timing as in bench_kernels.py: medians of round-robin samples after warm-up, the glibc malloc guard set by
re-executing (see benchmarks/README.md), one record per (mode, solver, shape, library) with median_s and
ratio_vs_ld3 (the variant's time over ld3_ext fused's: > 1 means ld3_ext is faster).
"""
from __future__ import annotations

import os
import sys

# bench_kernels.MALLOC_ENV (not imported from there: that imports torch, and the guard must run before)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

if __name__ == "__main__" and "--no-malloc-guard" not in sys.argv[1:] \
        and not all(k in os.environ for k in MALLOC_ENV):
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], dict(os.environ, **MALLOC_ENV))

import argparse  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, Timer, machine_info, shape_name  # noqa: E402

import ld3_ext  # noqa: E402
from ld3_ext.atomic_io import atomic_write_json  # noqa: E402

N_STEPS = 10
SIGMA_MAX, SIGMA_MIN, RHO = 80.0, 0.002, 7.0
# gradients: float32 autograd sums put ld3_ext's own reference backend near 1e-4; a dropped grid point is O(1) off
SAMPLE_TOL, GRAD_TOL = 1e-5, 1e-3
SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc_3")


def load_kdiffusion_sampling():
    """k_diffusion.sampling, loaded as the oracle tests load it (its package __init__ imports torchvision and
    skimage, which the sampling module does not need): tests/_oracles.py."""
    tests_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        from _oracles import import_kdiffusion_sampling
        return import_kdiffusion_sampling()
    except ImportError as exc:
        raise SystemExit(f"{exc}: the comparison needs the test extras and k-diffusion "
                         "(pip install --no-deps k-diffusion==0.1.1.post1)") from None


def library_versions():
    from importlib import metadata
    out = {"ld3_ext": ld3_ext.__version__, "torch": torch.__version__}
    for dist in ("k-diffusion", "diffusers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def ld3_solver(name, backend):
    if name == "dpmpp_2m":
        return ld3_ext.DPMSolverPP(2, solver_type="midpoint", lower_order_final=False, backend=backend)
    if name == "dpmpp_3m":
        return ld3_ext.DPMSolverPP(3, solver_type="heun", lower_order_final=False, backend=backend)
    return ld3_ext.UniPC(3, variant="bh2", lower_order_final=False, backend=backend)


def diffusers_scheduler(name):
    import diffusers
    common = dict(lower_order_final=False, final_sigmas_type="sigma_min", prediction_type="sample")
    if name == "unipc_3":
        return diffusers.UniPCMultistepScheduler(solver_order=3, solver_type="bh2", **common)
    order, kind = (2, "midpoint") if name == "dpmpp_2m" else (3, "heun")
    return diffusers.DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++", solver_type=kind,
                                                 **common)


def rel_err(a, ref):
    return float((a.detach().double() - ref).abs().max() / ref.abs().max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shapes", help="comma-separated subset, e.g. 64x3x32x32,1x3x256x256")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated subset of {','.join(SOLVERS)}")
    ap.add_argument("--modes", default="sample,grad", help="comma-separated subset of sample,grad")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--no-malloc-guard", action="store_true", help="do not set the glibc malloc variables")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    solvers = [s for s in args.solvers.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    bad = [s for s in solvers if s not in SOLVERS] + [m for m in modes if m not in ("sample", "grad")]
    if bad or not solvers or not modes:
        raise SystemExit(f"--solvers/--modes: unknown or empty selection {bad or '(empty)'}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    K = load_kdiffusion_sampling()
    timer = Timer(device, repeats=5 if args.quick else 15, warmup=1 if args.quick else 3,
                  min_sample_s=0.002 if args.quick else 0.05)

    sched = ld3_ext.EDM(SIGMA_MIN, SIGMA_MAX)
    ramp = torch.linspace(0, 1, N_STEPS + 1, dtype=torch.float64)
    sig64 = ((SIGMA_MAX ** (1 / RHO) + ramp * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO).to(device)
    alpha = 1.0 / torch.sqrt(1.0 + sig64 * sig64)  # diffusers' VP view: x_vp = alpha x_ve
    vp_scale = [0.9 / float(a) for a in alpha]     # x0 = 0.9 x_ve = (0.9 / alpha) x_vp

    def denoise_kd(x, sigma):  # k-diffusion's model(x, sigma) -> x0
        return 0.9 * x

    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, sched, prediction="x0")  # the defaults: output checks on
    records = []
    meta = {"machine": machine_info(device), "threads": args.threads, "device": device.type, "dtype": "float32",
            "steps": N_STEPS, "grid": f"EDM rho={RHO:g} sigma {SIGMA_MAX:g} -> {SIGMA_MIN:g}",
            "versions": library_versions()}

    def write_json(complete):
        if args.json:
            atomic_write_json(args.json, {**meta, "complete": complete, "records": records}, checksum=False)

    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        x_T = (SIGMA_MAX * torch.randn(shape, generator=gen)).to(device)
        g_out = torch.randn(shape, generator=gen).to(device)
        x_T_vp = (x_T.double() * alpha[0]).float()
        for name in solvers:
            ref_solver = ld3_solver(name, "reference")
            tt = sig64.clone().requires_grad_()
            ref_y = ref_solver.sample(model, x_T.double(), tt)
            ref_g = torch.autograd.grad(ref_y, tt, g_out.double())[0]
            ref_y = ref_y.detach()
            ours = {b: ld3_solver(name, b) for b in ("fused", "reference")}

            def ld3_sample(b):
                return lambda: ours[b].sample(model, x_T, sig64)

            def ld3_grad(b):
                def run():
                    t = sig64.clone().requires_grad_()
                    return torch.autograd.grad(ours[b].sample(model, x_T, t), t, g_out)[0]
                return run

            kd_fn = {"dpmpp_2m": K.sample_dpmpp_2m, "dpmpp_3m": K.sample_dpmpp_3m_sde}.get(name)

            def kd_call(fn, s):
                if name == "dpmpp_3m":  # eta = 0 never draws noise: no Brownian tree to build
                    return fn(denoise_kd, x_T, s, eta=0.0, disable=True, noise_sampler=lambda *a: 0.0)
                return fn(denoise_kd, x_T, s, disable=True)

            def kd_grad():
                s = sig64.clone().requires_grad_()
                return torch.autograd.grad(kd_call(kd_fn.__wrapped__, s), s, g_out)[0]

            scheduler = diffusers_scheduler(name)

            def diffusers_sample():
                scheduler.set_timesteps(N_STEPS)
                scheduler.sigmas = sig64.cpu()  # the float grid (see the oracle tests); diffusers keeps it on the CPU
                x = x_T_vp
                for i, ts in enumerate(scheduler.timesteps):
                    x = scheduler.step(vp_scale[i] * x, ts, x).prev_sample
                return x

            for mode in modes:
                if mode == "sample":
                    variants = {"ld3_ext": ld3_sample("fused"), "ld3_ext_reference": ld3_sample("reference")}
                    if kd_fn is not None:
                        variants["k_diffusion"] = lambda: kd_call(kd_fn, sig64)
                    variants["diffusers"] = diffusers_sample
                    with torch.no_grad():
                        errs = {}
                        for v, fn in variants.items():
                            out = fn()
                            errs[v] = rel_err(out / alpha[-1] if v == "diffusers" else out, ref_y)
                        tol = SAMPLE_TOL
                        if max(errs.values()) > tol:
                            raise SystemExit(f"{name} {shape_name(shape)}: samples disagree with the float64 "
                                             f"reference beyond {tol:g}: {errs}")
                        res = timer.run(variants)
                else:
                    variants = {"ld3_ext": ld3_grad("fused"), "ld3_ext_reference": ld3_grad("reference")}
                    if kd_fn is not None:
                        variants["k_diffusion"] = kd_grad
                    # as sigma * dL/dsigma: every grid point's gradient counts (see the module docstring)
                    errs = {v: rel_err(fn().double() * sig64, ref_g * sig64) for v, fn in variants.items()}
                    if max(errs.values()) > GRAD_TOL:
                        raise SystemExit(f"{name} {shape_name(shape)}: grid gradients disagree with the float64 "
                                         f"reference beyond {GRAD_TOL:g}: {errs}")
                    res = timer.run(variants)
                for v, med in res.items():
                    records.append({"mode": mode, "solver": name, "shape": shape_name(shape), "library": v,
                                    "median_s": med, "ratio_vs_ld3": med / res["ld3_ext"],
                                    "max_rel_err_vs_float64": errs[v], "threads": args.threads})
                write_json(False)  # a run stopped at a time limit keeps what it measured
    print_table(records)
    write_json(True)
    if args.json:
        print(f"wrote {len(records)} records to {args.json}")
    return records


def print_table(records):
    print(f"{'mode':7s} {'solver':9s} {'shape':13s} {'library':18s} {'median_us':>10s} {'x ld3':>7s} {'err':>9s}")
    for r in records:
        print(f"{r['mode']:7s} {r['solver']:9s} {r['shape']:13s} {r['library']:18s} {r['median_s'] * 1e6:10.1f} "
              f"{r['ratio_vs_ld3']:7.2f} {r['max_rel_err_vs_float64']:9.1e}")


if __name__ == "__main__":
    main()
