"""The Accelerate trainer: the closure's global loss/gradient, fp16 overflow, logging, checkpoints, resume."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

import nonlocal_opt
from nonlocal_opt.landscapes import LANDSCAPES
from nonlocal_opt.training import TrainConfig, TrainingDiverged, train
from nonlocal_opt.training.closure import BatchClosure, LossScale, classification_correct
from nonlocal_opt.training.config import ConfigError, optimizer_hyperparameters
from nonlocal_opt.training.data import FASHION_MNIST_DIR
from nonlocal_opt.training.metrics import EPOCH_KEYS, read_metrics

needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
QUICK = dict(model="logreg", batch_size=32, limit_train_batches=3, limit_val_batches=2)


def make_closure(model, batches, scale: LossScale | None = None):
    accelerator = Accelerator(cpu=True)
    closure = BatchClosure(accelerator, model, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                           classification_correct, iter(batches), scale or LossScale(enabled=False))
    return closure


def test_closure_returns_the_mean_loss_and_gradient_and_draws_fresh_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    closure = make_closure(model, batches[1:])
    closure.start(batches[0])
    for batch, kwargs in ((batches[0], {}), (batches[1], {"fresh_batch": True})):
        loss = closure(**kwargs)
        reference = torch.nn.Linear(5, 3)
        reference.load_state_dict(model.state_dict())
        expected = F.cross_entropy(reference(batch[0]), batch[1])
        expected.backward()
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(model.weight.grad, reference.weight.grad)
        torch.testing.assert_close(model.bias.grad, reference.bias.grad)
    correct = (model(batches[0][0]).argmax(1) == batches[0][1]).float().mean()
    torch.testing.assert_close(closure.first_accuracy, correct)  # the step's first pass


def test_fp16_overflow_is_refused_and_backs_off_the_loss_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    plain = copy.deepcopy(model)
    batch = (torch.randn(8, 5) * 1e3, torch.randint(0, 3, (8,)))
    scale = LossScale(enabled=True, scale=2.0**120)  # S·Σℓ overflows float32
    closure = make_closure(model, [], scale)
    opt = nonlocal_opt.compose(model.parameters(), "rbo", lr=1.0, rho=1.0, max_iters=2)
    before = [p.detach().clone() for p in model.parameters()]
    closure.start(batch)
    with scale.scaler.scaled_step(opt):
        opt.step(closure)
    assert opt.stats["nonfinite"] == 1.0 and math.isfinite(float(closure.first_loss))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    scale.scaler.update()
    assert scale.scale == 2.0**119
    scale.scaler.update(2.0**8)  # now representable: the same step goes through, as without loss scaling
    closure.start(batch)
    with scale.scaler.scaled_step(opt):
        opt.step(closure)
    scale.scaler.update()
    assert opt.stats["nonfinite"] == 0.0
    reference = make_closure(plain, [])
    reference_opt = nonlocal_opt.compose(plain.parameters(), "rbo", lr=1.0, rho=1.0, max_iters=2)
    reference.start(batch)
    reference_opt.step(reference)
    for p, q, old in zip(model.parameters(), plain.parameters(), before):
        assert not torch.equal(p, old)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_paper_preset_is_filtered_by_what_the_composition_accepts():
    assert optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="rbo", projector="gauss-newton")) == {"lr": 6.0, "rho": 1.0}
    rbo = optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="rbo", projector="footpoint"))
    assert rbo == nonlocal_opt.get("rule", "rbo").presets["paper"] | nonlocal_opt.get("projector", "footpoint").presets["paper"]
    assert rbo["lr"] == 6.0 and rbo["rho"] == 1.0
    assert rbo["max_iters"] == 20 and rbo["step_size"] == 0.1  # the paper's footpoint solver
    gauss = optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="rbo", projector="gauss-newton", lr=2.0))
    assert gauss == {"lr": 2.0, "rho": 1.0}
    newton = nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(1))], "rbo", projector="newton",
                                  **optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="rbo", projector="newton")))
    assert newton.param_groups[0]["max_iters"] == 6  # the projector's own default, not the footpoint's 20
    local = optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="local", overrides={"momentum": 0.9}))
    assert local == {"lr": 0.01, "momentum": 0.9}
    with pytest.raises(ValueError, match="unknown hyperparameter 'rho'"):
        optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="local", rho=0.1))
    entropy = optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="entropy-sgd", overrides={"inner_steps": 5}))
    assert entropy["inner_steps"] == 5 and entropy["lr"] == 1.0 and entropy["scale_outer_by_gamma"] is False


def test_preset_keys_the_base_does_not_take_are_dropped(monkeypatch):
    monkeypatch.setattr(nonlocal_opt.get("rule", "local"), "presets", {"paper": {"lr": 0.01, "momentum": 0.9}})
    assert optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="local")) == {"lr": 0.01, "momentum": 0.9}
    assert optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="local", base="adam")) == {"lr": 0.01}  # Adam has no momentum
    with pytest.raises(ValueError, match="unknown hyperparameter 'momentum'"):  # a flag is not dropped
        optimizer_hyperparameters(TrainConfig(preset="paper", optimizer="local", base="adam", overrides={"momentum": 0.9}))


def test_preset_none_keeps_every_components_own_default():
    assert optimizer_hyperparameters(TrainConfig(optimizer="rbo", preset="none")) == {}
    assert optimizer_hyperparameters(TrainConfig(optimizer="sam", preset="none", rho=0.1)) == {"rho": 0.1}
    opt = nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(1))], "entropy-sgd", base="adamw",
                               **optimizer_hyperparameters(TrainConfig(optimizer="entropy-sgd", base="adamw", preset="none")))
    group, rule = opt.param_groups[0], nonlocal_opt.get("rule", "entropy-sgd")
    assert {key: group[key] for key in rule.hyperparameters} == {key: spec.default for key, spec in rule.hyperparameters.items()}
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.01  # torch.optim.AdamW's defaults
    with pytest.raises(ValueError, match="unknown preset 'iclr' for sam; available: none, paper"):
        optimizer_hyperparameters(TrainConfig(optimizer="sam", preset="iclr"))


def tensorboard_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (logdir / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@needs_fashion
@pytest.mark.parametrize(
    ("optimizer", "overrides", "passes"),
    [("local", {}, 1), ("sam", {}, 2), ("entropy-sgd", {"inner_steps": 3, "fresh_batches": True}, 3),
     ("rbo", {"max_iters": 3}, 4)],
)
def test_one_epoch_leaves_events_metrics_and_a_checkpoint(tmp_path, optimizer, overrides, passes):
    result = train(TrainConfig(optimizer=optimizer, overrides=overrides, logdir=str(tmp_path), epochs=1,
                               **{**QUICK, "limit_train_batches": 2}))
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [row["scope"] for row in rows] == ["step", "step", "epoch"]
    assert all(float(row["grad_evals"]) == passes for row in rows[:2])
    assert set(EPOCH_KEYS) <= {key for key, value in rows[2].items() if value}
    assert 0 <= result.epochs[0]["val/acc"] <= 1 and math.isfinite(result.epochs[0]["val/loss"])
    tags = tensorboard_tags(tmp_path)
    assert {"train/loss", "train/acc", "lr", "grad_evals", "step_time", "val/loss", "val/acc"} <= tags
    if optimizer in ("sam", "rbo"):
        assert "rho" in tags
    if optimizer == "rbo":
        assert {"proj_residual", "offset_error"} <= tags
    assert (result.checkpoint / "model.safetensors").is_file() and result.checkpoint.name == "epoch_1"


@needs_fashion
@pytest.mark.parametrize(("optimizer", "overrides"), [("local", {"momentum": 0.9}), ("rbo", {"max_iters": 3, "lr": 1.0})])
def test_resume_continues_bit_identically(tmp_path, optimizer, overrides):
    common = dict(optimizer=optimizer, overrides=overrides, **QUICK)
    straight = train(TrainConfig(epochs=2, logdir=str(tmp_path / "straight"), **common))
    train(TrainConfig(epochs=1, logdir=str(tmp_path / "split"), **common))
    resumed = train(TrainConfig(epochs=2, logdir=str(tmp_path / "split"), resume="latest", seed=0, **common))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    saved = load_file(str(tmp_path / "split" / "checkpoints" / "epoch_2" / "model.safetensors"))
    assert all(torch.equal(saved[name], p) for name, p in straight.model.state_dict().items())
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "split" / "metrics.csv") if row["scope"] == "step"]
    assert steps == list(range(1, 7))  # the resumed run appends steps 4..6


def test_radius_schedule_is_followed_and_survives_resume(tmp_path):
    """``--rho-schedule linear``: the ρ logged at step t is ρ_0 + (ρ_f − ρ_0) t/T; a run interrupted after
    epoch 1 (its epoch-2 checkpoint removed) and resumed logs the same ρ and ends with the same weights."""
    common = dict(dataset="landscape:alm", optimizer="rbo", lr=0.001, rho=2.0, overrides={"max_iters": 2}, batch_size=256,
                  limit_train_batches=3, rho_schedule="linear", rho_final=0.5, epochs=2, logdir=str(tmp_path))
    straight = train(TrainConfig(**common))
    logged = [float(row["rho"]) for row in read_metrics(tmp_path / "metrics.csv") if row["scope"] == "step"]
    total = 6
    assert logged == pytest.approx([2.0 + (0.5 - 2.0) * t / total for t in range(total)], rel=1e-12)
    shutil.rmtree(tmp_path / "checkpoints" / "epoch_2")
    (tmp_path / "metrics.csv").unlink()
    resumed = train(TrainConfig(resume="latest", **common))
    assert [float(row["rho"]) for row in read_metrics(tmp_path / "metrics.csv") if row["scope"] == "step"] == logged[3:]
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # SGD with a too-large lr on the ALM landscape: |θ| grows ~50x per step, the loss overflows in epoch 2
    with pytest.raises(TrainingDiverged, match="epoch_1") as info:
        train(TrainConfig(dataset="landscape:alm", optimizer="local", lr=0.5, epochs=3, logdir=str(tmp_path)))
    assert "the loss became inf at epoch 2" in str(info.value)
    assert (tmp_path / "checkpoints" / "epoch_1" / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "epoch_2").exists()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        train(TrainConfig(dataset="landscape:sine", optimizer="local", logdir=str(tmp_path), resume="latest"))
    with pytest.raises(ConfigError, match="--model does not apply"):
        train(TrainConfig(dataset="landscape:sine", model="mlp", optimizer="local", logdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="larger than the 1024 training samples"):
        train(TrainConfig(dataset="landscape:sine", optimizer="local", batch_size=2048, logdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="larger than the 100 training samples"):
        train(TrainConfig(dataset="landscape:sine", optimizer="local", train_subset=100, logdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="unknown base 'lbfgs'"):
        train(TrainConfig(dataset="landscape:sine", optimizer="local", base="lbfgs", logdir=str(tmp_path)))


def hparams(logdir):
    """The run config Accelerate's TensorBoard tracker logged (``hparams.yml``)."""
    import yaml

    (path,) = (logdir / "tensorboard").rglob("hparams.yml")
    return yaml.safe_load(path.read_text())


