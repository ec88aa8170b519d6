"""GSAM, WSAM (coupled and decoupled), Friendly-SAM and ASAM's ``eta`` against references written here from the
papers' equations (plain torch, float64, the base a ``torch.optim`` optimizer fed the variant's gradient), with
``perturb=False`` groups; ``ρ = 0`` is the base; ``state_dict`` round trips; non-finite steps change nothing."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.testing.device_path import NoHostReads

from conftest import as_views_of_one_buffer, make_closure

BASES = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "sgd+momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
}
VARIANTS = {
    "gsam": dict(rule="gsam", rho=0.1, alpha=0.4),
    "wsam": dict(rule="wsam", rho=0.1, gamma=0.7),
    "wsam-coupled": dict(rule="wsam", rho=0.1, gamma=0.7, decoupled=False),
    "friendly-sam": dict(rule="friendly-sam", rho=0.1, sigma=0.8, lmbda=0.6),
    "asam-eta": dict(rule="sam", rho=0.5, adaptive=True, eta=0.2),
}
STEPS = 12


def _problem():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    with torch.no_grad():  # LayerNorm's affine parameters away from (1, 0), so that ASAM's |w| + η matters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.3)
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)


def _groups(model, layout, lr):
    """``one``: one group. ``groups``: the LayerNorm perturbed (η 0.3), the first Linear perturbed (η 0.05, half the
    learning rate), the last Linear not perturbed."""
    if layout == "one":
        return [{"params": list(model.parameters())}]
    return [
        {"params": list(model[1].parameters()), "perturb": True, "eta": 0.3},
        {"params": list(model[0].parameters()), "perturb": True, "eta": 0.05, "lr": lr / 2},
        {"params": list(model[3].parameters()), "perturb": False, "eta": 0.0},
    ]


def reference(model, loss_of, groups, base, base_hp, hp, steps):
    """The variant ``hp["rule"]`` from its equations: ``ε(d) = ρ T² d / (‖T d‖ + 1e-12)`` over the perturbed
    parameters (``T = |w| + η`` for ASAM, else 1), ``g_p = ∇f(w + ε)``, the base fed the variant's gradient."""
    rule, rho = hp["rule"], hp["rho"]
    specs = [(p, g.get("perturb", True), g.get("eta", hp.get("eta", 0.0)), g.get("lr", base_hp["lr"])) for g in groups for p in g["params"]]
    params = [p for p, *_ in specs]
    opt = base([{k: v for k, v in g.items() if k in ("params", "lr")} for g in groups], **base_hp)
    ema = [None] * len(params)
    for _ in range(steps):
        g = torch.autograd.grad(loss_of(model), params)
        with torch.no_grad():
            d = list(g)
            if rule == "friendly-sam":
                for i, gi in enumerate(g):
                    d[i] = gi if ema[i] is None else gi - hp["sigma"] * ema[i]
                    ema[i] = gi.clone() if ema[i] is None else hp["lmbda"] * ema[i] + (1 - hp["lmbda"]) * gi
            scale = [p.abs() + eta if hp.get("adaptive") else torch.ones_like(p) for p, _, eta, _ in specs]
            moved = [s for s in specs if s[1]]
            norm = math.sqrt(sum(float(((t * di) ** 2).sum()) for (p, on, *_), t, di in zip(specs, scale, d) if on))
            w = [p.clone() for p in params]
            for (p, on, *_), t, di in zip(specs, scale, d):
                if on:
                    p.add_(rho * t * t * di / (norm + 1e-12))
        assert moved
        g_p = torch.autograd.grad(loss_of(model), params)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
            handed = list(g_p)
            if rule == "gsam":
                projection = sum(float((a * b).sum()) for a, b in zip(g, g_p)) / sum(float((b * b).sum()) for b in g_p)
                handed = [b - hp["alpha"] * (a - projection * b) for a, b in zip(g, g_p)]
            c = hp.get("gamma", 0) / (1 - hp.get("gamma", 0))
            if rule == "wsam":
                handed = [a + c * (b - a) for a, b in zip(g, g_p)] if hp.get("decoupled") is False else list(g)
            for p, h in zip(params, handed):
                p.grad = h.clone()
            opt.step()
            if rule == "wsam" and hp.get("decoupled") is not False:
                for (p, _, _, lr), a, b in zip(specs, g, g_p):
                    p.sub_(lr * c * (b - a))


def _composed(model, layout, base, hp, **extra):
    base_cls, base_hp = BASES[base]
    groups = _groups(model, layout, base_hp["lr"])
    if hp["rule"] != "sam":
        groups = [{k: v for k, v in g.items() if k != "eta"} for g in groups]
    settings = {**base_hp, **{k: v for k, v in hp.items() if k != "rule" and not (k == "eta" and layout != "one")}, **extra}
    return nonlocal_opt.compose(groups, hp["rule"], base=base_cls, **settings)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("path", ["host", "device", "one-buffer"])
