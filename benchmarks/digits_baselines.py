"""Teacher-RMSE of NFE-5 DPM-Solver++(3M) on the digits model for each baseline schedule."""
import time, torch
torch.set_num_threads(1)
from ld3_ext import DPMSolverPP, UniPC, discretizations as D
from ld3_ext.models.digits import load_digits_model, weights_sha256
from ld3_ext.baselines import dmn, gits
from ld3_ext.metrics import teacher_rmse, digits_fd
BK = "auto"
m, s = load_digits_model()
print("weights sha256", weights_sha256())
N = 1024
xT = s.prior_std() * torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
teacher = UniPC(order=3, backend=BK).sample(m, xT, D.logsnr_uniform(s, 20))
# check the teacher against a much finer solve
fine = UniPC(order=3, backend=BK).sample(m, xT, D.logsnr_uniform(s, 200))
print(f"teacher(20) vs UniPC-200: RMSE {float(teacher_rmse(teacher, fine).mean()):.4f}")
sol = DPMSolverPP(order=3, backend=BK)
t0 = time.time(); tg = gits(m, nfe=5, sample_shape=(1, 8, 8), n_samples=64, fine_steps=60, seed=0,
                            return_info=True); tgits = time.time() - t0
tg1 = gits(m, nfe=5, sample_shape=(1, 8, 8), n_samples=64, fine_steps=60, seed=0, coeff=1.0)
from ld3_ext.baselines import gits_preset
t0 = time.time(); tdmn = dmn(s, 5); tdm = time.time() - t0
grids = {"time_uniform": D.time_uniform(s, 5), "time_quadratic": D.time_quadratic(s, 5),
         "logSNR": D.logsnr_uniform(s, 5), "EDM rho=7": D.edm(s, 5), "DMN": tdmn, "GITS": tg.timesteps,
         "GITS coeff=1": tg1, "GITS cifar10 list": gits_preset("cifar10", s, 5)}
print(f"GITS search {tgits:.1f}s path {tg.path}; DMN {tdm:.1f}s")
print(f"teacher digits-FD (first 256): {digits_fd(teacher[:256]):.2f}")
for k, t in grids.items():
    x = sol.sample(m, xT, t)
    r = teacher_rmse(x, teacher)
    print(f"{k:15s} RMSE {float(r.mean()):.4f} ± {float(r.std() / N ** 0.5):.4f}  digits-FD(256) {digits_fd(x[:256]):7.2f}  "
          f"sigmas {[round(v, 4) for v in s.edm_sigma(t).tolist()]}")
x32 = xT[:256].float()
for bk in ("auto", "reference"):
    t = D.logsnr_uniform(s, 10).float()
    ts = []
    for _ in range(7):
        t0 = time.time(); DPMSolverPP(order=3, backend=bk).sample(m, x32, t); ts.append(time.time() - t0)
    ts.sort()
    print(f"sampling 256 digits, NFE 10, DPM++(3M) fp32, 1 thread, backend={bk}: best {ts[0]*1e3:.1f} ms, median {ts[3]*1e3:.1f} ms")