def test_base_adamw_steps_as_torch_adamw_and_is_recorded(tmp_path):
    """``base="adamw"``: the local rule's run on a landscape equals torch.optim.AdamW on it, step by step;
    the logged config, the checkpoint's config and its optimizer state record AdamW."""
    config = TrainConfig(dataset="landscape:quadratic", optimizer="local", base="adamw", preset="paper", lr=0.1,
                         overrides={"weight_decay": 0.05}, batch_size=64, limit_train_batches=4, logdir=str(tmp_path))
    result = train(config)
    landscape = LANDSCAPES["quadratic"]()
    landscape.theta.data.zero_()  # the trainer's landscape model starts at θ = 0
    reference = torch.optim.AdamW(landscape.parameters(), lr=0.1, weight_decay=0.05)
    for _ in range(4):
        reference.zero_grad()
        landscape().backward()
        reference.step()
    torch.testing.assert_close(next(result.model.parameters()), landscape.theta.detach())
    assert isinstance(result.optimizer.base, torch.optim.AdamW)
    assert hparams(tmp_path)["base"] == "adamw" and hparams(tmp_path)["hp.weight_decay"] == 0.05
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved == config.flat() and saved["base"] == "adamw" and saved["preset"] == "paper"
    state = torch.load(result.checkpoint / "optimizer.bin", weights_only=True)
    assert state["param_groups"][0]["betas"] == (0.9, 0.999) and state["param_groups"][0]["weight_decay"] == 0.05
    assert {"exp_avg", "exp_avg_sq"} <= set(state["base_state"][0])


