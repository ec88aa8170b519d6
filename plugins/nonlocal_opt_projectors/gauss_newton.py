"""``gauss-newton``: the Gauss–Newton footpoint iteration with a Levenberg–Marquardt safeguard."""

from __future__ import annotations

from nonlocal_opt_projectors.footpoint_math import damped_gn_solve
from nonlocal_opt_projectors.safeguarded import SafeguardedFootpointProjector


class GaussNewtonProjector(SafeguardedFootpointProjector):
    """``Δ = −((1 + μ) I + g gᵀ)⁻¹ ∇φ`` (O(d), Sherman–Morrison). With ``μ = 0`` the trial is
    ``θ̃ − g (s − gᵀa)/(1 + ‖g‖²)``, the projection of ``c̃`` onto the tangent plane of Γ at ``θ``;
    from ``p_t`` it is exactly the SGD step ``θ_t − η g``. Linear rate ≈ ``dist(c̃, Γ) · max|κ|``."""

    name = "gauss-newton"

    def step(self, point, gradient, target, damping, memory, ctx):
        return damped_gn_solve(point.grad, gradient, damping, scale=-1.0)

    def predicted_decrease(self, point, gradient, step, damping):
        """``½ Δᵀ(μΔ − ∇φ)``, the Gauss–Newton model's decrease for the LM step (Madsen–Nielsen–Tingleff)."""
        return 0.5 * (damping * step.dot(step) - gradient.dot(step))
