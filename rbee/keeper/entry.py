"""The ``rbee-keeper`` console script: Ctrl-C first, then the command line.

Why a module of its own in front of ``main.py``: the commands' module needs cyclopts
(which imports rich) before it can say anything, ~0.2 s, while ``--version`` needs
nothing, and a Ctrl-C during those imports would be a ``KeyboardInterrupt`` traceback
out of some library's import. So this module imports nothing heavy, installs its SIGINT
handler before anything else, answers ``--version`` itself and only then imports
``main.py``. Importing this module installs the handler, so only the console script
imports it: a test process may import ``main.py`` and keep its own Ctrl-C.
"""

import os
import signal

from .exit_codes import EXIT_CANCELLED


def _cancel_now(signum: int, frame: object) -> None:
    """Ctrl-C before a command has its own handling: ``Cancelled.`` and 130, at once.

    ``run_job`` and ``chat`` put their own handlers in place before they start a queen;
    an ephemeral queen that a management command started dies with us (its
    PR_SET_PDEATHSIG), stopping its hives. An exception raised here could land inside any
    import or ``finally``: we leave at once, without unwinding.
    """
    try:
        os.write(2, b"Cancelled.\n")
    finally:
        os._exit(EXIT_CANCELLED)


signal.signal(signal.SIGINT, _cancel_now)

import sys  # noqa: E402 - after the handler, on purpose (see the module doc)


def main(argv: list[str] | None = None) -> int:
    """Run ``rbee-keeper``; returns the process exit code."""
    tokens = sys.argv[1:] if argv is None else argv
    if tokens == ["--version"]:
        # What cyclopts would print (main.py gives it the same version), without its import.
        from .. import __version__

        print(__version__)
        return 0
    from .main import main as run_command_line

    return run_command_line(tokens)


if __name__ == "__main__":
    sys.exit(main())