def test_resume_with_another_base_is_refused(tmp_path):
    common = dict(dataset="landscape:quadratic", optimizer="local", batch_size=256, limit_train_batches=2, logdir=str(tmp_path))
    train(TrainConfig(base="adamw", **common))
    with pytest.raises(ConfigError, match="written with --base adamw, this run has --base sgd; pass --base adamw"):
        train(TrainConfig(epochs=2, resume="latest", **common))
    assert len(train(TrainConfig(base="adamw", epochs=2, resume="latest", **common)).epochs) == 1


def test_preset_none_trains_with_the_components_defaults(tmp_path):
    result = train(TrainConfig(dataset="landscape:quadratic", optimizer="sam", preset="none", batch_size=256,
                               limit_train_batches=2, logdir=str(tmp_path)))
    group = result.optimizer.param_groups[0]
    assert group["rho"] == nonlocal_opt.get("rule", "sam").hyperparameters["rho"].default
    assert group["lr"] == 1e-3  # torch.optim.SGD's default, not the paper's 0.01
    assert hparams(tmp_path)["preset"] == "none" and hparams(tmp_path)["hp.lr"] == 1e-3


@pytest.mark.parametrize("optimizer", ["entropy-sgd", "rbo", "sam", "adamw"])
def test_train_runs_what_python_builds_with_the_same_defaults(tmp_path, optimizer):
    """No hidden preset: ``TrainConfig(optimizer=NAME)`` trains with every hyperparameter at the value
    ``compose(params, NAME)`` gives it (``nonlocal_opt.EntropySGD(params)`` for Entropy-SGD), and the same
    projector."""
    result = train(TrainConfig(dataset="landscape:quadratic", optimizer=optimizer, batch_size=256, limit_train_batches=1,
                               logdir=str(tmp_path)))
    python = nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(1))], optimizer)
    if optimizer == "entropy-sgd":
        python = nonlocal_opt.EntropySGD([torch.nn.Parameter(torch.zeros(1))])
    trained, built = ({k: v for k, v in opt.param_groups[0].items() if k != "params"} for opt in (result.optimizer, python))
    assert trained == built
    assert (type(result.optimizer.base), result.optimizer.rule.name) == (type(python.base), python.rule.name)
    assert getattr(result.optimizer.projector, "name", None) == getattr(python.projector, "name", None)
