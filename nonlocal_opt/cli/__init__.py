"""The ``nonlocal-opt`` command line, one module per subcommand."""

from nonlocal_opt.cli.main import main

__all__ = ["main"]
