"""Real Lightning (automatic optimization, one CPU process): a multi-pass rule steps like a plain loop,
and gradient accumulation by Lightning is refused with an error that names it."""

from __future__ import annotations

import copy

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.optim.step_context import HostGradientError

lightning = pytest.importorskip("lightning")


class Module(lightning.LightningModule):
    def __init__(self, model, make_optimizer):
        super().__init__()
        self.model, self.make_optimizer = model, make_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.model.parameters())


def _data():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(**kwargs):
    return lightning.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_sam_with_rho_zero_under_lightning_is_sgd():
    model, twin = _model(), _model()
    _trainer().fit(Module(model, lambda p: nonlocal_opt.SAM(p, lr=0.1, momentum=0.9, rho=0.0)), _data())
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), _model().parameters()))


@pytest.mark.parametrize("rule", ["sam", "rbo", "entropy-sgd"])
def test_lightning_gradient_accumulation_is_refused_by_multi_pass_rules(rule):
    model = _model()
    module = Module(model, lambda p: nonlocal_opt.compose(p, rule, lr=0.1))
    with pytest.raises(HostGradientError, match="gradient accumulation by the host"):
        _trainer(accumulate_grad_batches=2).fit(module, _data())


def test_lightning_gradient_accumulation_with_the_local_rule_is_plain_accumulation():
    model, twin = _model(), copy.deepcopy(_model())
    _trainer(accumulate_grad_batches=2).fit(Module(model, lambda p: nonlocal_opt.compose(p, "local", lr=0.1)), _data())
    _trainer(accumulate_grad_batches=2).fit(Module(twin, lambda p: torch.optim.SGD(p, lr=0.1)), _data())
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
