"""``compose``: build a ``ComposedOptimizer`` from registered names, classes or instances, and the
convenience constructors (``nonlocal_opt.SAM``, ...) that rules declare through their ``alias``."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from nonlocal_opt.optim.composed import BaseFactory, ComposedOptimizer
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.plugins.registry import get, instantiate, not_loaded, registrations

DEFAULT_BASE = "sgd"


def resolve_base(base: str | BaseFactory | None) -> BaseFactory:
    """A base optimizer class from a registered name (``None``: ``sgd``) or a ``torch.optim.Optimizer`` subclass.

    Args:
        base: a registered base name, a ``torch.optim.Optimizer`` subclass or ``None``.
    """
    if base is None or isinstance(base, str):
        return get("base", base or DEFAULT_BASE)
    if isinstance(base, torch.optim.Optimizer):
        raise TypeError(
            "base must be an optimizer class or a registered name, not an optimizer instance: "
            f"pass base={type(base).__name__} and its hyperparameters as keywords"
        )
    if not callable(base):
        raise TypeError(f"base must be a registered name or a torch.optim.Optimizer subclass, got {base!r}")
    return base


def rule_and_base(rule: Any, base: Any = None) -> tuple[Any, Any]:
    """``(rule, base)`` with a base's name given as the rule read as the rule that ``runs_bare_base`` over
    that base: ``("adamw", None)`` → ``("local", "adamw")`` when ``local`` declares it. A name registered as
    both a rule and a base is ambiguous, and a base name with a different ``base`` contradictory: both raise
    ``ValueError``, as does a name that is neither.

    Args:
        rule: a rule's or a base's registered name, or anything ``instantiate("rule", ...)`` takes.
        base: the base the caller asked for (``None``: none named).
    """
    if not isinstance(rule, str):
        return rule, base
    rules, bases = registrations("rule"), registrations("base")
    if isinstance(base, str):
        get("base", base)  # an unknown base is named before anything else
    if rule in rules and rule in bases:
        raise ValueError(f"{rule!r} is registered both as a rule (by {rules[rule].provider}) and as a base optimizer "
                         f"(by {bases[rule].provider}), so the name is ambiguous; block one of the two plugins")
    if rule in rules:
        return rule, base
    if rule not in bases:
        raise ValueError(f"unknown rule {rule!r}; available: {', '.join(sorted(rules)) or 'none'}; "
                         f"or a base optimizer run as it is: {', '.join(sorted(bases)) or 'none'}{not_loaded()}")
    if base is not None and base != rule:
        raise ValueError(f"{rule!r} names a base optimizer run as it is, and base={base!r} names another: name the base "
                         f"once, e.g. rule {base!r} alone, or a rule (not a base) with base {base!r}")
    bare = sorted(name for name, entry in rules.items() if entry.cls.runs_bare_base)
    if len(bare) != 1:
        found = f"rules {', '.join(bare)} each declare runs_bare_base" if bare else "no registered rule declares runs_bare_base"
        raise ValueError(f"{rule!r} names a base optimizer, not a rule, and {found}; name a rule with base={rule!r}")
    return bare[0], rule


def resolve(
    rule: str | DescentRule | type,
    base: str | BaseFactory | None = None,
    projector: str | Projector | None = None,
    manifold: str | ConstraintManifold | None = None,
) -> tuple[DescentRule, BaseFactory, Projector | None, ConstraintManifold | None]:
    """The components of a composition, checked to fit together (``ValueError`` names what does not).

    Args:
        rule: a registered rule name (or a base's name: see :func:`rule_and_base`), a ``DescentRule``
            subclass or instance.
        base: a registered base name or a ``torch.optim.Optimizer`` subclass (``None``: ``sgd``).
        projector: for rules that project (``None``: the rule's ``default_projector``).
        manifold: for rules that project (``None``: the rule's ``default_manifold``).
    """
    rule, base = rule_and_base(rule, base)
    rule_obj: DescentRule = instantiate("rule", rule)
    base_cls = resolve_base(base)
    if not rule_obj.manifolds:
        for kind, value in (("projector", projector), ("manifold", manifold)):
            if value is not None:
                raise ValueError(
                    f"rule {rule_obj.name!r} takes no {kind}: it moves a point, not a ball on a manifold "
                    "(rules that declare manifolds take projectors)"
                )
        return rule_obj, base_cls, None, None
    manifold_obj: ConstraintManifold = instantiate("manifold", manifold or rule_obj.default_manifold)
    projector_obj: Projector = instantiate("projector", projector or rule_obj.default_projector)
    if manifold_obj.name not in rule_obj.manifolds:
        raise ValueError(
            f"rule {rule_obj.name!r} does not work on manifold {manifold_obj.name!r}; it supports: {', '.join(rule_obj.manifolds)}"
        )
    if manifold_obj.name not in projector_obj.manifolds:
        raise ValueError(
            f"projector {projector_obj.name!r} cannot project onto manifold {manifold_obj.name!r}; "
            f"it supports: {', '.join(projector_obj.manifolds) or 'none'}"
        )
    return rule_obj, base_cls, projector_obj, manifold_obj


def compose(
    params: Iterable[Any],
    rule: str | DescentRule | type,
    *,
    base: str | BaseFactory | None = None,
    projector: str | Projector | None = None,
    manifold: str | ConstraintManifold | None = None,
    **hyperparameters: Any,
) -> ComposedOptimizer:
    """Build an optimizer: ``rule`` over the base optimizer ``base``, e.g.
    ``compose(params, "sam", base="adamw", lr=1e-3, weight_decay=0.05, rho=0.05)``. A base's name as the
    rule runs that base as it is: ``compose(params, "adamw")`` is ``compose(params, "local", base="adamw")``.
    Unknown names raise ``ValueError`` listing the available ones; unknown or invalid hyperparameters raise
    ``ValueError``.

    Args:
        params: the parameters (or parameter groups) to optimize.
        rule: a registered rule (or base) name, a ``DescentRule`` subclass or instance.
        base: a registered base name such as ``"adamw"`` or any ``torch.optim.Optimizer`` subclass
            (``None``: ``"sgd"``).
        projector: for rules that move a ball (``None``: the rule's ``default_projector``).
        manifold: for rules that move a ball (``None``: the rule's ``default_manifold``).
        **hyperparameters: go to the components that declare them, the rest to the base.
    """
    return ComposedOptimizer(params, *resolve(rule, base, projector, manifold), **hyperparameters)


@functools.cache
def _constructor(alias: str, rule: str) -> type[ComposedOptimizer]:
    def __init__(self, params, *, base=None, projector=None, manifold=None, **hyperparameters):
        ComposedOptimizer.__init__(self, params, *resolve(rule, base, projector, manifold), **hyperparameters)

    doc = f"``{alias}(params, base='sgd', **hyperparameters)``: ``compose(params, rule={rule!r}, base=base, ...)``."
    return type(alias, (ComposedOptimizer,), {"__init__": __init__, "__doc__": doc, "__module__": "nonlocal_opt"})


def constructor(alias: str) -> type[ComposedOptimizer] | None:
    """The optimizer class named ``alias`` by a registered rule (``DescentRule.alias`` or one of its
    ``constructors``), or ``None``.

    Args:
        alias: e.g. ``"RBO"``, as in ``nonlocal_opt.RBO``.
    """
    for name, entry in registrations("rule").items():
        if entry.cls.alias == alias:
            return _constructor(alias, name)
        if alias in entry.cls.constructors:
            return entry.cls.constructors[alias]
    return None
