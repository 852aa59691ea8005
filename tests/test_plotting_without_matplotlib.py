"""Without matplotlib the figures fail with an install hint, and the CLI says so in one line (exit 1): it was a
bare ModuleNotFoundError and, from `ld3 sample`, a traceback after the whole sampling run."""
import sys

import pytest
import torch

from ld3_ext import cli
from ld3_ext.plotting import sample_grid_png

from _cli_run import one_line_errors, run_cli  # noqa: F401  (the fixture: one-line errors)


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib.* raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def test_figures_without_matplotlib_say_how_to_install_it(no_matplotlib):
    with pytest.raises(ImportError, match="pip install matplotlib") as info:
        sample_grid_png({"a": torch.randn(4, 2)})
    assert type(info.value).__name__ == "PlottingUnavailableError"


def test_sample_without_matplotlib_is_one_line(no_matplotlib, tmp_path, capsys):
    rc, out, err = run_cli(["sample", "--model", "gmm:ring2d", "--nfe", "4", "--n", "8", "--out", str(tmp_path)],
                           capsys)
    assert rc == 1 and "pip install matplotlib" in err and "Traceback" not in err, err
