"""``load_state_dict`` checks where a state came from (issue 27): state of another rule, base, projector
or manifold, a plain ``torch.optim`` optimizer's, or another group layout is refused with a ``ValueError``
before anything changes; the optimizer's own state, also as saved before the composition was recorded,
loads and resumes bit for bit."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from rule_cases import RULES, compose, flat, loss_of, problem, without_momentum

import nonlocal_opt

PAIRS = list(itertools.permutations(sorted(RULES), 2))


@pytest.fixture(params=sorted(RULES))
def rule(request):
    return request.param


def trained(rule, steps=2, **hyperparameters):
    """``(model, opt, closure)`` after ``steps`` steps."""
    model, x, y = problem()
    opt = compose(model, rule, **hyperparameters)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model, opt, closure


def assert_refused(opt, model, foreign, message):
    params, state = flat(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(foreign)
    assert torch.equal(flat(model), params)
    after = opt.state_dict()
    assert after.pop("param_groups") == state.pop("param_groups")  # strings among them (refresh='every')
    torch.testing.assert_close(after, state, rtol=0, atol=0)
    assert opt.base.param_groups is opt.param_groups


@pytest.mark.parametrize(("rule", "other"), PAIRS)
def test_state_of_another_rule_is_refused(rule, other):
    model, opt, _ = trained(rule)
    assert_refused(opt, model, trained(other)[1].state_dict(), rf"saved by another composition: rule '{other}' \(here '{rule}'\)")


def test_state_over_another_base_is_refused(rule):
    model, opt, _ = trained(rule)
    foreign = nonlocal_opt.compose(problem()[0].parameters(), rule, base="adamw", lr=0.1, **without_momentum(rule))
    assert_refused(opt, model, foreign.state_dict(), r"base 'torch.optim.adamw.AdamW' \(here 'torch.optim.sgd.SGD'\)")


def test_state_of_another_projector_is_refused():
    model, opt, _ = trained("rbo")
    assert_refused(opt, model, trained("rbo", projector="gauss-newton")[1].state_dict(), r"projector 'gauss-newton' \(here 'footpoint'\)")


def test_state_of_a_plain_torch_optimizer_is_refused(rule):
    model, opt, _ = trained(rule)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.zero_grad()
    loss_of(model, *problem()[1:]).backward()
    plain.step()
    assert_refused(opt, model, plain.state_dict(), "not saved by a ComposedOptimizer")


def test_state_of_another_group_layout_is_refused(rule):
    model, opt, _ = trained(rule)
    other, _, _ = problem()
    layers = [m for m in other if isinstance(m, torch.nn.Linear)]
    groups = [{"params": layer.parameters()} for layer in layers]
    grouped = nonlocal_opt.compose(groups, rule, lr=0.1, **RULES[rule])
    assert_refused(opt, model, grouped.state_dict(), r"parameter groups of \[2, 2\] parameters, the optimizer \[4\]")


@pytest.mark.parametrize("foreign", [None, [1, 2], {"state": {}}], ids=["none", "list", "no-param-groups"])
def test_what_is_no_state_dict_is_refused(rule, foreign):
    model, opt, _ = trained(rule)
    assert_refused(opt, model, foreign, "load_state_dict needs what ComposedOptimizer.state_dict")


def test_own_state_saved_before_the_composition_was_recorded_still_resumes_bit_for_bit(rule):
    model, opt, closure = trained(rule)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    del saved["composition"]
    opt.step(closure)
    straight = flat(model)
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    opt.step(closure)
    assert torch.equal(flat(model), straight)


@pytest.mark.parametrize(("rule", "other"), PAIRS)
def test_older_state_of_another_rule_is_refused_by_its_hyperparameters(rule, other):
    model, opt, _ = trained(rule)
    foreign = trained(other)[1].state_dict()
    del foreign["composition"]
    assert_refused(opt, model, foreign, r"saved by another composition: its param_groups\[0\] (lacks|holds)")
