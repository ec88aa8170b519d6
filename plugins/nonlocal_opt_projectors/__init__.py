"""First-party plugin: exact and cheap projectors onto the offset manifold ``S(Γ, ρ)``.

``gauss-newton`` (Sherman–Morrison GN with an LM safeguard), ``newton`` (Newton-CG with
finite-difference Hessian-vector products), ``lbfgs`` (L-BFGS on ``φ`` with ``H₀ = (I + g gᵀ)⁻¹``)
and ``tangent`` (the preprint's distance-gradient projection of the update). See docs/projectors.md.
"""

from __future__ import annotations

from nonlocal_opt import hookimpl
from nonlocal_opt_projectors.gauss_newton import GaussNewtonProjector
from nonlocal_opt_projectors.lbfgs import LBFGSProjector
from nonlocal_opt_projectors.newton_cg import NewtonCGProjector
from nonlocal_opt_projectors.tangent import TangentProjector


@hookimpl
def nonlocal_opt_register_projectors(register):
    """Register ``gauss-newton``, ``newton``, ``lbfgs`` and ``tangent``.

    Args:
        register: The registry's callback.
    """
    for cls in (GaussNewtonProjector, NewtonCGProjector, LBFGSProjector, TangentProjector):
        register(cls)
