"""Every registered rule against the rule contract kit ``nonlocal_opt.testing.check_rule`` — projecting
rules under every projector that projects onto their default manifold — and, for each check of the
kit, a rule (or base) broken in that one way that fails it."""

from __future__ import annotations

import sys

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import DescentRule
from nonlocal_opt.testing import check_rule

# γ₀ = 3e-3 scales Entropy-SGD's outer gradient γ(x − μ) to a crawl over 30 steps: the reference code's x − μ.
HYPERPARAMETERS = {"entropy-sgd": {"scale_outer_by_gamma": False}}
RULES = nonlocal_opt.available("rule")
POINT_RULES = [rule for rule in RULES if not nonlocal_opt.get("rule", rule).manifolds]
PROJECTING_RULES = [
    (rule, projector)
    for rule in RULES
    if nonlocal_opt.get("rule", rule).manifolds
    for projector in nonlocal_opt.available("projector")
    if nonlocal_opt.get("rule", rule).default_manifold in nonlocal_opt.get("projector", projector).manifolds
]


@pytest.mark.parametrize("rule", POINT_RULES)
def test_point_rule_contract(rule):
    assert check_rule(rule, hyperparameters=HYPERPARAMETERS.get(rule)).ok


@pytest.mark.parametrize(("rule", "projector"), PROJECTING_RULES)
def test_projecting_rule_contract(rule, projector):
    assert check_rule(rule, projector=projector, hyperparameters=HYPERPARAMETERS.get(rule)).ok


def failed(report) -> set[str]:
    return {check.name for check in report.failures}


class Gradient(DescentRule):
    """``g = ∇f(θ)`` to the base, like ``local``; the broken rules below change one thing each."""

    name = "gradient"
    requires_closure = True

    def direction(self, point, ctx):
        return point.grad

    def step(self, ctx):
        point = ctx.evaluate(extra=False)
        ctx.apply(self.direction(point, ctx), theta=point.theta, finite=torch.isfinite(point.loss))
        return point.loss


class Ascent(Gradient):
    def direction(self, point, ctx):
        return -point.grad


class NonFiniteAsZero(Gradient):
    """Replaces NaN gradients by 0 and steps anyway: SGD's momentum buffer still decays."""

    def step(self, ctx):
        point = ctx.evaluate(extra=False)
        ctx.apply(torch.nan_to_num(point.grad, nan=0.0))
        return point.loss


class DecayOnTheInstance(Gradient):
    """Keeps its step count on the rule object, not in ``ctx.state``: ``state_dict`` does not save it, and
    a skipped step counts."""

    steps = 0

    def direction(self, point, ctx):
        self.steps += 1
        return point.grad / self.steps


class SecondPassTracked(Gradient):
    """A SAM-like second pass declared as a first one (``extra=False``): BatchNorm statistics see it."""

    def direction(self, point, ctx):
        return ctx.evaluate(point.theta + 0.01 * point.grad, extra=False).grad


class UncountedPass(Gradient):
    """Runs the closure behind the context's back (taken from the frame of ``opt.step``): the pass is not
    counted, and BatchNorm statistics are not paused for it."""

    def direction(self, point, ctx):
        frame = sys._getframe(1)
        while "closure" not in frame.f_locals:
            frame = frame.f_back
        with torch.enable_grad():
            frame.f_locals["closure"]()
        return point.grad


class DetachedSGD(torch.optim.SGD):
    """An SGD that keeps private copies of its parameter groups: a scheduler on the composed optimizer does not reach it."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.param_groups = [dict(group) for group in self.param_groups]
        self.detached = True

    def __setattr__(self, name, value):
        if not (name == "param_groups" and getattr(self, "detached", False)):
            super().__setattr__(name, value)


def test_the_reference_rule_passes():
    assert check_rule(Gradient()).ok


@pytest.mark.parametrize(
    ("rule", "broken"),
    [
        (Ascent(), {"descent"}),
        (NonFiniteAsZero(), {"nonfinite"}),
        (DecayOnTheInstance(), {"state_dict", "nonfinite"}),
        (SecondPassTracked(), {"batchnorm"}),
        (UncountedPass(), {"passes", "batchnorm"}),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, DescentRule) else "",
)
def test_each_check_fails_for_a_rule_broken_its_way(rule, broken):
    assert failed(check_rule(rule, raise_on_failure=False)) == broken


def test_scheduler_check_fails_when_the_base_does_not_share_param_groups():
    report = check_rule(Gradient(), bases={"detached-sgd": (DetachedSGD, {"lr": 0.5})}, raise_on_failure=False)
    assert "scheduler" in failed(report)


def test_failure_raises_with_the_report():
    with pytest.raises(AssertionError, match=r"FAIL descent +base sgd"):
        check_rule(Ascent())
