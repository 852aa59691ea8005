"""The CLI's PNG figures are written like every other output file: a plain file's mode, no temp file left."""
import os
import stat
import struct

import pytest
import torch

import ld3_ext
from ld3_ext.plotting import sample_grid, schedule_plot, schedule_plot_png


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


# ------------------------------------------------------------------------------------ empty / malformed inputs
import pytest  # noqa: E402

from ld3_ext.plotting import sample_grid_png, schedule_plot_png  # noqa: E402


def _grids():
    from ld3_ext import EDM, discretizations
    s = EDM()
    return s, {"edm": discretizations.edm(s, 5)}


@pytest.mark.parametrize("samples,kw,exc,message", [
    ({}, {}, ValueError, "samples is empty"),
    ([torch.randn(3, 2)], {}, TypeError, "samples must be a dict"),
    ({"a": [[1.0, 2.0]]}, {}, TypeError, r"samples\['a'\] must be a torch.Tensor"),
    ({"a": torch.randn(0, 1, 8, 8)}, {}, ValueError, r"samples\['a'\] must hold at least one sample"),
    ({"a": torch.randn(0, 2)}, {}, ValueError, r"samples\['a'\] must hold at least one sample"),
    ({"a": torch.randn(3, 0)}, {}, ValueError, r"samples\['a'\] must hold at least one sample"),
    ({"a": torch.tensor(1.0)}, {}, ValueError, r"samples\['a'\] must hold at least one sample"),
    ({"a": torch.randn(3, 2), "b": torch.randn(3, 1, 8, 8)}, {}, ValueError, "samples mixes 2-D points"),
    ({"a": torch.randn(3, 1, 8, 8)}, {"max_items": 0}, ValueError, "max_items must be an int >= 1"),
    ({"a": torch.randn(3, 1, 8, 8)}, {"max_items": 2.0}, TypeError, "max_items must be an int >= 1"),
])
def test_sample_grid_names_empty_or_malformed_samples(samples, kw, exc, message):
    """An empty dict failed as a bare StopIteration, an empty batch or max_items=0 inside matplotlib ("Number of
    columns must be a positive integer"), a mix of points and images on a boolean mask."""
    with pytest.raises(exc, match=message):
        sample_grid_png(samples, **kw)


@pytest.mark.parametrize("which,errors,exc,message", [
    ("empty", None, ValueError, "schedules is empty"),
    ("list", None, TypeError, "schedules must be a dict"),
    ("empty grid", None, ValueError, r"schedules\['a'\] must be a non-empty 1-D tensor"),
    ("ok", {"edm": []}, ValueError, r"errors\['edm'\] must be a non-empty list of \(nfe, error\) pairs"),
    ("ok", {"edm": [(5,)]}, ValueError, r"errors\['edm'\] must be a non-empty list"),
    ("ok", {"edm": 0.1}, ValueError, r"errors\['edm'\] must be a non-empty list"),
    ("ok", [(5, 0.1)], TypeError, "errors must be None or a dict"),
])
def test_schedule_plot_names_empty_or_malformed_inputs(which, errors, exc, message):
    """An empty error curve failed in zip(*...) ("not enough values to unpack"); no schedules drew a blank figure."""
    s, grids = _grids()
    schedules = {"empty": {}, "list": list(grids.values()), "ok": grids,
                 "empty grid": {"a": torch.empty(0, dtype=torch.float64)}}[which]
    with pytest.raises(exc, match=message):
        schedule_plot_png(schedules, s, errors=errors)


