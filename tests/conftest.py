"""Shared fixtures: deterministic float64 landscapes and a small classification batch. Every test
parametrised by ``projector`` gets the marker ``projector``; ``NONLOCAL_OPT_PROJECTOR=<name>`` deselects
those parametrised with another projector (the tox matrix runs ``pytest -m projector``)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.plugins.manager import ALLOW_ENV_VAR, DISABLE_ENV_VAR, ENTRY_POINT_GROUP, reset_plugin_manager

PROJECTOR_ENV_VAR = "NONLOCAL_OPT_PROJECTOR"

# Two cores, many small tensors: one intra-op thread per test process avoids oversubscription.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "projector: parametrised by a projector name (set automatically by conftest.py)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    chosen = os.environ.get(PROJECTOR_ENV_VAR)
    if chosen is not None and chosen not in nonlocal_opt.available("projector"):
        raise pytest.UsageError(f"{PROJECTOR_ENV_VAR}={chosen!r} is not a registered projector")
    kept, deselected = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if "projector" in params:
            item.add_marker(pytest.mark.projector)
            if chosen is not None and params["projector"] != chosen:
                deselected.append(item)
                continue
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins before and after a test that changes entry points or the allow- or block-list;
    both lists start unset (tox sets the allow-list), so the test's own entry points load."""
    monkeypatch.delenv(ALLOW_ENV_VAR, raising=False)
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def install_distribution(tmp_path, monkeypatch, fresh_plugins):
    """``install_distribution(name, version, modules, entry_points)``: a real distribution on ``sys.path``, the
    modules ``{module: source}`` next to a ``.dist-info`` declaring the ``nonlocal_opt`` entry points
    ``{entry-point name: module}``; the modules are forgotten after the test."""
    monkeypatch.syspath_prepend(tmp_path)
    imported = []

    def install(name: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(source)
        info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{entry} = {value}\n" for entry, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
        imported.extend(entry_points.values())
        importlib.invalidate_caches()

    yield install
    for module in imported:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


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


class PlainSGD(torch.optim.Optimizer):
    """A third party's base optimizer: ``θ ← θ − η g``, no state."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def as_views_of_one_buffer(model):
    """Re-point every parameter at a slice of one flat tensor, as flat-parameter wrappers do."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for p, piece in zip(model.parameters(), flat.split([p.numel() for p in model.parameters()])):
        p.data = piece.view_as(p)
    return flat


def sam_gradients(model, loss_of, rho, adaptive):
    """SAM / ASAM from the formulas, as an oracle: ``ε = ρ T² g / (‖T g‖ + 1e-12)``, ``T = |w|`` or 1, one
    norm over all tensors; returns ``(w, ∇f(w + ε))`` and leaves the model at ``w + ε``."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model), params)
    with torch.no_grad():
        scale = [p.abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scale, grads)))
        saved = [p.clone() for p in params]
        for p, t, g in zip(params, scale, grads):
            p.add_(rho * t * t * g / (norm + 1e-12))
    return saved, torch.autograd.grad(loss_of(model), params)

