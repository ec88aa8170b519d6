"""Tests of the example plugin, run where it is installed (``pip install ./plugins/example-damped-footpoint``;
``tox -e example-plugin``): its registration, the contract kits (``check_projector``, and
``check_device_path`` for the path a GPU takes), and its own claim — on a stiff landscape where the
paper's fixed step overshoots, backtracking keeps ``φ`` non-increasing and reaches the footpoint.
Where the distribution is not installed they are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import Centre
from nonlocal_opt.landscapes import Quadratic
from nonlocal_opt.testing import check_device_path, check_projector, nearest_point

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nonlocal_opt_damped_footpoint") is None,
    reason="the example plugin is not installed: pip install ./plugins/example-damped-footpoint (or tox -e example-plugin)",
)

# f(θ) = ½(θ − θ*)ᵀH(θ − θ*) with eigenvalues 10 and 1: ‖∇f(θ_t)‖ ≈ 9.1, so ∇²φ has an eigenvalue
# ≈ 1 + ‖∇f‖² ≈ 84 and a fixed step γ > 2/84 ≈ 0.024 — the paper's γ = 0.1 included — makes GD on φ diverge.
START, RHO, ETA = [1.0, -0.8], 0.5, 0.05


def stiff_landscape() -> Quadratic:
    return Quadratic(START, eigenvalues=[10.0, 1.0], seed=3).double()


def start_theta() -> torch.Tensor:
    return stiff_landscape().theta.detach().clone()


def one_rbo_step(projector: str, **hyperparameters) -> tuple[torch.Tensor, dict[str, float]]:
    """θ_{t+1} and the stats after one RBO step from ``START``."""
    landscape = stiff_landscape()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector=projector, lr=ETA, rho=RHO, **hyperparameters)

    def closure():
        opt.zero_grad()
        loss = landscape()
        loss.backward()
        return loss

    opt.step(closure)
    return landscape.theta.detach().clone(), opt.stats


def proposed_centre() -> Centre:
    """``c̃ = p + ρν(p) − η(g, ‖g‖²)`` at ``START``, written out here."""
    landscape = stiff_landscape()
    theta = start_theta().requires_grad_(True)
    value = landscape.value(theta)
    (g,) = torch.autograd.grad(value, theta)
    norm = torch.sqrt(1 + g @ g)
    return Centre(theta=theta.detach() - RHO * g / norm - ETA * g, height=value.detach() + RHO / norm - ETA * (g @ g))


def phi(theta: torch.Tensor, target: Centre) -> float:
    return float(0.5 * ((theta - target.theta).square().sum() + (stiff_landscape().value(theta) - target.height) ** 2))


def test_registered_through_its_entry_point():
    registration = nonlocal_opt.registrations("projector")["damped-footpoint"]
    assert (registration.distribution, registration.plugin) == ("nonlocal-opt-damped-footpoint", "damped_footpoint")


def test_contract_kit():
    report = check_projector("damped-footpoint")
    assert report.ok
    # safeguarded = True: the kit also asserted φ(θ_{t+1}) ≤ φ(θ_t), on the Riemann function too.
    assert any(check.name == "monotone" and check.case.startswith("riemann") for check in report.checks)
    # max_iters and tol are declared: accurate at the defaults, and converged when run to tolerance.
    assert {"accuracy", "convergence", "contact"} <= {check.name for check in report.checks}


def test_device_path_reads_nothing_on_the_host():
    assert check_device_path("damped-footpoint") <= 1e-9


def test_the_paper_fixed_step_overshoots_on_this_landscape():
    theta, stats = one_rbo_step("footpoint")  # γ = 0.1, K = 20
    assert stats["nonfinite"] == 1.0  # the iteration blew up; the rule refused the step
    torch.testing.assert_close(theta, start_theta(), rtol=0, atol=0)


def test_phi_never_increases_and_reaches_the_footpoint():
    target = proposed_centre()
    # Deterministic: the run with K iterations is the first K iterations of any longer run.
    values = [phi(one_rbo_step("damped-footpoint", max_iters=k)[0], target) for k in range(1, 31)]
    values.insert(0, phi(start_theta(), target))
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))
    assert values[-1] < 1e-3 * values[0]
    theta, stats = one_rbo_step("damped-footpoint", max_iters=200, tol=1e-8)
    assert stats["nonfinite"] == 0.0 and stats["proj_residual"] <= 1e-8 and stats["proj_iters"] < 200
    radius = 1.01 * (2 * phi(start_theta(), target)) ** 0.5
    footpoint = nearest_point(stiff_landscape().value, target, radius)
    assert footpoint.unique
    torch.testing.assert_close(theta, footpoint.theta, rtol=0, atol=1e-6)
