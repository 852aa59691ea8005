"""The CLI's PNG figures are written like every other output file: a plain file's mode, no temp file left."""
import os
import stat

import torch

from ld3_ext.plotting import sample_grid, schedule_plot


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_figures_get_a_plain_files_mode_and_leave_no_temp_file(tmp_path):
    from ld3_ext import EDM, discretizations
    s = EDM()
    grids = {"logsnr": discretizations.logsnr_uniform(s, 5), "edm": discretizations.get_discretization("edm", s, 5)}
    paths = [sample_grid({"a": torch.randn(4, 1, 8, 8)}, str(tmp_path / "g.png")),
             schedule_plot(grids, s, str(tmp_path / "s.png"), errors={"edm": [(5, 0.1), (6, 0.05)]})]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        # mkstemp's 0600 made the figures of a shared run folder unreadable by the group
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["g.png", "s.png"]


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """The CLI's figures need no pyplot: calling them in-process (cli.main from a notebook or a script) keeps
    the caller's backend (matplotlib.use("Agg") switched it) and opens no pyplot figure."""
    import matplotlib
    import matplotlib.pyplot as plt
    before = matplotlib.get_backend()
    try:
        plt.switch_backend("pdf")  # any backend other than Agg stands for the caller's
        sample_grid({"a": torch.randn(4, 2)}, str(tmp_path / "g.png"), title="t")
        sample_grid({"a": torch.randn(3, 1, 8, 8)}, str(tmp_path / "h.png"))
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []
    finally:
        plt.switch_backend(before)
    assert os.path.getsize(tmp_path / "g.png") > 500 and os.path.getsize(tmp_path / "h.png") > 500
