"""Shared fixtures: deterministic float64 landscapes and a small classification batch."""

from __future__ import annotations

import pytest
import torch

from nonlocal_opt.plugins.manager import reset_plugin_manager

# Two cores, many small tensors: one intra-op thread per test process avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def fresh_plugins():
    """Reload plugins before and after a test that changes entry points or the block list."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def make_closure(opt, loss_fn):
    """LBFGS-style closure: zero grads, forward, backward, return the loss."""

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


@pytest.fixture
def mlp_problem():
    """A tiny MLP with fixed data: (model, loss_fn)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)
