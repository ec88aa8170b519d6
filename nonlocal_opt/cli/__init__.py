"""The ``nonlocal-opt`` command line, one module per subcommand (``train``, ``plugins``, ``landscape``,
``geometry``, ``compare``); ``main`` builds the parser and maps errors to exit codes."""

from nonlocal_opt.cli.main import main

__all__ = ["main"]
