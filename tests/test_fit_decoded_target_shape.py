"""fit(noise, target) with a decoder decodes target unless target_decoded=True: targets already decoded (another
shape than the latent noise) without that flag were decoded again -- an error from inside the decoder (a VAE's
channel mismatch) or, for a decoder that took them, the loss's "pred and target must have the same shape" after the
init grid search.  Now refused at once, naming target_decoded."""
import pytest
import torch

import ld3_ext
from ld3_ext import testbeds


def _setup():
    g = torch.Generator().manual_seed(0)
    mix = testbeds.GaussianMixture(means=torch.randn(3, 16, generator=g, dtype=torch.float64),
                                   stds=torch.full((3, 16), 0.3, dtype=torch.float64), event_shape=(1, 4, 4))
    s = ld3_ext.VPLinear()
    up = torch.nn.Upsample(scale_factor=2)
    return mix.model(s), s, (lambda z: torch.tanh(up(z)))


def test_decoded_target_without_the_flag_is_refused_naming_it():
    model, s, dec = _setup()
    tr = ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=3, decoder=dec, rounds_v1=1, rounds_v2=0, progress=False)
    noise = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    decoded = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="target_decoded=True"):
        tr.fit(noise, decoded)


def test_decoded_target_with_the_flag_trains():
    model, s, dec = _setup()
    tr = ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=3, decoder=dec, rounds_v1=1, rounds_v2=0, progress=False,
                            init="logsnr", time_mode="lambda")
    noise = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    decoded = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    assert tr.fit(noise, decoded, target_decoded=True).nfe == 3
