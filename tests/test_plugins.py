"""The pluggy plugin system: runtime registration, real entry points, blocking, duplicates."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.plugin_manager import DISABLE_ENV_VAR, get_plugin_manager
from nonlocal_opt.landscapes import Quadratic

from conftest import make_closure

RollingBall = nonlocal_opt.get("rule", "rbo")


class HalfStepRBO(RollingBall):
    """A subclass of a registered class with a new name is a plugin of its own."""

    name = "half-step-rbo"

    def propose(self, centre, point, ctx):
        return super().propose(centre, point, ctx)


class RuntimePlugin:
    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_descent_rules(self, register):
        register(HalfStepRBO)


def test_builtin_names():
    assert {"rbo", "sgd"} <= set(nonlocal_opt.available("rule"))
    assert {"footpoint", "none"} <= set(nonlocal_opt.available("projector"))
    assert {"offset", "euclidean"} <= set(nonlocal_opt.available("manifold"))
    assert nonlocal_opt.available("rule") == sorted(nonlocal_opt.available("rule"))


def test_builtins_come_from_this_distribution_entry_points():
    regs = nonlocal_opt.registrations("rule")
    assert regs["rbo"].distribution == "nonlocal-opt"
    assert regs["rbo"].plugin == "rolling_ball"


def test_runtime_registered_plugin_works_in_compose():
    manager = get_plugin_manager()
    plugin = RuntimePlugin()
    manager.register(plugin, name="runtime-test")
    try:
        assert "half-step-rbo" in nonlocal_opt.available("rule")
        assert nonlocal_opt.get("rule", "half-step-rbo") is HalfStepRBO
        land = Quadratic([1.0, 2.0], eigenvalues=[1.0, 2.0])
        opt = nonlocal_opt.compose(land.parameters(), "half-step-rbo", lr=0.1, rho=0.5)
        assert opt.projector.name == "footpoint" and opt.manifold.name == "offset"
        before = land().item()
        for _ in range(5):
            opt.step(make_closure(opt, land))
        assert land().item() < before
    finally:
        manager.unregister(plugin)
    assert "half-step-rbo" not in nonlocal_opt.available("rule")


def test_duplicate_name_names_both_providers():
    class Clash(RollingBall):
        pass  # inherits name "rbo"

    class ClashPlugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_descent_rules(self, register):
            register(Clash)

    manager = get_plugin_manager()
    plugin = ClashPlugin()
    manager.register(plugin, name="clash-test")
    try:
        with pytest.raises(ValueError, match=r"duplicate rule name 'rbo'.*rolling_ball.*clash-test"):
            nonlocal_opt.available("rule")
    finally:
        manager.unregister(plugin)


def test_registering_a_non_rule_is_refused():
    class BadPlugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_projectors(self, register):
            register(int)

    manager = get_plugin_manager()
    plugin = BadPlugin()
    manager.register(plugin, name="bad-test")
    try:
        with pytest.raises(TypeError, match="bad-test.*not a Projector"):
            nonlocal_opt.available("projector")
    finally:
        manager.unregister(plugin)


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
def installed_entry_point(tmp_path, fresh_plugins):
    """A real distribution on sys.path: module + .dist-info with entry_points.txt."""
    (tmp_path / "nlo_test_plugin.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "nlo_test_plugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nlo-test-plugin\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[nonlocal_opt]\nscaled = nlo_test_plugin\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nlo_test_plugin", None)
        importlib.invalidate_caches()


def test_entry_point_plugin_is_discovered(installed_entry_point):
    reg = nonlocal_opt.registrations("projector")["entry-point-footpoint"]
    assert (reg.distribution, reg.version, reg.plugin) == ("nlo-test-plugin", "1.2.3", "scaled")
    land = Quadratic([1.0, 2.0], eigenvalues=[1.0, 2.0])
    opt = nonlocal_opt.compose(land.parameters(), "rbo", "entry-point-footpoint", lr=0.1, rho=0.5)
    opt.step(make_closure(opt, land))
    assert opt.stats["grad_evals"] == 21


def test_environment_variable_blocks_plugins(installed_entry_point, monkeypatch, fresh_plugins):
    from nonlocal_opt.plugin_manager import reset_plugin_manager

    monkeypatch.setenv(DISABLE_ENV_VAR, "scaled, rolling_ball")
    reset_plugin_manager()
    assert "entry-point-footpoint" not in nonlocal_opt.available("projector")
    assert "rbo" not in nonlocal_opt.available("rule")
    assert "sgd" in nonlocal_opt.available("rule")
    with pytest.raises(ValueError, match="unknown rule 'rbo'; available: .*sgd"):
        nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(2))], "rbo")
