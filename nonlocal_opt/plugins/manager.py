"""The process-wide pluggy plugin manager, loaded from the ``nonlocal_opt`` entry-point group. Each entry
point loads on its own: one that fails to import or declares invalid hooks is skipped, reported once as a
``PluginWarning``, and listed by :func:`load_failures`; the others load."""

from __future__ import annotations

import os
import warnings
from importlib import metadata

import pluggy

from nonlocal_opt.plugins import hookspecs
from nonlocal_opt.plugins.failures import BrokenPlugin, PluginWarning, failure

ENTRY_POINT_GROUP = "nonlocal_opt"
DISABLE_ENV_VAR = "NONLOCAL_OPT_DISABLE_PLUGINS"
ALLOW_ENV_VAR = "NONLOCAL_OPT_PLUGINS"

_manager: pluggy.PluginManager | None = None
_load_failures: list[BrokenPlugin] = []
_distributions: dict[str, tuple[str, str]] = {}
_reported: set[BrokenPlugin] = set()


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


def report(broken: BrokenPlugin) -> None:
    """Warn (``PluginWarning``) that ``broken`` is skipped, naming it, the reason and how to block it; once
    per plugin and reason until the plugins are reloaded (:func:`reset_plugin_manager`).

    Args:
        broken: the plugin that failed.
    """
    if broken in _reported:
        return
    _reported.add(broken)
    warnings.warn(f"{broken.provider} failed to load and is skipped: {broken.reason} (fix or uninstall it, "
                  f"or block it with {DISABLE_ENV_VAR}={broken.plugin})", PluginWarning, stacklevel=3)


def _unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no hook specification declares."""
    return sorted(caller.name for caller in manager.get_hookcallers(plugin) or ()
                  if not caller.has_spec() and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()))


def _load(manager: pluggy.PluginManager, entry_point: metadata.EntryPoint) -> None:
    """Import and register one entry point's plugin; it is unregistered again if it declares unknown hooks."""
    plugin = entry_point.load()
    manager.register(plugin, name=entry_point.name)
    unknown = _unknown_hooks(manager, plugin)
    if unknown:
        manager.unregister(plugin)
        known = ", ".join(sorted(name for name in dir(hookspecs) if name.startswith(f"{ENTRY_POINT_GROUP}_")))
        raise pluggy.PluginValidationError(plugin, f"unknown hook {', '.join(unknown)}; the hooks are: {known}")


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager: hook specs added, entry points loaded (minus blocked and broken ones)."""
    global _manager, _load_failures, _distributions
    if _manager is None:
        # A plugin that looks up a registered class while it is imported loads the plugins again, inside this
        # loop: this call's own manager is the one kept, and a failure is reported once (``report``).
        manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        manager.add_hookspecs(hookspecs)
        for name in blocked_plugins():
            manager.set_blocked(name)
        failures, distributions = [], {}
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if manager.is_blocked(entry_point.name) or manager.has_plugin(entry_point.name):
                continue
            distributions[entry_point.name] = (entry_point.dist.name, entry_point.dist.version)
            try:
                _load(manager, entry_point)
            except Exception as error:  # a plugin's own failure, whatever it is, must not stop the others
                failures.append(BrokenPlugin(entry_point.name, f"cannot load {entry_point.value}: {failure(error)}",
                                             *distributions.pop(entry_point.name)))
        _manager, _load_failures, _distributions = manager, failures, distributions
        for broken in failures:
            report(broken)
    return _manager


def load_failures() -> list[BrokenPlugin]:
    """The entry points that failed to load (import error, invalid or unknown hooks), in load order."""
    get_plugin_manager()
    return list(_load_failures)


def distribution(plugin: str) -> tuple[str, str] | tuple[None, None]:
    """``(distribution name, version)`` of the entry point ``plugin`` loaded from; ``(None, None)`` for a
    plugin registered at run time.

    Args:
        plugin: the plugin's name with the plugin manager.
    """
    get_plugin_manager()
    return _distributions.get(plugin, (None, None))


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next call reloads entry points (and re-reads the env vars)."""
    global _manager
    _manager = None
    _reported.clear()
