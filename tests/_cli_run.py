"""Running `ld3` in-process for the CLI tests: one-line errors (no LD3_TRACEBACK) and (status, stdout, stderr)."""
import pytest

from ld3_ext import cli


@pytest.fixture(autouse=True)
def one_line_errors(monkeypatch):
    """Imported by a test module, it gives each of its tests the one-line error format a user sees."""
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `ld3 ARGV` (a UsageError leaves main as SystemExit(2))."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
