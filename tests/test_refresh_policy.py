"""The refresh policy (LookSAM, periodic SAM, AE-SAM) over ``sam``, ``gsam``, ``friendly-sam`` and ``rbo``, and
Momentum-SAM, against references written here from the equations (plain torch, float64, the base a
``torch.optim`` optimizer fed the handed gradient): parameters to 1e-10 over 12 steps and the passes the
formulas say, counted by the optimizer and by the closure; resume, validation, the device path, the harness."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.comparison import ComparisonConfig, RunSpec, load_specs, train_run
from nonlocal_opt.comparison.data import load_splits
from nonlocal_opt.optim.refresh_policy import RefreshPolicy
from nonlocal_opt.testing import check_rule
from nonlocal_opt.testing.device_path import NoHostReads

BASES = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "sgd+momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
}
SETTINGS = {
    "looksam": dict(rule="sam", rho=0.1, refresh_every=3, reuse="vertical", reuse_weight=0.6),
    "periodic-sam": dict(rule="sam", rho=0.1, refresh_every=3, reuse="none"),
    "ae-sam": dict(rule="sam", rho=0.1, refresh="gradient-norm", reuse="vertical", refresh_ema=0.8, refresh_c=(-1.0, 1.0),
                   refresh_horizon=8),
    "msam": dict(rule="msam", rho=0.1, beta=0.8),
}
STEPS = 12


def _problem():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    data = [(torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))) for _ in range(STEPS + 8)]
    return model, data


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sq(x):
    return sum(float((a * a).sum()) for a in x)


def reference(model, data, base, base_hp, hp, steps):
    """The policy from its equations, one batch per step; returns the passes taken."""
    params = list(model.parameters())
    opt = base(params, **base_hp)
    rho, passes = hp["rho"], 0
    g_v, m, mu, var = None, None, 0.0, 0.0
    for t in range(steps):
        batch = data[t]
        if hp["rule"] == "msam":  # one pass at w + ρ m/‖m‖ (at w while m = 0)
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                if m is not None:
                    norm = math.sqrt(_sq(m))
                    for p, mi in zip(params, m):
                        p.add_(rho * mi / (norm + 1e-12))
            d = torch.autograd.grad(_loss(model, batch), params)
            passes += 1
            with torch.no_grad():
                for p, wi, di in zip(params, w, d):
                    p.copy_(wi)
                    p.grad = di.clone()
                opt.step()
            m = [di.clone() if m is None else hp["beta"] * mi + di for mi, di in zip(m or [None] * len(d), d)]
            continue
        g = torch.autograd.grad(_loss(model, batch), params)
        passes += 1
        if hp.get("refresh") == "gradient-norm":
            s, delta = _sq(g), hp["refresh_ema"]
            mu = delta * mu + (1 - delta) * s
            var = delta * var + (1 - delta) * (s - mu) ** 2
            first, last = hp["refresh_c"]
            c = first + (last - first) * min(t / hp["refresh_horizon"], 1.0)
            refresh = s >= mu + c * math.sqrt(var)
        else:
            refresh = t % hp["refresh_every"] == 0
        if refresh:
            norm = math.sqrt(_sq(g))
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (norm + 1e-12))
            d = torch.autograd.grad(_loss(model, batch), params)
            passes += 1
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            projection = sum(float((a * b).sum()) for a, b in zip(d, g)) / _sq(g)
            g_v = [a - projection * b for a, b in zip(d, g)]
            handed = d
        elif hp["reuse"] == "none" or g_v is None:
            handed = g
        else:
            scale = hp.get("reuse_weight", 0.7) * math.sqrt(_sq(g)) / math.sqrt(_sq(g_v))
            handed = [a + scale * b for a, b in zip(g, g_v)]
        with torch.no_grad():
            for p, h in zip(params, handed):
                p.grad = h.clone()
            opt.step()
    return passes


class Counting:
    """A closure over one batch per step, counting its calls."""

    def __init__(self, opt, model, data):
        self.opt, self.model, self.data, self.calls, self.batch = opt, model, data, 0, None

    def __call__(self):
        self.calls += 1
        self.opt.zero_grad()
        loss = _loss(self.model, self.batch)
        loss.backward()
        return loss


def _composed(model, base, hp, **extra):
    base_cls, base_hp = BASES[base]
    return nonlocal_opt.compose(model.parameters(), hp["rule"], base=base_cls, **base_hp,
                                **{k: v for k, v in hp.items() if k != "rule"}, **extra)


def _run(opt, model, data, steps, start=0):
    closure, counted = Counting(opt, model, data), 0.0
    refreshed = []
    for t in range(start, start + steps):
        closure.batch = data[t]
        opt.step(closure)
        counted += opt.stats["grad_evals"]
        refreshed.append(opt.stats.get("refreshed"))
    return closure.calls, counted, refreshed


EXPECTED_PASSES = {"looksam": 16, "periodic-sam": 16, "msam": 12}


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_its_equations_and_takes_the_passes_they_say(setting, base, path):
    hp = SETTINGS[setting]
    model, data = _problem()
    twin = copy.deepcopy(model)
    start = _flat(model)
    opt = _composed(model, base, hp, device_path=path == "device")
    calls, counted, refreshed = _run(opt, model, data, STEPS)
    passes = reference(twin, data, *BASES[base], hp, STEPS)
    assert calls == counted == passes
    if setting in EXPECTED_PASSES:
        assert passes == EXPECTED_PASSES[setting]
    else:  # AE-SAM: between one and two passes per step, and refreshed says which
        assert STEPS < passes < 2 * STEPS
        assert sum(refreshed) == passes - STEPS
    if setting in ("looksam", "periodic-sam"):
        assert refreshed[:4] == [1.0, 0.0, 0.0, 1.0]
    assert (_flat(model) - start).abs().max() > 1e-3
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=1e-10)


@pytest.mark.parametrize("setting", ["looksam", "periodic-sam"])
def test_reuse_steps_move_away_from_sam(setting):
    """The references above can fail: a policy with reuse steps ends away from SAM's path."""
    finals = []
    for hp in (SETTINGS[setting], {"rule": "sam", "rho": 0.1}):
        model, data = _problem()
        _run(_composed(model, "sgd+momentum", hp), model, data, 6)
        finals.append(_flat(model))
    assert (finals[0] - finals[1]).abs().max() > 1e-6


