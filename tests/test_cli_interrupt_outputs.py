"""Ctrl-C while `ld3 CMD` writes an output: exit 130 with one line, the user's earlier file left whole and
unchanged, no temp file left behind (every output goes through atomic_io)."""
import errno
import json
import os

import pytest

from ld3_ext import cli

RING = ["--model", "gmm:ring2d", "--nfe", "4", "--no-progress"]
CASES = {  # the command, and the output it is interrupted writing (just before the temp file replaces it)
    "sample": (["sample", *RING, "--n", "8"], "samples.png"),
    "teacher": (["teacher", "--model", "gmm:ring2d", "--n-train", "4", "--n-valid", "4", "--no-progress"],
                os.path.join("teacher", "chunk_00000.safetensors")),
    "train": (["train", *RING, "--n-train", "4", "--n-valid", "4", "--rounds-v1", "1", "--rounds-v2", "0",
               "--time-mode", "lambda", "--init", "logsnr"], "schedule.json"),
}


def _interrupt_writing(monkeypatch, target):
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if os.fspath(dst).endswith(target):
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("cmd", list(CASES))
def test_ctrl_c_while_writing_keeps_the_earlier_file(cmd, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    argv, target = CASES[cmd]
    out = tmp_path / "o"
    earlier = out / ("samples.png" if cmd == "teacher" else target)  # a teacher set is rewritten only as a whole
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"the user's earlier file")
    _interrupt_writing(monkeypatch, target)
    assert cli.main(argv + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: interrupted") and len(err.strip().splitlines()) == 1
    assert earlier.read_bytes() == b"the user's earlier file"
    assert cmd != "teacher" or not (out / target).exists()  # no half chunk
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_ctrl_c_while_eval_writes_keeps_the_earlier_results(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    out = tmp_path / "o"
    assert cli.main(CASES["train"][0] + ["--out", str(out)]) == 0
    earlier = out / "eval.json"
    earlier.write_text("{}")
    _interrupt_writing(monkeypatch, "eval.json")
    assert cli.main(["eval", "--out", str(out), "--n", "8", "--nfe-curve", "--skip-model-baselines"]) == 130
    assert capsys.readouterr().err.strip() == "ld3 eval: interrupted"
    assert earlier.read_text() == "{}"
    assert [f for f in os.listdir(out) if f.endswith(".tmp")] == []


def test_ctrl_c_while_eval_draws_keeps_the_earlier_eval_together(tmp_path, monkeypatch, capsys):
    """The figures are drawn before any file is written: a Ctrl-C while drawing leaves the earlier eval.json with
    the earlier figures, not this run's numbers next to the earlier run's figures."""
    from ld3_ext import plotting
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    out = tmp_path / "o"
    assert cli.main(CASES["train"][0] + ["--out", str(out)]) == 0
    earlier = {name: f"earlier {name}".encode() for name in ("eval.json", "schedules.png", "eval_samples.png")}
    for name, data in earlier.items():
        (out / name).write_bytes(data)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(plotting, "sample_grid_png", interrupted)  # the second figure, after the first was drawn
    assert cli.main(["eval", "--out", str(out), "--n", "8", "--nfe-curve", "--skip-model-baselines"]) == 130
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


def test_a_figure_that_cannot_be_drawn_keeps_the_numbers(tmp_path, monkeypatch, capsys):
    from ld3_ext import plotting
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    out = tmp_path / "o"
    assert cli.main(CASES["train"][0] + ["--out", str(out)]) == 0

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # e.g. a font cache that cannot be written
    monkeypatch.setattr(plotting, "sample_grid_png", broken)
    assert cli.main(["eval", "--out", str(out), "--n", "8", "--nfe-curve", "--skip-model-baselines"]) == 1
    assert json.loads((out / "eval.json").read_text())["n"] == 8
