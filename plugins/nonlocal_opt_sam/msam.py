"""Momentum-SAM (Becker et al., 2024): one pass per step, at ``w`` perturbed along the momentum ``m`` of the
directions the rule handed the base."""

from __future__ import annotations

import torch

from nonlocal_opt import DescentRule, Hyperparameter
from nonlocal_opt.optim.hyperparameters import unit_interval
from nonlocal_opt_sam.ascent import PERTURB, RHO
from nonlocal_opt_sam.two_pass import pass_at_perturbed, perturbed_flags


class MomentumSAMRule(DescentRule):
    """Momentum-SAM: ``m_t = β m_{t−1} + d_{t−1}`` over the directions ``d`` handed the base (``m = 0`` before the
    first step); one pass at ``w + ρ m/‖m‖`` (at ``w`` while ``m = 0``), and the base steps from ``w`` with the
    gradient there, ``d_t``. The loss it returns is ``f(w + ε)``, the only one it computes.

    ``m`` (one tensor per parameter) is ``state["msam_m"]``, saved by ``state_dict``; its update is formed in
    a buffer and kept only when the base step is taken. One pass, and ``perturb=False`` groups as SAM.
    """

    name = "msam"
    alias = "MSAM"
    shardable = True
    first_pass_at_start = False
    hyperparameters = {
        "rho": RHO,
        "beta": Hyperparameter(0.9, "β", "momentum factor of m ← β m + d over the directions handed the base", unit_interval),
        "perturb": PERTURB,
    }
    comparison_specs = ({"name": "msam/sgd-m", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03}, "sweep": {"rho": [0.1, 0.5]}},)

    def step(self, ctx):
        """One pass at ``w + ρ m/‖m‖``; the base steps from ``w`` with its gradient ``d``; then ``m ← β m + d``.

        Args:
            ctx: The step's context.

        Returns:
            The loss at ``w + ε``.
        """
        flags = perturbed_flags(ctx)
        m = ctx.state.get("msam_m")
        new = ctx.buffers("msam.m")  # m/‖m‖'s direction, then β m + d
        spare = []
        if m is None:
            loss = torch.as_tensor(ctx.loss(extra=False))
        else:
            direction = [b for b, on in zip(new, flags) if on]
            torch._foreach_copy_(direction, [v for v, on in zip(m, flags) if on])
            loss, buffers = pass_at_perturbed(ctx, flags, direction, None, extra=False)
            spare = [buffers]
        loss = loss.detach()
        grads = ctx.grads()
        index = [i for i, g in enumerate(grads) if g is not None]
        if m is None:
            m = [torch.zeros_like(b) for b in new]
        fresh = [new[i] for i in index]
        torch._foreach_copy_(fresh, [m[i] for i in index])
        torch._foreach_mul_(fresh, ctx.hp("beta"))
        torch._foreach_add_(fresh, [grads[i] for i in index])  # β m + d
        taken = ctx.apply(finite=ctx.finite(loss), spare=spare)
        for i in index:
            torch.where(taken, new[i], m[i], out=m[i])
        ctx.state["msam_m"] = m
        return loss
