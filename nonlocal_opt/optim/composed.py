"""``ComposedOptimizer``: a ``torch.optim.Optimizer`` made of a rule, a projector and a manifold."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nonlocal_opt.optim.hyperparameters import Hyperparameter, boolean, merge_specs, validate
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.optim.step_context import StepContext
from nonlocal_opt.plugins.registry import instantiate

OPTIMIZER_HYPERPARAMETERS = {
    "freeze_bn_stats": Hyperparameter(
        True,
        "—",
        "BatchNorm running statistics are updated only by the first forward pass of a step",
        boolean,
    ),
}


class ComposedOptimizer(torch.optim.Optimizer):
    """A non-local optimizer: ``rule`` proposes a move, ``projector`` restores ``manifold``'s constraint.

    Scalar hyperparameters of all three live in ``param_groups`` (so LR schedulers, and schedules
    of ``rho``, work); per-parameter state lives in ``self.state[p]``. ``stats`` describes the last step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule: DescentRule,
        projector: Projector,
        manifold: ConstraintManifold,
        **hyperparameters: Any,
    ):
        self.rule, self.projector, self.manifold = rule, projector, manifold
        self.hyperparameter_specs: dict[str, Hyperparameter] = merge_specs(
            ("the optimizer", OPTIMIZER_HYPERPARAMETERS),
            (f"rule {rule.name!r}", rule.hyperparameters),
            (f"projector {projector.name!r}", projector.hyperparameters),
            (f"manifold {manifold.name!r}", manifold.hyperparameters),
        )
        validate(self.hyperparameter_specs, hyperparameters, self._owner())
        defaults = {key: spec.default for key, spec in self.hyperparameter_specs.items()}
        defaults.update(hyperparameters)
        self._last_stats: dict[str, Any] = {}
        super().__init__(params, defaults)

    def _owner(self) -> str:
        return f"compose(rule={self.rule.name!r}, projector={self.projector.name!r}, manifold={self.manifold.name!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters (unknown or invalid ones raise ``ValueError``)."""
        validate(self.hyperparameter_specs, {k: v for k, v in param_group.items() if k != "params"}, self._owner())
        merged = {**self.defaults, **param_group}
        for component in (self.rule, self.projector, self.manifold):
            component.check_group(merged)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:
        """One step. ``closure()`` zeroes grads, runs forward and backward, returns the loss.

        Returns the loss at the start of the step (``None`` for closure-free rules called without one).
        """
        if closure is None and self.rule.requires_closure:
            raise RuntimeError(
                f"rule {self.rule.name!r} evaluates the loss several times per step: call "
                "opt.step(closure) with a closure that zeroes grads, runs forward and backward, "
                "and returns the loss"
            )
        ctx = StepContext(self, closure)
        loss = self.rule.step(ctx)
        self._last_stats = ctx.stats
        return loss

    @property
    def stats(self) -> dict[str, float]:
        """Plain floats about the last step: ``grad_evals``, ``proj_iters``, ``proj_residual``,
        ``offset_error`` (and ``nonfinite`` = 1.0 when a non-finite step was refused).

        Converted on access, so reading it is the only host synchronisation the step needs.
        """
        return {key: float(value) for key, value in self._last_stats.items()}

    def __repr__(self) -> str:
        return f"ComposedOptimizer({self._owner()[8:-1]}, groups={len(self.param_groups)})"


def compose(
    params: Iterable[Any],
    rule: str | DescentRule = "rbo",
    projector: str | Projector | None = None,
    manifold: str | ConstraintManifold | None = None,
    **hyperparameters: Any,
) -> ComposedOptimizer:
    """Build an optimizer from registered plugins (names) or component instances.

    ``None`` picks the rule's default projector / manifold. Unknown names raise ``ValueError``
    listing the available ones; unknown or invalid hyperparameters raise ``ValueError`` naming them.
    """
    rule_obj: DescentRule = instantiate("rule", rule)
    manifold_obj: ConstraintManifold = instantiate("manifold", manifold or rule_obj.default_manifold)
    projector_obj: Projector = instantiate("projector", projector or rule_obj.default_projector)
    if manifold_obj.name not in rule_obj.manifolds:
        raise ValueError(
            f"rule {rule_obj.name!r} does not work on manifold {manifold_obj.name!r}; "
            f"it supports: {', '.join(rule_obj.manifolds)}"
        )
    if manifold_obj.name not in projector_obj.manifolds:
        raise ValueError(
            f"projector {projector_obj.name!r} cannot project onto manifold {manifold_obj.name!r}; "
            f"it supports: {', '.join(projector_obj.manifolds)}"
        )
    return ComposedOptimizer(params, rule_obj, projector_obj, manifold_obj, **hyperparameters)
