"""The loop shared by the safeguarded footpoint projectors (Gauss–Newton, Newton-CG, L-BFGS).

Each outer iteration proposes a step ``Δ`` from the current point, evaluates the trial point
``θ + Δ`` (one pass) and keeps it only if ``φ`` decreases (up to rounding, see :func:`acceptable`),
so ``φ`` never increases. An accepted trial's pass already gives ``f`` and ``∇f`` at the new point:
no pass is spent twice. The Levenberg–Marquardt damping ``μ`` follows the gain ratio
(:func:`gain_ratio_damping`). Accept/reject goes through :func:`choose`: no host synchronisation
off the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from nonlocal_opt import Centre, GraphPoint, Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.hyperparameters import optional, positive, positive_int
from nonlocal_opt_projectors.footpoint_math import gauss_newton_decrease, phi_and_grad, tolerance

STOPPING_HYPERPARAMETERS = {
    "max_iters": Hyperparameter(20, "K", "outer iterations; each evaluates one trial point (one pass)", positive_int),
    "tol": Hyperparameter(None, "ε", "absolute tolerance on ‖∇φ‖ (None: off)", optional(positive)),
    "rtol": Hyperparameter(1e-6, "ε_rel", "stop when ‖∇φ‖ ≤ rtol·‖θ̃ − θ_t‖ (None: off)", optional(positive)),
}
MIN_DAMPING = 1.0  # μ after the first rejection when μ = 0 (the undamped Gauss–Newton step)


def choose(flag: torch.Tensor, new: tuple, old: tuple, on_host: bool) -> tuple:
    """``new`` where ``flag`` else ``old``, element by element of the tuples.

    On the CPU reading ``flag`` costs nothing, so it is a Python branch (no O(d) copy); on other
    devices ``torch.where`` keeps the decision on the device (no host synchronisation). Both give
    the same values, including for non-finite ``new``.
    """
    if on_host:
        return new if bool(flag) else old
    return tuple(torch.where(flag, n, o) for n, o in zip(new, old))


def acceptable(trial_value, trial_residual, value, residual) -> torch.Tensor:
    """Take the trial iff ``φ`` decreases, or stays equal up to rounding while ``‖∇φ‖`` decreases
    (near the solution float ``φ`` cannot resolve the decrease). ``False`` for a non-finite trial."""
    rounding = 8 * torch.finfo(value.dtype).eps * value.abs()
    flat = (trial_value <= value + rounding) & (trial_residual < residual)
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
        """Per-projection state kept across iterations (L-BFGS pairs); ``None`` (nothing observed) by default."""
        return None

    def step(self, point: GraphPoint, gradient: torch.Tensor, target: Centre, damping: torch.Tensor, memory: Any, ctx) -> torch.Tensor:
        """The trial step ``Δ`` at ``point`` (``gradient = ∇φ(θ)``) with LM damping ``μ``."""
        raise NotImplementedError

    def predicted_decrease(self, point: GraphPoint, gradient: torch.Tensor, step: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
        """The decrease of ``φ`` the step's model predicts; by default the Gauss–Newton model's."""
        return gauss_newton_decrease(point.grad, gradient, step)

    def observe(self, memory: Any, displacement: torch.Tensor, gradient_change: torch.Tensor) -> None:
        """Record the pair ``(θ_trial − θ, ∇φ(θ_trial) − ∇φ(θ))`` (accepted or not); called when ``memory`` is not ``None``."""

    def project(self, target, start, ctx):
        if start.grad is None:
            raise ValueError(f"projector {self.name!r} needs start.grad, the gradient at θ_t")
        threshold = tolerance(ctx.hp, start, target)
        max_iters = ctx.hp("max_iters")
        on_host = start.theta.device.type == "cpu"
        memory = self.new_memory(start, ctx)
        point = start
        value, gradient = phi_and_grad(start, target)
        residual = torch.linalg.vector_norm(gradient)
        damping, factor = torch.zeros_like(value), torch.full_like(value, 2.0)
        for iteration in range(max_iters + 1):
            if iteration == max_iters or (threshold is not None and bool(residual <= threshold)):
                break
            delta = self.step(point, gradient, target, damping, memory, ctx)
            predicted = self.predicted_decrease(point, gradient, delta, damping)
            trial = ctx.evaluate(point.theta + delta)
            trial_value, trial_gradient = phi_and_grad(trial, target)
            trial_residual = torch.linalg.vector_norm(trial_gradient)
            if memory is not None:
                self.observe(memory, trial.theta - point.theta, trial_gradient - gradient)
            accept = acceptable(trial_value, trial_residual, value, residual)
            damping, factor = gain_ratio_damping(accept, value - trial_value, predicted, damping, factor)
            theta, loss, grad, value, gradient, residual = choose(
                accept,
                (trial.theta, trial.loss, trial.grad, trial_value, trial_gradient, trial_residual),
                (point.theta, point.loss, point.grad, value, gradient, residual),
                on_host,
            )
            point = GraphPoint(theta=theta, loss=loss, grad=grad)
        return ProjectionResult(point=point, centre=None, iterations=iteration, residual=residual)
