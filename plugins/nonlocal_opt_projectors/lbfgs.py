"""``lbfgs``: limited-memory BFGS on ``φ``, seeded with the Gauss–Newton inverse ``H₀ = (I + g gᵀ)⁻¹``."""

from __future__ import annotations

import torch

from nonlocal_opt import Hyperparameter
from nonlocal_opt.hyperparameters import boolean, positive_int
from nonlocal_opt_projectors.footpoint_math import damped_gn_solve
from nonlocal_opt_projectors.safeguarded import STOPPING_HYPERPARAMETERS, SafeguardedFootpointProjector, choose


class PairMemory:
    """The last ``m`` pairs ``(s_i, y_i)`` in ring buffers; a pair with ``sᵀy ≤ 0`` (or non-finite) is
    stored as zeros with ``ρ_i = 0``, so it drops out of the two-loop recursion (no host-side branch off the CPU)."""

    def __init__(self, size: int, like: torch.Tensor):
        self.on_host = like.device.type == "cpu"
        self.s = like.new_zeros((size, like.numel()))
        self.y = like.new_zeros((size, like.numel()))
        self.rho = like.new_zeros(size)
        self.gamma = like.new_ones(())  # sᵀy/yᵀy of the last curved pair: the scaled-identity H₀
        self.count = 0

    def newest_first(self) -> list[int]:
        size = self.rho.numel()
        return [(self.count - 1 - k) % size for k in range(min(self.count, size))]

    def add(self, s: torch.Tensor, y: torch.Tensor) -> None:
        sy = s.dot(y)
        curved = (sy > 1e-10 * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)) & torch.isfinite(sy)
        slot = self.count % self.rho.numel()
        self.s[slot], self.y[slot] = choose(curved, (s, y), (0, 0), self.on_host)
        self.rho[slot] = torch.where(curved, 1 / torch.where(curved, sy, 1), 0)
        self.gamma = torch.where(curved, sy / torch.where(curved, y.dot(y), 1), self.gamma)
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
        return PairMemory(ctx.hp("history"), start.theta)

    def observe(self, memory, current, trial):
        memory.add(trial.a - current.a, trial.grad_phi - current.grad_phi)

    def step(self, current, damping, memory, ctx):
        q, alphas = current.grad_phi, []
        for i in memory.newest_first():
            alpha = memory.rho[i] * memory.s[i].dot(q)
            q = torch.addcmul(q, alpha, memory.y[i], value=-1)
            alphas.append(alpha)
        r = damped_gn_solve(current.g, q) if ctx.hp("gn_h0") else memory.gamma * q
        for i, alpha in zip(reversed(memory.newest_first()), reversed(alphas)):
            beta = memory.rho[i] * memory.y[i].dot(r)
            r = torch.addcmul(r, alpha - beta, memory.s[i])
        return r * (-1 / (1 + damping))

    def predicted_decrease(self, current, step, damping):
        """Under the model ``∇φᵀΔ + ½ΔᵀH⁻¹Δ`` with ``Δ = −H∇φ/(1 + μ)``: ``−∇φᵀΔ (1 − 1/(2(1 + μ)))``."""
        return -current.grad_phi.dot(step) * (1 - 0.5 / (1 + damping))
