"""``damped-footpoint``: gradient descent on ``φ`` with an Armijo backtracking step size.

An example of a third-party projector plugin for nonlocal-opt. Per iteration ``k`` it tries
``θ' = θ − γ_k ∇φ(θ)`` (one forward+backward pass) and accepts it only if
``φ(θ') ≤ φ(θ) − c γ_k ‖∇φ(θ)‖²``; on acceptance ``γ_{k+1} = min(2 γ_k, γ_max)``, otherwise the trial
is discarded and ``γ_{k+1} = γ_k / 2``. Accept/reject is decided with ``torch.where``: no host sync.
``φ`` and ``∇φ`` are the manifold's (``ctx.manifold.phi`` / ``phi_grad``), so it projects onto any
manifold that declares it: here ``offset``, RBO's ``S(Γ, ρ)``.

Like any third-party plugin it uses only nonlocal-opt's public API (``nonlocal_opt``,
``nonlocal_opt.optim.hyperparameters``), not the internals of the
first-party plugins.
"""

from __future__ import annotations

import torch

import nonlocal_opt
from nonlocal_opt import GraphPoint, Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.optim.hyperparameters import optional, positive, positive_int

ARMIJO_C = 1e-4


class DampedFootpoint(Projector):
    """Footpoint gradient descent with backtracking: ``φ`` is non-increasing, so it cannot blow up."""

    name = "damped-footpoint"
    manifolds = ("offset",)  # the manifolds it projects onto; the contract kit runs it on the first
    hyperparameters = {
        "max_iters": Hyperparameter(20, "K", "trial steps (one pass each)", positive_int),
        "step_size": Hyperparameter(0.1, "γ₀", "initial step size", positive),
        "max_step_size": Hyperparameter(1.0, "γ_max", "largest step size after growth", positive),
        "tol": Hyperparameter(None, "ε", "stop when ‖∇φ‖ ≤ tol (CPU only; None: run max_iters)", optional(positive)),
    }
    safeguarded = True  # φ never increases: nonlocal_opt.testing checks it, also on the Riemann function

    def project(self, target, start, ctx):
        """Armijo-backtracked gradient descent on the manifold's ``φ`` from ``θ_t``.

        Args:
            target: The proposed centre ``c̃``.
            start: The contact point ``p_t`` with its gradient.
            ctx: The step's context.

        Returns:
            The last accepted point, no centre, the trials run and ``‖∇φ‖`` there.
        """
        max_iters, tol = ctx.hp("max_iters"), ctx.hp("tol")
        gamma = torch.tensor(float(ctx.hp("step_size")), dtype=start.theta.dtype, device=start.theta.device)
        gamma_max = ctx.hp("max_step_size")
        phi, phi_grad = ctx.manifold.phi, ctx.manifold.phi_grad
        point = start
        value, gradient = phi(start, target, ctx), phi_grad(start, target, ctx)
        stop_early = tol is not None and ctx.host_reads  # a Python branch on a value: free on the host path only
        iteration = 0
        while iteration < max_iters and not (stop_early and bool(torch.linalg.vector_norm(gradient) <= tol)):
            trial = ctx.evaluate(point.theta - gamma * gradient)
            trial_value, trial_gradient = phi(trial, target, ctx), phi_grad(trial, target, ctx)
            accept = torch.isfinite(trial_value) & (trial_value <= value - ARMIJO_C * gamma * gradient.dot(gradient))
            point = GraphPoint(
                theta=torch.where(accept, trial.theta, point.theta),
                loss=torch.where(accept, trial.loss, point.loss),
                grad=torch.where(accept, trial.grad, point.grad),
            )
            value = torch.where(accept, trial_value, value)
            gradient = torch.where(accept, trial_gradient, gradient)
            gamma = torch.where(accept, torch.clamp(2 * gamma, max=gamma_max), 0.5 * gamma)
            iteration += 1
        return ProjectionResult(point=point, centre=None, iterations=iteration, residual=torch.linalg.vector_norm(gradient))


@nonlocal_opt.hookimpl
def nonlocal_opt_register_projectors(register):
    """Register the ``damped-footpoint`` projector.

    Args:
        register: The registry's callback.
    """
    register(DampedFootpoint)
