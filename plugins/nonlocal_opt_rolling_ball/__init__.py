"""First-party plugin: the Rolling Ball Optimizer (RBO paper, Algorithm 1).

Registers the ``rbo`` rule (constructor ``nonlocal_opt.RBO``), the ``offset`` manifold ``S(Γ, ρ)`` and
the paper's ``footpoint`` projector (plain gradient descent on ``φ``). Registered through the ``nonlocal_opt`` entry-point group.
"""

from __future__ import annotations

import torch

from nonlocal_opt import Centre, ConstraintManifold, DescentRule, Hyperparameter, ProjectionResult, Projector, hookimpl
from nonlocal_opt.optim.hyperparameters import optional, positive, positive_int
from nonlocal_opt.optim.refresh_policy import REFRESH_HYPERPARAMETERS, RefreshPolicy, check_refresh_group


class OffsetManifold(ConstraintManifold):
    """``S(Γ, ρ) = {c : d(c, Γ) = ρ}`` (docs/math.md §2); the centre over contact point ``p`` is
    ``c = p + ρ ν(p)``, ``ν(p) = (−g, 1)/N``, ``N = sqrt(1 + ‖g‖²)``. Projection objective
    ``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²``, ``∇φ = a + s g`` with ``a = θ − θ̃``, ``s = f(θ) − ỹ``.

    Hyperparameters: ``rho`` (``ρ``, the radius of the ball, default 1).
    """

    name = "offset"
    shardable = True
    hyperparameters = {"rho": Hyperparameter(1.0, "ρ", "radius of the ball", positive)}

    def centre(self, point, ctx):
        """``c = p + ρ ν(p)``.

        Args:
            point: The contact point ``p`` with ``point.grad = g``.
            ctx: The step's context (``ρ``, the sum ``‖g‖²`` over shards, the scratch vector).

        Returns:
            The centre; its ``θ`` part lives in the scratch vector ``offset.centre`` (the next call overwrites it).
        """
        inv_n = torch.rsqrt(1 + ctx.dot(point.grad, point.grad))
        rho = ctx.hp("rho")
        theta = torch.mul(point.grad, inv_n, out=ctx.scratch("offset.centre")).mul_(-rho).add_(point.theta)  # θ + ρ(−g/N)
        return Centre(theta=theta, height=point.loss + rho * inv_n)

    def phi(self, point, target, ctx):
        """``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²``.

        Args:
            point: The point ``(θ, f(θ))``.
            target: The proposed centre ``c̃ = (θ̃, ỹ)``.
            ctx: The step's context (``‖θ − θ̃‖²`` summed over shards).

        Returns:
            ``φ(θ)`` as a 0-d tensor.
        """
        gap = point.loss - target.height
        return 0.5 * (ctx.sum((point.theta - target.theta).square().sum()) + gap * gap)

    def phi_grad(self, point, target, ctx, *, out=None, offset=None, work=None):
        """``∇φ = (θ − θ̃) + s g``, ``s = f(θ) − ỹ``; with ``offset`` (``a = θ − θ̃``) one fused sweep, else
        ``s g`` in ``work`` and Algorithm 1's rounding (no fused multiply-add).

        Args:
            point: ``(θ, f(θ))`` with ``point.grad = g``; ``θ`` is not read when ``offset`` is given.
            target: The proposed centre ``c̃ = (θ̃, ỹ)``.
            ctx: The step's context (unused: ``∇φ`` needs no sum over ``R^d``).
            out: Where to write ``∇φ`` (may be ``offset``); ``None``: a new tensor.
            offset: ``a = θ − θ̃`` when the caller has formed it.
            work: A flat tensor to hold ``s g`` (``None``: a new tensor).

        Returns:
            ``∇φ``, in ``out`` when given.
        """
        gap = point.loss - target.height
        if offset is not None:
            return torch.addcmul(offset, gap, point.grad, out=out) if out is not None else torch.addcmul(offset, gap, point.grad)
        scaled = torch.mul(point.grad, gap, out=work)
        return torch.sub(point.theta, target.theta, out=out).add_(scaled)

    def offset_error(self, centre, point, ctx):
        """``|‖c − p‖ − ρ| / ρ``: 0 when the carried centre sits at distance ρ from its contact point.

        Args:
            centre: The carried centre ``c``.
            point: Its contact point ``p``.
            ctx: The step's context (``ρ``, sums over shards).

        Returns:
            The relative error as a 0-d tensor.
        """
        rho = ctx.hp("rho")
        gap = torch.sqrt(ctx.sum((centre.theta - point.theta).square().sum()) + (centre.height - point.loss).square())
        return (gap - rho).abs() / rho


