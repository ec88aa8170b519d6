"""Non-finite values in the Python API (issue 27): NaN or infinite hyperparameters are refused where they
enter (compose, a parameter group, ``param_groups`` at step time) before anything changes; a base step
that writes non-finite parameters is skipped and counted, parameters and base state as they were; and a
skipped Entropy-SGD step draws no noise, on the device path too (no host read), its noise being a
function of the seed and the step counter."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from rule_cases import RULES, compose, flat, loss_of, problem, without_momentum

import nonlocal_opt
from nonlocal_opt.testing import NoHostReads
from nonlocal_opt_entropy_sgd.noise import standard_normal_, words_needed

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.fixture(params=sorted(RULES))
def rule(request):
    return request.param


def closure_for(opt, model, x, y, scale=1.0, bad=False):
    """A closure; ``bad=True`` returns a NaN loss (the step must be skipped)."""

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y, scale)
        loss.backward()
        return loss * float("nan") if bad else loss

    return closure


def snapshot(model, opt):
    return flat(model), copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, before):
    """Parameters, base state and the rule's state as they were (a refused first step may only start the
    rule's bookkeeping: its step counter at 0, its noise seed)."""
    params, state = before
    now = opt.state_dict()
    assert torch.equal(flat(model), params)
    torch.testing.assert_close(now["base_state"], state["base_state"], rtol=0, atol=0)
    kept = {i: {k: v for k, v in now["state"].get(i, {}).items() if k in s} for i, s in state["state"].items()}
    torch.testing.assert_close(kept, state["state"], rtol=0, atol=0)
    assert all(set(s) <= set(state["state"].get(i, {})) | {"step", "noise_seed"} for i, s in now["state"].items())
    assert now["param_groups"] == state["param_groups"]


@pytest.mark.parametrize("value", BAD, ids=str)
def test_compose_refuses_a_nonfinite_base_hyperparameter(rule, value):
    model, _, _ = problem()
    with pytest.raises(ValueError, match=r"hyperparameter lr=(nan|inf|-inf) of compose\(rule=.* is not finite"):
        compose(model, rule, lr=value)
    with pytest.raises(ValueError, match=r"hyperparameter momentum=.* is not finite"):
        compose(model, rule, momentum=value)


def test_compose_refuses_nonfinite_betas_and_groups(rule):
    model, _, _ = problem()
    with pytest.raises(ValueError, match=r"hyperparameter betas=\(0.9, nan\) .* is not finite"):
        nonlocal_opt.compose(model.parameters(), rule, base="adam", lr=0.1, betas=(0.9, float("nan")), **without_momentum(rule))
    first, _, second = model
    groups = [{"params": first.parameters()}, {"params": second.parameters(), "lr": float("inf")}]
    with pytest.raises(ValueError, match=r"hyperparameter lr=inf .* is not finite"):
        nonlocal_opt.compose(groups, rule, lr=0.1, **RULES[rule])
    opt = nonlocal_opt.compose(first.parameters(), rule, lr=0.1, **RULES[rule])
    with pytest.raises(ValueError, match=r"hyperparameter weight_decay=nan .* is not finite"):
        opt.add_param_group({"params": second.parameters(), "weight_decay": float("nan")})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("device_path", [False, True], ids=["host-path", "device-path"])
@pytest.mark.parametrize("key", ["lr", "momentum"])
@pytest.mark.parametrize("value", BAD, ids=str)
def test_a_nonfinite_value_set_in_param_groups_mid_run_is_refused_before_anything_changes(rule, key, value, device_path):
    model, x, y = problem()
    opt = compose(model, rule, device_path=device_path)
    closure = closure_for(opt, model, x, y)
    opt.step(closure)
    before = snapshot(model, opt)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"hyperparameter {key}=.* param_groups\[0\] is not finite"):
        opt.step(closure)
    opt.param_groups[0][key] = before[1]["param_groups"][0][key]
    assert_unchanged(model, opt, before)


