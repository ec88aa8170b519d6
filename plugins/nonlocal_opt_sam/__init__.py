"""First-party plugin: Sharpness-Aware Minimization (Foret et al.) and adaptive SAM (ASAM, Kwon et al.).

Registers the ``sam`` rule (constructor ``nonlocal_opt.SAM``). Registered through the ``nonlocal_opt``
entry-point group.
"""

from __future__ import annotations

import torch

from nonlocal_opt import DescentRule, Hyperparameter, hookimpl
from nonlocal_opt.optim.hyperparameters import boolean, non_negative

Tensors = list[torch.Tensor]


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scratch: Tensors, rho: float, adaptive: bool, ctx) -> None:
    """``w ← w + ε``, ``ε = ρ T² g / (‖T g‖ + 1e-12)`` with ``T = |w|`` (ASAM) or ``T = 1`` (SAM); one global
    norm over all tensors (``ctx.norm``). ``saved`` holds ``w``; ``grads`` are overwritten (SAM) and ``scratch`` (ASAM)."""
    if adaptive:
        torch._foreach_copy_(scratch, saved)
        torch._foreach_mul_(scratch, grads)  # w g: ‖w g‖ = ‖T g‖
        norm = ctx.norm(scratch)
        torch._foreach_mul_(scratch, saved)  # w² g = T² g
        direction = scratch
    else:
        norm = ctx.norm(grads)
        direction = grads
    torch._foreach_mul_(direction, rho / (norm + 1e-12))  # a 0-d tensor factor: no host read
    torch._foreach_add_(params, direction)


class SAMRule(DescentRule):
    """SAM (docs/math.md §7): ``g_ε = ∇f(w + ε)`` on the same batch; the base steps from ``w`` with ``g_ε``.

    Two passes per step: the first (at ``w``) alone updates BatchNorm running statistics by default.
    ``rho = 0`` is the base optimizer exactly. Per-tensor work: one copy of ``w`` (two for ASAM), kept
    between steps.
    """

    name = "sam"
    alias = "SAM"
    shardable = True
    hyperparameters = {
        "rho": Hyperparameter(0.05, "ρ", "radius of the neighbourhood where the loss is maximised", non_negative),
        "adaptive": Hyperparameter(False, "T", "ASAM: T = diag(abs(w)) scales the neighbourhood per coordinate (False: T = I)", boolean),
    }
    presets = {"paper": {"lr": 0.01, "rho": 0.05}}

    def step(self, ctx):
        loss = torch.as_tensor(ctx.loss(extra=False)).detach()
        present = [g is not None for g in ctx.grads()]
        params = [p for p, has in zip(ctx.params, present) if has]
        saved = ctx.buffers("w")
        torch._foreach_copy_(saved, ctx.params)
        ctx.keep_start(saved)
        kept = [w for w, has in zip(saved, present) if has]
        grads = [g for g in ctx.grads() if g is not None]
        adaptive = ctx.hp("adaptive")
        perturb_(params, grads, kept, ctx.buffers("scratch") if adaptive else [], ctx.hp("rho"), adaptive, ctx)
        perturbed = torch.as_tensor(ctx.loss())
        ctx.apply(theta=saved, finite=ctx.finite(loss, perturbed))  # g_ε is in p.grad
        return loss


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(SAMRule)
