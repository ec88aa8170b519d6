"""The base-optimizer slot: SAM/ASAM over AdamW against an independent two-pass implementation, ρ = 0
is the base bit for bit, RBO and Entropy-SGD over momentum and Adam bases, schedulers, state round
trips, third-party bases by class and by plugin, the convenience constructors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.testing import NoHostReads

from conftest import PlainSGD, make_closure, sam_gradients


def _problem(dtype=torch.float64, seed=2):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    x, y = torch.randn(24, 5, dtype=dtype), torch.randint(0, 3, (24,))
    return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_sam_adamw(model, loss_of, steps, lr, rho, adaptive, betas, eps, weight_decay):
    """SAM / ASAM over AdamW from the formulas: ε = ρ T² g / (‖T g‖ + 1e-12) (one global norm),
    g_ε = ∇f(w + ε); then from w: w ← w(1 − ηλ), m ← β₁m + (1 − β₁)g_ε, v ← β₂v + (1 − β₂)g_ε²,
    w ← w − η (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + eps)."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        saved, grads = sam_gradients(model, loss_of, rho, adaptive)
        with torch.no_grad():
            for i, (p, w, g) in enumerate(zip(params, saved, grads)):
                w = w * (1 - lr * weight_decay)
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
                p.copy_(w - lr * m_hat / (v_hat.sqrt() + eps))


ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


@pytest.mark.parametrize("base", ["adamw", torch.optim.AdamW], ids=["by-name", "by-class"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_over_adamw_matches_an_independent_two_pass_implementation(base, adaptive):
    model, loss_of = _problem()
    twin, start = copy.deepcopy(model), _flat(model)
    rho = 0.5 if adaptive else 0.05
    opt = nonlocal_opt.compose(model.parameters(), "sam", base=base, rho=rho, adaptive=adaptive, **ADAMW)
    closure = make_closure(opt, lambda: loss_of(model))
    for _ in range(16):
        opt.step(closure)
    reference_sam_adamw(twin, loss_of, 16, rho=rho, adaptive=adaptive, **ADAMW)
    assert (_flat(model) - start).norm() > 1e-2
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=1e-10)


BASES = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3),
    "adamw": dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
}


@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_with_rho_zero_is_its_base_bit_for_bit(base):
    model, loss_of = _problem(torch.float32)
    twin = copy.deepcopy(model)
    sam = nonlocal_opt.compose(model.parameters(), "sam", base=base, rho=0.0, **BASES[base])
    plain = nonlocal_opt.get("base", base)(twin.parameters(), **BASES[base])
    for _ in range(10):
        sam.step(make_closure(sam, lambda: loss_of(model)))
        plain.step(make_closure(plain, lambda: loss_of(twin)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_scheduler_on_the_composed_optimizer_drives_the_base():
    model, loss_of = _problem(torch.float32)
    twin = copy.deepcopy(model)
    sam = nonlocal_opt.SAM(model.parameters(), base=torch.optim.AdamW, rho=0.0, **ADAMW)
    plain = torch.optim.AdamW(twin.parameters(), **ADAMW)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (sam, plain)]
    for _ in range(6):
        sam.step(make_closure(sam, lambda: loss_of(model)))
        plain.step(make_closure(plain, lambda: loss_of(twin)))
        for scheduler in schedulers:
            scheduler.step()
    assert sam.base.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize(("base", "settings"), [("sgd", dict(momentum=0.9)), ("adam", {}), ("adamw", dict(weight_decay=0.1))])
def test_rbo_gauss_newton_with_one_iteration_is_its_base(base, settings):
    """From ``p_t`` the first Gauss–Newton iterate is ``θ_t − η g`` (docs/math.md §3), so the pseudo-gradient
    ``ĝ = (θ_t − θ_{t+1})/η`` is ``g``: RBO-GN with K = 1 over any base is that base, up to rounding."""
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    lr = 0.05 if base == "sgd" else 1e-2
    rbo = nonlocal_opt.RBO(
        model.parameters(), base=base, projector="gauss-newton", lr=lr, rho=0.5, max_iters=1, rtol=None, **settings
    )
    plain = nonlocal_opt.get("base", base)(twin.parameters(), lr=lr, **settings)
    for _ in range(10):
        rbo.step(make_closure(rbo, lambda: loss_of(model)))
        plain.step(make_closure(plain, lambda: loss_of(twin)))
        assert rbo.stats["proj_iters"] == 1.0 and rbo.stats["nonfinite"] == 0.0
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=1e-9)


