"""O(d) algebra of the footpoint problem ``min_θ φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²`` (docs/math.md §3).

With ``a = θ − θ̃`` and ``s = f(θ) − ỹ``: ``∇φ = a + s g`` and the Gauss–Newton matrix is
``G = I + g gᵀ``. Everything here is a handful of dot products (over every shard: ``ctx.dot``) and
axpys on flat tensors.
"""

from __future__ import annotations

import math

import torch


def damped_gn_solve(grad: torch.Tensor, v: torch.Tensor, ctx, damping: torch.Tensor | float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """``c ((1 + μ) I + g gᵀ)⁻¹ v = c [v − g (gᵀv)/(1 + μ + ‖g‖²)] / (1 + μ)`` (Sherman–Morrison), ``c = scale``.

    Args:
        grad: ``g``.
        v: The right-hand side ``v``.
        ctx: The step's context (sums over shards).
        damping: ``μ ≥ 0``.
        scale: ``c``.

    Returns:
        The solution, a new flat tensor.
    """
    shift = 1 + damping
    gv, gg = ctx.sum(torch.stack([grad.dot(v), grad.dot(grad)])).unbind()
    return torch.addcmul(v, grad, gv / (shift + gg), value=-1) * (scale / shift)


def gauss_newton_decrease(grad: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor, ctx) -> torch.Tensor:
    """``L(0) − L(Δ) = −∇φᵀΔ − ½(‖Δ‖² + (gᵀΔ)²)``: the decrease of the Gauss–Newton model of ``φ``.

    Args:
        grad: ``g``.
        gradient: ``∇φ``.
        step: ``Δ``.
        ctx: The step's context (sums over shards).

    Returns:
        The predicted decrease, a 0-d tensor.
    """
    vd, dd, gd = ctx.sum(torch.stack([gradient.dot(step), step.dot(step), grad.dot(step)])).unbind()
    return -(vd + 0.5 * (dd + gd.square()))


def tolerance(hp, move_sq: float) -> float | None:
    """The stopping threshold on ``‖∇φ‖``: ``max(tol, rtol · ‖θ̃ − θ_t‖)`` with ``move_sq = ‖θ̃ − θ_t‖²``;
    ``None`` when both are off. Only for host reads: off the CPU the threshold is never checked inside
    the loop (it would synchronise the host).

    Args:
        hp: Reads a hyperparameter (``ctx.hp``).
        move_sq: ``‖θ̃ − θ_t‖²``.

    Returns:
        The threshold, or ``None``.
    """
    tol, rtol = hp("tol"), hp("rtol")
    if tol is None and rtol is None:
        return None
    return max(rtol * math.sqrt(max(move_sq, 0.0)) if rtol is not None else 0.0, tol or 0.0)
