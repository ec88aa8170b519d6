"""First-party plugin: the Rolling Ball Optimizer (RBO paper, Algorithm 1).

Registers the ``rbo`` rule, the ``offset`` manifold ``S(Γ, ρ)`` and the paper's ``footpoint``
projector (plain gradient descent on ``φ``). Registered through the ``nonlocal_opt`` entry-point group.
"""

from __future__ import annotations

import torch

from nonlocal_opt import Centre, ConstraintManifold, DescentRule, Hyperparameter, ProjectionResult, Projector, hookimpl
from nonlocal_opt.optim.host_reads import host_reads
from nonlocal_opt.optim.hyperparameters import optional, positive, positive_int


class OffsetManifold(ConstraintManifold):
    """``S(Γ, ρ) = {c : d(c, Γ) = ρ}``; the centre over contact point ``p`` is ``c = p + ρ ν(p)``,
    ``ν(p) = (−g, 1)/N``, ``N = sqrt(1 + ‖g‖²)``."""

    name = "offset"
    hyperparameters = {"rho": Hyperparameter(1.0, "ρ", "radius of the ball", positive)}

    @staticmethod
    def normal(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upward unit normal ``ν = (−g, 1)/N`` as its (θ-part, height-part)."""
        inv_n = torch.rsqrt(1 + grad.dot(grad))
        return -grad * inv_n, inv_n

    def centre(self, point, ctx):
        nu_theta, nu_height = self.normal(point.grad)
        rho = ctx.hp("rho")
        return Centre(theta=point.theta + rho * nu_theta, height=point.loss + rho * nu_height)

    def offset_error(self, centre, point, ctx):
        """``|‖c − p‖ − ρ| / ρ``: 0 when the carried centre sits at distance ρ from its contact point."""
        rho = ctx.hp("rho")
        gap = torch.sqrt((centre.theta - point.theta).square().sum() + (centre.height - point.loss).square())
        return (gap - rho).abs() / rho


class RollingBallRule(DescentRule):
    """RBO descent step (eq. 2–3): ``c̃ = c − η τ(p)``, ``τ(p) = (g, ‖g‖²)``.

    With parameter groups of different ``lr`` the step uses one ``η`` per coordinate:
    ``c̃ = (θ_c − η⊙g, y_c − Σ η_i g_i²)``.
    """

    name = "rbo"
    hyperparameters = {"lr": Hyperparameter(6.0, "η", "learning rate of the centre (paper: 6)", positive)}
    default_manifold = "offset"
    default_projector = "footpoint"
    manifolds = ("offset",)

    def propose(self, centre: Centre, point, ctx) -> Centre:
        eta = ctx.per_coordinate("lr")
        step = eta * point.grad
        return Centre(theta=centre.theta - step, height=centre.height - step.dot(point.grad))

    def step(self, ctx):
        start = ctx.evaluate(extra=False)
        centre = self._carried_centre(ctx) or ctx.manifold.centre(start, ctx)
        result = ctx.project(self.propose(centre, start, ctx), start, centre=centre)
        ctx.commit(result.point.theta, fallback=start.theta, loss=result.point.loss)
        self._carry_centre(ctx, result.centre)
        return start.loss

    @staticmethod
    def _carried_centre(ctx) -> Centre | None:
        """The centre a projector asked to carry over (``ProjectionResult.centre``), if any."""
        state = ctx.state
        if "centre_height" not in state:
            return None
        theta = ctx.flat.join(ctx.optimizer.state[p]["centre_theta"] for p in ctx.flat.params)
        return Centre(theta=theta, height=state["centre_height"])

    @staticmethod
    def _carry_centre(ctx, centre: Centre | None) -> None:
        if centre is None:
            for p in ctx.flat.params:
                ctx.optimizer.state[p].pop("centre_theta", None)
            ctx.state.pop("centre_height", None)
            return
        for p, piece in zip(ctx.flat.params, ctx.flat.split(centre.theta)):
            ctx.optimizer.state[p]["centre_theta"] = piece.clone()
        ctx.state["centre_height"] = centre.height.clone()


class FootpointGradientDescent(Projector):
    """The paper's solver (eq. 6): gradient descent on ``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²`` from ``θ_t``,
    ``θ ← θ − γ [(θ − θ̃) + (f(θ) − ỹ) ∇f(θ)]``, for ``K = max_iters`` iterations.

    The gradient at ``θ_t`` is the one the rule already computed; the returned point is evaluated
    once more (for ``‖∇φ‖`` and the early stop ``tol``), so a step costs at most ``1 + K`` passes.
    On CPU ``tol`` stops early; on CUDA the check would synchronise, so all ``K`` iterations run.
    """

    name = "footpoint"
    hyperparameters = {
        "max_iters": Hyperparameter(20, "K", "inner gradient-descent iterations", positive_int),
        "step_size": Hyperparameter(0.1, "γ", "step size of the inner gradient descent", positive),
        "tol": Hyperparameter(None, "ε", "stop when ‖∇φ‖ ≤ tol (None: always run max_iters)", optional(positive)),
    }

    def project(self, target, start, ctx):
        max_iters, gamma, tol = ctx.hp("max_iters"), ctx.hp("step_size"), ctx.hp("tol")
        stop_early = tol is not None and host_reads(start.theta)
        # Iterates alternate between two preallocated (θ, g) rows and ∇φ has its own row: no new R^d
        # tensor per pass. The operations keep Algorithm 1's rounding (no fused multiply-adds).
        rows = start.theta.new_empty((5, start.theta.numel()))
        grad_phi, slots = rows[4], (rows[0:2], rows[2:4])
        point, iteration = start, 0
        while True:
            theta_out, grad_out = slots[iteration % 2]
            torch.mul(point.grad, point.loss - target.height, out=theta_out)  # scratch: s g
            torch.sub(point.theta, target.theta, out=grad_phi).add_(theta_out)  # ∇φ = (θ − θ̃) + s g
            residual = torch.linalg.vector_norm(grad_phi)
            if iteration == max_iters or (stop_early and bool(residual <= tol)):
                return ProjectionResult(point=point, centre=None, iterations=iteration, residual=residual)
            torch.sub(point.theta, torch.mul(grad_phi, gamma, out=theta_out), out=theta_out)  # θ − γ ∇φ
            point = ctx.evaluate(theta_out, grad_out=grad_out)
            iteration += 1


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(RollingBallRule)


@hookimpl
def nonlocal_opt_register_manifolds(register):
    register(OffsetManifold)


@hookimpl
def nonlocal_opt_register_projectors(register):
    register(FootpointGradientDescent)
