#!/usr/bin/env python
"""Train the digits classifier behind "digits-FD" (ld3_ext/data/digits_classifier.safetensors).

Trained on 75 % of sklearn's digits (the split of ``digits_classifier.digits_split(seed=0)``), with
light augmentation (random one-pixel shifts, small Gaussian noise) so that its features react to
sample quality smoothly instead of only to exact training images.  The held-out 25 % gives the
accuracy stored in the metadata.  Fixed seed, fixed epochs, well under a minute on one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ld3_ext.models._io import save_state  # noqa: E402
from ld3_ext.models.digits_classifier import DEFAULT_CONFIG, DigitsClassifier, digits_split  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ld3_ext", "data",
                           "digits_classifier.safetensors")


def shift_batch(x, g):
    """Random shifts of -1..1 pixel in each direction (edge-padded with the background value -1)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, dy:dy + 8, dx:dx + 8]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    xtr, ytr, xte, yte = digits_split(seed=0)
    net = DigitsClassifier(DEFAULT_CONFIG)
    steps_per_epoch = (xtr.shape[0] + a.batch - 1) // a.batch
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for ep in range(a.epochs):
        net.train()
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch:(i + 1) * a.batch]
            x = shift_batch(xtr[idx], g) + 0.05 * torch.randn(xtr[idx].shape, generator=g)
            loss = F.cross_entropy(net(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % 5 == 0 or ep + 1 == a.epochs:
            net.eval()
            with torch.no_grad():
                acc = float((net(xte).argmax(1) == yte).float().mean())
            print(f"epoch {ep + 1:3d}  loss {float(loss):.4f}  test acc {acc:.4f}  {time.time() - t0:5.1f}s", flush=True)
    dt = time.time() - t0
    net.eval()
    with torch.no_grad():
        acc = float((net(xte).argmax(1) == yte).float().mean())
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_state(a.out, net.state_dict(), DEFAULT_CONFIG, seed=a.seed, epochs=a.epochs, test_accuracy=round(acc, 4),
               split="digits_split(seed=0, test_fraction=0.25)", train_seconds=round(dt, 1), torch=torch.__version__,
               script="scripts/train_digits_classifier.py")
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.2f} MB) after {dt:.1f}s; held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
