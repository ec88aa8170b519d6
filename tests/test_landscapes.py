"""Analytic landscapes and the brute-force offset function f_ρ against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from nonlocal_opt.landscapes import LANDSCAPES, GaussianBumps, Riemann, SinusoidalMixture, offset_function


def test_riemann_partial_sum_matches_python_math():
    for theta in (0.0, 0.3, -1.7):
        expected = sum(math.sin(k * k * theta) / (k * k) for k in range(1, 101))
        land = Riemann().double()
        land.theta.data.fill_(theta)
        assert land().item() == pytest.approx(expected, abs=1e-12)


def test_gaussian_bumps_formula():
    land = GaussianBumps([0.2, -0.4], n_bumps=5, sigma=0.5).double()
    theta = land.theta.detach()
    expected = (theta**2).sum() - sum(math.exp(-((theta - c) ** 2).sum().item() / 0.25) for c in land.centres)
    assert land().item() == pytest.approx(expected.item(), abs=1e-12)


def test_sm_formula():
    land = SinusoidalMixture([0.5, 1.5]).double()
    a = land.a
    expected = 0.5**2 + 1.5**2 + 100 * (math.sin(a[0] * 0.5) ** 2 + math.sin(a[1] * 1.5) ** 2)
    assert land().item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", sorted(LANDSCAPES))
def test_value_is_vectorised_like_forward(name):
    land = LANDSCAPES[name]().double()
    points = torch.randn(7, land.dim, dtype=torch.float64)
    batched = land.value(points)
    for point, value in zip(points, batched):
        with torch.no_grad():
            land.theta.copy_(point)
        assert land().item() == pytest.approx(value.item(), rel=1e-12, abs=1e-12)


def test_offset_of_a_constant_is_shifted_by_rho():
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    f_rho = offset_function(lambda x: torch.full((x.shape[0],), 0.7, dtype=x.dtype), 0.5, grid)
    torch.testing.assert_close(f_rho, torch.full_like(f_rho, 1.2))


def test_offset_of_an_affine_function_is_a_parallel_line():
    """f(θ) = aθ + b ⇒ f_ρ(θ) = aθ + b + ρ sqrt(1 + a²)."""
    a, b, rho = 0.8, -0.3, 0.6
    grid = torch.linspace(-3, 3, 20001, dtype=torch.float64)
    queries = torch.linspace(-2, 2, 41, dtype=torch.float64)
    f_rho = offset_function(lambda x: a * x[:, 0] + b, rho, grid, queries)
    torch.testing.assert_close(f_rho, a * queries + b + rho * math.sqrt(1 + a * a), atol=1e-6, rtol=0)


def test_offset_of_a_2d_paraboloid_at_its_vertex():
    """f(θ) = −‖θ‖²/2 (a cap): at θ = 0 the sup of −‖s‖²/2 + sqrt(ρ² − ‖s‖²) is at s = 0 for ρ ≤ 1: f_ρ(0) = ρ."""
    axis = torch.linspace(-1, 1, 161, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    f_rho = offset_function(lambda x: -0.5 * (x**2).sum(-1), 0.8, grid, torch.zeros(1, 2, dtype=torch.float64))
    assert f_rho.item() == pytest.approx(0.8, abs=1e-12)


def _sine_delta(rho):
    """Δ(ρ) = sup f_ρ − inf f_ρ for f = sin over [−3π, 3π] (grid padded by ρ on each side)."""
    queries = torch.linspace(-3 * math.pi, 3 * math.pi, 601, dtype=torch.float64)
    grid = torch.arange(-3 * math.pi - rho, 3 * math.pi + rho, 0.002, dtype=torch.float64)
    f_rho = offset_function(lambda x: torch.sin(x[:, 0]), rho, grid, queries)
    return (f_rho.max() - f_rho.min()).item()


def test_ironing_delta_decays_like_pi_squared_over_two_rho():
    """For large ρ, f_ρ(θ) ≈ ρ + 1 − d(θ)²/(2ρ) with d the distance to the nearest crest, so Δ(ρ) ≈ π²/(2ρ)."""
    for rho in (20.0, 40.0):
        assert _sine_delta(rho) * rho == pytest.approx(math.pi**2 / 2, rel=0.05)


def test_small_radius_keeps_the_whole_amplitude():
    assert _sine_delta(0.01) == pytest.approx(2.0, abs=0.02)
