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
            None, "—", "seed of the noise generator (None: drawn once from torch's global generator)",
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
        rng = self._noise_generator(ctx) if noise > 0 else None
        xi = rows[4] if rng is not None else None
        finite = ctx.finite(start.loss)
        x_inner.copy_(x)
        mu.copy_(x)
        coupling = inner_lr * gamma  # η'γ_t, a 0-d tensor: no host read
        point = start
        for inner in range(ctx.hp("inner_steps")):
            if inner > 0:
                point = ctx.evaluate(x_inner, fresh_batch=fresh, grad_out=grad)
                finite = finite & ctx.finite(point.loss)
            # x' − η'[∇f(x') − γ(x − x')] = (1 − η'γ) x' + η'γ x − η' ∇f(x')
            x_inner.mul_(1 - coupling).addcmul_(x, coupling).add_(point.grad, alpha=-inner_lr)
            if xi is not None:
                x_inner.add_(xi.normal_(generator=rng), alpha=math.sqrt(inner_lr) * noise)
            mu.lerp_(x_inner, alpha)
        outer = torch.sub(x, mu, out=mu)  # x − μ, over μ (no longer needed)
        if ctx.hp("scale_outer_by_gamma"):
            outer.mul_(gamma)
        accepted = ctx.apply(outer, theta=x, finite=finite, spare=[x_inner, grad, mu, x])
        ctx.state["step"] = t + accepted.to(t.dtype)
        if rng is not None:
            # A refused step gives its noise back on the host path; on the device path it keeps it drawn:
            # choosing the generator state would read the verdict on the host (a synchronisation).
            keep = ctx.host_reads and not bool(accepted)
            ctx.state["noise_rng"] = self._saved_rng_state(ctx) if keep else rng.get_state()
        ctx.stats["gamma"] = gamma
        return start.loss

    @staticmethod
    def _saved_rng_state(ctx) -> torch.Tensor:
        """``state['noise_rng']`` as the CPU byte tensor ``Generator.set_state`` wants:
        ``Optimizer.load_state_dict`` moves state to the parameter's device and dtype (exact for 0..255)."""
        return ctx.state["noise_rng"].to(device="cpu", dtype=torch.uint8)

    def _noise_generator(self, ctx) -> torch.Generator:
        """The generator of ``ξ ~ N(0, I)``, restored from ``state['noise_rng']`` (so ``state_dict``
        round-trips it) or seeded from ``seed`` on the first step. Under FSDP2 the shard of process
        ``r > 0`` draws from the seed ``hash((seed, r))``: independent noise on every shard."""
        rng = torch.Generator(device=ctx.flat.device)
        if "noise_rng" in ctx.state:
            rng.set_state(self._saved_rng_state(ctx))
        else:
            seed = ctx.hp("seed")
            seed = int(torch.randint(2**62, ())) if seed is None else seed
            rank = ctx.flat.shard_rank
            rng.manual_seed(seed if rank == 0 else hash((seed, rank)) % 2**63)
            ctx.state["noise_rng"] = rng.get_state()
        return rng


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register the ``entropy-sgd`` rule.

    Args:
        register: The registry's callback.
    """
    register(EntropySGDRule)
