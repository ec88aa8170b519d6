"""``lbfgs``: limited-memory BFGS on ``φ``, seeded with the Gauss–Newton inverse ``H₀ = (I + g gᵀ)⁻¹``."""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import boolean, positive_int
from nonlocal_opt_projectors.footpoint_math import damped_gn_solve
from nonlocal_opt_projectors.safeguarded import STOPPING_HYPERPARAMETERS, Iterate, SafeguardedFootpointProjector
from nonlocal_opt_projectors.scalars import Scalar, axpy_, read, scalar, sqrt, where


class PairMemory:
    """The last ``m`` pairs ``(s_i, y_i)`` in ring buffers, written in place; a pair with ``sᵀy ≤ 0``
    (or non-finite) is stored as zeros with ``ρ_i = 0``, so it drops out of the two-loop recursion.
    ``ρ_i`` and ``γ`` are scalars (Python floats on the CPU, 0-d tensors elsewhere: no host sync).

    Args:
        size: ``m``, the number of pairs kept.
        like: A flat tensor of ``R^d`` (size, dtype and device of the pairs).
        on_host: Whether scalars are read to the host (``ctx.host_reads``).
    """

    def __init__(self, size: int, like: torch.Tensor, on_host: bool):
        self.on_host = on_host
        self.s = like.new_zeros((size, like.numel()))
        self.y = like.new_zeros((size, like.numel()))
        zero = 0.0 if self.on_host else like.new_zeros(())
        self.rho: list[Scalar] = [zero] * size
        self.gamma: Scalar = 1.0 if self.on_host else like.new_ones(())  # sᵀy/yᵀy of the last curved pair: the scaled-identity H₀
        self.count = 0

    def newest_first(self) -> list[int]:
        """The slots of the stored pairs, the newest first.

        Returns:
            Row indices into ``s`` and ``y``.
        """
        size = len(self.rho)
        return [(self.count - 1 - k) % size for k in range(min(self.count, size))]

    def observe(self, current: Iterate, trial: Iterate, ctx) -> None:
        """Store ``s = θ_trial − θ = y − s_trial g_trial + s g``, ``y = ∇φ(θ_trial) − ∇φ(θ)`` in the next slot.

        Args:
            current: The iterate the trial was proposed from.
            trial: The evaluated trial, accepted or not.
            ctx: The step's context (sums over shards).
        """
        slot = self.count % len(self.rho)
        y = torch.sub(trial.grad_phi, current.grad_phi, out=self.y[slot])
        s = axpy_(axpy_(self.s[slot].copy_(y), -trial.gap, trial.g), current.gap, current.g)
        sy, ss, yy = read(ctx.sum(torch.stack([s.dot(y), s.dot(s), y.dot(y)])), self.on_host)
        curved = sy > 1e-10 * sqrt(ss * yy)  # False for NaN and inf as well
        if not self.on_host:
            s.copy_(torch.where(curved, s, 0))
            y.copy_(torch.where(curved, y, 0))
        elif not curved:
            s.zero_()
            y.zero_()
        self.rho[slot] = where(curved, 1 / where(curved, sy, 1.0), 0.0)
        self.gamma = where(curved, sy / where(curved, yy, 1.0), self.gamma)
        self.count += 1

    def inverse_hessian_times(self, q: torch.Tensor, grad: torch.Tensor | None, ctx) -> torch.Tensor:
        """``H q`` by the two-loop recursion over the stored pairs, newest first, in place over ``q``.

        Args:
            q: The vector, overwritten.
            grad: ``g``, to seed ``H₀ = (I + g gᵀ)⁻¹``; ``None``: ``H₀ = (sᵀy/yᵀy) I``.
            ctx: The step's context (sums over shards).

        Returns:
            ``H q``.
        """
        alphas = []
        for i in self.newest_first():
            alpha = self.rho[i] * scalar(ctx.dot(self.s[i], q), self.on_host)
            axpy_(q, -alpha, self.y[i])
            alphas.append(alpha)
        r = damped_gn_solve(grad, q, ctx) if grad is not None else q.mul_(self.gamma)
        for i, alpha in zip(reversed(self.newest_first()), reversed(alphas)):
            beta = self.rho[i] * scalar(ctx.dot(self.y[i], r), self.on_host)
            axpy_(r, alpha - beta, self.s[i])
        return r


class LBFGSProjector(SafeguardedFootpointProjector):
    """``Δ = −H ∇φ / (1 + μ)`` with ``H`` from the two-loop recursion over the last ``history`` pairs.

    ``gn_h0=True`` seeds it with ``H₀ = (I + g gᵀ)⁻¹`` at the current point (then the first step
    from ``p_t`` is the Gauss–Newton step); ``False`` uses ``H₀ = (sᵀy/yᵀy) I``, which must rediscover
    ``I + g gᵀ`` from the pairs. The LM damping of the shared loop shortens rejected steps; its gain ratio uses this model.
    """

    name = "lbfgs"
    hyperparameters = {
        **STOPPING_HYPERPARAMETERS,
        "history": Hyperparameter(5, "m", "number of stored (s, y) pairs", positive_int),
        "gn_h0": Hyperparameter(True, "H₀", "seed the inverse Hessian with (I + g gᵀ)⁻¹ (else (sᵀy/yᵀy) I)", boolean),
    }

    def new_memory(self, start, ctx):
        """Empty ring buffers of ``history`` pairs.

        Args:
            start: The contact point ``p_t`` (its ``θ`` sets the pairs' size, dtype and device).
            ctx: The step's context.

        Returns:
            A :class:`PairMemory`.
        """
        return PairMemory(ctx.hp("history"), start.theta, ctx.host_reads)

    def trial_offset(self, current, damping, memory, ctx, out):
        """``Δ = −H ∇φ / (1 + μ)``; the predicted decrease under the model ``∇φᵀΔ + ½ΔᵀH⁻¹Δ`` is
        ``−∇φᵀΔ (1 − 1/(2(1 + μ)))``.

        Args:
            current: The current iterate.
            damping: The LM damping ``μ``.
            memory: This projection's :class:`PairMemory`.
            ctx: The step's context.
            out: Where to write the trial offset ``a + Δ``.

        Returns:
            The predicted decrease of ``φ``.
        """
        step = memory.inverse_hessian_times(current.grad_phi.clone(), current.g if ctx.hp("gn_h0") else None, ctx)
        step.mul_(-1 / (1 + damping))
        current.offset_after(step, out)
        return -ctx.dot(current.grad_phi, step) * (1 - 0.5 / (1 + damping))