@pytest.mark.parametrize("reuse", ["vertical", "none"])
@pytest.mark.parametrize("rule", ["sam", "gsam", "friendly-sam"])
def test_refreshing_every_step_through_the_policy_is_the_rule_bit_for_bit(rule, reuse):
    """``refresh_every=1`` (the policy inactive) against the policy's code path taken at every step: the
    gradient-norm policy with a threshold no ‖g‖² misses, keeping ``g_v`` (vertical) or not."""
    finals = []
    for extra in ({}, dict(refresh="gradient-norm", refresh_c=(-1e300, -1e300), reuse=reuse)):
        model, data = _problem()
        opt = _composed(model, "adamw", {"rule": rule, "rho": 0.1}, **extra)
        calls, _, refreshed = _run(opt, model, data, STEPS)
        assert calls == 2 * STEPS and refreshed == [1.0] * STEPS
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])
    assert "refresh_t" not in nonlocal_opt.compose([torch.nn.Parameter(torch.ones(2))], rule).state_dict()["state"]


@pytest.mark.parametrize("projector", ["gauss-newton", "footpoint"])
def test_rbo_refreshing_every_step_through_the_policy_is_rbo_bit_for_bit(projector):
    """As above for RBO: the policy's code path (gathering the start point after the policy's own first pass,
    keeping ``g`` and forming ``g_v``) changes nothing while every step refreshes."""
    finals = []
    for extra in ({}, dict(refresh="gradient-norm", refresh_c=(-1e300, -1e300))):
        model, data = _problem()
        opt = nonlocal_opt.compose(model.parameters(), "rbo", projector=projector, base="sgd", lr=0.3, momentum=0.9, rho=1.0,
                                   max_iters=3, **extra)
        _, _, refreshed = _run(opt, model, data, STEPS)
        assert refreshed == [1.0] * STEPS
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("setting", ["looksam", "ae-sam", "msam", "rbo"])
def test_resume_is_exact(setting):
    """7 steps, ``state_dict`` through ``torch.save``/``torch.load(weights_only=True)`` into a fresh optimizer, 5
    more: the parameters equal 12 steps straight (t, g_v, μ, σ², m are saved)."""
    hp = SETTINGS.get(setting, dict(rule="rbo", projector="gauss-newton", rho=1.0, refresh_every=3))

    def fresh(model):
        settings = {k: v for k, v in hp.items() if k != "rule"}
        return nonlocal_opt.compose(model.parameters(), hp["rule"], base="sgd", lr=0.05, momentum=0.9, **settings)

    model, data = _problem()
    straight = copy.deepcopy(model)
    _run(fresh(straight), straight, data, STEPS)
    opt = fresh(model)
    _run(opt, model, data, 7)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, _ = _problem()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = fresh(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    _run(resumed_opt, resumed, data, 5, start=7)
    assert torch.equal(_flat(resumed), _flat(straight))
    unloaded, _ = _problem()
    unloaded.load_state_dict(checkpoint["model"])
    _run(fresh(unloaded), unloaded, data, 5, start=7)
    assert not torch.equal(_flat(unloaded), _flat(straight))  # the saved state matters


def test_refused_steps_count_in_t():
    """A non-finite step at t = 1 counts: the refresh of k = 3 comes at the fourth step, not the fifth."""
    model, data = _problem()
    opt = _composed(model, "sgd+momentum", SETTINGS["looksam"])
    closure = Counting(opt, model, data)
    seen = []
    for t in range(5):
        closure.batch = (torch.full_like(data[t][0], math.nan), data[t][1]) if t == 1 else data[t]
        opt.step(closure)
        seen.append((opt.stats["refreshed"], opt.stats["nonfinite"], opt.stats["grad_evals"]))
    assert seen == [(1.0, 0.0, 2.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 2.0), (0.0, 0.0, 1.0)]
    assert opt.state_dict()["state"][0]["refresh_t"] == 5


def test_rbo_reuse_step_is_one_pass_along_the_vertical_part_of_its_pseudo_gradient():
    """RBO over plain SGD (the base step is ``−η`` times the handed gradient): at a refresh ``ĝ = (θ_t − θ_{t+1})/η``;
    the next step is one pass and moves by ``−η (g + w (‖g‖/‖g_v‖) g_v)``, ``g_v = ĝ − (⟨ĝ, g⟩/‖g‖²) g``."""
    model, data = _problem()
    eta, weight = 0.3, 0.5
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector="gauss-newton", base="sgd", lr=eta, rho=1.0,
                               refresh_every=3, reuse_weight=weight)
    closure = Counting(opt, model, data)
    params = list(model.parameters())

    def grad_at(batch):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model, batch), params)])

    for t in range(7):
        closure.batch = data[t]
        theta, g = _flat(model), grad_at(data[t])
        opt.step(closure)
        if t % 3 == 0:
            assert opt.stats["refreshed"] == 1.0 and opt.stats["grad_evals"] > 1
            pseudo = (theta - _flat(model)) / eta
            g_v = pseudo - (pseudo @ g) / (g @ g) * g
            continue
        assert opt.stats["refreshed"] == 0.0 and opt.stats["grad_evals"] == 1.0
        expected = theta - eta * (g + weight * g.norm() / g_v.norm() * g_v)
        torch.testing.assert_close(_flat(model), expected, rtol=0, atol=1e-12)
        assert (_flat(model) - (theta - eta * g)).abs().max() > 1e-6