ENTROPY = dict(inner_steps=3, noise=0.0, scale_outer_by_gamma=False)
OVER = [("sgd", "sgd", dict(lr=0.1)), ("sgd-m", "sgd", dict(lr=0.1, momentum=0.9)), ("adam", "adam", dict(lr=1e-2))]


@pytest.mark.parametrize(("rule", "extra"), [("rbo", dict(rho=0.5)), ("entropy-sgd", ENTROPY)])
def test_rules_run_over_sgd_momentum_and_adam_and_momentum_matters(rule, extra):
    finals = {}
    for label, base, settings in OVER:
        model, loss_of = _problem()
        start = loss_of(model).item()
        opt = nonlocal_opt.compose(model.parameters(), rule, base=base, **settings, **extra)
        for _ in range(12):
            opt.step(make_closure(opt, lambda model=model, loss_of=loss_of: loss_of(model)))
            assert opt.stats["nonfinite"] == 0.0
        assert loss_of(model).item() < start
        finals[label] = _flat(model)
    assert (finals["sgd"] - finals["sgd-m"]).abs().max() > 1e-3
    assert (finals["sgd"] - finals["adam"]).abs().max() > 1e-3


@pytest.mark.parametrize(("rule", "extra"), [("sam", {}), ("rbo", dict(rho=0.5)), ("entropy-sgd", dict(inner_steps=2, seed=1))])
def test_state_dict_holds_the_base_state_and_round_trips(rule, extra):
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), rule, base="adam", lr=1e-2, **extra)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    saved = copy.deepcopy(opt.state_dict())
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["base_state"][0])
    resumed_model = copy.deepcopy(model)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    resumed = nonlocal_opt.compose(resumed_model.parameters(), rule, base="adam", **extra)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.base.param_groups is resumed.param_groups
    for _ in range(3):
        resumed.step(make_closure(resumed, lambda: loss_of(resumed_model)))
    assert torch.equal(_flat(model), _flat(resumed_model))


def test_a_nonfinite_step_leaves_parameters_and_adam_state_alone():
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "local", base="adam", lr=1e-2)
    for _ in range(2):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    params, state = _flat(model), copy.deepcopy(opt.base.state_dict()["state"])
    opt.step(make_closure(opt, lambda: loss_of(model) * torch.nan))
    assert opt.stats["nonfinite"] == 1.0 and torch.equal(_flat(model), params)
    after = opt.base.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, s in state.items() for k, v in s.items())


def test_a_third_party_base_by_class():
    """SAM over a third party's ``θ ← θ − η g`` is SAM over ``torch.optim.SGD`` (the same update)."""
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    ours = nonlocal_opt.compose(model.parameters(), "sam", base=PlainSGD, lr=0.01, rho=0.1)
    torchs = nonlocal_opt.compose(twin.parameters(), "sam", base="sgd", lr=0.01, rho=0.1)
    for _ in range(5):
        ours.step(make_closure(ours, lambda: loss_of(model)))
        torchs.step(make_closure(torchs, lambda: loss_of(twin)))
    assert torch.equal(_flat(model), _flat(twin))
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'momentum' .*PlainSGD; known: .*lr.*rho"):
        nonlocal_opt.compose(twin.parameters(), "sam", base=PlainSGD, momentum=0.9)


