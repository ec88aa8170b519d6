"""``newton``: Newton's method on ``φ`` with preconditioned conjugate gradient and finite-difference
Hessian-vector products of ``f``.

The closure protocol only yields ``f`` and ``∇f`` (and may hide DDP or Accelerate wrappers), so
``torch.func.jvp(grad(f))`` is not available; ``∇²f v ≈ (∇f(θ + εv) − ∇f(θ))/ε`` works through any
closure at the price of one pass per product, counted in ``grad_evals`` like every closure call.
"""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import non_negative_int, positive_int
from nonlocal_opt_projectors.footpoint_math import damped_gn_solve, gauss_newton_decrease
from nonlocal_opt_projectors.safeguarded import STOPPING_HYPERPARAMETERS, Iterate, SafeguardedFootpointProjector, choose
from nonlocal_opt_projectors.scalars import Scalar


def finite_difference_hvp(point, vector: torch.Tensor, ctx) -> torch.Tensor:
    """``∇²f(θ) v ≈ (∇f(θ + εv) − ∇f(θ))/ε`` with ``ε = √eps · (1 + ‖θ‖)/‖v‖`` (one pass).

    Args:
        point: The point ``(θ, f(θ), ∇f(θ))``.
        vector: ``v``, a flat tensor.
        ctx: The step's context (the pass, norms over shards).

    Returns:
        The product, a new flat tensor.
    """
    scale = torch.finfo(vector.dtype).eps ** 0.5 * (1 + ctx.norm(point.theta))
    eps = scale / torch.clamp(ctx.norm(vector), min=torch.finfo(vector.dtype).tiny)
    shifted = ctx.evaluate(torch.addcmul(point.theta, eps, vector))
    return (shifted.grad - point.grad).div_(eps)


class NewtonCGProjector(SafeguardedFootpointProjector):
    """Solve ``((1 + μ) I + g gᵀ + s ∇²f) Δ = −∇φ`` by ``cg_iters`` steps of CG preconditioned with
    ``((1 + μ) I + g gᵀ)⁻¹``, starting from 0 (so one CG step is the Gauss–Newton direction with the
    best length under the Newton model; ``cg_iters = 0`` is the Gauss–Newton step itself).
    Negative curvature ``pᵀAp ≤ 0`` means ``θ`` is past a focal point: the step falls back to
    the Levenberg–Marquardt step ``−((1 + μ) I + g gᵀ)⁻¹ ∇φ``. An iteration costs ``1 + cg_iters`` passes.
    """

    name = "newton"
    hyperparameters = {
        **STOPPING_HYPERPARAMETERS,
        "max_iters": Hyperparameter(6, "K", "Newton iterations (each 1 + cg_iters passes)", positive_int),
        "cg_iters": Hyperparameter(2, "m", "CG iterations per Newton step, one HVP pass each (0: Gauss–Newton)", non_negative_int),
    }

    def trial_offset(self, current, damping, memory, ctx, out):
        """The truncated Newton step (:func:`newton_cg_step`); its decrease predicted by the Gauss–Newton
        model, ``−∇φᵀΔ − ½(‖Δ‖² + (gᵀΔ)²)``.

        Args:
            current: The current iterate.
            damping: The LM damping ``μ``.
            memory: ``None`` (Newton-CG keeps no memory).
            ctx: The step's context (one pass per Hessian-vector product).
            out: Where to write the trial offset ``a + Δ``.

        Returns:
            The predicted decrease of ``φ``.
        """
        step = newton_cg_step(current, damping, ctx.hp("cg_iters"), ctx)
        current.offset_after(step, out)
        return gauss_newton_decrease(current.g, current.grad_phi, step, ctx)


def newton_cg_step(current: Iterate, damping: Scalar, cg_iters: int, ctx) -> torch.Tensor:
    """``Δ`` from ``cg_iters`` preconditioned CG steps on ``((1 + μ) I + g gᵀ + s ∇²f) Δ = −∇φ``, or the LM step
    ``−((1 + μ) I + g gᵀ)⁻¹ ∇φ`` when ``cg_iters = 0`` or the curvature ``pᵀAp`` is not positive.

    Args:
        current: The iterate (``g``, ``s``, ``∇φ``).
        damping: The LM damping ``μ``.
        cg_iters: CG iterations, one Hessian-vector product (one pass) each.
        ctx: The step's context.

    Returns:
        The step ``Δ``, a new flat tensor.
    """
    g, s, gradient = current.g, current.gap, current.grad_phi
    lm_step = damped_gn_solve(g, gradient, ctx, damping, scale=-1.0)
    if cg_iters == 0:
        return lm_step
    point = current.point()
    on_host = ctx.host_reads
    x, r, z = torch.zeros_like(gradient), -gradient, lm_step
    p, rz = z, ctx.dot(r, z)
    negative = torch.zeros((), dtype=torch.bool, device=g.device)
    for _ in range(cg_iters):
        ap = torch.addcmul((1 + damping) * p, g, ctx.dot(g, p)).add_(s * finite_difference_hvp(point, p, ctx))
        pap, pp = ctx.sum(torch.stack([p.dot(ap), p.dot(p)])).unbind()
        negative = negative | ((pap <= 0) & (pp > 0))
        alpha = rz / torch.where(pap > 0, pap, 1)
        (x,) = choose(negative, (x,), (torch.addcmul(x, alpha, p),), on_host)
        r = torch.addcmul(r, alpha, ap, value=-1)
        z = damped_gn_solve(g, r, ctx, damping)
        rz_next = ctx.dot(r, z)
        p = torch.addcmul(z, rz_next / torch.where(rz > 0, rz, 1), p)
        rz = rz_next
    return choose(negative, (lm_step,), (x,), on_host)[0]