@pytest.mark.parametrize("layout", ["one", "groups"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_its_equations(variant, base, layout, path):
    hp = VARIANTS[variant]
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    start = _flat(model)
    if path == "one-buffer":
        as_views_of_one_buffer(model)
    opt = _composed(model, layout, base, hp, device_path=path == "device")
    closure = make_closure(opt, lambda: loss_of(model))
    for _ in range(STEPS):
        opt.step(closure)
        assert opt.stats["grad_evals"] == 2.0 and opt.stats["nonfinite"] == 0.0
    base_cls, base_hp = BASES[base]
    twin_groups = _groups(twin, layout, base_hp["lr"])
    if hp["rule"] == "sam" and layout == "groups":
        hp = {k: v for k, v in hp.items() if k != "eta"}
    reference(twin, loss_of, twin_groups, base_cls, base_hp, hp, STEPS)
    assert (_flat(model) - start).abs().max() > 1e-3
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_takes_its_own_path(variant):
    """The references above can fail: every variant ends away from SAM's path with the same ρ."""
    finals = []
    for hp in (VARIANTS[variant], {"rule": "sam", "rho": VARIANTS[variant]["rho"]}):
        model, loss_of = _problem()
        opt = _composed(model, "one", "sgd+momentum", hp)
        for _ in range(5):
            opt.step(make_closure(opt, lambda model=model, loss_of=loss_of: loss_of(model)))
        finals.append(_flat(model))
    assert (finals[0] - finals[1]).abs().max() > 1e-6


RHO_ZERO = {
    "gsam α=0.4": (dict(rule="gsam", alpha=0.4), 1e-12),
    "gsam α=2": (dict(rule="gsam", alpha=2.0), 1e-12),
    "wsam": (dict(rule="wsam", gamma=0.9), 0.0),
    "wsam-coupled": (dict(rule="wsam", gamma=0.9, decoupled=False), 0.0),
    "friendly-sam": (dict(rule="friendly-sam"), 0.0),
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("variant", RHO_ZERO)
def test_rho_zero_is_the_base(variant, base):
    """``ρ = 0``: bit for bit the base for WSAM and Friendly-SAM; GSAM's decomposition rounds (to 1e-12)."""
    hp, tolerance = RHO_ZERO[variant]
    base_cls, base_hp = BASES[base]
    model, loss_of = _problem()
    twin = copy.deepcopy(model)
    opt = nonlocal_opt.compose(model.parameters(), hp["rule"], base=base_cls, rho=0.0, **base_hp,
                               **{k: v for k, v in hp.items() if k != "rule"})
    plain = base_cls(twin.parameters(), **base_hp)
    for _ in range(STEPS):
        opt.step(make_closure(opt, lambda: loss_of(model)))
        plain.step(make_closure(plain, lambda: loss_of(twin)))
    if tolerance == 0.0:
        assert torch.equal(_flat(model), _flat(twin))
    else:
        torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=tolerance)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_continues_identically(variant):
    hp = VARIANTS[variant]
    model, loss_of = _problem()
    opt = _composed(model, "groups", "adamw", hp)
    for _ in range(4):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    for _ in range(4):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    finals = []
    for load_opt in (True, False):
        resumed, _ = _problem()
        resumed.load_state_dict(checkpoint["model"])
        resumed_opt = _composed(resumed, "groups", "adamw", hp)
        if load_opt:
            resumed_opt.load_state_dict(checkpoint["opt"])
        for _ in range(4):
            resumed_opt.step(make_closure(resumed_opt, lambda resumed=resumed: loss_of(resumed)))
        finals.append(_flat(resumed))
    assert torch.equal(finals[0], _flat(model))
    assert not torch.equal(finals[1], _flat(model))  # the optimizer's state matters


def test_friendly_sam_keeps_its_ema_in_the_state_dict():
    model, loss_of = _problem()
    opt = nonlocal_opt.FriendlySAM(model.parameters(), lr=0.05, rho=0.1)
    for _ in range(2):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    ema = opt.state_dict()["state"][0]["ema"]
    assert [m.shape for m in ema] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("poison", ["loss", "gradient"])
@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_nonfinite_second_pass_changes_nothing(variant, path, poison):
    """The second pass of step 4 returns an infinite loss, or NaN gradients with a finite loss: parameters, base
    state and the rule's state (Friendly-SAM's EMA) stay as they were, and the run goes on as one without that step."""
    hp = VARIANTS[variant]
    runs = []
    for poisoned in (True, False):
        model, loss_of = _problem()
        opt = _composed(model, "groups", "sgd+momentum", hp, device_path=path == "device")
        calls = []

        def closure(opt=opt, model=model, loss_of=loss_of, calls=calls, poisoned=poisoned):
            calls.append(1)
            opt.zero_grad()
            loss = loss_of(model)
            bad = poisoned and len(calls) == 8
            (loss * math.nan if bad and poison == "gradient" else loss).backward()
            return torch.tensor(math.inf) if bad and poison == "loss" else loss

        for _ in range(3):
            opt.step(closure)
        if poisoned:
            before = (_flat(model), copy.deepcopy(opt.state_dict()))
            opt.step(closure)
            assert opt.stats["nonfinite"] == 1.0
            assert torch.equal(_flat(model), before[0])
            assert repr(opt.state_dict()["state"]) == repr(before[1]["state"])
            assert repr(opt.state_dict()["base_state"]) == repr(before[1]["base_state"])
        opt.step(closure)
        assert opt.stats["nonfinite"] == 0.0
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


def test_perturb_false_groups_are_not_moved_and_not_in_the_norm():
    """SAM-ON's layout: only the LayerNorm is perturbed; the second pass sees the others at ``w`` and
    ``‖ε‖ = ρ`` over the LayerNorm alone."""
    model, loss_of = _problem()
    norm = list(model[1].parameters())
    others = [p for p in model.parameters() if all(p is not q for q in norm)]
    seen = []
    opt = nonlocal_opt.compose([{"params": norm}, {"params": others, "perturb": False}], "sam", rho=0.3, lr=0.0)

    def closure():
        opt.zero_grad()
        seen.append([p.detach().clone() for p in (*norm, *others)])
        loss = loss_of(model)
        loss.backward()
        return loss

    opt.step(closure)
    moves = [b - a for a, b in zip(*seen)]
    assert all(torch.equal(m, torch.zeros_like(m)) for m in moves[len(norm):])
    torch.testing.assert_close(torch.cat([m.reshape(-1) for m in moves[:len(norm)]]).norm(), torch.tensor(0.3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("rule", "settings", "message"),
    [
        ("wsam", dict(gamma=1.0), "gamma"),
        ("sam", dict(eta=0.1), "adaptive=True"),
        ("friendly-sam", dict(lmbda=1.5), "lmbda"),
        ("gsam", dict(alpha=-0.1), "alpha"),
    ],
)
def test_bad_hyperparameters_are_refused(rule, settings, message):
    model, _ = _problem()
    with pytest.raises(ValueError, match=message):
        nonlocal_opt.compose(model.parameters(), rule, lr=0.1, **settings)


class NoLearningRate(torch.optim.Optimizer):
    """A base whose groups carry no ``lr``: ``θ ← θ − s g``."""

    def __init__(self, params, step_size=0.1):
        super().__init__(params, dict(step_size=step_size))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["step_size"])


def test_decoupled_wsam_needs_a_learning_rate():
    model, loss_of = _problem()
    with pytest.raises(ValueError, match="decoupled=False"):
        nonlocal_opt.compose(model.parameters(), "wsam", base=NoLearningRate)
    opt = nonlocal_opt.compose(model.parameters(), "wsam", base=NoLearningRate, decoupled=False)
    opt.step(make_closure(opt, lambda: loss_of(model)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_group_unperturbed_is_refused_before_any_pass(variant):
    model, loss_of = _problem()
    opt = _composed(model, "one", "sgd+momentum", VARIANTS[variant], perturb=False)
    calls = []
    with pytest.raises(ValueError, match="perturb=True"):
        opt.step(make_closure(opt, lambda: calls.append(1) or loss_of(model)))
    assert calls == []


@pytest.mark.parametrize(("alias", "rule"), [("GSAM", "gsam"), ("WSAM", "wsam"), ("FriendlySAM", "friendly-sam")])
def test_constructors_read_like_the_peers(alias, rule):
    model, _ = _problem()
    opt = getattr(nonlocal_opt, alias)(model.parameters(), base=torch.optim.AdamW, lr=1e-3, rho=0.05)
    assert opt.rule.name == rule and isinstance(opt.base, torch.optim.AdamW) and opt.param_groups[0]["rho"] == 0.05


@pytest.mark.parametrize("variant", ["wsam", "wsam-coupled"])
def test_tensor_learning_rates_are_used_without_reading_them(variant):
    """torch.optim takes ``lr`` as a tensor (for schedules under CUDA graphs): on the device path the variant scales
    by it on the device, with the same result as float learning rates."""
    finals = []
    for as_tensor in (False, True):
        model, loss_of = _problem()
        base_cls, base_hp = BASES["sgd+momentum"]
        groups = _groups(model, "groups", base_hp["lr"])
        lrs = []
        for group in groups:
            if as_tensor:
                group["lr"] = torch.tensor(group.get("lr", base_hp["lr"]), dtype=torch.float64)
                lrs.append(group["lr"])
        hp = {k: v for k, v in VARIANTS[variant].items() if k != "rule"}
        opt = nonlocal_opt.compose([{k: v for k, v in g.items() if k != "eta"} for g in groups], "wsam", base=base_cls,
                                   device_path=True, **{**base_hp, **hp})
        closure = make_closure(opt, lambda model=model, loss_of=loss_of: loss_of(model))
        for _ in range(STEPS):
            with NoHostReads(of=lrs):
                opt.step(closure)
        finals.append(_flat(model))
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=1e-12)
