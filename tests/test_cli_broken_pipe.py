"""`ld3 sample | head -1`: the reader of stdout leaves early; the run still writes its files and exits 0
(a BrokenPipeError at a progress line stopped it before samples.png, with exit status 1)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_closed_stdout_does_not_stop_the_run(tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "ld3_ext.cli", "sample", "--model", "gmm:ring2d", "--n", "16",
                          "--nfe", "4", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first line
    try:
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == 0, err[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
    assert "BrokenPipe" not in err and "Exception ignored" not in err
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
