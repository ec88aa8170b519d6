"""A small float64 problem and settings of the four rule families (local, sam, entropy-sgd, rbo), for the
tests of the Python API's refusals (closures, state, non-finite values)."""

from __future__ import annotations

import torch

import nonlocal_opt

RULES = {
    "local": dict(momentum=0.9),
    "sam": dict(rho=0.05, momentum=0.9),
    "entropy-sgd": dict(inner_steps=3, gamma=0.03, noise=1e-2, seed=3, momentum=0.9),
    "rbo": dict(rho=1.0, momentum=0.9),
}


def problem(seed: int = 1) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny float64 MLP and a fixed batch: ``(model, x, y)``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return model, torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))


def without_momentum(rule: str) -> dict:
    """The settings of ``rule`` for a base without ``momentum`` (Adam, AdamW)."""
    return {k: v for k, v in RULES[rule].items() if k != "momentum"}


def compose(model: torch.nn.Module, rule: str, **hyperparameters) -> nonlocal_opt.ComposedOptimizer:
    """``rule`` over SGD at ``lr=0.1`` with its settings from :data:`RULES`, overridden by ``hyperparameters``."""
    return nonlocal_opt.compose(model.parameters(), rule, **{"lr": 0.1, **RULES[rule], **hyperparameters})


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The cross-entropy of ``model`` on ``(x, y)``, times ``scale``."""
    return torch.nn.functional.cross_entropy(model(x), y) * scale


def flat(model: torch.nn.Module) -> torch.Tensor:
    """A copy of the parameters as one vector."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
