"""The three plugin interfaces: ``DescentRule``, ``Projector`` and ``ConstraintManifold``.

Notation (docs/math.md §1): loss ``f``, flat parameters ``θ ∈ R^d``, graph ``Γ = {(θ, f(θ))}``,
gradient ``g = ∇f(θ)``, contact point ``p = (θ, f(θ))``, ball centre ``c = (θ_c, y_c) ∈ R^{d+1}``.
Every vector here is a *flat* tensor over all parameters of all groups: one ball, never one per tensor.
Under FSDP2 it is this process's shard of that vector; sums over ``R^d`` then go through ``ctx.sum``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from nonlocal_opt.optim.hyperparameters import Hyperparameter
from nonlocal_opt.optim.points import Centre, GraphPoint, ProjectionResult

if TYPE_CHECKING:
    from nonlocal_opt.optim.step_context import StepContext

__all__ = ["Centre", "ConstraintManifold", "DescentRule", "GraphPoint", "ProjectionResult", "Projector"]


class _Component(ABC):
    """Shared shape of registered components: a ``name``, declared ``hyperparameters`` and named
    ``presets`` (e.g. ``"paper"``: the settings of the paper that defines the component; a preset may
    also set hyperparameters of the base optimizer, such as ``lr``)."""

    name: ClassVar[str]
    hyperparameters: ClassVar[Mapping[str, Hyperparameter]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    shardable: ClassVar[bool] = False
    """Whether the component works on sharded parameters (FSDP2): every sum over ``R^d`` it forms
    (dot products, norms) goes through ``ctx.dot`` / ``ctx.sum``, which add up the processes' shards.
    Optimizers with a component that does not declare it refuse sharded parameters."""

    def check_group(self, group: Mapping[str, object]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Reject combinations of hyperparameters with ``ValueError``; single values are already checked
        by their ``Hyperparameter`` validators.

        Args:
            group: one parameter group, the base's and every component's defaults filled in.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ConstraintManifold(_Component):
    """The set the optimizer's state lives on, and the projection objective that restores it.

    It owns the geometry: the centre ``c(p)`` over a contact point, the objective
    ``φ(θ) = ½ dist((θ, f(θ)), c̃)²`` a projector minimises to find the new contact point for a
    proposed centre ``c̃``, its gradient, and the offset error of a centre.
    """

    @abstractmethod
    def centre(self, point: GraphPoint, ctx: StepContext) -> Centre:
        """``c(p)``: the state attached to the contact point ``p`` (needs ``point.grad``)."""

    @abstractmethod
    def phi(self, point: GraphPoint, target: Centre, ctx: StepContext) -> torch.Tensor:
        """``φ(θ)`` at ``point`` for the proposed centre ``target``, as a 0-d tensor."""

    @abstractmethod
    def phi_grad(
        self, point: GraphPoint, target: Centre, out: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``∇φ(θ)`` at ``point`` (needs ``point.grad``), written into ``out`` when given (``out`` may be
        ``offset``). ``offset``: ``θ − θ̃`` when the caller has formed it already (a solver may pass it to
        save a sweep); ``point.theta`` is then not read, and may be ``None``."""

    @abstractmethod
    def offset_error(self, centre: Centre, point: GraphPoint, ctx: StepContext) -> torch.Tensor:
        """How far ``(c, p)`` is from satisfying the constraint (0 on the manifold), as a 0-d tensor."""


class Projector(_Component):
    """A solver that restores the constraint after a move: it maps a proposed centre ``c̃`` back onto
    the manifold by minimising the manifold's ``φ`` (``ctx.manifold.phi`` / ``phi_grad``).

    It may evaluate the loss as often as it needs through ``ctx.evaluate(θ)``, which runs the
    closure on the *same* mini-batch. ``manifolds`` lists the manifolds it can project onto.
    """

    manifolds: ClassVar[tuple[str, ...]] = ()
    uses_centre: ClassVar[bool] = True
    """Whether it reads ``ctx.centre`` (``c_t``) or returns a centre to carry. ``False`` lets the rule form
    ``c̃`` over ``c_t`` (one vector less); returning a centre then raises."""

    @abstractmethod
    def project(self, target: Centre, start: GraphPoint, ctx: StepContext) -> ProjectionResult:
        """Return ``p_{t+1}`` (and optionally ``c_{t+1}``) for the proposed centre ``c̃ = target``,
        starting from the current contact point ``start = p_t``."""

    def start_grad_out(self, ctx: StepContext) -> torch.Tensor | None:
        """Where the rule should gather ``∇f(θ_t)`` (``start.grad``): a flat tensor of the projector's own
        storage, which it may then overwrite once its iterates have left ``θ_t``; ``None``: anywhere."""
        return None


class DescentRule(_Component):
    """Decides what one optimizer step hands to the base optimizer, and drives the step.

    A rule reads the loss through ``ctx.evaluate`` (the closure, on the step's mini-batch), and ends
    with ``ctx.apply(direction)``: the base optimizer (SGD, AdamW, ...) steps from the parameters
    the step started at, with ``direction`` as the gradient. A non-finite step is skipped.

    ``manifolds``: the manifolds the rule works on; empty for point-like rules, which take no
    manifold and no projector. ``default_manifold`` / ``default_projector``: what ``compose`` picks
    for ``None``. ``alias``: the name of a convenience constructor, ``nonlocal_opt.<alias>(params,
    base=..., **hyperparameters)``. ``requires_closure``: whether ``step()`` needs a closure
    (LBFGS-style: it zeroes grads, runs forward and backward, returns the loss).
    """

    manifolds: ClassVar[tuple[str, ...]] = ()
    default_manifold: ClassVar[str | None] = None
    default_projector: ClassVar[str | None] = None
    training_projector: ClassVar[str | None] = None
    """The projector ``nonlocal-opt train`` uses when none is given (``None``: ``default_projector``):
    a rule may keep its paper's solver as the library default and still train with a sturdier one."""
    alias: ClassVar[str | None] = None
    requires_closure: ClassVar[bool] = True

    @abstractmethod
    def step(self, ctx: StepContext) -> torch.Tensor | None:
        """Perform one optimizer step, through ``ctx`` only; end with ``ctx.apply``.

        Args:
            ctx: the step's context, the whole API a rule may use (docs/plugins.md, "The step context").

        Returns:
            The loss at the start of the step (or ``None`` without a closure).
        """
