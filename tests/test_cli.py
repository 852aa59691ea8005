"""The ``ld3`` command line: sample end to end, and clear errors for bad --model strings."""
import json
import os
import sys
import types

import pytest

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


def test_train_then_eval_digits_reports_the_teachers_fd(tmp_path, capsys):
    """ld3 eval on the digits model: every schedule's row, and the teacher's digits-FD as the reference
    point (few-sample FD is biased, so a schedule is read against the teacher, not against zero)."""
    out = str(tmp_path / "d")
    rc = cli.main(["train", "--model", "digits", "--solver", "dpmpp", "--order", "2", "--nfe", "4", "--n-train", "8",
                   "--n-valid", "8", "--rounds-v1", "1", "--rounds-v2", "1", "--time-mode", "lambda", "--init", "logsnr",
                   "--out", out])
    assert rc == 0
    capsys.readouterr()
    rc = cli.main(["eval", "--out", out, "--n", "64", "--nfe-curve", "--skip-model-baselines"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("teacher", "ld3", "logsnr", "edm", "time_uniform", "time_quadratic"):
            rows[parts[0]] = parts
    assert set(rows) == {"teacher", "ld3", "logsnr", "edm", "time_uniform", "time_quadratic"}
    assert rows["teacher"][1] == "20" and float(rows["teacher"][3]) == 0.0
    fds = {k: float(v[4]) for k, v in rows.items()}
    assert all(0.0 < v < 1e4 for v in fds.values())
    assert fds["time_uniform"] > 3 * fds["teacher"]  # 4 uniform steps are far off; the teacher is not
    assert "ld3 vs best baseline (teacher)" not in text
    with open(os.path.join(out, "eval.json")) as f:
        saved = json.load(f)
    assert [r["schedule"] for r in saved["rows"]][0] == "teacher"