def test_a_declared_hyperparameter_set_to_nan_mid_run_is_refused(rule):
    model, x, y = problem()
    opt = compose(model, rule)
    opt.param_groups[0]["max_grad_norm"] = float("nan")
    with pytest.raises(ValueError, match="max_grad_norm=nan"):
        opt.step(closure_for(opt, model, x, y))


@pytest.mark.parametrize("device_path", [False, True], ids=["host-path", "device-path"])
@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "later-step"])
def test_a_step_that_writes_nonfinite_parameters_is_skipped_and_counted(rule, device_path, warm_steps):
    """``lr`` at the largest float: finite, but θ − lr·g overflows. The step is skipped like a
    non-finite gradient, and training goes on as if it had never been taken."""
    (model, x, y), (twin, _, _) = problem(), problem()
    opt, twin_opt = compose(model, rule, device_path=device_path), compose(twin, rule, device_path=device_path)
    closure, twin_closure = closure_for(opt, model, x, y, scale=1e6), closure_for(twin_opt, twin, x, y, scale=1e6)
    for _ in range(warm_steps):
        opt.step(closure)
        twin_opt.step(twin_closure)
    before = snapshot(model, opt)
    opt.param_groups[0]["lr"] = torch.finfo(torch.float64).max
    with NoHostReads() if device_path and warm_steps else contextlib.nullcontext():  # a first step reads, to drop new state
        opt.step(closure)
    assert opt.stats["nonfinite"] == 1.0
    opt.param_groups[0]["lr"] = 0.1
    assert torch.isfinite(flat(model)).all()
    assert_unchanged(model, opt, before)
    with NoHostReads() if device_path and warm_steps else contextlib.nullcontext():
        opt.step(closure)
        twin_opt.step(twin_closure)
    assert opt.stats["nonfinite"] == 0.0
    assert torch.equal(flat(model), flat(twin))


@pytest.mark.parametrize("device_path", [False, True], ids=["host-path", "device-path"])
def test_a_skipped_entropy_sgd_step_draws_no_noise(device_path):
    """A run with a skipped step (a NaN loss) matches a run that never had it, step for step, on the device
    path without a host read."""
    (model, x, y), (twin, _, _) = problem(), problem()
    opt, twin_opt = compose(model, "entropy-sgd", device_path=device_path), compose(twin, "entropy-sgd", device_path=device_path)
    opt.step(closure_for(opt, model, x, y))
    twin_opt.step(closure_for(twin_opt, twin, x, y))
    with NoHostReads() if device_path else contextlib.nullcontext():
        opt.step(closure_for(opt, model, x, y, bad=True))
        for _ in range(3):
            opt.step(closure_for(opt, model, x, y))
            twin_opt.step(closure_for(twin_opt, twin, x, y))
            assert torch.equal(flat(model), flat(twin))
    assert opt.stats["nonfinite"] == 0.0


@pytest.mark.parametrize("n", [1, 2, 57, 40_001])
def test_the_noise_is_a_standard_normal_function_of_seed_and_position(n):
    out, words = torch.empty(n, dtype=torch.float64), torch.empty(2, words_needed(n), dtype=torch.int64)
    first = standard_normal_(out, 7, torch.tensor(3), words).clone()
    assert torch.equal(standard_normal_(torch.empty(n, dtype=torch.float64), 7, 3, words), first)
    torch.testing.assert_close(standard_normal_(torch.empty(n, dtype=torch.float32), 7, 3, words), first.float(), rtol=0, atol=1e-3)
    assert not torch.equal(standard_normal_(out, 7, 4, words), first)
    assert not torch.equal(standard_normal_(out, 8, 3, words), first)
    assert torch.isfinite(first).all()
    if n > 10_000:
        assert abs(float(first.mean())) < 0.02 and abs(float(first.std()) - 1) < 0.02
        assert abs(float((first**4).mean()) - 3) < 0.15  # Gaussian tails, not uniform ones (1.8)
