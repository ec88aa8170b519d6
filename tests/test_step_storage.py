"""Where a step keeps its vectors: scratch kept from step to step (no new ``R^d`` tensor per step), and
the projection record, which holds copies only when asked for."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nonlocal_opt
from nonlocal_opt import ProjectionResult, Projector

from conftest import make_closure


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 4, (4,))  # activations smaller than d
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)


class NewStorages(TorchDispatchMode):
    """The sizes (in elements) of the tensors ops allocate: outputs of ops whose results alias nothing
    (not in-place, ``out=`` or view ops)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(result.alias_info is not None for result in func._schema.returns):
            self.sizes += [leaf.numel() for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        return out


COMPOSITIONS = {
    "local": dict(rule="local", lr=0.1),
    "sam": dict(rule="sam", lr=0.1, rho=0.05),
    "asam with eta": dict(rule="sam", lr=0.1, rho=0.05, adaptive=True, eta=0.01),
    "gsam": dict(rule="gsam", lr=0.1, rho=0.05),
    "wsam": dict(rule="wsam", lr=0.1, rho=0.05),
    "wsam coupled": dict(rule="wsam", lr=0.1, rho=0.05, decoupled=False),
    "friendly-sam": dict(rule="friendly-sam", lr=0.1, rho=0.05),
    "friendly-sam, device path": dict(rule="friendly-sam", lr=0.1, rho=0.05, device_path=True),
    "looksam k=2": dict(rule="sam", lr=0.1, rho=0.05, refresh_every=2),
    "ae-sam": dict(rule="sam", lr=0.1, rho=0.05, refresh="gradient-norm"),
    "msam": dict(rule="msam", lr=0.1, rho=0.05),
    "rbo gauss-newton, refresh_every=2": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=1.0, max_iters=6, rtol=None,
                                              refresh_every=2),
    "entropy-sgd": dict(rule="entropy-sgd", lr=0.1, inner_steps=4),
    "rbo gauss-newton": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=1.0, max_iters=6, rtol=None),
    "rbo gauss-newton, device path": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=1.0, max_iters=6, rtol=None,
                                          device_path=True),
    "rbo footpoint": dict(rule="rbo", projector="footpoint", lr=0.5, rho=1.0, max_iters=6),
}


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_steps_after_the_first_allocate_no_parameter_sized_vector(name):
    """Every ``R^d`` vector of a step lives in storage the optimizer keeps: a fresh one per step costs page
    faults on the CPU that can exceed the arithmetic filling it. (Each parameter is smaller than ``d``, so
    only flat vectors reach ``d`` elements.)"""
    model, loss_of = _problem()
    d = sum(p.numel() for p in model.parameters())
    opt = nonlocal_opt.compose(model.parameters(), **COMPOSITIONS[name])
    closure = make_closure(opt, loss_of)
    opt.step(closure)
    with NewStorages() as mode:
        for _ in range(3):
            opt.step(closure)
    assert max(p.numel() for p in model.parameters()) < d and d > 4 * 8
    assert [n for n in mode.sizes if n >= d] == []


def test_the_check_sees_a_fresh_flat_vector():
    """The mode above counts a flat vector made inside a step (so the test can fail)."""
    model, _ = _problem()
    d = sum(p.numel() for p in model.parameters())
    with NewStorages() as mode:
        torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert d in mode.sizes


def test_projection_record_is_off_by_default_and_copies_when_on():
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector="gauss-newton", lr=0.5, rho=1.0, max_iters=4)
    opt.step(make_closure(opt, loss_of))
    assert opt.last_projection is None

    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector="gauss-newton", lr=0.5, rho=1.0, max_iters=4,
                               record_projection=True)
    closure = make_closure(opt, loss_of)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loss = opt.step(closure)
    record = opt.last_projection
    kept = [t.clone() for t in (record.centre.theta, record.target.theta, record.result.point.theta, record.result.point.grad)]
    # c_t = p_t + ρ ν(p_t) from the gradient at θ_t, recomputed here.
    model_at = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, value in zip(model.parameters(), theta.split([p.numel() for p in model.parameters()])):
            p.copy_(value.view_as(p))
    opt.zero_grad()
    loss_of().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        for p, value in zip(model.parameters(), model_at):
            p.copy_(value)
    norm = torch.sqrt(1 + g @ g)
    torch.testing.assert_close(record.centre.theta, theta - g / norm)
    torch.testing.assert_close(record.centre.height, loss.detach() + 1 / norm)
    torch.testing.assert_close(record.target.theta, record.centre.theta - 0.5 * g)
    for _ in range(2):
        opt.step(closure)  # reuses the step's scratch: the record must not change
    for before, now in zip(kept, (record.centre.theta, record.target.theta, record.result.point.theta, record.result.point.grad)):
        assert torch.equal(before, now)


def test_a_projector_that_carries_a_centre_must_say_it_uses_the_centre():
    class Careless(Projector):
        name = "careless"
        manifolds = ("offset",)
        uses_centre = False

        def project(self, target, start, ctx):
            return ProjectionResult(point=start, centre=target, iterations=0, residual=torch.zeros_like(start.loss))

    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector=Careless(), lr=0.5, rho=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="uses_centre = False"):
        opt.step(make_closure(opt, loss_of))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
