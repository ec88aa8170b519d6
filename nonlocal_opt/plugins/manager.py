"""The process-wide pluggy plugin manager, loaded from the ``nonlocal_opt`` entry-point group."""

from __future__ import annotations

import os

import pluggy

from nonlocal_opt.plugins import hookspecs

ENTRY_POINT_GROUP = "nonlocal_opt"
DISABLE_ENV_VAR = "NONLOCAL_OPT_DISABLE_PLUGINS"

_manager: pluggy.PluginManager | None = None


def blocked_plugins() -> list[str]:
    """Entry-point names listed (comma-separated) in ``$NONLOCAL_OPT_DISABLE_PLUGINS``."""
    return [name.strip() for name in os.environ.get(DISABLE_ENV_VAR, "").split(",") if name.strip()]


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager: hook specs added, entry points loaded (minus blocked ones), checked."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        manager.add_hookspecs(hookspecs)
        for name in blocked_plugins():
            manager.set_blocked(name)
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        manager.check_pending()
        _manager = manager
    return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next call reloads entry points (and re-reads the env var)."""
    global _manager
    _manager = None