class RollingBallRule(DescentRule):
    """RBO (docs/math.md §2): ``c̃ = c − η τ(p)``, ``τ(p) = (g, ‖g‖²)``, projected to ``p_{t+1}``; the base
    steps from ``θ_t`` with the pseudo-gradient ``ĝ = (θ_t − θ_{t+1}) / η`` (docs/composing.md).

    ``η`` is the base's ``lr``: over ``sgd`` without momentum the step is ``θ_{t+1}`` itself (paper
    Algorithm 1). With parameter groups of different ``lr`` the move uses one ``η`` per coordinate:
    ``c̃ = (θ_c − η⊙g, y_c − Σ η_i g_i²)``. A projector may carry its centre to the next step
    (``ProjectionResult.centre``); it moves with the contact point: when the base lands elsewhere
    than ``θ_{t+1}`` (momentum, Adam, weight decay, clipping), the carried centre is translated by the
    same ``Δθ`` (``offset_error`` then reports how far that leaves it from ``S(Γ, ρ)``); a skipped
    step keeps the centre it started from.

    Under the refresh policy (``refresh_every``, ``refresh``) the projection runs at refreshes only; a
    reuse step is one pass, the base gets ``g`` or ``g + w (‖g‖/‖g_v‖) g_v`` with ``g_v`` the part of the
    last refresh's ``ĝ`` vertical to its ``g``, and a carried centre is dropped (the next refresh starts
    from the centre over its contact point).
    """

    name = "rbo"
    alias = "RBO"
    shardable = True
    default_manifold = "offset"
    # The paper's solver, from Python and the CLI alike; at the paper's η = 6 it refuses nearly every step on
    # an MLP, where projector="gauss-newton" trains (docs/projectors.md).
    default_projector = "footpoint"
    manifolds = ("offset",)
    presets = {"paper": {"lr": 6.0, "rho": 1.0}}
    comparison_specs = (
        {"name": "rbo-gn K=2 ρ=1", "base": "sgd", "projector": "gauss-newton", "fixed": {"max_iters": 2, "rho": 1.0},
         "sweep": {"lr": [0.1, 0.3]}},
    )
    hyperparameters = REFRESH_HYPERPARAMETERS

    def check_group(self, group):
        """Refuse a group without a positive ``lr`` (the step ``η`` of the centre), and what the refresh
        policy refuses.

        Args:
            group: One parameter group with every component's defaults filled in.

        Raises:
            ValueError: ``lr`` is missing, a tensor, not a number or not positive.
        """
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            raise ValueError(f"rule 'rbo' uses the base optimizer's lr as the step η of the centre and takes it as a number; "
                             f"got a tensor lr ({lr!r}): pass lr as a float")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"rule 'rbo' uses the base optimizer's lr as the step η of the centre and needs lr > 0, got lr={lr!r}")
        check_refresh_group(group)

    @staticmethod
    def propose(centre: Centre, point, eta, ctx) -> Centre:
        """``c̃ = c − η τ(p)``, ``τ(p) = (g, ‖g‖²)``, formed in place over ``centre.theta``.

        Args:
            centre: The centre ``c``; its ``theta`` is overwritten (pass a centre no longer needed).
            point: The contact point ``p`` with ``point.grad = g``.
            eta: The step ``η``: a float, or a flat tensor with one ``η`` per coordinate.
            ctx: The step's context (``‖g‖²`` summed over shards).

        Returns:
            The proposed centre ``c̃``.
        """
        if isinstance(eta, float):
            theta = centre.theta.add_(point.grad, alpha=-eta)
            return Centre(theta=theta, height=centre.height - ctx.dot(point.grad, point.grad) * eta)
        theta = centre.theta.addcmul_(eta, point.grad, value=-1)
        return Centre(theta=theta, height=centre.height - ctx.dot(eta * point.grad, point.grad))

    def step(self, ctx):
        """One RBO step: centre, move, projection, then the base's step with ``ĝ = (θ_t − θ_{t+1}) / η``;
        or, between refreshes, the policy's reuse step.

        Args:
            ctx: The step's context.

        Returns:
            The loss ``f(θ_t)`` at the start of the step.
        """
        policy = RefreshPolicy(ctx)
        if not policy.refreshing:
            ctx.state.pop("centre_theta", None)
            ctx.state.pop("centre_height", None)
            return policy.reuse_step()
        start = policy.start_point(ctx.scratch("rbo.theta"), ctx.start_grad_out())
        policy.keep_gradient(start.grad)
        eta = ctx.per_coordinate("lr")
        carried = self._carried_centre(ctx)
        centre = carried or ctx.manifold.centre(start, ctx)
        # c̃ is formed over c_t unless something reads c_t after the move (or c_t shares θ_t's or g's storage).
        shared = centre.theta.data_ptr() in (start.theta.data_ptr(), start.grad.data_ptr())
        keep = carried is not None or shared or ctx.projector.uses_centre or ctx.recording
        moving = Centre(theta=ctx.scratch("rbo.target").copy_(centre.theta), height=centre.height) if keep else centre
        target = self.propose(moving, start, eta, ctx)
        result = ctx.project(target, start, centre=centre if keep else None)
        finite = ctx.finite(start.loss, result.point.loss)
        carried = result.centre
        spare = []
        if carried is not None:
            direction = torch.sub(start.theta, result.point.theta).div_(eta)
        else:  # ĝ = (θ_t − θ_{t+1})/η over c̃, no longer needed; once written, θ_t, ĝ and p_{t+1} are spare
            direction = torch.sub(start.theta, result.point.theta, out=target.theta).div_(eta)
            spare = distinct([start.theta, target.theta, result.point.theta, result.point.grad])
        taken = policy.apply(direction, theta=start.theta, finite=finite, spare=spare)
        if carried is not None:
            landed = ctx.flat.gather()
            carried = Centre(theta=carried.theta + (landed - result.point.theta), height=carried.height)
        self._carry_centre(ctx, carried, centre, taken)
        return start.loss

    @staticmethod
    def _carried_centre(ctx) -> Centre | None:
        """The centre a projector asked to carry over (``ProjectionResult.centre``), if any."""
        if "centre_height" not in ctx.state:
            return None
        return Centre(theta=ctx.state["centre_theta"], height=ctx.state["centre_height"])

    @staticmethod
    def _carry_centre(ctx, new: Centre | None, old: Centre, taken: torch.Tensor) -> None:
        if new is None:
            ctx.state.pop("centre_theta", None)
            ctx.state.pop("centre_height", None)
            return
        ctx.state["centre_theta"] = torch.where(taken, new.theta, old.theta)
        ctx.state["centre_height"] = torch.where(taken, new.height, old.height)


