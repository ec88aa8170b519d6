"""The ``nonlocal-opt`` command line, one module per subcommand (``train``, ``plugins``, ``landscape``,
``geometry``, ``compare``); ``main`` builds the parser and maps errors to exit codes."""

import sys

PROG = "nonlocal-opt"
EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """The console script: :func:`nonlocal_opt.cli.main.main`, imported here so that a Ctrl-C while torch and
    the subcommands load exits 130 without a traceback, like one at any later point.

    Args:
        argv: the arguments after the program name (``None``: ``sys.argv[1:]``).
    """
    try:
        from nonlocal_opt.cli.main import main as run
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted while starting", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run(argv)


__all__ = ["main"]
