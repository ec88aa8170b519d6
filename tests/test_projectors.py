"""Every registered projector against the contract kit ``nonlocal_opt.testing`` and through the trainer,
deliberately broken projectors failing the kit at their default budget, plus projector-specific facts
checked against independent formulas.

``NONLOCAL_OPT_PROJECTOR=<name>`` restricts the tests parametrised by ``projector`` to one projector
(tests/conftest.py; the tox matrix).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.landscapes import LANDSCAPES, Quadratic, Sine
from nonlocal_opt.optim.hyperparameters import positive_int
from nonlocal_opt.testing import DEFAULT_CASES, RUN_CASES, check_device_path, check_projector
from nonlocal_opt.training import TrainConfig, train
from nonlocal_opt.training.config import optimizer_hyperparameters
from nonlocal_opt.training.metrics import read_metrics

from conftest import make_closure

PROJECTORS = nonlocal_opt.available("projector")


@pytest.mark.parametrize("projector", PROJECTORS)
def test_projector_contract(projector):
    report = check_projector(projector)
    assert report.ok
    assert {check.name for check in report.checks} >= {"residual", "evaluated", "passes", "idempotence"}


def residual(ctx, point, target) -> torch.Tensor:
    return torch.linalg.vector_norm(ctx.manifold.phi_grad(point, target, ctx))


class StaysPut(Projector):
    """Returns the contact point it started from."""

    name = "stays-put"
    manifolds = ("offset",)

    def project(self, target, start, ctx):
        return ProjectionResult(point=start, centre=None, iterations=0, residual=residual(ctx, start, target))


class HalfWay(nonlocal_opt.get("projector", "gauss-newton")):
    """Moves half way from θ_t to the Gauss–Newton footpoint."""

    name = "half-way"

    def project(self, target, start, ctx):
        end = super().project(target, start, ctx).point
        point = ctx.evaluate((start.theta + end.theta) / 2)
        return ProjectionResult(point=point, centre=None, iterations=1, residual=residual(ctx, point, target))


Footpoint = nonlocal_opt.get("projector", "footpoint")


class TwoSteps(Footpoint):
    """The paper's solver with a default budget of K = 2: it converges when run to tolerance, not at its defaults."""

    name = "two-steps"
    hyperparameters = {**Footpoint.hyperparameters, "max_iters": Hyperparameter(2, "K", "iterations", positive_int)}


@pytest.mark.parametrize(
    ("broken", "failing"),
    [(StaysPut(), {"accuracy", "contact"}), (HalfWay(), {"accuracy", "convergence", "contact"}), (TwoSteps(), {"accuracy", "contact"})],
    ids=lambda value: getattr(value, "name", ""),
)
def test_broken_projectors_fail_the_kit_at_their_default_budget(broken, failing):
    report = check_projector(broken, cases=DEFAULT_CASES[:3], run_cases=RUN_CASES[:1], steps=50, raise_on_failure=False)
    assert {check.name for check in report.failures} == failing  # two-steps passes "convergence": K = 500 reaches θ*
    with pytest.raises(AssertionError, match="FAIL accuracy"):
        check_projector(broken, cases=DEFAULT_CASES[:1], run_cases=())


@pytest.mark.parametrize("projector", PROJECTORS)
def test_trainer_steps_the_projector_like_a_plain_loop(projector, tmp_path):
    """``train`` on ``landscape:sine`` (every sample's loss is f(θ)) = the same optimizer stepped by hand."""
    config = TrainConfig(dataset="landscape:sine", optimizer="rbo", projector=projector, lr=0.05, rho=0.2, batch_size=64,
                         limit_train_batches=5, limit_val_batches=1, logdir=str(tmp_path))
    result = train(config)
    steps = [row for row in read_metrics(tmp_path / "metrics.csv") if row["scope"] == "step"]
    landscape = LANDSCAPES["sine"]()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector=projector, **optimizer_hyperparameters(config))
    losses, passes = [], []
    for _ in range(5):
        losses.append(opt.step(make_closure(opt, landscape)).item())
        passes.append(opt.stats["grad_evals"])
    torch.testing.assert_close(result.model.landscape.theta.detach(), landscape.theta.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor([float(row["train/loss"]) for row in steps]), torch.tensor(losses))
    assert [float(row["grad_evals"]) for row in steps] == passes
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))  # descends on sin θ from θ = 0