def test_ae_sam_trains_finite_between_one_and_two_passes_per_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = nonlocal_opt.AESAM(model.parameters(), base="sgd", lr=0.05, momentum=0.9, rho=0.05)
    x, y = torch.randn(512, 10), torch.randint(0, 4, (512,))
    closure = Counting(opt, model, None)
    steps, losses = 60, []
    for t in range(steps):
        closure.batch = (x[t % 16 * 32:(t % 16 + 1) * 32], y[t % 16 * 32:(t % 16 + 1) * 32])
        losses.append(float(opt.step(closure)))
    mean = closure.calls / steps
    assert all(math.isfinite(v) for v in losses) and bool(_flat(model).isfinite().all())
    assert 1.0 < mean < 2.0, mean


def test_constructors_map_onto_the_generic_names():
    model = torch.nn.Linear(3, 2)
    look = nonlocal_opt.LookSAM(model.parameters(), base="adamw", lr=1e-3, rho=0.1, k=4, alpha=0.5)
    assert (look.rule.name, look.param_groups[0]["refresh_every"], look.param_groups[0]["reuse_weight"]) == ("sam", 4, 0.5)
    ae = nonlocal_opt.AESAM(model.parameters(), lr=0.1, refresh_c=[-0.5, 0.5], refresh_horizon=100)
    group = ae.param_groups[0]
    assert (group["refresh"], group["reuse"], group["refresh_c"], group["rho"]) == ("gradient-norm", "none", (-0.5, 0.5), 0.05)
    assert nonlocal_opt.MSAM(model.parameters(), lr=0.1).rule.name == "msam"


