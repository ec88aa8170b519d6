"""The points a step works with: contact points of Γ, centres in ``R^{d+1}``, a projection's result
(notation: docs/math.md §1)."""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class GraphPoint:
    """A point ``p = (θ, f(θ))`` of Γ, with the gradient ``g = ∇f(θ)`` when it was evaluated."""

    theta: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor | None = None


@attrs.frozen
class Centre:
    """A point ``c = (θ_c, y_c)`` of ``R^{d+1}``: the ball's centre, or a proposed centre ``c̃``."""

    theta: torch.Tensor
    height: torch.Tensor


@attrs.frozen
class ProjectionResult:
    """What a projector returns.

    ``point``: the new contact point ``p_{t+1}`` (its ``grad`` is ``∇f`` there when it was evaluated).
    ``centre``: the centre to carry into the next step, or ``None`` when the next step recomputes it
    from the new mini-batch as ``c = p + ρ ν(p)`` (the paper's code does).
    ``iterations``: inner iterations run; ``residual``: ``‖∇φ‖`` at ``point``.
    """

    point: GraphPoint
    centre: Centre | None
    iterations: int
    residual: torch.Tensor


def copied(value):
    """``value`` with every tensor it holds cloned: a tensor, or a point class of this module (recursively)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if attrs.has(type(value)):
        return attrs.evolve(value, **{field.name: copied(getattr(value, field.name)) for field in attrs.fields(type(value))})
    return value
