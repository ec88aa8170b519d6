"""The three plugin interfaces: ``DescentRule``, ``Projector`` and ``ConstraintManifold``.

Notation (docs/math.md §1): loss ``f``, flat parameters ``θ ∈ R^d``, graph ``Γ = {(θ, f(θ))}``,
gradient ``g = ∇f(θ)``, contact point ``p = (θ, f(θ))``, ball centre ``c = (θ_c, y_c) ∈ R^{d+1}``.
Every vector here is a *flat* tensor over all parameters of all groups: one ball, never one per tensor.
Under FSDP2 it is this process's shard of that vector; sums over ``R^d`` then go through ``ctx.sum``.
"""

from __future__ import annotations

import inspect
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


_MANIFOLD_CALLS = {
    "centre": (("point", "ctx"), ()),
    "phi": (("point", "target", "ctx"), ()),
    "phi_grad": (("point", "target", "ctx"), ("out", "offset", "work")),
    "offset_error": (("centre", "point", "ctx"), ()),
}
"""How rules and projectors call a manifold: positional arguments, then keywords."""


class ConstraintManifold(_Component):
    """The set the ball's centre lives on, and the projection objective that restores it.

    A manifold owns the geometry: the centre ``c(p)`` over a contact point ``p``, the objective
    ``φ(θ) = ½ dist((θ, f(θ)), c̃)²`` a projector minimises to find the new contact point for a proposed
    centre ``c̃``, its gradient ``∇φ``, and the offset error of a carried centre. These four methods are
    everything a rule or a projector calls on a manifold, with exactly these signatures; a subclass whose
    methods do not accept these arguments is refused when it is defined.

    Class attributes (every component): ``name`` (the registered name, which ``Projector.manifolds``
    and ``DescentRule.manifolds`` refer to), ``hyperparameters``, ``presets``, ``shardable``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method, (positional, keywords) in _MANIFOLD_CALLS.items():
            defined = cls.__dict__.get(method)
            if defined is None:
                continue
            try:
                inspect.signature(defined).bind(None, *[None] * len(positional), **dict.fromkeys(keywords))
            except TypeError:
                expected = ", ".join(["self", *positional, *(["*", *(f"{k}=None" for k in keywords)] if keywords else [])])
                raise TypeError(
                    f"{cls.__qualname__}.{method}{inspect.signature(defined)} does not accept the arguments rules and "
                    f"projectors pass: define {method}({expected}) (ConstraintManifold.{method}, docs/plugins.md)"
                ) from None

    @abstractmethod
    def centre(self, point: GraphPoint, ctx: StepContext) -> Centre:
        """``c(p)``: the centre over the contact point ``p``.

        Args:
            point: The contact point ``p = (θ, f(θ))`` with ``point.grad = ∇f(θ)``.
            ctx: The step's context (hyperparameters, sums over shards, scratch vectors).

        Returns:
            The centre ``c(p)``. Its ``theta`` may live in the manifold's scratch storage, which the next
            call overwrites.
        """

    @abstractmethod
    def phi(self, point: GraphPoint, target: Centre, ctx: StepContext) -> torch.Tensor:
        """``φ(θ)``, the projection objective at ``point`` for the proposed centre ``target``.

        Args:
            point: The point ``(θ, f(θ))`` of the graph.
            target: The proposed centre ``c̃ = (θ̃, ỹ)``.
            ctx: The step's context (sums over ``R^d`` go through ``ctx.sum``).

        Returns:
            ``φ(θ)`` as a 0-d tensor.
        """

    @abstractmethod
    def phi_grad(
        self,
        point: GraphPoint,
        target: Centre,
        ctx: StepContext,
        *,
        out: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``∇φ(θ)`` at ``point`` for the proposed centre ``target``.

        ``out``, ``offset`` and ``work`` let a solver run without allocating: a manifold must honour
        ``out`` and ``offset`` and may ignore ``work``.

        Args:
            point: The point ``(θ, f(θ))`` with ``point.grad = ∇f(θ)``. ``point.theta`` is not read when
                ``offset`` is given, and may then be ``None``.
            target: The proposed centre ``c̃ = (θ̃, ỹ)``.
            ctx: The step's context (hyperparameters, sums over shards, scratch vectors).
            out: A flat tensor to write ``∇φ`` into (``None``: a new tensor). It may be ``offset`` itself.
            offset: ``θ − θ̃`` when the caller has formed it already (it saves a sweep over ``R^d``).
            work: A flat tensor, distinct from ``out``, ``offset`` and the point's vectors, that the
                manifold may overwrite with intermediate results; its content afterwards is unspecified.

        Returns:
            ``∇φ(θ)`` as a flat tensor (``out`` when given).
        """

    @abstractmethod
    def offset_error(self, centre: Centre, point: GraphPoint, ctx: StepContext) -> torch.Tensor:
        """How far ``(c, p)`` is from satisfying the constraint, for a centre a projector carries.

        Args:
            centre: The carried centre ``c``.
            point: Its contact point ``p``.
            ctx: The step's context.

        Returns:
            A 0-d tensor, 0 on the manifold.
        """