class FootpointGradientDescent(Projector):
    """The paper's solver (docs/math.md §2): gradient descent on ``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²`` from ``θ_t``,
    ``θ ← θ − γ [(θ − θ̃) + (f(θ) − ỹ) ∇f(θ)]``, for ``K = max_iters`` iterations.

    The gradient at ``θ_t`` is the one the rule already computed; the returned point is evaluated
    once more (for ``‖∇φ‖`` and the early stop ``tol``), so a step costs at most ``1 + K`` passes.
    On CPU ``tol`` stops early; on CUDA the check would synchronise, so all ``K`` iterations run.
    """

    name = "footpoint"
    manifolds = ("offset",)
    shardable = True
    uses_centre = False
    presets = {"paper": {"max_iters": 20, "step_size": 0.1}}
    hyperparameters = {
        "max_iters": Hyperparameter(20, "K", "inner gradient-descent iterations", positive_int),
        "step_size": Hyperparameter(0.1, "γ", "step size of the inner gradient descent", positive),
        "tol": Hyperparameter(None, "ε", "stop when ‖∇φ‖ ≤ tol (None: always run max_iters)", optional(positive)),
    }

    def project(self, target, start, ctx):
        """Run ``K`` gradient steps on ``φ`` from ``θ_t`` (fewer with ``tol`` on the CPU).

        Args:
            target: The proposed centre ``c̃``.
            start: The contact point ``p_t`` with its gradient.
            ctx: The step's context.

        Returns:
            The last iterate (evaluated), no centre, the iterations run and ``‖∇φ‖`` there.
        """
        max_iters, gamma, tol = ctx.hp("max_iters"), ctx.hp("step_size"), ctx.hp("tol")
        stop_early = tol is not None and ctx.host_reads
        # Iterates alternate between two (θ, g) rows kept from step to step; ∇φ is formed in the θ row of
        # the next iterate (its g row is the manifold's work vector), then turned into it: no new R^d tensor.
        rows = ctx.scratch("footpoint.rows", rows=4)
        slots = (rows[0:2], rows[2:4])
        point, iteration = start, 0
        while True:
            theta_out, grad_out = slots[iteration % 2]
            grad_phi = ctx.manifold.phi_grad(point, target, ctx, out=theta_out, work=grad_out)
            last = iteration == max_iters
            residual = ctx.norm(grad_phi) if last or stop_early else None  # ‖∇φ‖ only where it is read
            if last or (stop_early and bool(residual <= tol)):
                return ProjectionResult(point=point, centre=None, iterations=iteration, residual=residual)
            torch.sub(point.theta, grad_phi.mul_(gamma), out=theta_out)  # θ − γ ∇φ
            point = ctx.evaluate(theta_out, grad_out=grad_out)
            iteration += 1


def distinct(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``vectors`` without those that share memory with an earlier one (``p_{t+1}`` may be ``p_t`` itself).

    Args:
        vectors: Tensors, or ``None`` (dropped).

    Returns:
        The tensors in their order, each storage once.
    """
    kept: list[torch.Tensor] = []
    for v in vectors:
        if v is not None and not any(v.data_ptr() == k.data_ptr() for k in kept):
            kept.append(v)
    return kept


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register the ``rbo`` rule.

    Args:
        register: The registry's callback.
    """
    register(RollingBallRule)


@hookimpl
def nonlocal_opt_register_manifolds(register):
    """Register the ``offset`` manifold.

    Args:
        register: The registry's callback.
    """
    register(OffsetManifold)


@hookimpl
def nonlocal_opt_register_projectors(register):
    """Register the ``footpoint`` projector.

    Args:
        register: The registry's callback.
    """
    register(FootpointGradientDescent)
