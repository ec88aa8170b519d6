"""First-party plugin: Entropy-SGD (Chaudhari et al., Algorithm 1), with the public reference code's
variant as options. Registers the ``entropy-sgd`` rule (constructor ``nonlocal_opt.EntropySGD``) through
the ``nonlocal_opt`` entry-point group.
"""

from __future__ import annotations

import math

import torch

from nonlocal_opt import DescentRule, Hyperparameter, hookimpl
from nonlocal_opt.optim.hyperparameters import (
    boolean,
    non_negative,
    non_negative_int,
    optional,
    positive,
    positive_int,
    unit_interval,
)
from nonlocal_opt_entropy_sgd.noise import standard_normal_, words_needed


class EntropySGDRule(DescentRule):
    """One outer step (docs/math.md §8): ``x', μ ← x``; ``L`` Langevin steps
    ``x' ← x' − η' [∇f(x') − γ_t (x − x')] + sqrt(η') ε ξ``, ``μ ← (1 − α) μ + α x'``;
    then the base optimizer steps from ``x`` with the gradient ``γ_t (x − μ)`` (``x − μ`` when
    ``scale_outer_by_gamma=False``). Scoping ``γ_t = γ₀ (1 + γ₁)^t``, ``t`` = accepted outer steps
    (``state['step']``, which ``load_state_dict`` keeps as it is).

    The first Langevin step uses the gradient of the step's first pass (at ``x' = x``), so a step
    costs ``L`` passes; only that first pass updates BatchNorm running statistics by default.
    """

    name = "entropy-sgd"
    alias = "EntropySGD"
    shardable = True
    hyperparameters = {
        "inner_steps": Hyperparameter(20, "L", "Langevin steps per outer step", positive_int),
        "inner_lr": Hyperparameter(0.1, "η'", "step size of the Langevin steps", positive),
        "gamma": Hyperparameter(3e-3, "γ₀", "scope: coupling of x' to x at t = 0", positive),
        "scoping": Hyperparameter(0.0, "γ₁", "scoping rate: γ_t = γ₀ (1 + γ₁)^t", non_negative),
        "noise": Hyperparameter(1e-4, "ε", "thermal noise of the Langevin steps", non_negative),
        "alpha": Hyperparameter(0.75, "α", "weight of x' in the running mean μ", unit_interval),
        "scale_outer_by_gamma": Hyperparameter(
            True, "—", "outer gradient γ_t (x − μ) as in the paper; False: x − μ as in the reference code", boolean
        ),
        "fresh_batches": Hyperparameter(
            False, "—", "Langevin steps 2..L call closure(fresh_batch=True) for a new mini-batch each", boolean
        ),
        "seed": Hyperparameter(
            None, "—", "seed of the noise ξ (None: drawn once from torch's global generator)",
            optional(non_negative_int),
        ),
    }
    # The paper gives γ and L only; it adapted the public reference code, whose defaults fill in the
    # rest: outer lr 1 on x − μ (no γ factor), scoping 1e-3, a fresh mini-batch per Langevin step.
    presets = {
        "paper": {"lr": 1.0, "gamma": 3e-3, "inner_steps": 20, "scale_outer_by_gamma": False, "scoping": 1e-3, "fresh_batches": True},
    }
    comparison_specs = (
        {"name": "entropy-sgd L=5", "base": "sgd", "fixed": {"lr": 1.0, "gamma": 3e-3, "inner_steps": 5, "scoping": 1e-3,
                                                           "scale_outer_by_gamma": False, "fresh_batches": True, "seed": 0}},
    )

    def step(self, ctx):
        """``L`` Langevin steps from ``x`` (``L`` passes), then the base's step with the outer gradient.

        Args:
            ctx: The step's context.

        Returns:
            The loss at ``x``.

        Raises:
            ValueError: ``fresh_batches=True`` with a closure that takes no ``fresh_batch`` keyword.
        """
        fresh = ctx.hp("fresh_batches")
        if fresh and not ctx.accepts_fresh_batch:
            raise ValueError(
                "fresh_batches=True needs a closure that accepts the keyword fresh_batch, e.g. "
                "def closure(fresh_batch=False): ...; or set fresh_batches=False to reuse the step's batch"
            )
        inner_lr, alpha, noise = ctx.hp("inner_lr"), ctx.hp("alpha"), ctx.hp("noise")
        # x, x', μ, ∇f(x') and ξ (with noise on) in rows kept from step to step, updated in place.
        rows = ctx.scratch("entropy-sgd.rows", rows=5 if noise > 0 else 4)
        x, x_inner, mu, grad = rows[:4].unbind()
        start = ctx.evaluate(extra=False, theta_out=x, grad_out=grad)
        t = ctx.state.get("step", torch.zeros((), dtype=torch.int64, device=x.device))
        gamma = ctx.hp("gamma") * (1 + ctx.hp("scoping")) ** t.to(x.dtype)
        xi = rows[4] if noise > 0 else None
        seed = self._noise_seed(ctx) if xi is not None else None
        words = None if xi is None else ctx.scratch("entropy-sgd.noise", rows=2, dtype=torch.int64, columns=words_needed(xi.numel()))
        finite = ctx.finite(start.loss)
        x_inner.copy_(x)
        mu.copy_(x)
        coupling = inner_lr * gamma  # η'γ_t, a 0-d tensor: no host read
        point = start
        steps = ctx.hp("inner_steps")
        for inner in range(steps):
            if inner > 0:
                point = ctx.evaluate(x_inner, fresh_batch=fresh, grad_out=grad)
                finite = finite & ctx.finite(point.loss)
            # x' − η'[∇f(x') − γ(x − x')] = (1 − η'γ) x' + η'γ x − η' ∇f(x')
            x_inner.mul_(1 - coupling).addcmul_(x, coupling).add_(point.grad, alpha=-inner_lr)
            if xi is not None:
                x_inner.add_(standard_normal_(xi, seed, t * steps + inner, words), alpha=math.sqrt(inner_lr) * noise)
            mu.lerp_(x_inner, alpha)
        outer = torch.sub(x, mu, out=mu)  # x − μ, over μ (no longer needed)
        if ctx.hp("scale_outer_by_gamma"):
            outer.mul_(gamma)
        accepted = ctx.apply(outer, theta=x, finite=finite, spare=[x_inner, grad, mu, x])
        ctx.state["step"] = t + accepted.to(t.dtype)  # a refused step leaves t, so the next step draws its noise
        ctx.stats["gamma"] = gamma
        return start.loss

    @staticmethod
    def _noise_seed(ctx) -> int:
        """The seed of the noise, ``state['noise_seed']`` (so ``state_dict`` round-trips it), fixed on the first
        step from ``seed`` (``None``: drawn from torch's global generator). Under FSDP2 the shard of process
        ``r > 0`` uses the seed ``hash((seed, r))``: independent noise on every shard."""
        if "noise_seed" not in ctx.state:
            seed = ctx.hp("seed")
            seed = int(torch.randint(2**62, ())) if seed is None else seed
            rank = ctx.flat.shard_rank
            ctx.state["noise_seed"] = seed if rank == 0 else hash((seed, rank)) % 2**63
        return ctx.state["noise_seed"]


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register the ``entropy-sgd`` rule.

    Args:
        register: The registry's callback.
    """
    register(EntropySGDRule)
