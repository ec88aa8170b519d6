"""The ``entropy-sgd`` rule against an independent implementation of Algorithm 1 (Chaudhari et al.)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import nonlocal_opt

from conftest import make_closure

PAPER = dict(lr=2.0, inner_steps=4, inner_lr=0.1, gamma=0.5, scoping=0.2, alpha=0.75, scale_outer_by_gamma=True)
REFERENCE_CODE = dict(
    lr=0.3, inner_steps=3, inner_lr=0.05, gamma=0.03, scoping=0.0, alpha=0.75, scale_outer_by_gamma=False,
    momentum=0.9, nesterov=True, weight_decay=5e-4,
)


def _problem(batches=1):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    data = [(torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))) for _ in range(batches)]
    return model, lambda m, k=0: torch.nn.functional.cross_entropy(m(data[k][0]), data[k][1])


def reference_entropy_sgd(model, loss_of, steps, lr, inner_steps, inner_lr, gamma, scoping, alpha,
                          scale_outer_by_gamma, momentum=0.0, nesterov=False, weight_decay=0.0, batch_of=None):
    """Algorithm 1 with ε = 0: x', μ ← x; L times x' ← x' − η'[∇f(x') − γ_t(x − x')], μ ← (1−α)μ + αx';
    outer gradient G = γ_t(x − μ) (or x − μ); SGD from x with G: d = G + λx, b ← μ_m b + d, x ← x − η b
    (Nesterov: x ← x − η(d + μ_m b)); γ_t = γ₀(1 + γ₁)^t. ``batch_of(t, ℓ)`` picks the mini-batch."""
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    buffers = None
    for t in range(steps):
        gamma_t = gamma * (1 + scoping) ** t
        x_inner, mu = [v.clone() for v in x], [v.clone() for v in x]
        for inner in range(inner_steps):
            with torch.no_grad():
                for p, v in zip(params, x_inner):
                    p.copy_(v)
            k = 0 if batch_of is None else batch_of(t, inner)
            grads = torch.autograd.grad(loss_of(model, k), params)
            x_inner = [v - inner_lr * (g - gamma_t * (a - v)) for v, g, a in zip(x_inner, grads, x)]
            mu = [(1 - alpha) * m + alpha * v for m, v in zip(mu, x_inner)]
        outer = [(gamma_t if scale_outer_by_gamma else 1.0) * (a - m) for a, m in zip(x, mu)]
        d = [o + weight_decay * a for o, a in zip(outer, x)]
        if momentum:
            buffers = [v.clone() for v in d] if buffers is None else [momentum * b + v for b, v in zip(buffers, d)]
            d = [v + momentum * b for v, b in zip(d, buffers)] if nesterov else buffers
        x = [a - lr * v for a, v in zip(x, d)]
    with torch.no_grad():
        for p, v in zip(params, x):
            p.copy_(v)


@pytest.mark.parametrize("settings", [PAPER, REFERENCE_CODE], ids=["paper", "reference-code"])
def test_noise_free_entropy_sgd_matches_algorithm_1(settings):
    model, loss_of = _problem()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    opt = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", noise=0.0, **settings)
    for _ in range(5):
        opt.step(make_closure(opt, lambda: loss_of(model)))
        assert opt.stats["grad_evals"] == settings["inner_steps"]
    reference_entropy_sgd(twin, loss_of, 5, **settings)
    moved = sum((a - b).norm() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 1e-3
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fresh_batches_follow_algorithm_1_with_one_batch_per_langevin_step():
    """Langevin step ℓ of outer step t sees batch t·L + ℓ: the step's own batch, then L − 1 fresh ones."""
    settings = dict(PAPER, inner_steps=3)
    model, loss_of = _problem(batches=5 * 3)
    twin = copy.deepcopy(model)
    opt = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", noise=0.0, fresh_batches=True, **settings)
    position = {"k": 0}

    def closure(fresh_batch=False):
        position["k"] += fresh_batch
        opt.zero_grad()
        loss = loss_of(model, position["k"])
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
        position["k"] += 1  # the trainer's next mini-batch
    assert position["k"] == 15
    reference_entropy_sgd(twin, loss_of, 5, batch_of=lambda t, inner: 3 * t + inner, **settings)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fresh_batches_need_a_closure_that_accepts_the_keyword():
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", fresh_batches=True)
    with pytest.raises(ValueError, match="fresh_batch"):
        opt.step(make_closure(opt, lambda: loss_of(model)))


def _run_with_noise(seed, steps=3):
    model, loss_of = _problem()
    opt = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", noise=1e-2, seed=seed, **PAPER)
    for _ in range(steps):
        opt.step(make_closure(opt, lambda: loss_of(model)))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_noise_is_reproducible_from_the_seed():
    torch.manual_seed(123)
    first = _run_with_noise(seed=7)
    torch.manual_seed(456)  # the global generator must not matter
    assert torch.equal(first, _run_with_noise(seed=7))
    assert not torch.equal(first, _run_with_noise(seed=8))


def test_noise_term_is_sqrt_inner_lr_times_epsilon_times_standard_normal():
    """With f ≡ 0, L = 1, α = 1 and the un-scaled outer step at η = 1: Δx = x' − x = sqrt(η') ε ξ."""
    theta = torch.nn.Parameter(torch.zeros(40_000))
    inner_lr, noise = 0.04, 0.5
    opt = nonlocal_opt.compose(
        [theta], rule="entropy-sgd", lr=1.0, inner_steps=1, alpha=1.0, inner_lr=inner_lr, noise=noise,
        scale_outer_by_gamma=False, seed=0,
    )
    opt.step(make_closure(opt, lambda: 0.0 * theta.sum()))
    xi = theta.detach() / (math.sqrt(inner_lr) * noise)
    assert abs(float(xi.mean())) < 0.02
    assert abs(float(xi.std()) - 1.0) < 0.02


def test_scoping_advances_gamma_once_per_outer_step():
    model, loss_of = _problem()
    gamma0, scoping = 0.5, 0.2
    opt = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", noise=0.0, **PAPER)
    for t in range(4):
        opt.step(make_closure(opt, lambda: loss_of(model)))
        assert opt.stats["gamma"] == pytest.approx(gamma0 * (1 + scoping) ** t, rel=1e-6)
    still = nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", noise=0.0, **dict(PAPER, scoping=0.0))
    for _ in range(3):
        still.step(make_closure(still, lambda: loss_of(model)))
        assert still.stats["gamma"] == pytest.approx(gamma0, rel=1e-6)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(dict(inner_steps=0), "inner_steps"), (dict(alpha=1.5), "alpha"), (dict(noise=-1.0), "noise"),
     (dict(seed=-3), "seed"), (dict(nesterov=True), "Nesterov"), (dict(gamma=0.0), "gamma")],
)
def test_bad_hyperparameters_raise_value_error(bad, message):
    model, _ = _problem()
    with pytest.raises(ValueError, match=message):
        nonlocal_opt.compose(model.parameters(), rule="entropy-sgd", **bad)
