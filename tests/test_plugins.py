"""The pluggy plugin system: runtime registration (rules, manifolds, projectors, bases), real entry points,
blocking, duplicates."""

from __future__ import annotations

import contextlib
import textwrap
import warnings

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import Centre, ConstraintManifold, Hyperparameter
from nonlocal_opt.landscapes import Quadratic
from nonlocal_opt.optim.hyperparameters import positive
from nonlocal_opt.plugins.failures import BrokenPlugin, PluginWarning
from nonlocal_opt.plugins.manager import DISABLE_ENV_VAR, get_plugin_manager
from nonlocal_opt.plugins.registry import broken_plugins
from nonlocal_opt.testing import DEFAULT_CASES, RUN_CASES, check_projector, check_rule, nearest_point

from conftest import PlainSGD, make_closure


@contextlib.contextmanager
def registered(plugin, name):
    """``plugin`` registered under ``name`` with the plugin manager for the block."""
    manager = get_plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(plugin)

RollingBall = nonlocal_opt.get("rule", "rbo")


class HalfStepRBO(RollingBall):
    """A subclass of a registered class with a new name is a plugin of its own: the centre moves ``η/2``."""

    name = "half-step-rbo"

    def propose(self, centre, point, eta, ctx):
        return super().propose(centre, point, eta / 2, ctx)


class RuntimePlugin:
    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_descent_rules(self, register):
        register(HalfStepRBO)


def test_builtin_names():
    assert {"local", "rbo", "sam", "entropy-sgd"} <= set(nonlocal_opt.available("rule"))
    assert {"footpoint", "gauss-newton", "newton", "lbfgs", "tangent"} <= set(nonlocal_opt.available("projector"))
    assert {"offset"} <= set(nonlocal_opt.available("manifold"))
    assert {"sgd", "adam", "adamw"} <= set(nonlocal_opt.available("base"))
    assert nonlocal_opt.get("base", "adamw") is torch.optim.AdamW
    for kind in ("rule", "projector", "manifold", "base"):
        assert nonlocal_opt.available(kind) == sorted(nonlocal_opt.available(kind))


def test_builtins_come_from_this_distribution_entry_points():
    regs = nonlocal_opt.registrations("rule")
    assert regs["rbo"].distribution == "nonlocal-opt"
    assert regs["rbo"].plugin == "rolling_ball"
    assert nonlocal_opt.registrations("base")["sgd"].plugin == "torch"  # the core registers torch.optim's bases itself


def test_runtime_registered_plugin_works_in_compose():
    with registered(RuntimePlugin(), "runtime-test"):
        assert "half-step-rbo" in nonlocal_opt.available("rule")
        assert nonlocal_opt.get("rule", "half-step-rbo") is HalfStepRBO
        land = Quadratic([1.0, 2.0], eigenvalues=[1.0, 2.0]).double()
        opt = nonlocal_opt.compose(land.parameters(), "half-step-rbo", lr=0.2, rho=0.5)
        assert opt.projector.name == "footpoint" and opt.manifold.name == "offset"
        twin = Quadratic([1.0, 2.0], eigenvalues=[1.0, 2.0]).double()
        rbo = nonlocal_opt.compose(twin.parameters(), "rbo", lr=0.1, rho=0.5)
        before = land().item()
        for _ in range(5):
            opt.step(make_closure(opt, land))
            rbo.step(make_closure(rbo, twin))
        assert land().item() < before
        # Its move c̃ = c − (η/2)τ is RBO's at η/2, and over plain SGD the base lands on the projection θ_{t+1}.
        torch.testing.assert_close(land.theta.detach(), twin.theta.detach(), rtol=0, atol=1e-12)
    assert "half-step-rbo" not in nonlocal_opt.available("rule")


