"""The ``ld3`` command line: sample end to end, and clear errors for bad --model strings."""
import json
import os
import sys
import types

import pytest
import torch

from ld3_ext import cli
from ld3_ext.models import ModelSpecError, load_model


def test_sample_ring_writes_png_and_ranks_schedules(tmp_path, capsys):
    out = tmp_path / "s"
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--nfe", "6", "--n", "64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert (out / "samples.png").stat().st_size > 1000
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("time_uniform", "time_quadratic", "logsnr", "edm"):
            rows[parts[0]] = float(parts[3])
    assert set(rows) == {"time_uniform", "time_quadratic", "logsnr", "edm"}
    # on the ring, lambda-aware grids beat the uniform-in-time grid by a wide margin
    assert rows["logsnr"] < 0.5 * rows["time_uniform"]
    assert rows["edm"] < 0.5 * rows["time_uniform"]


@pytest.mark.parametrize("spec, match", [
    ("gmm:nope", "unknown mixture"),
    ("gmm:ring2d@vp_weird", "unknown schedule"),
    ("not_a_module_xyz:factory", "cannot import module"),
    ("os:path_does_not_exist", "no callable"),
    ("justaname", "expected a built-in name"),
    ("", "non-empty"),
])
def test_bad_model_spec(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_model(spec)


def test_factory_must_return_model_and_schedule(monkeypatch):
    mod = types.ModuleType("ld3_fake_factory_mod")
    mod.bad = lambda: (lambda x, t: x, None)
    mod.good = lambda: load_model("gmm:ring2d")
    monkeypatch.setitem(sys.modules, "ld3_fake_factory_mod", mod)
    with pytest.raises(ModelSpecError, match="must return"):
        load_model("ld3_fake_factory_mod:bad")
    model, schedule = load_model("ld3_fake_factory_mod:good")
    assert model.schedule is schedule


def test_cli_reports_bad_model_cleanly(tmp_path):
    with pytest.raises(SystemExit, match="unknown mixture"):
        cli.main(["sample", "--model", "gmm:nope", "--out", str(tmp_path)])


def test_corrupt_schedule_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "schedule.json"
    bad.write_text('{"format": "ld3_ext.schedule", "version": 1, "timesteps": [1, 2')  # truncated
    rc = cli.main(["eval", "--schedule", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and str(bad) in err and "Traceback" not in err
