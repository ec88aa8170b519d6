"""First-party plugin: point-like optimisation — the ``sgd`` rule, the ``euclidean`` manifold and the
``none`` projector. Registered through the ``nonlocal_opt`` entry-point group like any third party."""

from __future__ import annotations

import torch

from nonlocal_opt import Centre, ConstraintManifold, DescentRule, GraphPoint, ProjectionResult, Projector, hookimpl
from nonlocal_opt.optim.base_updates import SGD_HYPERPARAMETERS, check_nesterov, sgd_update


class SGDRule(DescentRule):
    """Stochastic gradient descent, ``θ ← θ − η (g + λθ)`` with momentum; equals ``torch.optim.SGD``."""

    name = "sgd"
    hyperparameters = SGD_HYPERPARAMETERS
    requires_closure = False

    def check_group(self, group: dict) -> None:
        check_nesterov(group)

    def step(self, ctx):
        loss = None
        if ctx.closure is not None:
            with torch.enable_grad():
                loss = ctx.closure()
            ctx.stats["grad_evals"] = 1
        for group in ctx.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            sgd_update(params, [p.grad for p in params], group, ctx.optimizer.state)
        return loss


class EuclideanManifold(ConstraintManifold):
    """No constraint: the state is the point itself, ``c(p) = p``."""

    name = "euclidean"

    def centre(self, point, ctx):
        return Centre(theta=point.theta, height=point.loss)

    def offset_error(self, centre, point, ctx):
        return torch.zeros((), dtype=point.theta.dtype, device=point.theta.device)


class NoProjection(Projector):
    """No projection: the new contact point is the horizontal part of the proposal, ``θ_{t+1} = θ̃``."""

    name = "none"
    manifolds = ("euclidean", "offset")

    def project(self, target, start, ctx):
        point = GraphPoint(theta=target.theta, loss=start.loss)
        return ProjectionResult(point=point, centre=None, iterations=0, residual=torch.zeros_like(start.loss))


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(SGDRule)


@hookimpl
def nonlocal_opt_register_manifolds(register):
    register(EuclideanManifold)


@hookimpl
def nonlocal_opt_register_projectors(register):
    register(NoProjection)