def test_convenience_constructors_are_composed_optimizer_classes():
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    ours = nonlocal_opt.SAM(model.parameters(), base=torch.optim.AdamW, rho=0.05, **ADAMW)
    composed = nonlocal_opt.compose(twin.parameters(), "sam", base="adamw", rho=0.05, **ADAMW)
    for _ in range(3):
        ours.step(make_closure(ours, lambda: loss_of(model)))
        composed.step(make_closure(composed, lambda: loss_of(twin)))
    assert torch.equal(_flat(model), _flat(twin))
    assert isinstance(ours, nonlocal_opt.SAM) and isinstance(ours, nonlocal_opt.ComposedOptimizer)
    assert not isinstance(composed, nonlocal_opt.SAM)
    rbo = nonlocal_opt.RBO(model.parameters(), lr=0.1)
    names = (rbo.rule.name, rbo.projector.name, rbo.manifold.name, rbo.base_factory)
    assert names == ("rbo", "footpoint", "offset", torch.optim.SGD)
    assert nonlocal_opt.EntropySGD(model.parameters()).rule.name == "entropy-sgd"
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        nonlocal_opt.Nope  # noqa: B018


RULES_ON_BOTH_PATHS = {
    "sam": dict(rule="sam"),
    "rbo": dict(rule="rbo", projector="gauss-newton", max_iters=3, rtol=None),
    "entropy-sgd": dict(rule="entropy-sgd", inner_steps=3, noise=0.0),
}


@pytest.mark.parametrize("rule", RULES_ON_BOTH_PATHS)
@pytest.mark.parametrize(
    ("base", "settings", "strict"),
    [("sgd", dict(lr=0.1), True), ("sgd", dict(lr=0.1, momentum=0.9), True), ("adam", dict(lr=1e-2), False)],
)
def test_device_path_skips_nonfinite_steps_like_the_host_path(base, settings, strict, rule):
    """Off the CPU the skip is a ``torch.where`` restore of parameters and base state (from copies kept in
    the rule's spare vectors): runs on both paths, refusals included, agree exactly. Past the step that
    creates the base state our code reads nothing on the host (``strict``; torch's Adam itself reads its
    CPU step counter)."""
    finals = []
    for device_path in (False, True):
        model, loss_of = _problem()
        opt = nonlocal_opt.compose(model.parameters(), base=base, device_path=device_path, **RULES_ON_BOTH_PATHS[rule], **settings)
        bad = make_closure(opt, lambda model=model, loss_of=loss_of: loss_of(model) * torch.nan)
        good = make_closure(opt, lambda model=model, loss_of=loss_of: loss_of(model))
        opt.step(bad)  # a refused first step: base state created and dropped again
        opt.step(good)
        for closure in (good, bad, good):
            with NoHostReads() if device_path and strict else contextlib.nullcontext():
                opt.step(closure)
            assert bool(opt.stats["nonfinite"]) == (closure is bad)
        finals.append((_flat(model), opt.base.state_dict()["state"]))
    assert torch.equal(finals[0][0], finals[1][0])
    assert finals[0][1].keys() == finals[1][1].keys()


def test_a_base_whose_step_needs_a_closure_is_refused():
    with pytest.raises(ValueError, match=r"base torch.optim.lbfgs.LBFGS needs a closure in step\(\)"):
        nonlocal_opt.compose(_problem()[0].parameters(), "sam", base=torch.optim.LBFGS)


def test_max_grad_norm_must_agree_across_groups():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = nonlocal_opt.compose([{"params": [a], "max_grad_norm": 1.0}, {"params": [b]}], "local", lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm clips one global norm and must be the same in every parameter group"):
        opt.step(make_closure(opt, lambda: (a**2).sum() + (b**2).sum()))


def test_tangent_centre_moves_with_the_contact_point_over_a_momentum_base():
    """The carried centre follows the parameters the base lands on: ``c − θ`` keeps the projector's offset."""
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "rbo", base="sgd", projector="tangent", lr=0.05, momentum=0.9, rho=0.5,
                               record_projection=True)
    for _ in range(4):
        opt.step(make_closure(opt, lambda: loss_of(model)))
        record = opt.last_projection
        offset = record.result.centre.theta - record.result.point.theta
        carried = opt.state[next(model.parameters())]["centre_theta"]
        torch.testing.assert_close(carried - _flat(model), offset, rtol=0, atol=1e-12)


def test_no_host_reads_catches_every_way_of_reading_a_value():
    from nonlocal_opt.testing import HostReadError

    value = torch.tensor(2.0)
    for read in (bool, float, int, torch.Tensor.item, lambda t: 1 if t > 0 else 0):
        with NoHostReads(), pytest.raises(HostReadError, match="read on the host"):
            read(value)