def value_and_grad(loss_fn, params):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def test_first_gauss_newton_iterate_is_the_sgd_step(mlp_problem):
    model, loss_fn = mlp_problem
    params = list(model.parameters())
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    _, g = value_and_grad(loss_fn, params)
    opt = nonlocal_opt.compose(params, "rbo", projector="gauss-newton", lr=0.3, rho=0.7, max_iters=1, rtol=None)
    opt.step(make_closure(opt, loss_fn))
    theta1 = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(theta1, theta0 - 0.3 * g, rtol=1e-5, atol=1e-6)
    assert opt.stats["grad_evals"] == 2


def test_finite_difference_hvp_matches_the_exact_hessian():
    from nonlocal_opt_projectors.newton_cg import finite_difference_hvp

    landscape = Quadratic(eigenvalues=[0.5, 2.0, 3.0], seed=1).double()
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector="newton")
    ctx = opt.step_context(make_closure(opt, landscape))
    with torch.no_grad():
        point = ctx.evaluate(extra=False)
        v = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
        hv = finite_difference_hvp(point, v, ctx)
    torch.testing.assert_close(hv, landscape.hessian @ v, rtol=1e-6, atol=1e-7)
    assert ctx.grad_evals == 2


def test_tangent_moves_the_centre_by_the_projected_update():
    """Two RBO steps with ``tangent`` against eqs. (10)–(12) written here: ``u = c_t − p_t``."""
    landscape = Sine([0.9, -0.4], dim=2).double()
    eta, rho = 0.2, 0.5
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector="tangent", lr=eta, rho=rho, record_projection=True)
    closure = make_closure(opt, landscape)
    theta = landscape.theta.detach().clone()
    f, g = value_and_grad(landscape, [landscape.theta])
    centre = torch.cat([theta - rho * g / torch.sqrt(1 + g @ g), (f + rho / torch.sqrt(1 + g @ g)).reshape(1)])
    for _ in range(2):
        f, g = value_and_grad(landscape, [landscape.theta])
        delta = -eta * torch.cat([g, (g @ g).reshape(1)])
        u = centre - torch.cat([theta, f.reshape(1)])
        delta = delta - (u @ delta) / (u @ u) * u
        centre, theta = centre + delta, theta + delta[:2]
        opt.step(closure)
        carried = opt.last_projection.result.centre
        torch.testing.assert_close(torch.cat([carried.theta, carried.height.reshape(1)]), centre)
        torch.testing.assert_close(landscape.theta.detach(), theta)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_batchnorm_running_stats_see_one_forward_pass(projector):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector=projector, lr=0.5, rho=0.5)
    opt.step(make_closure(opt, lambda: torch.nn.functional.cross_entropy(model(x), y)))
    assert opt.stats["grad_evals"] > 1
    twin(x)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(model.state_dict()[key], twin.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("projector", [n for n in PROJECTORS if n != "footpoint"])
def test_paper_setting_stays_finite(projector, mlp_problem):
    """ρ = 1, η = 6 on a small MLP: the safeguarded projectors never step to a non-finite point."""
    model, loss_fn = mlp_problem
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector=projector, lr=6.0, rho=1.0)
    closure = make_closure(opt, loss_fn)
    for _ in range(10):
        opt.step(closure)
        assert torch.isfinite(torch.tensor(opt.stats["proj_residual"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("projector", PROJECTORS)
def test_step_does_not_synchronise_on_cuda(projector):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda()
    x, y = torch.randn(32, 6, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector=projector, lr=0.5, rho=0.5)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gain_ratio_damping_follows_nielsen():
    """``μ ← μ·max(1/3, 1 − (2ϱ − 1)³)``, ``ν ← 2`` on acceptance; ``μ ← max(νμ, 1)``, ``ν ← 2ν`` on rejection."""
    from nonlocal_opt_projectors.safeguarded import gain_ratio_damping

    mu, nu = torch.tensor(0.6), torch.tensor(8.0)
    for ratio in (0.05, 0.5, 0.9, 3.0):
        damping, factor = gain_ratio_damping(torch.tensor(True), torch.tensor(ratio * 0.2), torch.tensor(0.2), mu, nu)
        torch.testing.assert_close(damping, mu * max(1 / 3, 1 - (2 * ratio - 1) ** 3))
        assert float(factor) == 2.0
    damping, factor = gain_ratio_damping(torch.tensor(False), torch.tensor(-1.0), torch.tensor(0.2), mu, nu)
    assert (float(damping), float(factor)) == pytest.approx((4.8, 16.0))
    damping, _ = gain_ratio_damping(torch.tensor(False), torch.tensor(-1.0), torch.tensor(0.2), torch.tensor(0.0), nu)
    assert float(damping) == 1.0  # the undamped μ = 0 can grow
    damping, _ = gain_ratio_damping(torch.tensor(True), torch.tensor(0.1), torch.tensor(-1.0), mu, nu)
    torch.testing.assert_close(damping, 2 * mu)  # a non-positive prediction counts as ϱ = 0


SAFEGUARDED = [n for n in PROJECTORS if getattr(nonlocal_opt.get("projector", n), "safeguarded", False)]


@pytest.mark.parametrize("projector", SAFEGUARDED)
def test_phi_never_increases_along_the_iterations(projector, mlp_problem):
    """``K = 1, 2, …, 12`` iterations of the same deterministic run: ``φ`` at the returned point never rises
    (beyond the documented 8-ulp rounding allowance), at the paper's ρ = 1, η = 6 where many trials are rejected."""
    model, loss_fn = mlp_problem
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    no_early_stop = {key: None for key in ("tol", "rtol") if key in nonlocal_opt.get("projector", projector).hyperparameters}
    values = []
    for k in range(1, 13):
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        opt = nonlocal_opt.compose(params, "rbo", projector=projector, lr=6.0, rho=1.0, max_iters=k, **no_early_stop)
        ctx = opt.step_context(make_closure(opt, loss_fn))
        with torch.no_grad():
            start = ctx.evaluate(extra=False)
            centre = ctx.manifold.centre(start, ctx)
            target = opt.rule.propose(centre, start, ctx.per_coordinate("lr"), ctx)
            result = ctx.project(target, start, centre=centre)
        values.append(float(0.5 * ((result.point.theta - target.theta).square().sum() + (result.point.loss - target.height) ** 2)))
    ulps = 8 * torch.finfo(torch.float32).eps
    assert all(later <= earlier * (1 + ulps) for earlier, later in itertools.pairwise(values)), values
    assert values[-1] < values[0]


def test_choose_branches_on_the_host_and_selects_on_devices_identically():
    """``choose`` keeps ``old`` for a rejected (possibly non-finite) ``new``: the CPU branch and the
    ``torch.where`` path used off the CPU give the same tensors."""
    from nonlocal_opt_projectors.safeguarded import choose

    new = (torch.tensor([1.0, float("nan")]), torch.tensor(float("inf")))
    old = (torch.tensor([3.0, 4.0]), torch.tensor(5.0))
    for flag in (torch.tensor(True), torch.tensor(False)):
        expected = new if flag else old
        for on_host in (True, False):
            for got, want in zip(choose(flag, new, old, on_host), expected):
                torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_device_path_reads_nothing_on_the_host_and_matches_the_cpu_path(projector):
    """The path a GPU takes (0-d tensor scalars, ``torch.where`` choices) run on the CPU with every host
    read raising: no read happens, and five float64 steps end where the CPU path (Python scalars and branches) ends."""
    assert check_device_path(projector) <= 1e-9


def test_host_scalars_past_the_dtype_range_overflow_like_tensors():
    """A float64 step coefficient beyond float32's range gives ±inf coordinates (rejected by the safeguard), not an error."""
    from nonlocal_opt_projectors.scalars import axpy_

    x, y = torch.zeros(3), torch.tensor([1.0, -1.0, 0.0])
    axpy_(x, 1e39, y)
    assert x[0] == float("inf") and x[1] == float("-inf") and torch.isnan(x[2])
    assert torch.equal(axpy_(torch.zeros(3), torch.tensor(1e39).float(), y)[:2], x[:2])
