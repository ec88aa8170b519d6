"""The closure contract (issue 27): passes never add up, whether the closure zeroes the gradients or the
caller zeroed once before ``step``; a closure that returns anything but the loss as a scalar, or leaves no
gradient, is refused naming the closure; host accumulation stays refused (``HostGradientError``)."""

from __future__ import annotations

import pytest
import torch
from rule_cases import RULES, compose, flat, loss_of, problem

from nonlocal_opt import ClosureError, HostGradientError

MULTI_PASS = sorted(set(RULES) - {"local"})


@pytest.fixture(params=sorted(RULES))
def rule(request):
    return request.param


def run(rule, closure_of, steps=3, zero_before_step=True, **hyperparameters):
    """Parameters after ``steps`` steps with the closure ``closure_of(opt, model, x, y)``."""
    model, x, y = problem()
    opt = compose(model, rule, **hyperparameters)
    for _ in range(steps):
        if zero_before_step:
            opt.zero_grad()
        opt.step(closure_of(opt, model, x, y))
    return flat(model)


ZEROING = {
    "opt-zero-grad": lambda opt, model: opt.zero_grad(),
    "no-zero-grad": lambda opt, model: None,  # the caller zeroed once before ``step``, as for a plain torch optimizer
    "model-zero-grad-in-place": lambda opt, model: model.zero_grad(set_to_none=False),
}


def zeroing(how):
    """A closure factory whose closure zeroes the gradients as ``ZEROING[how]`` does."""

    def closure_of(opt, model, x, y):
        def closure():
            ZEROING[how](opt, model)
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        return closure

    return closure_of


@pytest.mark.parametrize("how", ["no-zero-grad", "model-zero-grad-in-place"])
def test_passes_never_add_up_whoever_zeroes(rule, how):
    assert torch.equal(run(rule, zeroing(how)), run(rule, zeroing("opt-zero-grad")))


@pytest.mark.parametrize(
    ("returned", "described"),
    [(lambda loss: None, "returned None"), (lambda loss: loss.expand(3), r"returned a tensor of shape \(3,\) \(torch.float64\)"),
     (lambda loss: "0.5", "returned a str"), (lambda loss: (loss, 1), "returned a tuple")],
    ids=["none", "vector", "str", "tuple"],
)
def test_a_closure_returning_no_scalar_loss_is_refused_before_anything_changes(rule, returned, described):
    model, x, y = problem()
    opt = compose(model, rule)
    before = flat(model)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return returned(loss)

    with pytest.raises(ClosureError, match=rf"the closure of rule '{rule}' {described}; it must return the loss as a scalar tensor"):
        opt.step(closure)
    assert torch.equal(flat(model), before)
    assert not opt.state_dict()["base_state"]


@pytest.mark.parametrize(
    "returned",
    [lambda loss: loss.detach().reshape(1), lambda loss: float(loss.detach()), lambda loss: loss * float("nan")],
    ids=["one-element", "float", "nan"],
)
def test_a_scalar_loss_in_any_form_is_taken(rule, returned):
    model, x, y = problem()
    opt = compose(model, rule)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return returned(loss)

    opt.step(closure)
    assert opt.stats["grad_evals"] >= 1


def test_a_closure_that_never_calls_backward_is_refused(rule):
    model, x, y = problem()
    opt = compose(model, rule)
    before = flat(model)

    def closure():
        opt.zero_grad()
        return loss_of(model, x, y)

    with pytest.raises(ClosureError, match=rf"the closure of rule '{rule}' left no gradient in p.grad: it must call loss.backward"):
        opt.step(closure)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("rule", MULTI_PASS)
def test_a_closure_that_stops_calling_backward_after_the_first_pass_is_refused(rule):
    """Without the clearing, the first pass's gradients would pass for the second's."""
    model, x, y = problem()
    opt = compose(model, rule)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, x, y)
        if len(calls) == 1:
            loss.backward()
        return loss.detach()

    opt.zero_grad()
    with pytest.raises(ClosureError, match="left no gradient"):
        opt.step(closure)


@pytest.mark.parametrize("rule", MULTI_PASS)
def test_host_accumulation_stays_refused(rule):
    """Gradients the host left in ``p.grad`` (accumulation over micro-batches) with a closure that adds to them."""
    model, x, y = problem()
    opt = compose(model, rule)
    loss_of(model, x, y).backward()
    with pytest.raises(HostGradientError, match="gradient accumulation by the host"):
        opt.step(zeroing("no-zero-grad")(opt, model, x, y))


def test_accumulation_inside_one_closure_is_kept(rule):
    """Two half-batches summed by two backward calls in one closure: one pass, one gradient."""

    def halves(opt, model, x, y):
        def closure():
            opt.zero_grad()
            total = 0.0
            for part in (slice(0, 16), slice(16, 32)):
                loss = loss_of(model, x[part], y[part]) / 2
                loss.backward()
                total = total + loss.detach()
            return total

        return closure

    torch.testing.assert_close(run(rule, halves), run(rule, zeroing("opt-zero-grad")), rtol=1e-12, atol=1e-12)