@pytest.mark.parametrize(
    ("rule", "extra", "raise_at"),
    [("sam", {}, 2), ("rbo", dict(projector="gauss-newton", rho=0.5), 4), ("rbo", dict(projector="footpoint", rho=0.5), 7),
     ("entropy-sgd", dict(inner_steps=4, seed=0), 3)],
)
def test_a_step_that_raises_leaves_parameters_and_state_as_they_were(rule, extra, raise_at):
    """An exception in the middle of a step (here from the closure's ``raise_at``-th pass) leaves the model at
    ``θ_t``, not at a trial point, and the optimizer state untouched; the next step is the step it would have been."""
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    opt = nonlocal_opt.compose(model.parameters(), rule, base="adam", lr=1e-2, **extra)
    twin_opt = nonlocal_opt.compose(twin.parameters(), rule, base="adam", lr=1e-2, **extra)
    for _ in range(2):
        opt.step(make_closure(opt, lambda: loss_of(model)))
        twin_opt.step(make_closure(twin_opt, lambda: loss_of(twin)))
    params, state = _flat(model), copy.deepcopy(opt.state_dict())
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == raise_at:
            raise KeyboardInterrupt
        return make_closure(opt, lambda: loss_of(model))()

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert torch.equal(_flat(model), params)
    after = opt.state_dict()
    for part in ("state", "base_state"):
        assert all(torch.equal(after[part][i][k], v) for i, s in state[part].items() for k, v in s.items() if isinstance(v, torch.Tensor))
    opt.step(make_closure(opt, lambda: loss_of(model)))
    twin_opt.step(make_closure(twin_opt, lambda: loss_of(twin)))
    assert torch.equal(_flat(model), _flat(twin))


def test_a_refused_tangent_step_does_not_poison_the_next_ones():
    """A non-finite pass refuses the step and keeps the centre it started from: later steps train as before."""
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector="tangent", lr=0.05, rho=0.5)
    losses = [opt.step(make_closure(opt, lambda: loss_of(model))).item() for _ in range(3)]
    opt.step(make_closure(opt, lambda: loss_of(model) * torch.nan))
    assert opt.stats["nonfinite"] == 1.0
    centre = opt.state[next(model.parameters())]["centre_theta"]
    assert torch.isfinite(centre).all()
    losses += [opt.step(make_closure(opt, lambda: loss_of(model))).item() for _ in range(5)]
    assert opt.stats["nonfinite"] == 0.0 and losses[-1] < losses[0]


def test_stats_and_the_loss_at_theta_t_reach_through_wrappers():
    from accelerate import Accelerator

    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1)
    wrapped = Accelerator(cpu=True).prepare_optimizer(opt)
    closure = make_closure(wrapped, lambda: loss_of(model))
    expected = loss_of(model).item()
    wrapped.step(closure)
    assert nonlocal_opt.unwrap(wrapped) is opt
    assert nonlocal_opt.stats(wrapped)["grad_evals"] == 2.0
    assert nonlocal_opt.stats(wrapped)["loss"] == pytest.approx(expected)
    with pytest.raises(TypeError, match="SGD is not a nonlocal-opt optimizer and wraps none"):
        nonlocal_opt.stats(torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_closure_that_adds_to_the_hosts_gradients_is_refused_by_multi_pass_rules():
    """Gradient accumulation by the host: the first pass of a multi-pass step adds to a gradient left in
    ``p.grad`` instead of zeroing it. Leftover gradients that the closure zeroes are fine."""
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1)
    loss_of(model).backward()  # a micro-batch accumulated outside the step

    def accumulating():
        loss = loss_of(model)
        loss.backward()
        return loss

    before = _flat(model)
    with pytest.raises(nonlocal_opt.HostGradientError, match="gradient accumulation by the host"):
        opt.step(accumulating)
    assert torch.equal(_flat(model), before)
    opt.step(make_closure(opt, lambda: loss_of(model)))  # zeroes first: the leftover gradient is not added
    assert opt.stats["grad_evals"] == 2.0 and not torch.equal(_flat(model), before)
