"""compose(rule="local") over sgd equals torch.optim.SGD bit for bit; RBO tends to SGD as ρ → 0."""

from __future__ import annotations

import copy

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.landscapes import Quadratic

from conftest import make_closure

SETTINGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-2),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sgd_rule_is_torch_sgd_bit_for_bit(mlp_problem, settings, foreach):
    model, _ = mlp_problem
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    ours = nonlocal_opt.compose(model.parameters(), rule="local", **settings)
    theirs = torch.optim.SGD(twin.parameters(), foreach=foreach, **settings)
    for _ in range(10):
        ours.step(make_closure(ours, lambda: torch.nn.functional.cross_entropy(model(x), y)))
        theirs.step(make_closure(theirs, lambda: torch.nn.functional.cross_entropy(twin(x), y)))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_sgd_without_closure_uses_existing_grads(mlp_problem):
    model, loss_fn = mlp_problem
    opt = nonlocal_opt.compose(model.parameters(), rule="local", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    assert opt.step() is None
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)


def _rbo_minus_sgd(rho, eta=0.02, steps=20):
    """Distance between the RBO path (projection solved to 1e-12) and the SGD path on a 3-D quadratic."""
    torch.set_default_dtype(torch.float64)
    try:
        rbo_land = Quadratic([1.0, -0.5, 2.0], eigenvalues=[0.3, 1.0, 2.0])
        sgd_land = copy.deepcopy(rbo_land)
        rbo = nonlocal_opt.compose(rbo_land.parameters(), "rbo", lr=eta, rho=rho, max_iters=5000, step_size=0.3, tol=1e-12)
        sgd = nonlocal_opt.compose(sgd_land.parameters(), "local", lr=eta)
        gap = 0.0
        for _ in range(steps):
            rbo.step(make_closure(rbo, rbo_land))
            sgd.step(make_closure(sgd, sgd_land))
            gap = max(gap, (rbo_land.theta - sgd_land.theta).norm().item())
        return gap
    finally:
        torch.set_default_dtype(torch.float32)


def test_rbo_approaches_sgd_as_rho_vanishes():
    gaps = [_rbo_minus_sgd(rho) for rho in (0.5, 0.05, 0.005)]
    assert gaps[0] > 5 * gaps[1] > 5 * gaps[2]


def test_rbo_with_tiny_rho_is_a_first_order_match_of_sgd():
    """With ρ → 0 the footpoint of c̃ = (θ − ηg, f − η‖g‖²) differs from θ − ηg by O(η²) per step
    (curvature), so over a fixed time T = η·steps the paths differ by O(η): halving η halves the gap."""
    horizon = 0.4
    gaps = [_rbo_minus_sgd(5e-4, eta, round(horizon / eta)) for eta in (0.02, 0.01, 0.005)]
    assert gaps[1] < 0.6 * gaps[0] and gaps[2] < 0.6 * gaps[1]
    assert gaps[2] < 2e-3