class HangingOffset(ConstraintManifold):
    """The ball hangs under the graph: ``c(p) = p − ρν(p)``, ``ν = (−g, 1)/sqrt(1 + ‖g‖²)`` (the mirror image
    of ``offset``); ``φ(θ) = ½‖θ − θ̃‖² + ½(f(θ) − ỹ)²``, ``∇φ = (θ − θ̃) + (f(θ) − ỹ) g``, written from scratch."""

    name = "hanging-offset"
    hyperparameters = {"rho": Hyperparameter(1.0, "ρ", "radius of the ball", positive)}

    def centre(self, point, ctx):
        norm = torch.sqrt(1 + point.grad.dot(point.grad))
        rho = ctx.hp("rho")
        return Centre(theta=point.theta + rho * point.grad / norm, height=point.loss - rho / norm)

    def phi(self, point, target, ctx):
        return 0.5 * ((point.theta - target.theta).square().sum() + (point.loss - target.height).square())

    def phi_grad(self, point, target, ctx, *, out=None, offset=None, work=None):
        grad = (point.theta - target.theta if offset is None else offset) + (point.loss - target.height) * point.grad
        return grad if out is None else out.copy_(grad)

    def offset_error(self, centre, point, ctx):
        gap = torch.sqrt((centre.theta - point.theta).square().sum() + (centre.height - point.loss).square())
        return (gap - ctx.hp("rho")).abs() / ctx.hp("rho")


class HangingRBO(RollingBall):
    name = "hanging-rbo"
    default_manifold = "hanging-offset"
    default_projector = "hanging-footpoint"
    manifolds = ("hanging-offset",)


class HangingFootpoint(nonlocal_opt.get("projector", "footpoint")):
    name = "hanging-footpoint"
    manifolds = ("hanging-offset",)


class ManifoldPlugin:
    """One plugin object implementing all three hooks: a new manifold plus a rule and a projector for it."""

    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_manifolds(self, register):
        register(HangingOffset)

    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_descent_rules(self, register):
        register(HangingRBO)

    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_projectors(self, register):
        register(HangingFootpoint)


def rbo_step_to_tolerance(rule: str, projector: str) -> torch.Tensor:
    """θ after one RBO step from θ_t = 1.2 on f(θ) = θ² (η = 0.3, ρ = 0.5), projection run to 1e-12."""
    land = Quadratic([1.2], eigenvalues=[2.0]).double()
    opt = nonlocal_opt.compose(land.parameters(), rule, projector=projector, lr=0.3, rho=0.5, max_iters=500, tol=1e-12)
    opt.step(make_closure(opt, land))
    return land.theta.detach().clone()


def test_runtime_manifold_plugin_sets_where_the_ball_goes():
    with registered(ManifoldPlugin(), "manifold-test"):
        assert nonlocal_opt.registrations("manifold")["hanging-offset"].plugin == "manifold-test"
        land = Quadratic([1.2], eigenvalues=[2.0]).double()
        opt = nonlocal_opt.compose(land.parameters(), "hanging-rbo")
        assert isinstance(opt.manifold, HangingOffset) and isinstance(opt.projector, HangingFootpoint)
        with pytest.raises(ValueError, match="'rbo' does not work on manifold 'hanging-offset'"):
            nonlocal_opt.compose(land.parameters(), "rbo", manifold="hanging-offset")
        hanging = rbo_step_to_tolerance("hanging-rbo", "hanging-footpoint")
        # The contract kit finds the rule for the projector's manifold by itself (hanging-rbo, not rbo).
        report = check_projector("hanging-footpoint", cases=DEFAULT_CASES[:2], run_cases=RUN_CASES[:1], steps=50)
        assert "under rule 'hanging-rbo'" in report.subject and report.worst("convergence") <= 1e-6
    assert "hanging-offset" not in nonlocal_opt.available("manifold")
    # Independently: c = p − ρν with ν = (−f', 1)/N, moved by −η(f', f'²), then the nearest point of Γ.
    theta, rho, eta = 1.2, 0.5, 0.3
    f, g = theta**2, 2 * theta
    n = (1 + g * g) ** 0.5
    target = Centre(theta=torch.tensor([theta + rho * g / n - eta * g], dtype=torch.float64),
                    height=torch.tensor(f - rho / n - eta * g * g, dtype=torch.float64))
    expected = nearest_point(lambda t: t.square().sum(-1), target, radius=3.0)
    assert expected.unique
    torch.testing.assert_close(hanging, expected.theta, rtol=0, atol=1e-8)
    above = rbo_step_to_tolerance("rbo", "footpoint")
    assert (above - hanging).abs().item() > 1e-2  # the manifold, not only the rule, decided the step


