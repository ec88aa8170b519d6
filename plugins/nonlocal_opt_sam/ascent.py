"""The ascent every sharpness-aware rule shares: ``ε(d) = ρ T² d / (‖T d‖ + 1e-12)`` over the perturbed
parameters, with ``T = |w| + η`` (ASAM) or ``T = 1``; and the hyperparameters that set it."""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import boolean, non_negative

Tensors = list[torch.Tensor]

RHO = Hyperparameter(0.05, "ρ", "radius of the neighbourhood where the loss is maximised", non_negative)
PERTURB = Hyperparameter(
    True, "—", "per group: perturb its parameters (False: ε = 0 for them, and they are left out of every norm of the ascent)", boolean
)


def perturb_(target: Tensors, direction: Tensors, w: Tensors, scratch: Tensors, rho: float, eta: list[float] | None, ctx) -> None:
    """``target ← target + ε``, ``ε = ρ T² d / (‖T d‖ + 1e-12)`` with ``T = |w| + η`` (ASAM, ``eta`` given) or
    ``T = 1``; one global norm over all tensors (``ctx.norm``).

    Args:
        target: The tensors to perturb, in place.
        direction: The ascent direction ``d`` per tensor; overwritten.
        w: The weights ``w`` (ASAM's ``T``).
        scratch: Work tensors like ``w``, overwritten (ASAM; unused for ``T = 1``).
        rho: ``ρ``.
        eta: ``η`` per tensor (ASAM), or ``None`` for ``T = 1``.
        ctx: The step's context (the global norm).
    """
    if eta is not None:
        torch._foreach_copy_(scratch, w)
        torch._foreach_abs_(scratch)
        torch._foreach_add_(scratch, eta)  # T = |w| + η
        torch._foreach_mul_(direction, scratch)  # T d
        norm = ctx.norm(direction)
        torch._foreach_mul_(direction, scratch)  # T² d
    else:
        norm = ctx.norm(direction)
    torch._foreach_mul_(direction, rho / (norm + 1e-12))  # a 0-d tensor factor: no host read
    torch._foreach_add_(target, direction)
