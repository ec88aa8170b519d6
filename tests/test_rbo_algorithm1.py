"""RBO + footpoint against an independent implementation of the paper's Algorithm 1 (eqs. 2–6)."""

from __future__ import annotations

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.landscapes import GaussianBumps, Quadratic, Riemann, Sine

from conftest import make_closure


def value_and_grad(f, theta):
    theta = theta.detach().requires_grad_(True)
    value = f(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return value.detach(), grad


def algorithm1(f, theta0, eta, rho, gamma, inner_steps, steps):
    """Algorithm 1 written from the paper: centre recomputed each step, inner GD from θ_t."""
    theta = theta0.clone()
    path = []
    for _ in range(steps):
        value, g = value_and_grad(f, theta)
        norm = torch.sqrt(1 + g @ g)
        centre_theta, centre_height = theta - rho * g / norm, value + rho / norm  # c = p + ρν
        target_theta, target_height = centre_theta - eta * g, centre_height - eta * (g @ g)  # c̃ = c − ητ
        inner = theta.clone()
        for _ in range(inner_steps):  # eq. 6
            value_k, g_k = value_and_grad(f, inner)
            inner = inner - gamma * ((inner - target_theta) + (value_k - target_height) * g_k)
        theta = inner
        path.append(theta.clone())
    return path


class SplitTheta(torch.nn.Module):
    """θ ∈ R^d split over several parameter tensors (and two parameter groups)."""

    def __init__(self, landscape, sizes):
        super().__init__()
        self.landscape = landscape
        pieces = landscape.theta.detach().split(sizes)
        self.parts = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in pieces])

    def forward(self):
        return self.landscape.value(torch.cat(list(self.parts)))


CASES = [
    ("sine", lambda: Sine([0.3]), 0.5, 0.5),
    # Well-conditioned settings: chaotic ones (Riemann with 100 terms) amplify rounding differences.
    ("riemann-4-terms", lambda: Riemann([0.2], terms=4), 0.05, 0.05),
    ("bumps", lambda: GaussianBumps([1.0, -0.5], n_bumps=30, sigma=0.6), 1.0, 0.05),
    ("quadratic-3d", lambda: Quadratic([0.5, -1.0, 2.0], eigenvalues=[0.2, 1.0, 3.0]), 0.7, 0.2),
]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("name", "build", "rho", "eta"), CASES, ids=[c[0] for c in CASES])
def test_rbo_matches_algorithm1(name, build, rho, eta, dtype, tol):
    torch.set_default_dtype(dtype)
    try:
        landscape = build()
        theta0 = landscape.theta.detach().clone()
        opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector="footpoint", lr=eta, rho=rho)
        closure = make_closure(opt, landscape)
        reference = algorithm1(landscape.value, theta0, eta, rho, gamma=0.1, inner_steps=20, steps=30)
        for expected in reference:
            opt.step(closure)
            assert opt.stats["grad_evals"] <= 1 + 20
            torch.testing.assert_close(landscape.theta.detach(), expected, rtol=0, atol=tol)
    finally:
        torch.set_default_dtype(torch.float32)


def test_theta_split_over_tensors_and_groups_is_one_ball():
    torch.set_default_dtype(torch.float64)
    try:
        landscape = Quadratic([0.5, -1.0, 2.0, 0.1, 0.4], eigenvalues=[0.2, 1.0, 3.0, 0.5, 2.0])
        theta0 = landscape.theta.detach().clone()
        split = SplitTheta(landscape, [2, 1, 2])
        groups = [{"params": list(split.parts)[:2]}, {"params": list(split.parts)[2:]}]
        opt = nonlocal_opt.compose(groups, "rbo", lr=0.4, rho=0.8, max_iters=7, step_size=0.2)
        closure = make_closure(opt, split)
        reference = algorithm1(landscape.value, theta0, 0.4, 0.8, gamma=0.2, inner_steps=7, steps=30)
        for expected in reference:
            opt.step(closure)
            assert opt.stats["grad_evals"] == 1 + 7
            torch.testing.assert_close(torch.cat([p.detach() for p in split.parts]), expected, rtol=0, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_first_pass_and_stats():
    landscape = Sine([0.3]).double()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", lr=0.5, rho=0.5, max_iters=5)
    closure = make_closure(opt, landscape)
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(torch.sin(torch.tensor(0.3, dtype=torch.float64)).item())
    stats = opt.stats
    assert stats["grad_evals"] == 6 and stats["proj_iters"] == 5 and stats["offset_error"] == 0.0
    # proj_residual is ‖∇φ‖ at the returned point, recomputed independently here.
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["proj_residual"] > 0


def test_tol_stops_early_with_fewer_passes():
    landscape = Quadratic([1.0, -1.0], eigenvalues=[0.5, 1.0]).double()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", lr=0.1, rho=0.1, max_iters=500, step_size=0.5, tol=1e-9)
    opt.step(make_closure(opt, landscape))
    assert opt.stats["proj_residual"] <= 1e-9
    assert opt.stats["grad_evals"] < 100


def test_nonfinite_step_is_refused():
    landscape = Quadratic([1.0, -1.0], eigenvalues=[0.5, 1.0]).double()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", lr=1.0, rho=1.0)
    before = landscape.theta.detach().clone()

    def closure():
        opt.zero_grad()
        loss = landscape() * float("nan")
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stats["nonfinite"] == 1.0
    torch.testing.assert_close(landscape.theta.detach(), before, rtol=0, atol=0)


def test_apply_skips_any_nonfinite_coordinate_or_verdict_but_not_a_large_finite_one():
    """``StepContext.apply`` skips the base step for ±inf/NaN in the direction or a false verdict —
    parameters stay at ``θ`` — and steps with a finite direction even when its coordinates would
    overflow a plain sum (float32, 3e38 each)."""
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))
    ctx = nonlocal_opt.compose([param], "rbo", lr=1.0).step_context()
    start, large = torch.full((4,), 7.0), torch.full((4,), 3e38)
    with torch.no_grad():
        for bad, verdict in ((float("inf"), True), (-float("inf"), True), (float("nan"), True), (0.0, False)):
            taken = ctx.apply(torch.tensor([1.0, bad, 2.0, 3.0]), theta=start, finite=torch.tensor(verdict))
            torch.testing.assert_close(param.detach(), start)
            assert not bool(taken) and ctx.stats["nonfinite"] == 1.0
        taken = ctx.apply(large, theta=torch.zeros(4), finite=torch.tensor(True))
    torch.testing.assert_close(param.detach(), -large)
    assert bool(taken) and ctx.stats["nonfinite"] == 0.0
