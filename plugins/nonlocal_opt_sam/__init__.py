"""First-party plugin: Sharpness-Aware Minimization (Foret et al.) and adaptive SAM (ASAM, Kwon et al.).

Registers the ``sam`` rule. Registered through the ``nonlocal_opt`` entry-point group.
"""

from __future__ import annotations

import torch

from nonlocal_opt import DescentRule, Hyperparameter, hookimpl
from nonlocal_opt.optim.base_updates import MAX_GRAD_NORM, SGD_HYPERPARAMETERS, check_nesterov, guarded_sgd_step
from nonlocal_opt.optim.hyperparameters import boolean, non_negative


def perturbation(w: torch.Tensor, g: torch.Tensor, rho: float, adaptive: bool) -> torch.Tensor:
    """``ε = ρ T² g / (‖T g‖ + 1e-12)`` with ``T = |w|`` (ASAM) or ``T = 1`` (SAM); one global norm."""
    tg = g * w.abs() if adaptive else g
    t2g = tg * w.abs() if adaptive else g
    return t2g * (rho / (torch.linalg.vector_norm(tg) + 1e-12))


class SAMRule(DescentRule):
    """SAM: ``g_ε = ∇f(w + ε)`` on the same batch, then the SGD base update from ``w`` with ``g_ε``.

    Two passes per step: the first (at ``w``) alone updates BatchNorm running statistics by default.
    """

    name = "sam"
    hyperparameters = {
        **SGD_HYPERPARAMETERS,
        "rho": Hyperparameter(0.05, "ρ", "radius of the neighbourhood where the loss is maximised", non_negative),
        "adaptive": Hyperparameter(False, "T", "ASAM: T = diag(abs(w)) scales the neighbourhood per coordinate (False: T = I)", boolean),
        "max_grad_norm": MAX_GRAD_NORM,
    }

    def check_group(self, group: dict) -> None:
        check_nesterov(group)

    def step(self, ctx):
        start = ctx.evaluate(extra=False)
        eps = perturbation(start.theta, start.grad, ctx.hp("rho"), ctx.hp("adaptive"))
        perturbed = ctx.evaluate(start.theta + eps)
        finite = torch.isfinite(start.loss) & torch.isfinite(perturbed.loss)
        guarded_sgd_step(ctx, start.theta, perturbed.grad, finite)
        return start.loss


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(SAMRule)
