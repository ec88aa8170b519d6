"""GSAM, surrogate-gap guided SAM (Zhuang et al., ICLR 2022): the base gets ``g_p − α g_⊥``."""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import non_negative
from nonlocal_opt.optim.refresh_policy import REFRESH_HYPERPARAMETERS, dot
from nonlocal_opt_sam.ascent import PERTURB, RHO
from nonlocal_opt_sam.refreshing import RefreshingRule
from nonlocal_opt_sam.two_pass import passes_keeping_gradient


class GSAMRule(RefreshingRule):
    """GSAM: ``ε = ε(g)``, ``g_p = ∇f(w + ε)``, ``g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p`` (``g_⊥ = g`` when
    ``g_p = 0``); the base steps from ``w`` with ``g_p − α g_⊥``.

    ``g_p`` descends the perturbed loss; ``−α g_⊥``, orthogonal to it, lowers the surrogate gap
    ``f(w + ε) − f(w)``. Two passes; ``g`` is kept in a buffer through the second pass.
    """

    name = "gsam"
    alias = "GSAM"
    shardable = True
    hyperparameters = {
        "rho": RHO,
        "alpha": Hyperparameter(0.4, "α", "weight of −g_⊥, the part of g orthogonal to g_p, in the base's gradient", non_negative),
        "perturb": PERTURB,
        **REFRESH_HYPERPARAMETERS,
    }

    def refresh(self, ctx, policy):
        """Two passes; then ``p.grad ← (1 + α⟨g, g_p⟩/‖g_p‖²) g_p − α g`` and the base steps from ``w``.

        Args:
            ctx: The step's context.
            policy: The step's refresh policy.

        Returns:
            The loss at ``w``.
        """
        passes, g, g_p, kept = passes_keeping_gradient(ctx, policy, "gsam.g")
        if g:
            squared = dot(g_p, g_p, ctx)
            projection = torch.where(squared > 0, dot(g, g_p, ctx) / squared, torch.zeros_like(squared))
            alpha = ctx.hp("alpha")
            torch._foreach_mul_(g, -alpha)
            torch._foreach_mul_(g_p, 1 + alpha * projection)
            torch._foreach_add_(g_p, g)  # g_p − α (g − projection g_p)
        policy.apply(finite=passes.finite(ctx), spare=[*passes.spare, kept])
        return passes.loss
