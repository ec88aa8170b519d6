"""BatchNorm running statistics are updated only by the first pass of an RBO step (switchable)."""

from __future__ import annotations

import copy

import pytest
import torch

import nonlocal_opt

from conftest import make_closure


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


@pytest.mark.parametrize("freeze", [True, False])
def test_running_stats_after_rbo_step(freeze):
    model = _bn_model()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    opt = nonlocal_opt.compose(model.parameters(), "rbo", lr=0.5, rho=1.0, max_iters=4, freeze_bn_stats=freeze)
    opt.step(make_closure(opt, lambda: torch.nn.functional.cross_entropy(model(x), y)))
    reference(x)  # one plain training-mode forward pass
    bn, ref = model[1], reference[1]
    if freeze:
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
        assert bn.num_batches_tracked.item() == 1
    else:
        assert bn.num_batches_tracked.item() == 1 + 4
        assert not torch.equal(bn.running_mean, ref.running_mean)
    assert bn.track_running_stats  # restored after the step
