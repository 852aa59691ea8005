#!/usr/bin/env python
"""Train the built-in digits denoiser (ld3_ext/data/digits_denoiser.safetensors).

EDM training (Karras et al. 2022): sigma ~ logNormal(P_mean, P_std), loss weight
(sigma^2 + sd^2) / (sigma sd)^2 on ||D(x + sigma n; sigma) - x||^2, Adam with a cosine learning rate,
and an EMA of the weights (the EMA is what ships).  A fixed step count (not a time limit) keeps the run
reproducible for a given seed and torch version; ~2 minutes on 2 CPU cores.

    python scripts/train_digits_model.py            # writes the package weights
    python scripts/train_digits_model.py --steps 200 --out /tmp/x.safetensors   # quick check
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ld3_ext.models._io import save_state  # noqa: E402
from ld3_ext.models.digits import DEFAULT_CONFIG, DigitsDenoiser, real_digits  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ld3_ext", "data",
                           "digits_denoiser.safetensors")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-mean", type=float, default=-1.2)
    ap.add_argument("--p-std", type=float, default=1.2)
    ap.add_argument("--seed", type=int, default=0)
    # one thread: on a shared 2-core box a second OpenMP thread made each step several times slower
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                    help="store fp16 weights (halves the file; the loader upcasts)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    data = real_digits().reshape(-1, 64)
    sd = float(data.std())
    cfg = dict(DEFAULT_CONFIG, sigma_data=round(sd, 6))
    net = DigitsDenoiser(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    warm = max(1, a.steps // 50)
    # linear warm-up then cosine decay to 2 % of the peak rate
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(k, a.steps) / a.steps))))
    g = torch.Generator().manual_seed(a.seed)
    t0, run = time.time(), 0.0
    for step in range(1, a.steps + 1):
        x = data[torch.randint(0, data.shape[0], (a.batch,), generator=g)]
        sigma = (a.p_mean + a.p_std * torch.randn(a.batch, generator=g)).exp()
        noisy = x + sigma[:, None] * torch.randn(x.shape, generator=g)
        w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = (w[:, None] * (net(noisy, sigma) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - a.ema)
        lv = float(loss.detach())
        run = 0.98 * run + 0.02 * lv if step > 1 else lv
        if step % 500 == 0 or step == a.steps:
            print(f"step {step:5d}  loss(ema) {run:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.1f}s",
                  flush=True)
    dt = time.time() - t0
    state = {k: (v.half() if a.fp16 else v) for k, v in ema.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_state(a.out, state, cfg, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr, ema=a.ema,
               p_mean=a.p_mean, p_std=a.p_std, train_seconds=round(dt, 1), torch=torch.__version__,
               dataset="sklearn.datasets.load_digits (1797 images, x/8-1)", script="scripts/train_digits_model.py")
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.2f} MB) after {dt:.1f}s; sigma_data={sd:.4f}")


if __name__ == "__main__":
    main()