class Projector(_Component):
    """A solver that restores the constraint after a move: it maps a proposed centre ``c̃`` back onto
    the manifold by minimising the manifold's ``φ`` (``ctx.manifold.phi`` / ``phi_grad``, the only
    manifold methods it calls).

    It may evaluate the loss as often as it needs through ``ctx.evaluate(θ)``, which runs the
    closure on the *same* mini-batch.

    Class attributes: ``manifolds`` lists the names of the manifolds it can project onto (``compose``
    refuses any other); ``uses_centre`` (below); and every component's ``name``, ``hyperparameters``,
    ``presets``, ``shardable``.
    """

    manifolds: ClassVar[tuple[str, ...]] = ()
    uses_centre: ClassVar[bool] = True
    """Whether it reads ``ctx.centre`` (``c_t``) or returns a centre to carry. ``False`` lets the rule form
    ``c̃`` over ``c_t`` (one vector less); returning a centre then raises."""

    @abstractmethod
    def project(self, target: Centre, start: GraphPoint, ctx: StepContext) -> ProjectionResult:
        """Project the proposed centre back onto the manifold.

        Args:
            target: The proposed centre ``c̃``; its vectors belong to the rule and must not be written.
            start: The current contact point ``p_t``, with ``start.grad = ∇f(θ_t)`` already paid for.
            ctx: The step's context: ``ctx.evaluate`` for passes, ``ctx.manifold`` for ``φ`` and ``∇φ``,
                ``ctx.hp`` for hyperparameters, ``ctx.centre`` for ``c_t`` when ``uses_centre``.

        Returns:
            ``p_{t+1}`` (an evaluated point), the centre to carry (``None``: the rule recomputes
            ``c(p_{t+1})``), the iterations run and ``‖∇φ‖`` at ``p_{t+1}``.
        """

    def start_grad_out(self, ctx: StepContext) -> torch.Tensor | None:
        """Where the rule should gather ``∇f(θ_t)`` (``start.grad``).

        Args:
            ctx: The step's context.

        Returns:
            A flat tensor of the projector's own storage, which it may overwrite once its iterates have
            left ``θ_t``; ``None``: anywhere.
        """
        return None


class DescentRule(_Component):
    """Decides what one optimizer step hands to the base optimizer, and drives the step.

    A rule reads the loss through ``ctx.evaluate`` (the closure, on the step's mini-batch), and ends
    with ``ctx.apply(direction)``: the base optimizer (SGD, AdamW, ...) steps from the parameters
    the step started at, with ``direction`` as the gradient. A non-finite step is skipped.

    ``manifolds``: the manifolds the rule works on; empty for point-like rules, which take no
    manifold and no projector. ``default_manifold`` / ``default_projector``: what ``compose`` (and so
    ``nonlocal-opt train``) picks for ``None``. ``runs_bare_base``: the rule a base's name stands for.
    ``alias``: the name of a convenience constructor, ``nonlocal_opt.<alias>(params, base=...,
    **hyperparameters)``; ``constructors``: further ones by name (optimizer classes composing the rule with
    a paper's settings), also ``nonlocal_opt.<name>``. ``requires_closure``: whether ``step()`` needs a closure (LBFGS-style: it
    zeroes grads, runs forward and backward, returns the loss).
    """

    manifolds: ClassVar[tuple[str, ...]] = ()
    default_manifold: ClassVar[str | None] = None
    default_projector: ClassVar[str | None] = None
    runs_bare_base: ClassVar[bool] = False
    """Whether the rule hands the base the gradient as it is: a base's name given as the rule
    (``compose(params, "adamw")``) means this rule over that base. At most one registered rule declares it."""
    alias: ClassVar[str | None] = None
    constructors: ClassVar[Mapping[str, type]] = {}
    requires_closure: ClassVar[bool] = True
    comparison_specs: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    """What the rule adds to ``nonlocal-opt compare --quick``: optimizer specs as in a spec file
    (``name``, ``base``, ``fixed``, ``sweep``, ...), without ``rule``, which is the rule's own name."""
    first_pass_at_start: ClassVar[bool] = True
    """Whether the step's first pass, the one BatchNorm's running statistics come from, runs at ``θ_t``
    (``False``: a one-pass rule that evaluates elsewhere, such as at a perturbed point)."""

    @abstractmethod
    def step(self, ctx: StepContext) -> torch.Tensor | None:
        """Perform one optimizer step, through ``ctx`` only; end with ``ctx.apply``.

        Args:
            ctx: the step's context, the whole API a rule may use (docs/plugins.md, "The step context").

        Returns:
            The loss at the start of the step (or ``None`` without a closure).
        """