@pytest.mark.parametrize(("settings", "message"), [
    (dict(refresh_every=0), "refresh_every"),
    (dict(refresh_every=2.0), "refresh_every"),
    (dict(reuse="horizontal"), "reuse"),
    (dict(refresh="sometimes"), "refresh"),
    (dict(reuse_weight=-1.0), "reuse_weight"),
    (dict(refresh="gradient-norm", refresh_ema=1.0), "refresh_ema"),
    (dict(refresh="gradient-norm", refresh_c=(1.0,)), "refresh_c"),
    (dict(refresh="gradient-norm", refresh_c=(0.0, math.inf)), "refresh_c"),
    (dict(refresh="gradient-norm", refresh_horizon=0), "refresh_horizon"),
    (dict(refresh="gradient-norm", refresh_every=3), "refresh_every"),
    (dict(refresh_ema=0.5), "refresh_ema"),
    (dict(refresh_c=(0.0, 1.0)), "refresh_c"),
    (dict(refresh_every=3, reuse="none", reuse_weight=0.3), "reuse_weight"),
])
@pytest.mark.parametrize("rule", ["sam", "rbo"])
def test_invalid_settings_are_refused_naming_the_key(rule, settings, message):
    with pytest.raises(ValueError, match=message):
        nonlocal_opt.compose(torch.nn.Linear(2, 2).parameters(), rule, lr=0.1, **settings)


@pytest.mark.parametrize("settings", [dict(refresh_every=3), dict(refresh="gradient-norm", refresh_c=(100.0, 100.0))])
def test_no_perturbed_group_is_refused_before_any_pass(settings):
    """Also when the step would be a reuse step (a threshold no ‖g‖² reaches): never silently the base alone."""
    model, data = _problem()
    opt = nonlocal_opt.compose([{"params": list(model.parameters()), "perturb": False}], "sam", lr=0.1, **settings)
    closure = Counting(opt, model, data)
    closure.batch = data[0]
    with pytest.raises(ValueError, match="every parameter group has perturb=False"):
        opt.step(closure)
    assert closure.calls == 0


@pytest.mark.parametrize("rule", ["wsam", "msam"])
def test_rules_outside_the_policy_refuse_its_options(rule):
    """WSAM's decoupled step and Momentum-SAM's single pass have no refresh to space out."""
    with pytest.raises(ValueError, match="unknown hyperparameter 'refresh_every'"):
        nonlocal_opt.compose(torch.nn.Linear(2, 2).parameters(), rule, lr=0.1, refresh_every=3)


@pytest.mark.parametrize("setting", ["looksam", "periodic-sam", "msam"])
def test_device_path_reads_nothing_on_the_host(setting):
    """After a first step (which creates the base's state: the guarded step reads once then), the device path
    runs under :class:`NoHostReads` and lands where the host path does."""
    finals = []
    for device_path in (False, True):
        model, data = _problem()
        opt = _composed(model, "sgd+momentum", SETTINGS[setting], device_path=device_path)
        _steps(opt, model, data, range(1))
        with NoHostReads() if device_path else contextlib.nullcontext():
            _steps(opt, model, data, range(1, 7))
        finals.append(_flat(model))
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-12)


