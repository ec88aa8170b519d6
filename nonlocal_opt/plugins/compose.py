"""``compose``: build a ``ComposedOptimizer`` from registered names, classes or instances, and the
convenience constructors (``nonlocal_opt.SAM``, ...) that rules declare through their ``alias``."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from nonlocal_opt.optim.composed import BaseFactory, ComposedOptimizer
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.plugins.registry import get, instantiate, registrations

DEFAULT_BASE = "sgd"


def resolve_base(base: str | BaseFactory | None) -> BaseFactory:
    """A base optimizer class from a registered name (``None``: ``sgd``) or a ``torch.optim.Optimizer`` subclass."""
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


def resolve(
    rule: str | DescentRule | type,
    base: str | BaseFactory | None = None,
    projector: str | Projector | None = None,
    manifold: str | ConstraintManifold | None = None,
) -> tuple[DescentRule, BaseFactory, Projector | None, ConstraintManifold | None]:
    """The components of a composition, checked to fit together (``ValueError`` names what does not)."""
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
    """Build an optimizer: ``rule`` over the base optimizer ``base`` (a registered name such as
    ``"adamw"``, or any ``torch.optim.Optimizer`` subclass; default ``"sgd"``), with ``projector`` and
    ``manifold`` for rules that move a ball (``None``: the rule's defaults).

    ``hyperparameters`` go to the components that declare them and the rest to the base, e.g.
    ``compose(params, "sam", base="adamw", lr=1e-3, weight_decay=0.05, rho=0.05)``. Unknown names raise
    ``ValueError`` listing the available ones; unknown or invalid hyperparameters raise ``ValueError``.
    """
    return ComposedOptimizer(params, *resolve(rule, base, projector, manifold), **hyperparameters)


@functools.cache
def _constructor(alias: str, rule: str) -> type[ComposedOptimizer]:
    def __init__(self, params, *, base=None, projector=None, manifold=None, **hyperparameters):
        ComposedOptimizer.__init__(self, params, *resolve(rule, base, projector, manifold), **hyperparameters)

    doc = f"``{alias}(params, base='sgd', **hyperparameters)``: ``compose(params, rule={rule!r}, base=base, ...)``."
    return type(alias, (ComposedOptimizer,), {"__init__": __init__, "__doc__": doc, "__module__": "nonlocal_opt"})


def constructor(alias: str) -> type[ComposedOptimizer] | None:
    """The optimizer class named ``alias`` by a registered rule (``DescentRule.alias``), or ``None``."""
    for name, entry in registrations("rule").items():
        if entry.cls.alias == alias:
            return _constructor(alias, name)
    return None
