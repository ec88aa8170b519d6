"""Contract kits for plugin authors: run them in a plugin's own test suite."""

from nonlocal_opt.testing.projector_kit import *  # noqa: F403
from nonlocal_opt.testing.projector_kit import __all__  # noqa: F401
