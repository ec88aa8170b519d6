"""Name → class registry of rules, projectors, manifolds and base optimizers, built from the plugins' hooks."""

from __future__ import annotations

from typing import Any

import attrs
import pluggy
import torch

from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.plugins import torch_bases
from nonlocal_opt.plugins.failures import BrokenPlugin, PluginError, failure, provider
from nonlocal_opt.plugins.manager import DISABLE_ENV_VAR, distribution, get_plugin_manager, load_failures, report

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
        return provider(self.plugin, self.distribution, self.version)


@attrs.frozen
class Collection:
    """The registrations of one set of loaded plugins.

    Args:
        found: ``{kind: {name: Registration}}`` from every plugin whose hooks ran cleanly.
        broken: the plugins whose hooks raised or registered something invalid (none of their
            registrations is in ``found``).
        duplicate: the message for a name two plugins registered for one kind (``None``: no such name).
    """

    found: dict[str, dict[str, Registration]]
    broken: list[BrokenPlugin]
    duplicate: str | None


class InvalidRegistration(Exception):
    """A plugin registered something that is not a usable class of the hook's kind."""


def _check_kind(kind: str) -> tuple[str, type]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind]


def _hookimpls() -> list[tuple[str, pluggy.HookImpl]]:
    """``(kind, implementation)`` of every loaded plugin's registration hooks."""
    manager = _manager()
    return [(kind, impl) for kind, (hook_name, _) in KINDS.items() for impl in getattr(manager.hook, hook_name).get_hookimpls()]


def _missing_methods(cls: type, interface: type) -> list[str]:
    """The methods ``cls`` must implement and does not: abstract ones, and a base optimizer's ``step``."""
    if interface is torch.optim.Optimizer:
        return ["step"] if cls.step is torch.optim.Optimizer.step else []
    return sorted(getattr(cls, "__abstractmethods__", ()))


def _registration(kind: str, cls: Any, name: str | None, plugin: str) -> Registration:
    """``cls`` registered by ``plugin`` for ``kind`` under ``name`` (``None``: ``cls.name``), checked
    against the kind's interface (``InvalidRegistration`` says what is wrong)."""
    interface = KINDS[kind][1]
    if not (isinstance(cls, type) and issubclass(cls, interface)):
        raise InvalidRegistration(f"registered {cls!r}, which is not a {interface.__name__} subclass")
    name = name or getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise InvalidRegistration(
            f"registered {cls.__name__} without a name (a string `name` attribute or register(cls, name=...))"
        )
    missing = _missing_methods(cls, interface)
    if missing:
        raise InvalidRegistration(f"registered {cls.__qualname__}, which does not implement {', '.join(missing)} "
                                  f"(every {interface.__name__} must)")
    return Registration(kind, name, cls, plugin, *distribution(plugin))


def _plugin_registrations(plugin: str, impls: list[tuple[str, pluggy.HookImpl]]) -> list[Registration]:
    """Run the registration hooks ``impls`` of ``plugin``: what it registered. ``InvalidRegistration``
    when it registers something invalid or one name twice for one kind, the hook's own exception when
    a hook raises."""
    entries: dict[tuple[str, str], Registration] = {}
    for kind, impl in impls:

        def register(cls: type, name: str | None = None, _kind: str = kind) -> None:
            entry = _registration(_kind, cls, name, plugin)
            earlier = entries.setdefault((_kind, entry.name), entry)
            if earlier is not entry:
                raise InvalidRegistration(f"registered the {_kind} name {entry.name!r} twice "
                                          f"({earlier.cls.__qualname__} and {cls.__qualname__})")

        impl.function(register=register)
    return list(entries.values())


def collect_registrations(impls: list[tuple[str, pluggy.HookImpl]]) -> Collection:
    """Run the registration hooks ``impls``, plugin by plugin. A plugin whose hook raises, or registers
    a class of the wrong kind, without a name, with unimplemented methods, or one name twice, is broken:
    none of its registrations is kept. A name two plugins register for one kind is ``Collection.duplicate``.

    Args:
        impls: ``(kind, hook implementation)`` pairs, as the plugin manager lists them.
    """
    by_plugin: dict[str, list[tuple[str, pluggy.HookImpl]]] = {}
    for kind, impl in impls:
        by_plugin.setdefault(impl.plugin_name, []).append((kind, impl))
    found: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
    broken: list[BrokenPlugin] = []
    duplicate = None
    for plugin, plugin_impls in by_plugin.items():
        try:
            entries = _plugin_registrations(plugin, plugin_impls)
        except Exception as error:  # a plugin's own failure, whatever it is, must not stop the others
            reason = str(error) if isinstance(error, InvalidRegistration) else f"a registration hook raised {failure(error)}"
            broken.append(BrokenPlugin(plugin, reason, *distribution(plugin)))
            continue
        for entry in entries:
            earlier = found[entry.kind].setdefault(entry.name, entry)
            if earlier is not entry and duplicate is None:
                duplicate = (f"duplicate {entry.kind} name {entry.name!r}: registered by {earlier.provider} "
                             f"({earlier.cls.__qualname__}) and by {entry.provider} ({entry.cls.__qualname__}); "
                             f"uninstall one of the two, or block it with {DISABLE_ENV_VAR}")
    return Collection(found, broken, duplicate)


# The registrations of each set of loaded plugins, keyed by their hook implementations (the plugin objects are
# kept in the value, so their ids stay theirs): a set of plugins is collected, and its failures reported, once.
_COLLECTED: dict[tuple[tuple[str, str, int], ...], tuple[list[Any], Collection]] = {}


def _collection() -> Collection:
    """The collection of the loaded plugins' registrations; its broken plugins reported (once per load)."""
    impls = _hookimpls()
    key = tuple((k, impl.plugin_name, id(impl.plugin)) for k, impl in impls)
    if key not in _COLLECTED:
        _COLLECTED[key] = ([impl.plugin for _, impl in impls], collect_registrations(impls))
    collection = _COLLECTED[key][1]
    for broken in collection.broken:
        report(broken)
    return collection


def registrations(kind: str) -> dict[str, Registration]:
    """Every class registered for ``kind``, by name, collected once per set of loaded plugins; broken
    plugins are left out (:func:`broken_plugins`). A name two plugins register for one kind raises
    ``PluginError`` (a ``ValueError``) naming both.

    Args:
        kind: one of ``"rule"``, ``"base"``, ``"projector"``, ``"manifold"``.
    """
    _check_kind(kind)
    collection = _collection()
    if collection.duplicate is not None:
        raise PluginError(collection.duplicate)
    return dict(collection.found[kind])


def broken_plugins() -> list[BrokenPlugin]:
    """The plugins skipped because they failed to load or to register their classes, with the reason."""
    return [*load_failures(), *_collection().broken]


def not_loaded() -> str:
    """``; not loaded: PLUGIN, REASON; ...`` naming the broken plugins, for a message about a name that is
    not registered (a broken plugin may be the one that provides it); ``""`` when no plugin is broken."""
    broken = broken_plugins()
    return "; not loaded: " + "; ".join(f"{entry.provider}, {entry.reason}" for entry in broken) if broken else ""


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
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(found)) or 'none'}{not_loaded()}")
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
