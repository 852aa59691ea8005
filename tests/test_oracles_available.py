"""CI sets LD3_REQUIRE_ORACLES=1: there every third-party oracle must load, so that the comparisons
against diffusers, k-diffusion, scipy and the hypothesis fuzzers cannot pass by silently skipping
(a broken install would otherwise turn them all into skips and the run would still be green)."""
from __future__ import annotations

import importlib
import os

import pytest

from _oracles import load_kdiffusion_sampling

required = pytest.mark.skipif(os.environ.get("LD3_REQUIRE_ORACLES") != "1", reason="LD3_REQUIRE_ORACLES is not set")


@required
@pytest.mark.parametrize("module", ["diffusers", "hypothesis", "scipy.linalg"])
def test_oracle_module_imports(module):
    importlib.import_module(module)  # an ImportError here fails the test instead of skipping the oracles


@required
def test_kdiffusion_sampling_loads():
    try:
        sampling = load_kdiffusion_sampling()
    except pytest.skip.Exception as skip:  # the loader skips its callers when k-diffusion is absent
        pytest.fail(f"k-diffusion oracle unavailable: {skip}")
    assert callable(sampling.sample_dpmpp_2m) and callable(sampling.get_sigmas_karras)
