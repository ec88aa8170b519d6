"""Real Lightning (one CPU process). Automatic optimization: a multi-pass rule steps like a plain loop,
gradient accumulation by Lightning is refused with an error that names it, and the logging helpers record
the loss at θ_t once per step. Manual optimization steps like a plain loop with the same closures, and a run
resumed from a Lightning checkpoint ends where an uninterrupted one does. fp16 through ``ClosureMixedPrecision``
and bf16 step like plain loops under autocast; torch's scaler is refused with a message naming ours."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import HostGradientError

lightning = pytest.importorskip("lightning")
from nonlocal_opt.integrations.lightning import ClosureMixedPrecision, StepLossLogger  # noqa: E402  (needs lightning)

RULES = {
    "sam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9),
    "entropy-sgd": dict(rule="entropy-sgd", lr=1.0, inner_steps=3, seed=0, scale_outer_by_gamma=False, momentum=0.9),
    "rbo": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=0.5, momentum=0.9),
}
CARRYING = {"rbo-tangent": dict(rule="rbo", projector="tangent", lr=0.5, rho=0.5, momentum=0.9)}  # carries its centre


def _compose(name):
    settings = {**RULES, **CARRYING}[name]
    return lambda params: nonlocal_opt.compose(params, **settings)


class Module(lightning.LightningModule):
    def __init__(self, model, make_optimizer):
        super().__init__()
        self.model, self.make_optimizer = model, make_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.model.parameters())


def batch_closure(opt, model, batch, backward):
    """The closure both the Lightning module (``backward=self.manual_backward``) and the plain loop use."""
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        backward(loss)
        return loss

    return closure


class ManualModule(Module):
    def __init__(self, model, make_optimizer):
        super().__init__(model, make_optimizer)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.step(closure=batch_closure(opt, self.model, batch, self.manual_backward))


class CountingModule(Module):
    """Logs the loss and counts calls of ``training_step``, guarded by ``first_pass`` and unguarded."""

    def __init__(self, model, make_optimizer):
        super().__init__(model, make_optimizer)
        self.calls = self.guarded_calls = 0
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.calls += 1
        if nonlocal_opt.first_pass(self.optimizers()):
            self.guarded_calls += 1
            self.logged.append(loss.item())
            self.log("first_pass_loss", loss)
        return loss


def _data():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(**kwargs):
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return lightning.Trainer(**{**settings, **kwargs})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _assert_same_parameters(a, b, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), _model().parameters())), "did not train"


def test_sam_with_rho_zero_under_lightning_is_sgd():
    model, twin = _model(), _model()
    _trainer().fit(Module(model, lambda p: nonlocal_opt.SAM(p, lr=0.1, momentum=0.9, rho=0.0)), _data())
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        opt.step()
    _assert_same_parameters(model, twin)


@pytest.mark.parametrize("rule", list(RULES))
def test_manual_optimization_steps_like_a_plain_loop(rule):
    model, twin = _model(), _model()
    _trainer().fit(ManualModule(model, _compose(rule)), _data())
    opt = _compose(rule)(twin.parameters())
    for batch in _data():
        opt.step(batch_closure(opt, twin, batch, torch.Tensor.backward))
    _assert_same_parameters(model, twin)


@pytest.mark.parametrize("rule", [*RULES, *CARRYING])
@pytest.mark.parametrize("module", [Module, ManualModule], ids=["automatic", "manual"])
def test_resume_from_a_lightning_checkpoint_continues_the_run(tmp_path, rule, module):
    whole = _trainer(max_epochs=2)
    whole.fit(module(_model(), _compose(rule)), _data())
    first = _trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(module(_model(), _compose(rule)), _data())
    checkpoint = first.checkpoint_callback.best_model_path
    assert checkpoint.endswith("epoch=0-step=4.ckpt")
    resumed = _trainer(max_epochs=2)
    resumed.fit(module(_model(), _compose(rule)), _data(), ckpt_path=checkpoint)

    assert resumed.global_step == whole.global_step == 8
    for p, q in zip(resumed.lightning_module.parameters(), whole.lightning_module.parameters()):
        assert torch.equal(p, q)
    expected, got = whole.optimizers[0].state_dict(), resumed.optimizers[0].state_dict()
    assert expected["base_state"] and all("momentum_buffer" in s for s in expected["base_state"].values())
    assert rule != "rbo-tangent" or "centre_theta" in expected["state"][0]  # RBO's carried centre
    assert rule != "entropy-sgd" or "noise_seed" in expected["state"][0]
    assert got.pop("param_groups") == expected.pop("param_groups")  # strings among them (reuse='vertical')
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["sam", "rbo", "entropy-sgd"])
def test_lightning_gradient_accumulation_is_refused_by_multi_pass_rules(rule):
    model = _model()
    module = Module(model, lambda p: nonlocal_opt.compose(p, rule, lr=0.1))
    with pytest.raises(HostGradientError, match=r"gradient accumulation by the host.*MicroBatchClosure.*manual optimization"):
        _trainer(accumulate_grad_batches=2).fit(module, _data())


def test_lightning_gradient_accumulation_with_the_local_rule_is_plain_accumulation():
    model, twin = _model(), copy.deepcopy(_model())
    _trainer(accumulate_grad_batches=2).fit(Module(model, lambda p: nonlocal_opt.compose(p, "local", lr=0.1)), _data())
    _trainer(accumulate_grad_batches=2).fit(Module(twin, lambda p: torch.optim.SGD(p, lr=0.1)), _data())
    _assert_same_parameters(model, twin)


def _logged(tmp_path, module, helper=None, **kwargs) -> list[dict[str, str]]:
    """Fit ``module`` with the callback ``helper`` (default: ``StepLossLogger("train_loss")``) and return the rows
    Lightning's ``CSVLogger`` wrote."""
    logger = lightning.pytorch.loggers.CSVLogger(tmp_path, name="run")
    callbacks = [helper or StepLossLogger("train_loss")]
    _trainer(logger=logger, log_every_n_steps=1, callbacks=callbacks, **kwargs).fit(module, _data())
    with open(Path(logger.log_dir) / "metrics.csv") as rows:
        return list(csv.DictReader(rows))