class BasePlugin:
    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_bases(self, register):
        register(PlainSGD, name="plain-sgd")


def test_runtime_base_plugin_composes_by_name_and_passes_the_rule_kit():
    with registered(BasePlugin(), "base-test"):
        assert nonlocal_opt.registrations("base")["plain-sgd"].plugin == "base-test"
        land = Quadratic([1.0, -2.0], eigenvalues=[1.0, 3.0]).double()
        theta, grad = land.theta.detach().clone(), land.hessian @ (land.theta.detach() - land.minimum)
        opt = nonlocal_opt.compose(land.parameters(), "local", base="plain-sgd", lr=0.25)
        opt.step(make_closure(opt, land))
        torch.testing.assert_close(land.theta.detach(), theta - 0.25 * grad, rtol=0, atol=1e-15)
        check_rule("sam", bases={"plain-sgd": ("plain-sgd", {"lr": 0.5})})
    assert "plain-sgd" not in nonlocal_opt.available("base")


def test_duplicate_name_names_both_providers():
    class Clash(RollingBall):
        pass  # inherits name "rbo"

    class ClashPlugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_descent_rules(self, register):
            register(Clash)

    with registered(ClashPlugin(), "clash-test"), pytest.raises(ValueError, match=r"duplicate rule name 'rbo'.*rolling_ball.*clash-test"):
        nonlocal_opt.available("rule")


def test_registering_a_non_projector_breaks_only_that_plugin(fresh_plugins):
    class BadPlugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_projectors(self, register):
            register(HangingFootpoint)
            register(int)

    reason = "registered <class 'int'>, which is not a Projector subclass"
    with registered(BadPlugin(), "bad-test"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            projectors = nonlocal_opt.available("projector")
            assert nonlocal_opt.available("projector") == projectors
        assert broken_plugins() == [BrokenPlugin("bad-test", reason)]
    assert broken_plugins() == []
    (warning,) = caught
    assert warning.category is PluginWarning
    assert str(warning.message).startswith(f"plugin 'bad-test' failed to load and is skipped: {reason} (")
    assert "footpoint" in projectors and "hanging-footpoint" not in projectors  # nothing of the broken plugin is kept


PLUGIN_MODULE = textwrap.dedent(
    '''
    import nonlocal_opt
    from nonlocal_opt import hookimpl

    class ScaledFootpoint(nonlocal_opt.get("projector", "footpoint")):
        name = "entry-point-footpoint"

    @hookimpl
    def nonlocal_opt_register_projectors(register):
        register(ScaledFootpoint)
    '''
)


@pytest.fixture
def installed_entry_point(install_distribution):
    """A real distribution on sys.path: module + .dist-info with entry_points.txt."""
    install_distribution("nlo-test-plugin", "1.2.3", {"nlo_test_plugin": PLUGIN_MODULE}, {"scaled": "nlo_test_plugin"})


def test_entry_point_plugin_is_discovered(installed_entry_point):
    reg = nonlocal_opt.registrations("projector")["entry-point-footpoint"]
    assert (reg.distribution, reg.version, reg.plugin) == ("nlo-test-plugin", "1.2.3", "scaled")
    land = Quadratic([1.0, 2.0], eigenvalues=[1.0, 2.0])
    opt = nonlocal_opt.compose(land.parameters(), "rbo", projector="entry-point-footpoint", lr=0.1, rho=0.5)
    opt.step(make_closure(opt, land))
    assert opt.stats["grad_evals"] == 21


def test_environment_variable_blocks_plugins(installed_entry_point, monkeypatch, fresh_plugins):
    from nonlocal_opt.plugins.manager import reset_plugin_manager

    monkeypatch.setenv(DISABLE_ENV_VAR, "scaled, rolling_ball")
    reset_plugin_manager()
    assert "entry-point-footpoint" not in nonlocal_opt.available("projector")
    assert "rbo" not in nonlocal_opt.available("rule")
    assert "offset" not in nonlocal_opt.available("manifold")
    assert "local" in nonlocal_opt.available("rule")
    with pytest.raises(ValueError, match=r"unknown rule 'rbo'; available: .*local"):
        nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(2))], "rbo")
