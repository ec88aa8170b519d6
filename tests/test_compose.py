"""compose(): names and instances, validation errors, param_groups, schedulers, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.landscapes import Quadratic

from conftest import make_closure


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rule="adamx"), r"unknown rule 'adamx'; available: .*local.*rbo.*; or a base optimizer run as it is: .*adamw"),
        (dict(rule="adamw", base="sgd"), r"'adamw' names a base optimizer run as it is, and base='sgd' names another"),
        (dict(rule="sam", base="adamz"), r"unknown base 'adamz'; available: .*adamw.*sgd"),
        (dict(rule="sam", base="adamw", momentum=0.9),
         r"unknown hyperparameter 'momentum' for compose\(rule='sam'\) over base torch.optim.adamw.AdamW; known: .*betas.*rho"),
        (dict(rule="entropy-sgd", base="rmsprop"),
         r"hyperparameter 'alpha' is declared by compose\(rule='entropy-sgd'\) and is also a keyword of the base"),
        (dict(rule="rbo", projector="magic"), r"unknown projector 'magic'; available: .*footpoint"),
        (dict(rule="rbo", manifold="sphere"), r"unknown manifold 'sphere'; available: .*offset"),
        (dict(rule="rbo", lr=-1.0), r"invalid base hyperparameters for torch.optim.sgd.SGD: Invalid learning rate: -1.0"),
        (dict(rule="rbo", lr=0.0), r"rule 'rbo' uses the base optimizer's lr as the step η of the centre and needs lr > 0"),
        (dict(rule="rbo", lr=torch.tensor(0.1)), r"rule 'rbo' uses the base .* got a tensor lr \(tensor\(0.1000\)\): pass lr as a float"),
        (dict(rule="rbo", rho=-0.5), r"invalid hyperparameter rho=-0.5"),
        (dict(rule="rbo", max_iters=0), r"invalid hyperparameter max_iters=0 .*integer >= 1"),
        (dict(rule="rbo", momentun=0.9), r"unknown hyperparameter 'momentun' .*known: .*lr.*momentum.*rho"),
        (dict(rule="local", nesterov=True), r"Nesterov momentum requires a momentum and zero dampening"),
        (dict(rule="local", projector="footpoint"), r"rule 'local' takes no projector"),
        (dict(rule="sam", manifold="offset"), r"rule 'sam' takes no manifold"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nonlocal_opt.compose(params(), **kwargs)


def test_an_optimizer_instance_as_base_is_a_type_error_naming_the_fix():
    with pytest.raises(TypeError, match=r"not an optimizer instance: pass base=SGD and its hyperparameters as keywords"):
        nonlocal_opt.compose(params(), "sam", base=torch.optim.SGD(params(), lr=0.1))


def test_bad_group_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match="invalid hyperparameter rho=0"):
        nonlocal_opt.compose([{"params": params(), "rho": 0}], "rbo")


def test_instances_instead_of_names():
    rule = nonlocal_opt.get("rule", "rbo")()
    projector = nonlocal_opt.get("projector", "footpoint")()
    opt = nonlocal_opt.compose(params(), rule=rule, projector=projector, lr=0.5)
    assert opt.rule is rule and opt.projector is projector and opt.manifold.name == "offset"
    assert isinstance(opt, torch.optim.Optimizer)


def test_step_without_closure_is_a_clear_error():
    opt = nonlocal_opt.compose(params(), "rbo")
    with pytest.raises(RuntimeError, match=r"needs?.*closure|opt.step\(closure\)"):
        opt.step()


def test_hyperparameters_live_in_param_groups_and_schedulers_drive_them():
    land = Quadratic([1.0, -1.0], eigenvalues=[1.0, 1.0])
    opt = nonlocal_opt.compose(land.parameters(), "rbo", lr=1.0, rho=2.0)
    group = opt.param_groups[0]
    assert (group["lr"], group["rho"], group["max_iters"], group["step_size"], group["momentum"]) == (1.0, 2.0, 20, 0.1, 0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step(make_closure(opt, land))
        scheduler.step()
    assert group["lr"] == pytest.approx(0.125)


def test_rho_set_in_param_groups_changes_the_centre():
    """Moving ρ in param_groups changes the step exactly as composing with that ρ does."""
    land_a = Quadratic([1.0, -1.0], eigenvalues=[0.5, 2.0]).double()
    land_b = copy.deepcopy(land_a)
    opt_a = nonlocal_opt.compose(land_a.parameters(), "rbo", lr=0.3, rho=1.0)
    opt_b = nonlocal_opt.compose(land_b.parameters(), "rbo", lr=0.3, rho=0.25)
    opt_a.param_groups[0]["rho"] = 0.25
    opt_a.step(make_closure(opt_a, land_a))
    opt_b.step(make_closure(opt_b, land_b))
    assert torch.equal(land_a.theta, land_b.theta)


def test_one_ball_hyperparameters_must_agree_across_groups():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = nonlocal_opt.compose([{"params": [a], "rho": 1.0}, {"params": [b], "rho": 2.0}], "rbo")
    with pytest.raises(ValueError, match="'rho' must be the same in every parameter group"):
        opt.step(make_closure(opt, lambda: (a**2).sum() + (b**2).sum()))


def test_per_group_learning_rates_scale_the_descent_per_coordinate():
    """Two groups with lr η₁, η₂: c̃ = (θ_c − η⊙g, y_c − Σ η_i g_i²), checked with max_iters=1 by hand."""
    torch.set_default_dtype(torch.float64)
    try:
        a, b = torch.nn.Parameter(torch.tensor([1.0, 0.5])), torch.nn.Parameter(torch.tensor([-0.7]))
        f = lambda: (a**2).sum() + 3 * (b**2).sum()  # noqa: E731
        opt = nonlocal_opt.compose([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}], "rbo", rho=0.5, max_iters=1, step_size=0.2)
        theta = torch.cat([a.detach(), b.detach()])
        g = torch.cat([2 * a.detach(), 6 * b.detach()])
        value = f().detach()
        eta = torch.tensor([0.1, 0.1, 0.02])
        n = torch.sqrt(1 + g @ g)
        target_theta = theta - 0.5 * g / n - eta * g
        target_height = value + 0.5 / n - (eta * g * g).sum()
        expected = theta - 0.2 * ((theta - target_theta) + (value - target_height) * g)
        opt.step(make_closure(opt, f))
        torch.testing.assert_close(torch.cat([a.detach(), b.detach()]), expected)
    finally:
        torch.set_default_dtype(torch.float32)


def _problem():
    """A fresh copy of the same tiny MLP and data (same seed every call)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(("rule", "settings"), [("rbo", dict(lr=0.5, rho=1.0, max_iters=5)), ("local", dict(lr=0.1, momentum=0.9))])
