"""``gauss-newton``: the Gauss–Newton footpoint iteration with a Levenberg–Marquardt safeguard."""

from __future__ import annotations

from nonlocal_opt_projectors.safeguarded import SafeguardedFootpointProjector
from nonlocal_opt_projectors.scalars import combine


class GaussNewtonProjector(SafeguardedFootpointProjector):
    """``Δ = −((1 + μ) I + g gᵀ)⁻¹ ∇φ`` (O(d), Sherman–Morrison). With ``μ = 0`` the trial is
    ``θ̃ − g (s − gᵀa)/(1 + ‖g‖²)``, the projection of ``c̃`` onto the tangent plane of Γ at ``θ``;
    from ``p_t`` it is exactly the SGD step ``θ_t − η g``. Linear rate ≈ ``dist(c̃, Γ) · max|κ|``."""

    name = "gauss-newton"

    def trial_offset(self, current, damping, memory, ctx, out):
        """``Δ = −k (∇φ − β g)`` with ``k = 1/(1 + μ)``, ``β = gᵀ∇φ/(1 + μ + gᵀg)``, i.e. ``a + Δ = (1 − k) a − k (s − β) g
        = (1 − k) ∇φ − (s − kβ) g``; predicted decrease ``½ Δᵀ(μΔ − ∇φ)`` (the LM model, Madsen–Nielsen–Tingleff),
        all from the iterate's dots.

        Args:
            current: The current iterate.
            damping: The LM damping ``μ``.
            memory: ``None`` (Gauss–Newton keeps no memory).
            ctx: The step's context.
            out: Where to write the trial offset ``a + Δ``.

        Returns:
            The predicted decrease of ``φ``.
        """
        k = 1 / (1 + damping)
        beta = current.gv / (1 + damping + current.gg)
        combine(1 - k, current.grad_phi, -(current.gap - k * beta), current.g, out=out)
        step_sq = k * k * (current.vv - beta * (2 * current.gv - beta * current.gg))
        grad_phi_step = -k * (current.vv - beta * current.gv)
        return 0.5 * (damping * step_sq - grad_phi_step)
