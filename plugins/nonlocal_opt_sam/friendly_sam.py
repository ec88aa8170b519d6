"""Friendly-SAM (Li et al., CVPR 2024): the ascent direction drops the full-batch part of the gradient,
estimated by an EMA ``m`` of past gradients."""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import non_negative, unit_interval
from nonlocal_opt.optim.refresh_policy import REFRESH_HYPERPARAMETERS
from nonlocal_opt_sam.ascent import PERTURB, RHO
from nonlocal_opt_sam.refreshing import RefreshingRule
from nonlocal_opt_sam.two_pass import Gradients, perturbed_passes


class FriendlySAMRule(RefreshingRule):
    """Friendly-SAM: at a tensor's first step ``m = g`` and ``d = g``; afterwards ``d = g − σ m``, then
    ``m ← λ m + (1 − λ) g`` (the raw gradient, as the authors' code). ``ε = ε(d)``, and the base steps from
    ``w`` with ``g_p = ∇f(w + ε)``.

    ``m`` (one tensor per perturbed parameter, ``None`` for the others) is ``state["ema"]``, saved by
    ``state_dict``; its update is formed in a buffer and kept only when the base step is taken. Two passes.
    Under the refresh policy ``m`` moves at refreshes only.
    """

    name = "friendly-sam"
    alias = "FriendlySAM"
    shardable = True
    hyperparameters = {
        "rho": RHO,
        "sigma": Hyperparameter(1.0, "σ", "weight of the EMA m subtracted from g in the ascent direction g − σ m", non_negative),
        "lmbda": Hyperparameter(0.9, "λ", "EMA factor of m ← λ m + (1 − λ) g", unit_interval),
        "perturb": PERTURB,
        **REFRESH_HYPERPARAMETERS,
    }
    comparison_specs = (
        {"name": "friendly-sam/sgd-m", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03}, "sweep": {"rho": [0.05, 0.2]}},
    )

    def refresh(self, ctx, policy):
        """Two passes at ``w`` and ``w + ε(g − σ m)``; the base steps from ``w`` with ``g_p``; then ``m`` moves.

        Args:
            ctx: The step's context.
            policy: The step's refresh policy.

        Returns:
            The loss at ``w``.

        Raises:
            ValueError: the saved EMA has another number of tensors than the parameters.
        """
        ema = ctx.state.get("ema", [None] * len(ctx.params))
        if len(ema) != len(ctx.params):
            raise ValueError(
                f"friendly-sam's saved EMA has {len(ema)} tensors for {len(ctx.params)} parameters: "
                "load a state_dict saved with the same parameters"
            )
        fresh = ctx.buffers("friendly-sam.ema")
        sigma, lmbda = ctx.hp("sigma"), ctx.hp("lmbda")

        def ascent_direction(first: Gradients, moved: list[bool]) -> list[torch.Tensor]:
            tracked = [i for i, m in enumerate(moved) if m and ema[i] is not None]
            new = [i for i, m in enumerate(moved) if m and ema[i] is None]
            if new:
                torch._foreach_copy_([fresh[i] for i in new], [first[i] for i in new])  # m = g at the first step
            if tracked:
                m, g, out = [ema[i] for i in tracked], [first[i] for i in tracked], [fresh[i] for i in tracked]
                torch._foreach_copy_(out, m)
                torch._foreach_mul_(out, lmbda)
                torch._foreach_add_(out, g, alpha=1 - lmbda)  # λ m + (1 − λ) g
                torch._foreach_add_(g, m, alpha=-sigma)  # d = g − σ m
            return [g for g, m in zip(first, moved) if m]

        passes = perturbed_passes(ctx, policy, ascent_direction)
        taken = policy.apply(finite=passes.finite(ctx), spare=passes.spare)
        created = list(ema)
        for i, m in enumerate(passes.perturbed):
            if not m:
                continue
            if ema[i] is None:
                if bool(taken):  # a tensor's first step only: reads the verdict on the device path
                    created[i] = fresh[i].clone()
            elif ctx.host_reads:
                if bool(taken):
                    ema[i].copy_(fresh[i])
            else:
                torch.where(taken, fresh[i], ema[i], out=ema[i])
        if any(a is not b for a, b in zip(created, ema)):
            ctx.state["ema"] = created
        return passes.loss
