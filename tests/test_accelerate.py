"""Real Accelerate (one CPU process) with gradient accumulation: ``accelerator.accumulate()`` is refused by
multi-pass rules with an error that names it and the supported way; the single-pass ``local`` rule
accumulates like ``torch.optim.SGD``; the supported way (accumulate inside the closure) equals one step on
the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nonlocal_opt
from nonlocal_opt import HostGradientError

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import GradientState  # noqa: E402


@pytest.fixture(autouse=True)
def _forget_accumulation():
    """Accelerate keeps ``gradient_accumulation_steps`` in a process-wide ``GradientState``: drop it after each
    test, as Accelerate's own tests do, so that later tests do not run under accumulation."""
    yield
    GradientState._reset_state()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(count=4, size=16):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator)) for _ in range(count)]


def _closure(opt, model, batch, backward, micro_batches=1):
    """``opt.zero_grad()``, then forward and ``backward`` of each of ``micro_batches`` equal parts of ``batch`` (its
    loss divided by their number: accumulation inside the closure); returns the batch's mean loss."""
    x, y = batch

    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            loss = F.cross_entropy(model(xs), ys) / micro_batches
            backward(loss)
            total += loss.detach()
        return total

    return closure


@pytest.mark.parametrize("rule", ["sam", "entropy-sgd", "rbo"])
def test_accumulate_is_refused_by_multi_pass_rules(rule):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    prepared, opt = accelerator.prepare(model, nonlocal_opt.compose(model.parameters(), rule, lr=0.1))
    stepped = []

    def train():
        for index, batch in enumerate(_batches()):
            with accelerator.accumulate(prepared):
                stepped.append(index)
                opt.step(_closure(opt, prepared, batch, accelerator.backward))

    with pytest.raises(HostGradientError, match=r"gradient_accumulation_steps=2.*accumulate inside the closure.*MicroBatchClosure"):
        train()
    assert stepped == [0, 1]  # Accelerate skipped the first batch's step (and closure); the second one raised
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))


def _accumulated(make_optimizer) -> torch.nn.Module:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    prepared, opt = accelerator.prepare(model, make_optimizer(model.parameters()))
    for x, y in _batches():
        with accelerator.accumulate(prepared):
            accelerator.backward(F.cross_entropy(prepared(x), y))
            opt.step()
            opt.zero_grad()
    return model


def test_the_local_rule_accumulates_like_torch_sgd():
    ours = _accumulated(lambda p: nonlocal_opt.compose(p, "local", lr=0.1, momentum=0.9))
    reference = _accumulated(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    for p, q, start in zip(ours.parameters(), reference.parameters(), _model().parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        assert not torch.equal(p, start)


@pytest.mark.parametrize("rule", ["sam", "rbo"])
def test_accumulating_inside_the_closure_equals_whole_batch_steps(rule):
    settings = dict(lr=0.1, rho=0.05, momentum=0.9) if rule == "sam" else dict(projector="gauss-newton", lr=0.5, rho=0.5)
    accelerator = Accelerator(cpu=True)
    model, twin = _model(), _model()
    prepared, opt = accelerator.prepare(model, nonlocal_opt.compose(model.parameters(), rule, **settings))
    plain = nonlocal_opt.compose(twin.parameters(), rule, **settings)
    for batch in _batches():
        opt.step(_closure(opt, prepared, batch, accelerator.backward, micro_batches=4))  # what the error proposes
        plain.step(_closure(plain, twin, batch, torch.Tensor.backward))
        assert nonlocal_opt.stats(opt)["loss"] == pytest.approx(nonlocal_opt.stats(plain)["loss"], abs=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
