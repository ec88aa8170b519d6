"""The loop shared by the safeguarded footpoint projectors (Gauss–Newton, Newton-CG, L-BFGS).

Each outer iteration proposes a step ``Δ`` from the current point, evaluates the trial point
``θ + Δ`` (one pass) and keeps it only if ``φ`` decreases (up to rounding, see :func:`acceptable`) —
decided with ``torch.where``, so ``φ`` never increases and no host synchronisation happens. An
accepted trial's pass already gives ``f`` and ``∇f`` at the new point: no pass is spent twice.
The Levenberg–Marquardt damping ``μ`` follows the gain ratio (:func:`gain_ratio_damping`).
"""

from __future__ import annotations

from typing import Any

import torch

from nonlocal_opt import Centre, GraphPoint, Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.hyperparameters import optional, positive, positive_int
from nonlocal_opt_projectors.footpoint_math import gauss_newton_decrease, grad_phi, phi, tolerance

STOPPING_HYPERPARAMETERS = {
    "max_iters": Hyperparameter(20, "K", "outer iterations; each evaluates one trial point (one pass)", positive_int),
    "tol": Hyperparameter(None, "ε", "absolute tolerance on ‖∇φ‖ (None: off)", optional(positive)),
    "rtol": Hyperparameter(1e-6, "ε_rel", "stop when ‖∇φ‖ ≤ rtol·‖θ̃ − θ_t‖ (None: off)", optional(positive)),
}
MIN_DAMPING = 1.0  # μ after the first rejection when μ = 0 (the undamped Gauss–Newton step)


def select(accept: torch.Tensor, new: GraphPoint, old: GraphPoint) -> GraphPoint:
    """``new`` where ``accept`` else ``old``, field by field, without leaving the device."""
    return GraphPoint(
        theta=torch.where(accept, new.theta, old.theta),
        loss=torch.where(accept, new.loss, old.loss),
        grad=torch.where(accept, new.grad, old.grad),
    )


def acceptable(trial_value, trial_gradient, value, residual) -> torch.Tensor:
    """Take the trial iff ``φ`` decreases, or stays equal up to rounding while ``‖∇φ‖`` decreases
    (near the solution float ``φ`` cannot resolve the decrease). ``False`` for a non-finite trial."""
    rounding = 8 * torch.finfo(value.dtype).eps * value.abs()
    flat = (trial_value <= value + rounding) & (torch.linalg.vector_norm(trial_gradient) < residual)
    return (trial_value < value) | flat


def gain_ratio_damping(accept, actual, predicted, damping, factor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nielsen's update of ``(μ, ν)`` from the gain ratio ``ϱ = (φ(θ) − φ(θ + Δ)) / (predicted decrease)``.

    Accepted: ``μ ← μ · max(1/3, 1 − (2ϱ − 1)³)``, ``ν ← 2``. Rejected: ``μ ← max(ν μ, 1)``, ``ν ← 2ν``
    (the floor 1 lets ``μ = 0``, the undamped first step, grow). A non-positive prediction counts as ``ϱ = 0``.
    """
    ratio = torch.where(predicted > 0, actual / torch.where(predicted > 0, predicted, 1), 0)
    shrink = torch.clamp(1 - (2 * ratio - 1) ** 3, min=1 / 3)
    damping = torch.where(accept, damping * shrink, torch.clamp(factor * damping, min=MIN_DAMPING))
    factor = torch.where(accept, 2.0, 2 * factor)
    return damping, factor


class SafeguardedFootpointProjector(Projector):
    """Monotone descent on ``φ`` from ``θ_t`` with an LM safeguard; subclasses choose the step ``Δ``.

    The first step uses ``start.grad`` (the gradient the rule already computed), so ``K`` iterations
    cost ``K`` passes plus any passes :meth:`step` spends (Hessian-vector products). On CPU the loop
    stops as soon as ``‖∇φ‖ ≤ max(tol, rtol·‖θ̃ − θ_t‖)``; on CUDA it always runs ``K`` iterations.
    """

    hyperparameters = STOPPING_HYPERPARAMETERS
    safeguarded = True  # φ never increases: nonlocal_opt.testing also checks these on the Riemann function

    def new_memory(self, start: GraphPoint, ctx) -> Any:
        """Per-projection state kept across iterations (L-BFGS pairs); ``None`` by default."""
        return None

    def step(self, point: GraphPoint, gradient: torch.Tensor, target: Centre, damping: torch.Tensor, memory: Any, ctx) -> torch.Tensor:
        """The trial step ``Δ`` at ``point`` (``gradient = ∇φ(θ)``) with LM damping ``μ``."""
        raise NotImplementedError

    def predicted_decrease(self, point: GraphPoint, gradient: torch.Tensor, step: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
        """The decrease of ``φ`` the step's model predicts; by default the Gauss–Newton model's."""
        return gauss_newton_decrease(point.grad, gradient, step)

    def observe(self, memory: Any, displacement: torch.Tensor, gradient_change: torch.Tensor) -> None:
        """Record the pair ``(θ_trial − θ, ∇φ(θ_trial) − ∇φ(θ))`` (accepted or not)."""

    def project(self, target, start, ctx):
        if start.grad is None:
            raise ValueError(f"projector {self.name!r} needs start.grad, the gradient at θ_t")
        threshold = tolerance(ctx.hp, start, target)
        max_iters = ctx.hp("max_iters")
        memory = self.new_memory(start, ctx)
        point, value, gradient = start, phi(start, target), grad_phi(start, target)
        damping, factor = torch.zeros_like(value), torch.full_like(value, 2.0)
        iteration = 0
        while True:
            residual = torch.linalg.vector_norm(gradient)
            if iteration == max_iters or (threshold is not None and bool(residual <= threshold)):
                return ProjectionResult(point=point, centre=None, iterations=iteration, residual=residual)
            delta = self.step(point, gradient, target, damping, memory, ctx)
            predicted = self.predicted_decrease(point, gradient, delta, damping)
            trial = ctx.evaluate(point.theta + delta)
            trial_value, trial_gradient = phi(trial, target), grad_phi(trial, target)
            self.observe(memory, trial.theta - point.theta, trial_gradient - gradient)
            accept = acceptable(trial_value, trial_gradient, value, residual)
            damping, factor = gain_ratio_damping(accept, value - trial_value, predicted, damping, factor)
            point = select(accept, trial, point)
            value = torch.where(accept, trial_value, value)
            gradient = torch.where(accept, trial_gradient, gradient)
            iteration += 1
