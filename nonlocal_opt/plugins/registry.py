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
    """Who registered what: the class, the plugin's name and its distribution (if installed)."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def provider(self) -> str:
        if self.distribution is None:
            return f"plugin {self.plugin!r}"
        return f"plugin {self.plugin!r} ({self.distribution} {self.version})"


def _check_kind(kind: str) -> tuple[str, type]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind]


_DISTRIBUTIONS: dict[tuple[int, ...], dict[int, tuple[str, str]]] = {}


def _distributions() -> dict[int, tuple[str, str]]:
    """id(plugin object) → (distribution name, version) for plugins loaded from entry points.

    Reading a distribution's ``metadata`` parses its METADATA file; the answer is kept per set of
    loaded plugins (plugins are modules that live as long as the process), so ``compose`` does not
    re-parse every plugin's metadata on each call."""
    pairs = _manager().list_plugin_distinfo()
    key = tuple(id(plugin) for plugin, _ in pairs)
    if key not in _DISTRIBUTIONS:
        _DISTRIBUTIONS[key] = {id(plugin): (dist.metadata["name"], dist.version) for plugin, dist in pairs}
    return _DISTRIBUTIONS[key]


def registrations(kind: str) -> dict[str, Registration]:
    """Every class registered for ``kind``, by name. A name registered twice raises ``ValueError``."""
    hook_name, base = _check_kind(kind)
    manager = _manager()
    dists = _distributions()
    found: dict[str, Registration] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        dist, version = dists.get(id(impl.plugin), (None, None))

        def register(cls: type, name: str | None = None, _plugin: str = impl.plugin_name, _dist=dist, _version=version) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"plugin {_plugin!r} registered {cls!r}, which is not a {base.__name__} subclass")
            name = name or getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"plugin {_plugin!r} registered {cls.__name__} without a name (a string `name` attribute or register(cls, name=...))"
                )
            entry = Registration(kind, name, cls, _plugin, _dist, _version)
            if name in found:
                raise ValueError(
                    f"duplicate {kind} name {name!r}: registered by {found[name].provider} "
                    f"({found[name].cls.__qualname__}) and by {entry.provider} ({cls.__qualname__})"
                )
            found[name] = entry

        impl.function(register=register)
    return found


def available(kind: str) -> list[str]:
    """Sorted registered names for ``kind`` in ``{"rule", "base", "projector", "manifold"}``."""
    return sorted(registrations(kind))


def get(kind: str, name: str) -> type:
    """The class registered for ``kind`` under ``name``; ``ValueError`` lists the available names."""
    found = registrations(kind)
    if name not in found:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    return found[name].cls


def instantiate(kind: str, name_or_instance: Any) -> Any:
    """An instance for ``kind``: a registered name is looked up, a class is instantiated, an instance is
    checked and kept."""
    _, base = _check_kind(kind)
    if isinstance(name_or_instance, str):
        return get(kind, name_or_instance)()
    if isinstance(name_or_instance, type) and issubclass(name_or_instance, base):
        return name_or_instance()
    if isinstance(name_or_instance, base):
        return name_or_instance
    raise TypeError(f"{kind} must be a registered name, a {base.__name__} subclass or instance, got {name_or_instance!r}")
