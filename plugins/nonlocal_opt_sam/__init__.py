"""First-party plugin: Sharpness-Aware Minimization (Foret et al.) and adaptive SAM (ASAM, Kwon et al.).

Registers the ``sam`` rule (constructor ``nonlocal_opt.SAM``). Registered through the ``nonlocal_opt``
entry-point group.
"""

from __future__ import annotations

import torch

from nonlocal_opt import DescentRule, Hyperparameter, hookimpl
from nonlocal_opt.optim.hyperparameters import boolean, non_negative


def perturbation(w: torch.Tensor, g: torch.Tensor, rho: float, adaptive: bool) -> torch.Tensor:
    """``ε = ρ T² g / (‖T g‖ + 1e-12)`` with ``T = |w|`` (ASAM) or ``T = 1`` (SAM); one global norm."""
    tg = g * w.abs() if adaptive else g
    t2g = tg * w.abs() if adaptive else g
    return t2g * (rho / (torch.linalg.vector_norm(tg) + 1e-12))


class SAMRule(DescentRule):
    """SAM (docs/math.md §7): ``g_ε = ∇f(w + ε)`` on the same batch; the base steps from ``w`` with ``g_ε``.

    Two passes per step: the first (at ``w``) alone updates BatchNorm running statistics by default.
    ``rho = 0`` is the base optimizer exactly.
    """

    name = "sam"
    alias = "SAM"
    hyperparameters = {
        "rho": Hyperparameter(0.05, "ρ", "radius of the neighbourhood where the loss is maximised", non_negative),
        "adaptive": Hyperparameter(False, "T", "ASAM: T = diag(abs(w)) scales the neighbourhood per coordinate (False: T = I)", boolean),
    }
    presets = {"paper": {"lr": 0.01, "rho": 0.05}}

    def step(self, ctx):
        start = ctx.evaluate(extra=False)
        eps = perturbation(start.theta, start.grad, ctx.hp("rho"), ctx.hp("adaptive"))
        perturbed = ctx.loss(theta=start.theta + eps)
        finite = torch.isfinite(start.loss) & torch.isfinite(torch.as_tensor(perturbed))
        ctx.apply(theta=start.theta, finite=finite)  # g_ε is in p.grad
        return start.loss


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(SAMRule)
