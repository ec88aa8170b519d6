"""WSAM, weighted sharpness as a regulariser (Yue et al., KDD 2023): ``f + c (f(w + ε) − f)``, ``c = γ/(1 − γ)``."""

from __future__ import annotations

import torch

from nonlocal_opt import DescentRule, Hyperparameter
from nonlocal_opt.optim.hyperparameters import boolean
from nonlocal_opt.optim.refresh_policy import RefreshPolicy, below_one
from nonlocal_opt_sam.ascent import PERTURB, RHO
from nonlocal_opt_sam.two_pass import passes_keeping_gradient


class WSAMRule(DescentRule):
    """WSAM: ``ε = ε(g)``, ``g_p = ∇f(w + ε)``, ``c = γ/(1 − γ)``. Coupled (``decoupled=False``): the base
    steps from ``w`` with ``g + c (g_p − g)``. Decoupled: the base steps with ``g``, then
    ``w ← w − η c (g_p − g)`` with the group's ``lr`` ``η`` (the sharpness term outside the base's
    preconditioning, as AdamW's weight decay). Two passes; ``g`` is kept in a buffer through the second
    pass, and ``g_p − g`` in another through the base step when decoupled.
    """

    name = "wsam"
    alias = "WSAM"
    shardable = True
    hyperparameters = {
        "rho": RHO,
        "gamma": Hyperparameter(0.9, "γ", "weight of the sharpness term: c = γ/(1 − γ)", below_one),
        "decoupled": Hyperparameter(
            True, "—", "the base steps on g, then w ← w − lr c (g_p − g) (False: the base gets g + c (g_p − g))", boolean
        ),
        "perturb": PERTURB,
    }

    def check_group(self, group):
        """Refuse ``decoupled`` over a base without a learning rate.

        Args:
            group: One parameter group, defaults filled in.

        Raises:
            ValueError: ``decoupled`` and the group has no ``lr``.
        """
        if group["decoupled"] and "lr" not in group:
            raise ValueError(
                "wsam with decoupled=True steps w ← w − lr·c·(g_p − g) with the group's lr, and this base has no 'lr' "
                "in its param groups: pass lr, or use decoupled=False"
            )

    def step(self, ctx):
        """Two passes; then the coupled or decoupled update.

        Args:
            ctx: The step's context.

        Returns:
            The loss at ``w``.
        """
        passes, g, g_p, kept = passes_keeping_gradient(ctx, RefreshPolicy(ctx, declared=False), "wsam.g")
        present = passes.present
        gamma = ctx.hp("gamma")
        c = gamma / (1 - gamma)
        if not ctx.hp("decoupled"):
            torch._foreach_sub_(g_p, g)
            torch._foreach_mul_(g_p, c)
            torch._foreach_add_(g_p, g)  # g + c (g_p − g)
            ctx.apply(finite=passes.finite(ctx), spare=[*passes.spare, kept])
            return passes.loss
        sharpness = [b for b, has in zip(ctx.buffers("wsam.sharpness"), present) if has]
        torch._foreach_copy_(sharpness, g_p)
        torch._foreach_sub_(sharpness, g)  # g_p − g
        torch._foreach_copy_(g_p, g)
        taken = ctx.apply(finite=passes.finite(ctx, ctx.norm(sharpness)), spare=[*passes.spare, kept])
        scales = [-c * lr for lr, has in zip(ctx.per_tensor("lr"), present) if has]  # −η c
        if any(isinstance(k, torch.Tensor) for k in scales):  # a tensor lr is not read on the host
            scales = [k if isinstance(k, torch.Tensor) else torch.tensor(k) for k in scales]
        torch._foreach_mul_(sharpness, scales)
        if ctx.host_reads:
            if not bool(taken):
                return passes.loss
        else:
            zero = sharpness[0].new_zeros(())
            for s in sharpness:
                torch.where(taken, s, zero, out=s)
        torch._foreach_add_([p for p, has in zip(ctx.params, present) if has], sharpness)  # w − η c (g_p − g)
        return passes.loss
