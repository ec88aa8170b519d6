"""Name → class registry of rules, projectors, manifolds and base optimizers, built from the plugins' hooks."""

from __future__ import annotations

from typing import Any

import attrs
import pluggy
import torch

from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.plugins import torch_bases
from nonlocal_opt.plugins.manager import get_plugin_manager

KINDS: dict[str, tuple[str, type]] = {
    "rule": ("nonlocal_opt_register_descent_rules", DescentRule),
    "base": ("nonlocal_opt_register_bases", torch.optim.Optimizer),
    "projector": ("nonlocal_opt_register_projectors", Projector),
    "manifold": ("nonlocal_opt_register_manifolds", ConstraintManifold),
}
CORE_PLUGIN = "torch"  # the core's own provider: torch.optim's optimizers as bases


def _manager() -> pluggy.PluginManager:
    """The plugin manager, with the core's ``torch`` bases registered next to the entry-point plugins."""
    manager = get_plugin_manager()
    if not manager.is_registered(torch_bases):
        manager.register(torch_bases, name=CORE_PLUGIN)
    return manager


@attrs.frozen
class Registration:
    """Who registered what.

    Args:
        kind: ``"rule"``, ``"base"``, ``"projector"`` or ``"manifold"``.
        name: the registered name.
        cls: the registered class.
        plugin: the plugin's name with the plugin manager.
        distribution: the installed distribution that provides the plugin (``None``: registered at run time).
        version: that distribution's version.
    """

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def provider(self) -> str:
        """``plugin 'NAME' (DISTRIBUTION VERSION)``, for messages."""
        if self.distribution is None:
            return f"plugin {self.plugin!r}"
        return f"plugin {self.plugin!r} ({self.distribution} {self.version})"


def _check_kind(kind: str) -> tuple[str, type]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind]


def _distributions() -> dict[int, tuple[str, str]]:
    """id(plugin object) → (distribution name, version) for plugins loaded from entry points."""
    return {id(plugin): (dist.metadata["name"], dist.version) for plugin, dist in _manager().list_plugin_distinfo()}


def _hookimpls() -> list[tuple[str, pluggy.HookImpl]]:
    """``(kind, implementation)`` of every loaded plugin's registration hooks."""
    manager = _manager()
    return [(kind, impl) for kind, (hook_name, _) in KINDS.items() for impl in getattr(manager.hook, hook_name).get_hookimpls()]


def collect_registrations(impls: list[tuple[str, pluggy.HookImpl]]) -> dict[str, dict[str, Registration]]:
    """Run the registration hooks ``impls``: ``{kind: {name: Registration}}``. A name registered twice for
    one kind raises ``ValueError``; a class of the wrong kind or without a name raises ``TypeError``.

    Args:
        impls: ``(kind, hook implementation)`` pairs, as the plugin manager lists them.
    """
    dists = _distributions()
    found: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
    for kind, impl in impls:
        base = KINDS[kind][1]
        dist, version = dists.get(id(impl.plugin), (None, None))
        of_kind = found[kind]

        def register(cls: type, name: str | None = None, _plugin: str = impl.plugin_name, _dist=dist, _version=version,
                     _kind: str = kind, _base: type = base, _found: dict[str, Registration] = of_kind) -> None:
            if not (isinstance(cls, type) and issubclass(cls, _base)):
                raise TypeError(f"plugin {_plugin!r} registered {cls!r}, which is not a {_base.__name__} subclass")
            name = name or getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"plugin {_plugin!r} registered {cls.__name__} without a name (a string `name` attribute or register(cls, name=...))"
                )
            entry = Registration(_kind, name, cls, _plugin, _dist, _version)
            if name in _found:
                raise ValueError(
                    f"duplicate {_kind} name {name!r}: registered by {_found[name].provider} "
                    f"({_found[name].cls.__qualname__}) and by {entry.provider} ({cls.__qualname__})"
                )
            _found[name] = entry

        impl.function(register=register)
    return found


# The registrations of each set of loaded plugins, keyed by their hook implementations (the plugin objects are
# kept in the value, so their ids stay theirs): a set of plugins is collected once per process.
_COLLECTED: dict[tuple[tuple[str, str, int], ...], tuple[list[Any], dict[str, dict[str, Registration]]]] = {}


def registrations(kind: str) -> dict[str, Registration]:
    """Every class registered for ``kind``, by name, collected once per set of loaded plugins. A name
    registered twice raises ``ValueError``.

    Args:
        kind: one of ``"rule"``, ``"base"``, ``"projector"``, ``"manifold"``.
    """
    _check_kind(kind)
    impls = _hookimpls()
    key = tuple((k, impl.plugin_name, id(impl.plugin)) for k, impl in impls)
    if key not in _COLLECTED:
        _COLLECTED[key] = ([impl.plugin for _, impl in impls], collect_registrations(impls))
    return dict(_COLLECTED[key][1][kind])


def available(kind: str) -> list[str]:
    """Sorted registered names for ``kind``.

    Args:
        kind: one of ``"rule"``, ``"base"``, ``"projector"``, ``"manifold"``.
    """
    return sorted(registrations(kind))


def get(kind: str, name: str) -> type:
    """The class registered for ``kind`` under ``name``; ``ValueError`` lists the available names.

    Args:
        kind: one of ``"rule"``, ``"base"``, ``"projector"``, ``"manifold"``.
        name: the registered name, e.g. ``"rbo"``.
    """
    found = registrations(kind)
    if name not in found:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    return found[name].cls


def instantiate(kind: str, name_or_instance: Any) -> Any:
    """An instance for ``kind``: a registered name is looked up, a class is instantiated, an instance is
    checked and kept (``TypeError`` for anything else).

    Args:
        kind: one of ``"rule"``, ``"base"``, ``"projector"``, ``"manifold"``.
        name_or_instance: a registered name, a subclass of the kind's interface, or an instance of one.
    """
    _, base = _check_kind(kind)
    if isinstance(name_or_instance, str):
        return get(kind, name_or_instance)()
    if isinstance(name_or_instance, type) and issubclass(name_or_instance, base):
        return name_or_instance()
    if isinstance(name_or_instance, base):
        return name_or_instance
    raise TypeError(f"{kind} must be a registered name, a {base.__name__} subclass or instance, got {name_or_instance!r}")
