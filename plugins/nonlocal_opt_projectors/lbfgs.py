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
    ``ρ_i`` and ``γ`` are scalars (Python floats on the CPU, 0-d tensors elsewhere: no host sync)."""

    def __init__(self, size: int, like: torch.Tensor, on_host: bool):
        self.on_host = on_host
        self.s = like.new_zeros((size, like.numel()))
        self.y = like.new_zeros((size, like.numel()))
        zero = 0.0 if self.on_host else like.new_zeros(())
        self.rho: list[Scalar] = [zero] * size
        self.gamma: Scalar = 1.0 if self.on_host else like.new_ones(())  # sᵀy/yᵀy of the last curved pair: the scaled-identity H₀
        self.count = 0

    def newest_first(self) -> list[int]:
        size = len(self.rho)
        return [(self.count - 1 - k) % size for k in range(min(self.count, size))]

    def add(self, current: Iterate, trial: Iterate, ctx) -> None:
        """Store ``s = θ_trial − θ = y − s_trial g_trial + s g``, ``y = ∇φ(θ_trial) − ∇φ(θ)`` in the next slot."""
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
        return PairMemory(ctx.hp("history"), start.theta, ctx.host_reads)

    def observe(self, memory, current, trial, ctx):
        memory.add(current, trial, ctx)

    def step(self, current, damping, memory, ctx):
        on_host, alphas = memory.on_host, []
        q = current.grad_phi.clone()
        for i in memory.newest_first():
            alpha = memory.rho[i] * scalar(ctx.dot(memory.s[i], q), on_host)
            axpy_(q, -alpha, memory.y[i])
            alphas.append(alpha)
        r = damped_gn_solve(current.g, q, ctx) if ctx.hp("gn_h0") else q.mul_(memory.gamma)
        for i, alpha in zip(reversed(memory.newest_first()), reversed(alphas)):
            beta = memory.rho[i] * scalar(ctx.dot(memory.y[i], r), on_host)
            axpy_(r, alpha - beta, memory.s[i])
        return r.mul_(-1 / (1 + damping))

    def predicted_decrease(self, current, step, damping, ctx):
        """Under the model ``∇φᵀΔ + ½ΔᵀH⁻¹Δ`` with ``Δ = −H∇φ/(1 + μ)``: ``−∇φᵀΔ (1 − 1/(2(1 + μ)))``."""
        return -ctx.dot(current.grad_phi, step) * (1 - 0.5 / (1 + damping))
