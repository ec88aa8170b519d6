"""The ``nonlocal-opt`` command line, one module per subcommand (``train``, ``plugins``, ``landscape``,
``geometry``, ``compare``); ``main`` builds the parser and maps errors to exit codes."""

import os
import signal
import sys

PROG = "nonlocal-opt"
EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while torch and the subcommands import: nothing is written yet, so leave at once. (An
    interrupt raised inside an import can leave a half-imported module that fails later in other ways.)"""
    print(f"\n{PROG}: interrupted while starting", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """The console script: :func:`nonlocal_opt.cli.main.main`, imported here under a SIGINT handler, so that
    a Ctrl-C while torch and the subcommands load exits 130 without a traceback, like one at any later point.

    Args:
        argv: the arguments after the program name (``None``: ``sys.argv[1:]``).
    """
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from nonlocal_opt.cli.main import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    return run(argv)


__all__ = ["main"]
