"""`ld3 train --device xpu|mps` under torchrun: init_from_env asks for the process group's backend to be named for
such a device (backend=...), which the CLI has no flag for; the CLI says which devices it runs on under torchrun."""
import pytest

from _cli_run import one_line_errors, run_cli  # noqa: F401  (the fixture: one-line errors)


@pytest.mark.parametrize("device", ["xpu", "mps"])
def test_another_accelerator_under_torchrun_is_a_usage_error(device, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, out, err = run_cli(["train", "--model", "gmm:ring2d", "--device", device, "--out", str(tmp_path)], capsys)
    assert rc == 2 and "under torchrun the CLI runs on cpu (gloo) or cuda (nccl)" in err, err
    assert "backend=" not in err
