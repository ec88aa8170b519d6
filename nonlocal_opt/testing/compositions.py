"""How the kits compose the component under test without naming any plugin: a projector runs on its
first manifold under the first registered rule (sorted names) that works on that manifold."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import attrs

import nonlocal_opt
from nonlocal_opt import ComposedOptimizer, ConstraintManifold, DescentRule, Projector
from nonlocal_opt.plugins.registry import instantiate
from nonlocal_opt.testing.public_contract import hold_to_contract


def rule_on(manifold: str) -> str:
    """The first registered rule (sorted names) whose ``manifolds`` include ``manifold``.

    Args:
        manifold: a manifold's name.

    Raises:
        ValueError: no registered rule works on it.
    """
    for name in nonlocal_opt.available("rule"):
        if manifold in nonlocal_opt.get("rule", name).manifolds:
            return name
    raise ValueError(f"no registered rule works on manifold {manifold!r}: pass rule=... to the kit")


@attrs.frozen
class Composition:
    """A rule with the projector and manifold it runs with (both ``None`` for a point rule), composed
    over any base with :meth:`compose`.

    Args:
        rule: the rule.
        projector: its projector, or ``None``.
        manifold: its manifold, or ``None``.
    """

    rule: DescentRule
    projector: Projector | None = None
    manifold: ConstraintManifold | None = None

    @classmethod
    def for_projector(
        cls, projector: str | Projector, rule: str | DescentRule | None = None, manifold: str | ConstraintManifold | None = None
    ) -> Composition:
        """The composition that runs ``projector``.

        Args:
            projector: a registered name or a ``Projector``.
            rule: the rule (``None``: :func:`rule_on` the manifold).
            manifold: the manifold (``None``: the projector's first).
        """
        projector = instantiate("projector", projector)
        if manifold is None:
            if not projector.manifolds:
                raise ValueError(f"projector {projector.name!r} declares no manifolds: set Projector.manifolds")
            manifold = projector.manifolds[0]
        manifold = instantiate("manifold", manifold)
        return cls(instantiate("rule", rule or rule_on(manifold.name)), projector, manifold)

    @classmethod
    def for_rule(
        cls, rule: str | DescentRule, projector: str | Projector | None = None, manifold: str | ConstraintManifold | None = None
    ) -> Composition:
        """The composition that runs ``rule``.

        Args:
            rule: a registered name or a ``DescentRule``.
            projector: the projector (``None``: the rule's default; none for a point rule).
            manifold: the manifold (``None``: the rule's default; none for a point rule).
        """
        rule = instantiate("rule", rule)
        if rule.manifolds:
            projector = instantiate("projector", projector or rule.default_projector)
            manifold = instantiate("manifold", manifold or rule.default_manifold)
        return cls(rule, projector, manifold)

    def radius(self, rho: float) -> dict[str, float]:
        """``{"rho": ρ}`` when the manifold declares ``rho``, else nothing.

        Args:
            rho: the radius ``ρ``.
        """
        return {"rho": rho} if self.manifold is not None and "rho" in self.manifold.hyperparameters else {}

    def compose(self, params: Iterable[Any], base: str | type | None = None, **hyperparameters: Any) -> ComposedOptimizer:
        """A new optimizer with copies of the components, so that no run sees another's instance attributes; its
        steps refuse reads of private members of the step context (:func:`~nonlocal_opt.testing.public_contract.hold_to_contract`).

        Args:
            params: the parameters.
            base: the base optimizer, a registered name or a class (``None``: ``compose``'s default).
            **hyperparameters: the optimizer's, the components' and the base's.
        """
        rule, projector, manifold = copy.deepcopy((self.rule, self.projector, self.manifold))
        opt = nonlocal_opt.compose(params, rule, base=base, projector=projector, manifold=manifold, **hyperparameters)
        return hold_to_contract(opt)

    def __str__(self) -> str:
        parts = {"rule": self.rule, "projector": self.projector, "manifold": self.manifold}
        return ", ".join(f"{kind} {part.name!r}" for kind, part in parts.items() if part is not None)
