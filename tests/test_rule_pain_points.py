"""What users of SAM / Entropy-SGD code complain about, checked on both rules: BatchNorm statistics,
autocast (bf16 on CPU), LR schedulers, ``state_dict`` round trips, gradient clipping, non-finite steps.
Also: ``docs/optimizers.md`` lists every declared hyperparameter of every rule."""

from __future__ import annotations

import copy
import io
import pathlib

import pytest
import torch

import nonlocal_opt

RULES = {
    "sam": dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
    "gsam": dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
    "wsam": dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4, decoupled=False),  # decoupled: the sharpness term is not clipped
    "friendly-sam": dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
    "entropy-sgd": dict(
        lr=1.0, inner_steps=3, gamma=0.03, scoping=0.1, noise=1e-3, seed=3, momentum=0.9, nesterov=True,
        scale_outer_by_gamma=False,
    ),
}
PASSES = {"sam": 2, "gsam": 2, "wsam": 2, "friendly-sam": 2, "entropy-sgd": 3}
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "optimizers.md"


def _bn_model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


torch.manual_seed(5)
X, Y = torch.randn(32, 6), torch.randint(0, 3, (32,))


def _closure(opt, model, bad=None):
    """LBFGS-style closure; ``bad="inf_loss"`` returns an infinite loss, ``"nan_grad"`` poisons the gradient."""

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), Y)
        (loss * torch.nan if bad == "nan_grad" else loss).backward()
        return torch.tensor(float("inf")) if bad == "inf_loss" else loss

    return closure


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _state_tensors(opt):
    """Every tensor of the rule's and the base's state."""
    saved = opt.state_dict()
    return [(f"{part}{i}", k, v.clone()) for part in ("state", "base_state") for i, s in saved[part].items() for k, v in s.items()
            if isinstance(v, torch.Tensor)]


@pytest.fixture(params=sorted(RULES))
def rule(request):
    return request.param


def test_batchnorm_statistics_come_from_the_first_pass_only(rule):
    model = _bn_model()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain(X)
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, **RULES[rule])
    opt.step(_closure(opt, model))
    for ours, once in zip(model[1].buffers(), plain[1].buffers()):
        assert torch.equal(ours, once)


def test_batchnorm_statistics_follow_every_pass_when_switched_off(rule):
    model = _bn_model()
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, freeze_bn_stats=False, **RULES[rule])
    opt.step(_closure(opt, model))
    assert int(model[1].num_batches_tracked) == PASSES[rule] == opt.stats["grad_evals"]


def test_autocast_bf16_on_cpu_trains_with_finite_loss(rule):
    model = _bn_model()
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, **RULES[rule])
    start, dtypes = _flat(model), set()

    def closure():
        opt.zero_grad()
        logits = model(X)
        dtypes.add(logits.dtype)
        loss = torch.nn.functional.cross_entropy(logits, Y)
        loss.backward()
        return loss

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = [opt.step(closure) for _ in range(4)]
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(loss) for loss in losses) and opt.stats["nonfinite"] == 0.0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (_flat(model) - start).norm() > 1e-4


def test_lr_scheduler_drives_the_step(rule):
    model = _bn_model()
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, **RULES[rule])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    before = _flat(model)
    opt.step(_closure(opt, model))
    moved = _flat(model)
    scheduler.step()
    opt.step(_closure(opt, model))
    assert opt.param_groups[0]["lr"] == 0.0
    assert not torch.equal(before, moved) and torch.equal(moved, _flat(model))


def test_state_dict_round_trip_resumes_bit_for_bit(rule):
    model = _bn_model()
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, **RULES[rule])
    for _ in range(2):
        opt.step(_closure(opt, model))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    for _ in range(2):
        opt.step(_closure(opt, model))

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, cold = _bn_model(), _bn_model()
    for twin in (resumed, cold):
        twin.load_state_dict(checkpoint["model"])
    resumed_opt = nonlocal_opt.compose(resumed.parameters(), rule=rule, **RULES[rule])
    resumed_opt.load_state_dict(checkpoint["opt"])
    cold_opt = nonlocal_opt.compose(cold.parameters(), rule=rule, **RULES[rule])
    for _ in range(2):
        resumed_opt.step(_closure(resumed_opt, resumed))
        cold_opt.step(_closure(cold_opt, cold))
    assert torch.equal(_flat(resumed), _flat(model))
    assert not torch.equal(_flat(cold), _flat(model))  # the optimizer state matters


def test_max_grad_norm_clips_the_base_update(rule):
    settings = dict(RULES[rule], momentum=0.0, nesterov=False, weight_decay=0.0)
    steps = {}
    for max_norm in (None, 1e-3):
        model = _bn_model()
        opt = nonlocal_opt.compose(model.parameters(), rule=rule, max_grad_norm=max_norm, **settings)
        before = _flat(model)
        opt.step(_closure(opt, model))
        steps[max_norm] = (_flat(model) - before).norm()
    lr = settings["lr"]
    assert steps[None] > 5 * lr * 1e-3
    torch.testing.assert_close(steps[1e-3], torch.tensor(lr * 1e-3), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bad", ["inf_loss", "nan_grad"])
@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "later-step"])
def test_nonfinite_step_changes_neither_parameters_nor_state(rule, bad, warm_steps):
    model, twin = _bn_model(), _bn_model()
    opt = nonlocal_opt.compose(model.parameters(), rule=rule, **RULES[rule])
    twin_opt = nonlocal_opt.compose(twin.parameters(), rule=rule, **RULES[rule])
    for _ in range(warm_steps):
        opt.step(_closure(opt, model))
        twin_opt.step(_closure(twin_opt, twin))
    params, state = _flat(model), _state_tensors(opt)
    opt.step(_closure(opt, model, bad=bad))
    assert opt.stats["nonfinite"] == 1.0
    assert torch.equal(_flat(model), params)
    after = {(i, k): v for i, k, v in _state_tensors(opt)}
    assert all(torch.equal(after[(i, k)], v) for i, k, v in state)
    # a refused first step may only initialise bookkeeping (step counter 0, seeded noise generator)
    assert {k for _, k in after} - {k for _, k, _ in state} <= {"step", "noise_rng"}
    # and training goes on as if the refused step had never happened
    opt.step(_closure(opt, model))
    twin_opt.step(_closure(twin_opt, twin))
    assert opt.stats["nonfinite"] == 0.0
    assert torch.equal(_flat(model), _flat(twin))


def hyperparameter_rows(rule_name):
    """The table rows ``docs/optimizers.md`` must carry for ``rule_name`` with its default projector and
    manifold: `` | `name` | symbol | `default` | doc | ``."""
    opt = nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(1))], rule=rule_name)
    return [
        f"| `{name}` | {spec.symbol} | `{spec.default!r}` | {spec.doc} |"
        for name, spec in opt.hyperparameter_specs.items()
    ]


@pytest.mark.parametrize("rule_name", nonlocal_opt.available("rule"))
def test_docs_list_every_hyperparameter_symbol_and_default(rule_name):
    lines = set(DOC.read_text(encoding="utf-8").splitlines())
    missing = [row for row in hyperparameter_rows(rule_name) if row not in lines]
    assert not missing, f"docs/optimizers.md lacks (regenerate with hyperparameter_rows): {missing}"
