"""``python -m nonlocal_opt``: the ``nonlocal-opt`` command."""

import sys

from nonlocal_opt.cli import main

sys.exit(main())