@pytest.mark.parametrize("rule", list(RULES))
def test_logged_loss_is_the_loss_at_theta_t_and_guarded_side_effects_run_once_per_step(tmp_path, rule):
    module = CountingModule(_model(), _compose(rule))
    rows = _logged(tmp_path, module)

    twin = _model()
    opt, expected = _compose(rule)(twin.parameters()), []  # the loss at θ_t of every step, from a plain loop
    for batch in _data():
        expected.append(float(opt.step(batch_closure(opt, twin, batch, torch.Tensor.backward))))
    assert module.guarded_calls == 4 and module.calls >= 4 * 2  # one guarded call per step; the others once per pass
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert [float(row["train_loss"]) for row in rows] == pytest.approx(expected, abs=1e-6)
    assert [float(row["first_pass_loss"]) for row in rows] == pytest.approx(expected, abs=1e-6)
    assert module.logged == pytest.approx(expected, abs=1e-6)
    assert expected[0] != pytest.approx(expected[-1], abs=1e-3), "the loss should change from step to step"


def test_step_loss_logger_logs_nothing_on_batches_without_a_step(tmp_path):
    module = Module(_model(), lambda p: nonlocal_opt.compose(p, "local", lr=0.1))
    rows = _logged(tmp_path, module, StepLossLogger("train_loss", on_epoch=True), accumulate_grad_batches=2)
    steps = [float(row["train_loss_step"]) for row in rows if row["train_loss_step"]]
    (epoch,) = [float(row["train_loss_epoch"]) for row in rows if row["train_loss_epoch"]]
    assert len(steps) == 2 and steps[0] != pytest.approx(steps[1])
    assert epoch == pytest.approx(sum(steps) / 2, abs=1e-6)  # a stale loss logged on a batch without a step would count


def test_first_pass_is_true_outside_a_step_and_names_a_foreign_optimizer():
    opt = nonlocal_opt.SAM(_model().parameters(), lr=0.1)
    assert nonlocal_opt.first_pass(opt)
    with pytest.raises(TypeError, match="not a nonlocal-opt optimizer"):
        nonlocal_opt.first_pass(torch.optim.SGD(_model().parameters(), lr=0.1))


def _fp16_data():
    """Four batches; the third overflows float16 (its scaled loss is not finite), so that step is skipped."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    x[32:48] *= 1e6
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["plain", "clipped"])
@pytest.mark.parametrize("rule", list(RULES))
def test_fp16_with_closure_mixed_precision_steps_like_a_plain_loop_with_the_scaler(rule, clip):
    """Lightning's fp16 (autocast float16 on the CPU, loss scaling) through ``ClosureMixedPrecision`` against a plain
    loop with ``nonlocal_opt.GradScaler``: same parameters and scale, the overflowing batch skipped in both, and
    Lightning's gradient clipping applied to every pass's unscaled gradients."""
    model, twin = _model(), _model()
    trainer = _trainer(plugins=[ClosureMixedPrecision("cpu")], gradient_clip_val=clip)
    trainer.fit(Module(model, _compose(rule)), _fp16_data())
    opt, scaler, skipped = _compose(rule)(twin.parameters()), nonlocal_opt.GradScaler("cpu"), []
    for x, y in _fp16_data():

        def closure(x=x, y=y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(twin(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
            return loss

        scaler.step(opt, closure)
        scaler.update()
        skipped.append(nonlocal_opt.stats(opt)["nonfinite"])
    assert skipped == [0.0, 0.0, 1.0, 0.0]
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale() == 2.0**15
    _assert_same_parameters(model, twin)


def test_torch_scaler_under_lightning_fp16_is_refused_naming_the_closure_scaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Module(_model(), _compose("sam"))
    with pytest.raises(RuntimeError, match=r"evaluates the loss several times.*use nonlocal_opt.GradScaler"):
        _trainer(plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module, _fp16_data())
    with pytest.raises(TypeError, match=r"needs a nonlocal_opt\.GradScaler"):
        ClosureMixedPrecision("cpu", torch.amp.GradScaler("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"needs a GPU and none is available: on the CPU pass ClosureMixedPrecision\('cpu'\)"):
            ClosureMixedPrecision()


@pytest.mark.parametrize("rule", list(RULES))
def test_bf16_mixed_steps_like_a_plain_loop_under_autocast(rule):
    model, twin = _model(), _model()
    _trainer(precision="bf16-mixed").fit(Module(model, _compose(rule)), _data())
    opt = _compose(rule)(twin.parameters())
    for x, y in _data():

        def closure(x=x, y=y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    _assert_same_parameters(model, twin)