def _png_size(png: bytes):
    """(width, height) from a PNG's IHDR chunk (the first chunk, right after the 8-byte signature)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", png[:16]
    return struct.unpack(">II", png[16:24])


def test_plots_of_valid_inputs_still_draw():
    """errors={} (no curves) draws the schedule panel alone, as errors=None does; rows with fewer samples than
    max_items show as many images as the shortest row."""
    pytest.importorskip("matplotlib")
    s, grids = _grids()
    for errors in (None, {}):
        assert schedule_plot_png(grids, s, errors=errors)[:8] == b"\x89PNG\r\n\x1a\n"
    assert sample_grid_png({"a": torch.randn(5, 2), "b": torch.randn(1, 2)})[:8] == b"\x89PNG\r\n\x1a\n"

    def size(n_a, n_b, **kw):  # (width, height) in pixels of a two-row image grid
        return _png_size(sample_grid_png({"a": torch.randn(n_a, 1, 8, 8), "b": torch.randn(n_b, 1, 8, 8)}, **kw))

    # the reference: both rows hold k images; each column adds width, the height stays
    ref = {k: size(k, k) for k in range(1, 6)}
    widths = [ref[k][0] for k in range(1, 6)]
    assert all(w1 < w2 for w1, w2 in zip(widths, widths[1:])), ref
    heights = [h for _, h in ref.values()]
    assert max(heights) < 1.1 * min(heights), ref  # (the tight bounding box moves it by a few pixels)
    # a row shorter than max_items: the figure has as many columns as the shortest row (either row) ...
    for n_a, n_b in ((5, 2), (2, 5), (5, 3), (4, 1)):
        assert size(n_a, n_b)[0] == ref[min(n_a, n_b)][0], (n_a, n_b, size(n_a, n_b), ref)
    # ... and max_items caps the columns when every row is longer
    assert size(5, 5, max_items=3)[0] == ref[3][0]
    assert size(5, 4, max_items=16)[0] == ref[4][0]


def test_schedule_plot_names_a_schedule_that_is_not_one():
    """A schedule name or config failed at .lambda_ ('str' object has no attribute ...), naming nothing."""
    t = ld3_ext.discretizations.edm(ld3_ext.EDM(), 4)
    for bad in ("edm", ld3_ext.EDM().config(), None):
        with pytest.raises(TypeError, match="schedule must be an ld3_ext NoiseSchedule"):
            schedule_plot_png({"edm": t}, bad)
    assert schedule_plot_png({"edm": t}, ld3_ext.EDM())[:4] == b"\x89PNG"


def test_sample_grid_shows_intensities_on_one_scale():
    """[-1, 1] is black..white in every image: each image was scaled to its own range, so a uniform white
    sample came out black, and a faint sample as bright as a clear one."""
    pytest.importorskip("matplotlib")
    import io
    from matplotlib.image import imread

    def brightness(value):  # mean gray level of the whole PNG (white background, the frame and a label)
        png = sample_grid_png({"a": torch.full((6, 1, 8, 8), value)})
        return float(imread(io.BytesIO(png), format="png")[..., :3].mean())
    black, mid, white = brightness(-1.0), brightness(0.0), brightness(1.0)
    assert black + 0.2 < mid < white - 0.2, (black, mid, white)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_sample_grid_lays_each_row_out_as_one_strip(monkeypatch, shape):
    """One Axes a row: the k images side by side with one white column between them (none after the last), on
    the fixed [0, 1] scale, labelled with the row's name."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    shown, labels = [], []
    real_imshow, real_ylabel = Axes.imshow, Axes.set_ylabel
    monkeypatch.setattr(Axes, "imshow", lambda self, a, *p, **k: shown.append((a, k)) or real_imshow(self, a, *p, **k))
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, s, *p, **k: labels.append(s) or real_ylabel(self, s, *p, **k))
    sample_grid_png({"first": torch.full((3, *shape), -1.0), "second": torch.full((5, *shape), 1.0)}, max_items=4)
    assert len(shown) == 2 and labels == ["first", "second"]
    for (strip, kw), value in zip(shown, (0.0, 1.0)):
        strip = torch.as_tensor(strip)
        assert strip.shape[:2] == (8, 3 * 8 + 2) and kw.get("vmin") == 0.0 and kw.get("vmax") == 1.0
        gaps = [8, 17]
        assert bool((strip[:, gaps] == 1.0).all())
        assert bool((strip[:, [c for c in range(strip.shape[1]) if c not in gaps]] == value).all())