def test_gradient_norm_policy_reads_its_decision_on_the_host():
    """AE-SAM's decision chooses which passes run: the device path reads it, and only it, once per step."""
    model, data = _problem()
    opt = _composed(model, "sgd+momentum", SETTINGS["ae-sam"], device_path=True)
    _steps(opt, model, data, range(1))
    closure = Counting(opt, model, data)
    closure.batch = data[1]
    decision = RefreshPolicy._norm_spiked
    with pytest.raises(AssertionError, match="read on the host") as raised, NoHostReads():
        opt.step(closure)
    assert any(entry.name == decision.__name__ for entry in raised.traceback)


def _steps(opt, model, data, steps):
    """The steps of ``steps`` (indices of batches), reading no stats (reading them is the one host read)."""
    closure = Counting(opt, model, data)
    for t in steps:
        closure.batch = data[t]
        opt.step(closure)


@pytest.mark.parametrize(("rule", "hyperparameters"), [
    ("msam", None),
    ("sam", {"refresh_every": 4}),
    ("gsam", {"refresh_every": 4, "reuse": "none"}),
    ("friendly-sam", {"refresh": "gradient-norm", "refresh_horizon": 10}),
])
def test_rule_kit(rule, hyperparameters):
    """``k = 4``: the kit's poisoned third step counts in ``t`` (t = 2), so the fourth step of its run and the
    third of its clean twin are both reuse steps; with ``k ≤ 3`` one of them would be a refresh."""
    assert check_rule(rule, hyperparameters=hyperparameters).ok


class TwicePerStep(nonlocal_opt.DescentRule):
    """A rule whose pass is not at ``θ_t`` by its own account, broken: BatchNorm's statistics move twice per step."""

    name = "twice-per-step-test"
    first_pass_at_start = False

    def step(self, ctx):
        ctx.loss(extra=False)
        loss = torch.as_tensor(ctx.loss(extra=False))
        ctx.apply(finite=ctx.finite(loss))
        return loss


def test_rule_kit_batchnorm_check_still_fails_for_rules_whose_pass_is_elsewhere():
    report = check_rule(TwicePerStep(), raise_on_failure=False)
    assert {check.name for check in report.failures} == {"batchnorm"}


def test_rbo_rule_kit_with_reuse_steps():
    assert check_rule("rbo", projector="gauss-newton", hyperparameters={"refresh_every": 4}).ok


@pytest.mark.parametrize(("fixed", "steps"), [
    ({"rho": 0.05, "refresh_every": 3}, 30),  # 4 passes per 3 steps
    ({"rho": 0.05, "refresh_every": 3, "reuse": "none"}, 30),
])
def test_the_harness_charges_a_reuse_step_one_pass(fixed, steps):
    spec = {"name": "looksam", "rule": "sam", "base": "sgd", "fixed": {"lr": 0.05, **fixed}}
    cfg = ComparisonConfig(budget=40, final_seeds=(1,), dataset="synthetic", train_subset=512, test_subset=256, val_size=128,
                           batch_size=32, evals=4)
    (parsed,) = load_specs([spec])
    record = train_run(cfg, RunSpec(parsed, parsed.points()[0], 1, 0.0, "final"), load_splits(cfg, 0.0))
    assert (record["passes"], record["steps"]) == (40, steps)


def test_the_harness_charges_msam_one_pass_per_step():
    spec = {"name": "msam", "rule": "msam", "base": "sgd", "fixed": {"lr": 0.05, "rho": 0.05}}
    cfg = ComparisonConfig(budget=20, final_seeds=(1,), dataset="synthetic", train_subset=512, test_subset=256, val_size=128,
                           batch_size=32, evals=4)
    (parsed,) = load_specs([spec])
    record = train_run(cfg, RunSpec(parsed, parsed.points()[0], 1, 0.0, "final"), load_splits(cfg, 0.0))
    assert (record["passes"], record["steps"]) == (20, 20)
