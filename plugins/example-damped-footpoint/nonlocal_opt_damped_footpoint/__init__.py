"""``damped-footpoint``: gradient descent on ``φ`` with an Armijo backtracking step size.

An example of a third-party projector plugin for nonlocal-opt. Per iteration ``k`` it tries
``θ' = θ − γ_k ∇φ(θ)`` (one forward+backward pass) and accepts it only if
``φ(θ') ≤ φ(θ) − c γ_k ‖∇φ(θ)‖²``; on acceptance ``γ_{k+1} = min(2 γ_k, γ_max)``, otherwise the trial
is discarded and ``γ_{k+1} = γ_k / 2``. Accept/reject is decided with ``torch.where``: no host sync.
"""

from __future__ import annotations

import torch

import nonlocal_opt
from nonlocal_opt import GraphPoint, Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.hyperparameters import optional, positive, positive_int

ARMIJO_C = 1e-4


def phi_and_gradient(point: GraphPoint, target: nonlocal_opt.Centre) -> tuple[torch.Tensor, torch.Tensor]:
    """``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²`` and ``∇φ = (θ − θ̃) + (f(θ) − ỹ) ∇f(θ)``."""
    offset, gap = point.theta - target.theta, point.loss - target.height
    return 0.5 * (offset.dot(offset) + gap * gap), offset + gap * point.grad


class DampedFootpoint(Projector):
    """Footpoint gradient descent with backtracking: ``φ`` is non-increasing, so it cannot blow up."""

    name = "damped-footpoint"
    hyperparameters = {
        "max_iters": Hyperparameter(20, "K", "trial steps (one pass each)", positive_int),
        "step_size": Hyperparameter(0.1, "γ₀", "initial step size", positive),
        "max_step_size": Hyperparameter(1.0, "γ_max", "largest step size after growth", positive),
        "tol": Hyperparameter(None, "ε", "stop when ‖∇φ‖ ≤ tol (CPU only; None: run max_iters)", optional(positive)),
    }

    def project(self, target, start, ctx):
        max_iters, tol = ctx.hp("max_iters"), ctx.hp("tol")
        gamma = torch.tensor(float(ctx.hp("step_size")), dtype=start.theta.dtype, device=start.theta.device)
        gamma_max = ctx.hp("max_step_size")
        point = start
        phi, grad_phi = phi_and_gradient(point, target)
        stop_early = tol is not None and start.theta.device.type == "cpu"
        for iteration in range(max_iters):
            if stop_early and bool(torch.linalg.vector_norm(grad_phi) <= tol):
                break
            trial = ctx.evaluate(point.theta - gamma * grad_phi)
            trial_phi, trial_grad_phi = phi_and_gradient(trial, target)
            accept = torch.isfinite(trial_phi) & (trial_phi <= phi - ARMIJO_C * gamma * grad_phi.dot(grad_phi))
            point = GraphPoint(
                theta=torch.where(accept, trial.theta, point.theta),
                loss=torch.where(accept, trial.loss, point.loss),
                grad=torch.where(accept, trial.grad, point.grad),
            )
            phi = torch.where(accept, trial_phi, phi)
            grad_phi = torch.where(accept, trial_grad_phi, grad_phi)
            gamma = torch.where(accept, torch.clamp(2 * gamma, max=gamma_max), 0.5 * gamma)
        else:
            iteration = max_iters
        return ProjectionResult(point=point, centre=None, iterations=iteration, residual=torch.linalg.vector_norm(grad_phi))


@nonlocal_opt.hookimpl
def nonlocal_opt_register_projectors(register):
    register(DampedFootpoint)
