"""The process-wide pluggy plugin manager, loaded from the ``nonlocal_opt`` entry-point group."""

from __future__ import annotations

import os
from importlib import metadata

import pluggy

from nonlocal_opt.plugins import hookspecs

ENTRY_POINT_GROUP = "nonlocal_opt"
DISABLE_ENV_VAR = "NONLOCAL_OPT_DISABLE_PLUGINS"
ALLOW_ENV_VAR = "NONLOCAL_OPT_PLUGINS"

_manager: pluggy.PluginManager | None = None


def _names(value: str) -> list[str]:
    """The comma-separated names in ``value``, stripped, empty ones dropped."""
    return [name.strip() for name in value.split(",") if name.strip()]


def blocked_plugins() -> list[str]:
    """Entry-point names listed (comma-separated) in ``$NONLOCAL_OPT_DISABLE_PLUGINS``, plus, when
    ``$NONLOCAL_OPT_PLUGINS`` is set, every entry point of the group it does not list."""
    blocked = _names(os.environ.get(DISABLE_ENV_VAR, ""))
    allowed = os.environ.get(ALLOW_ENV_VAR)
    if allowed is not None:
        kept = set(_names(allowed))
        blocked += sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)} - kept)
    return blocked


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
    """Forget the loaded plugins; the next call reloads entry points (and re-reads the env vars)."""
    global _manager
    _manager = None
