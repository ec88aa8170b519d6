"""``tangent``: the distance-gradient tangent projection of the preprint (Sec. 3.2, eqs. 10–12)."""

from __future__ import annotations

import torch

from nonlocal_opt import Centre, ProjectionResult, Projector


class TangentProjector(Projector):
    """Moves the centre instead of projecting it: ``δ = δ̃ − ⟨u, δ̃⟩ u/‖u‖²``, ``c_{t+1} = c_t + δ``.

    ``δ̃ = c̃ − c_t`` (``= −ητ(p_t)`` for ``rbo``). ``u = ∇d_Γ(c_t)`` is taken as ``c_t − p_t``: exact
    when the contact point ``p_t`` (``θ_t`` evaluated on the current batch) is the footpoint of
    ``c_t``, and free — no projection solve. The contact point moves rigidly with the centre,
    ``θ_{t+1} = θ_t + δ_θ``, and is evaluated once (one pass) so that ``f``, ``∇f`` and the
    residual ``‖∇φ‖`` with respect to ``c_{t+1}`` are known. ``c_{t+1}`` is returned and carried to
    the next step, so nothing pulls it back onto ``S(Γ, ρ)``: ``offset_error`` reports the drift.
    On the first step (centre ``p_t + ρν(p_t)``) ``u ∥ ν ⟂ τ``, so ``δ = δ̃`` and ``θ_1`` is the SGD step.
    """

    name = "tangent"
    manifolds = ("offset",)
    shardable = True

    def project(self, target, start, ctx):
        """Move ``c_t`` by the projected update and the contact point rigidly with it.

        Args:
            target: The proposed centre ``c̃``.
            start: The contact point ``p_t``.
            ctx: The step's context; ``ctx.centre`` is ``c_t``.

        Returns:
            ``p_{t+1}`` (evaluated), the centre ``c_{t+1}`` to carry, one iteration and ``‖∇φ‖`` with respect to ``c_{t+1}``.

        Raises:
            ValueError: The rule passed no current centre.
        """
        centre = ctx.centre
        if centre is None:
            raise ValueError(
                "projector 'tangent' needs the current centre c_t: the rule must call "
                "ctx.project(target, start, centre=c_t)"
            )
        move_theta, move_height = target.theta - centre.theta, target.height - centre.height
        u_theta, u_height = centre.theta - start.theta, centre.height - start.loss
        u_move, u_u = ctx.sum(torch.stack([u_theta.dot(move_theta), u_theta.dot(u_theta)])).unbind()
        along = (u_move + u_height * move_height) / (u_u + u_height.square())
        moved = Centre(theta=centre.theta + move_theta - along * u_theta, height=centre.height + move_height - along * u_height)
        point = ctx.evaluate(start.theta + (moved.theta - centre.theta))
        residual = ctx.norm(ctx.manifold.phi_grad(point, moved, ctx))
        return ProjectionResult(point=point, centre=moved, iterations=1, residual=residual)
