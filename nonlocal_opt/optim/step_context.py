"""Everything a rule or projector may use during one ``optimizer.step(closure)``."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from nonlocal_opt.optim.batchnorm import BatchNormFreezer
from nonlocal_opt.optim.flat_params import FlatParams
from nonlocal_opt.optim.interfaces import Centre, GraphPoint, ProjectionResult

if TYPE_CHECKING:
    from nonlocal_opt.optim.composed import ComposedOptimizer


def accepts_fresh_batch(closure: Callable[..., Any] | None) -> bool:
    """Whether ``closure`` takes the keyword ``fresh_batch`` (see :meth:`StepContext.evaluate`)."""
    if closure is None:
        return False
    try:
        return "fresh_batch" in inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False


class StepContext:
    """One step's view of the optimizer: flat parameters, hyperparameters, closure calls, stats.

    Closure protocol: ``closure()`` zeroes the gradients, runs forward and backward on the current
    mini-batch and returns the loss — the *global* loss in data-parallel training, with the global
    gradient left in ``p.grad``. A closure may also accept ``fresh_batch=True``, asking it to draw
    the next mini-batch first (Entropy-SGD's Langevin steps can use this).
    """

    def __init__(self, optimizer: ComposedOptimizer, closure: Callable[..., Any] | None):
        self.optimizer = optimizer
        self.closure = closure
        self.manifold = optimizer.manifold
        self.projector = optimizer.projector
        self.flat = FlatParams(optimizer.param_groups)
        self.grad_evals = 0
        self.batchnorm: BatchNormFreezer | None = None  # made by the first extra pass, kept for the step
        self.centre: Centre | None = None  # c_t the rule moved from, set by project(..., centre=c_t)
        self.stats: dict[str, Any] = {"grad_evals": 0, "proj_iters": 0, "proj_residual": 0.0, "offset_error": 0.0}

    # -- hyperparameters --------------------------------------------------------------------------
    def hp(self, name: str) -> Any:
        """A hyperparameter shared by the whole ball: it must be equal in every parameter group."""
        values = {group[name] for group in self.optimizer.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"hyperparameter {name!r} must be the same in every parameter group for "
                f"{self.optimizer.rule.name!r} (one ball for all parameters); got {sorted(values)}"
            )
        return values.pop()

    def per_coordinate(self, name: str) -> float | torch.Tensor:
        """A hyperparameter that may differ between groups, spread over the flat coordinates."""
        return self.flat.per_coordinate([group[name] for group in self.optimizer.param_groups])

    @property
    def state(self) -> dict[str, Any]:
        """Optimizer-wide state (kept in the first parameter's state, so ``state_dict`` saves it)."""
        return self.optimizer.state[self.flat.params[0]]

    # -- closure calls ----------------------------------------------------------------------------
    def evaluate(
        self, theta: torch.Tensor | None = None, *, extra: bool = True, fresh_batch: bool = False, grad_out: torch.Tensor | None = None
    ) -> GraphPoint:
        """Run the closure at ``θ`` (the current parameters when ``None``) and return ``(θ, f(θ), ∇f(θ))``.

        ``grad_out``: a preallocated flat tensor to gather ``∇f(θ)`` into (saves an allocation per pass).

        ``extra=True`` marks a pass beyond the first of the step: BatchNorm running statistics are
        left alone unless ``freeze_bn_stats`` is off. Every call counts one pass in ``grad_evals``.
        """
        if self.closure is None:
            raise RuntimeError(
                f"rule {self.optimizer.rule.name!r} needs a closure: call opt.step(closure) where closure() "
                "zeroes grads, runs forward and backward, and returns the loss"
            )
        if theta is not None:
            self.flat.write(theta)
        else:
            theta = self.flat.gather()
        with torch.enable_grad(), self._batchnorm_paused(extra):
            loss = self.closure(fresh_batch=True) if fresh_batch else self.closure()
        self.grad_evals += 1
        self.stats["grad_evals"] = self.grad_evals
        loss = torch.as_tensor(loss).detach().to(device=self.flat.device, dtype=self.flat.dtype)
        return GraphPoint(theta=theta, loss=loss, grad=self.flat.gather_grad(grad_out))

    def _batchnorm_paused(self, extra: bool) -> contextlib.AbstractContextManager:
        if not (extra and self.hp("freeze_bn_stats")):
            return contextlib.nullcontext()
        if self.batchnorm is None:
            self.batchnorm = BatchNormFreezer()
        return self.batchnorm.paused()

    # -- projection -------------------------------------------------------------------------------
    def project(self, target: Centre, start: GraphPoint, centre: Centre | None = None) -> ProjectionResult:
        """Run the composed projector from ``start`` towards ``target`` and record its stats.

        ``centre`` is the current centre ``c_t`` the rule moved from (``c̃ = c_t + δ̃``); projectors
        that move the centre rather than project it (``tangent``) read it as ``ctx.centre``.
        """
        self.centre = centre
        result = self.projector.project(target, start, self)
        self.stats["proj_iters"] = result.iterations
        self.stats["proj_residual"] = result.residual
        if result.centre is not None:
            self.stats["offset_error"] = self.manifold.offset_error(result.centre, result.point, self)
        return result

    def commit(self, theta: torch.Tensor, fallback: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Write ``θ`` to the parameters unless it (or ``loss``) is not finite; then keep ``fallback``.

        Decided with ``torch.where``: no host synchronisation. ``stats['nonfinite']`` records it.
        ``0·θ`` is 0 where ``θ`` is finite and NaN elsewhere, so one sum tests every coordinate
        (``isfinite(θ).all()`` costs several passes over ``R^d``).
        """
        finite = torch.isfinite((0 * theta).sum() + loss)
        theta = torch.where(finite, theta, fallback)
        self.flat.write(theta)
        self.stats["nonfinite"] = ~finite
        return theta