def test_state_dict_round_trip_continues_bit_identically(rule, settings):
    model, loss_fn = _problem()
    straight = nonlocal_opt.compose(model.parameters(), rule, **settings)
    for _ in range(10):
        straight.step(make_closure(straight, loss_fn))

    other, other_loss = _problem()
    first = nonlocal_opt.compose(other.parameters(), rule, **settings)
    for _ in range(5):
        first.step(make_closure(first, other_loss))
    saved = copy.deepcopy(first.state_dict())
    resumed = nonlocal_opt.compose(other.parameters(), rule)  # defaults: load_state_dict restores them
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == settings["lr"]
    for _ in range(5):
        resumed.step(make_closure(resumed, other_loss))
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_a_base_name_as_the_rule_is_that_base_run_as_it_is():
    """``compose(params, "adamw")`` steps exactly as ``torch.optim.AdamW`` with the same settings."""
    ours, theirs = Quadratic(), Quadratic()
    for landscape in (ours, theirs):
        landscape.theta.data.fill_(1.0)
    opt = nonlocal_opt.compose(ours.parameters(), "adamw", lr=0.1)
    reference = torch.optim.AdamW(theirs.parameters(), lr=0.1)
    assert opt.rule.runs_bare_base and isinstance(opt.base, torch.optim.AdamW)
    for _ in range(3):
        opt.step(make_closure(opt, ours))
        reference.zero_grad()
        theirs().backward()
        reference.step()
    torch.testing.assert_close(ours.theta.detach(), theirs.theta.detach(), rtol=0, atol=0)
    assert float(ours.theta) < 1.0  # it moved


def test_base_names_as_rules_refuse_ambiguity():
    """A name that is both a rule and a base, or two rules that each claim to run a bare base, is refused
    with the plugins named."""
    from nonlocal_opt.plugins.manager import get_plugin_manager

    class SGDRule(nonlocal_opt.get("rule", "local")):
        name = "sgd"

    class SecondBare(nonlocal_opt.get("rule", "local")):
        name = "second-bare"

    class Plugin:
        def __init__(self, cls):
            self.cls = cls

        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_descent_rules(self, register):
            register(self.cls)

    manager = get_plugin_manager()
    for cls, message in ((SGDRule, r"'sgd' is registered both as a rule \(by plugin 'clash'\) and as a base optimizer \(by "
                                   r"plugin 'torch'\)"),
                         (SecondBare, r"rules local, second-bare each declare runs_bare_base")):
        plugin = Plugin(cls)
        manager.register(plugin, name="clash")
        try:
            with pytest.raises(ValueError, match=message):
                nonlocal_opt.compose(params(), "sgd")
        finally:
            manager.unregister(plugin)
    assert nonlocal_opt.compose(params(), "sgd").rule.name == "local"
