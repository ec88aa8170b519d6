"""Plugin failures: a plugin that fails to load is ``BrokenPlugin``, reported once as a ``PluginWarning``
and skipped, so the other plugins keep working; ``PluginError`` stops a caller that cannot go on (a name
two plugins register)."""

from __future__ import annotations

import attrs


class PluginWarning(UserWarning):
    """A plugin failed to load or to register its classes, and was skipped; the other plugins work."""


class PluginError(ValueError):
    """A plugin problem no caller can work around, e.g. one name registered by two plugins."""


def provider(plugin: str, distribution: str | None, version: str | None) -> str:
    """``plugin 'NAME' (DISTRIBUTION VERSION)``, or ``plugin 'NAME'`` for one registered at run time.

    Args:
        plugin: the plugin's name with the plugin manager (its entry-point name).
        distribution: the installed distribution that provides it (``None``: registered at run time).
        version: that distribution's version.
    """
    return f"plugin {plugin!r}" if distribution is None else f"plugin {plugin!r} ({distribution} {version})"


def failure(error: BaseException) -> str:
    """``error`` as one line: ``TYPE: MESSAGE``, whitespace collapsed.

    Args:
        error: the exception a plugin raised.
    """
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@attrs.frozen
class BrokenPlugin:
    """A plugin skipped because it failed to load (import, hook validation) or to register its classes.

    Args:
        plugin: the plugin's name with the plugin manager (its entry-point name).
        reason: what went wrong, one line.
        distribution: the installed distribution that provides it (``None``: registered at run time).
        version: that distribution's version.
    """

    plugin: str
    reason: str
    distribution: str | None = None
    version: str | None = None

    @property
    def provider(self) -> str:
        """``plugin 'NAME' (DISTRIBUTION VERSION)``, for messages."""
        return provider(self.plugin, self.distribution, self.version)

