"""The ``ld3`` console script: a thin module, so that a Ctrl-C while the heavy imports load (``import torch`` takes
seconds) ends as one line and exit status 130, like a Ctrl-C during a run, not a long traceback.

Imports nothing heavy itself.  The package's ``__init__`` runs before this module (Python imports a module's
package first) and imports torch: it catches a Ctrl-C there itself when argv[0] is the ``ld3`` script.
"""
import os
import sys


def _traceback_wanted() -> bool:  # cli._traceback_wanted, which cannot be imported yet
    return os.environ.get("LD3_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _is_script() -> bool:
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("ld3", "ld3.exe")


def _ignore_signals() -> None:
    import signal
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def main() -> int:
    try:
        from . import cli  # torch and the rest of the library
        code = cli.main()  # handles Ctrl-C during a command itself; this catches it before and after (parsing)
        if _is_script():
            # done: what is left is interpreter shutdown (~0.5 s), where a Ctrl-C would turn a finished run into
            # status 130 with no message (`ld3 train ... && ld3 eval ...` stopping on a complete run)
            _ignore_signals()
        return code
    except KeyboardInterrupt as exc:
        if _traceback_wanted():
            raise
        cli = sys.modules.get(__package__ + ".cli")
        if cli is not None and isinstance(exc, getattr(cli, "Terminated", ())):
            print("ld3: terminated (SIGTERM)", file=sys.stderr)
            return 128 + 15
        print("ld3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
