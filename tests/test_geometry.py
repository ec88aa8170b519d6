"""Path geometry (RSI / EB / γ / lolr) against closed forms and independent re-implementations."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.analysis.path_geometry import PathTracker, measure_path_geometry, read_csv, seeded_loader
from nonlocal_opt.cli.geometry import add_geometry_arguments, run_geometry
from nonlocal_opt.cli.main import main
from nonlocal_opt.landscapes import LANDSCAPES
from nonlocal_opt.training.metrics import read_metrics

from conftest import make_closure

EIGENVALUES = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
LR, STEPS = 0.25, 12


def quadratic_problem():
    """``f(w) = ½ (w − m)ᵀ Q diag(λ) Qᵀ (w − m)``: (Q, m, w0), built in the test."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    m = torch.randn(3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)
    return q, m, w0


def test_full_batch_gd_on_quadratic_matches_closed_form():
    q, m, w0 = quadratic_problem()
    hessian = q @ torch.diag(EIGENVALUES) @ q.T

    def train(tracker):
        w = torch.nn.Parameter(w0.clone())
        opt = nonlocal_opt.compose([w], "local", lr=LR)

        closure = make_closure(opt, lambda: 0.5 * (w - m) @ hessian @ (w - m))

        for _ in range(STEPS):
            tracker.step(opt, closure)

    result = measure_path_geometry(train)
    assert result.replay_error == 0.0 and len(result.rows) == STEPS

    # Eigenbasis: w_t − m = Σ_i a_i^t c_i q_i with a_i = 1 − ηλ_i, G_t = Σ_i λ_i a_i^t c_i q_i, w* = w_T.
    c, a = q.T @ (w0 - m), 1 - LR * EIGENVALUES
    for t, row in enumerate(result.rows):
        diff = (a**t - a**STEPS) * c  # coordinates of w_t − w*
        grad = EIGENVALUES * a**t * c  # coordinates of G_t
        rsi = float((grad * diff).sum() / (diff**2).sum())
        eb = float(grad.norm() / diff.norm())
        assert row.step == t
        assert row.rsi == pytest.approx(rsi, rel=1e-6, abs=1e-6)
        assert row.eb == pytest.approx(eb, rel=1e-6, abs=1e-6)
        assert row.gamma == pytest.approx(rsi / eb, rel=1e-6, abs=1e-6)
        assert row.lolr == pytest.approx(rsi / eb**2, rel=1e-6, abs=1e-6)
    # Convex quadratic, GD with η < 2/λ_max: every step heads towards w*.
    assert all(row.gamma > 0 for row in result.rows)


def test_sam_perturbed_pass_and_custom_loop():
    """``pass_index=1`` on SAM records ∇f(w_t + ε_t); a custom loop with ``observe`` records ∇f(w_t).
    Both checked against a plain re-implementation of SAM's iterates written here."""
    q, m, w0 = quadratic_problem()
    hessian = q @ torch.diag(EIGENVALUES) @ q.T
    rho, steps = 0.3, 6

    def grad_f(w):
        return hessian @ (w - m)

    iterates, perturbed = [w0.clone()], []
    for _ in range(steps):
        w = iterates[-1]
        g = grad_f(w)
        perturbed.append(grad_f(w + rho * g / g.norm()))
        iterates.append(w - LR * perturbed[-1])
    w_star = iterates[-1]

    def run(tracker, observe):
        w = torch.nn.Parameter(w0.clone())
        opt = nonlocal_opt.compose([w], "sam", lr=LR, rho=rho)

        closure = make_closure(opt, lambda: 0.5 * (w - m) @ hessian @ (w - m))

        for _ in range(steps):
            if observe:
                closure()
                tracker.observe([w])
                opt.step(closure)
            else:
                tracker.step(opt, closure)

    tapped, observed = PathTracker(w_star, pass_index=1), PathTracker(w_star)
    run(tapped, observe=False)
    run(observed, observe=True)
    for t in range(steps):
        diff = iterates[t] - w_star
        for tracker, grad in ((tapped, perturbed[t]), (observed, grad_f(iterates[t]))):
            row = tracker.rows[t]
            assert row.rsi == pytest.approx(float(grad @ diff / diff.dot(diff)), rel=1e-9)
            assert row.eb == pytest.approx(float(grad.norm() / diff.norm()), rel=1e-9)


def test_rbo_records_the_first_pass_at_the_contact_point():
    """For RBO, ``G_t`` is ∇f(θ_t) of the step's first pass; compared with the gradient at the
    iterates written down by a second tracker-free run."""
    q, m, w0 = quadratic_problem()
    hessian = q @ torch.diag(EIGENVALUES) @ q.T

    def run(tracker=None):
        w = torch.nn.Parameter(w0.clone())
        opt = nonlocal_opt.compose([w], "rbo", lr=0.3, rho=0.5, max_iters=5)
        path = []

        closure = make_closure(opt, lambda: 0.5 * (w - m) @ hessian @ (w - m))

        for _ in range(5):
            path.append(w.detach().clone())
            tracker.step(opt, closure) if tracker else opt.step(closure)
        return path, w.detach().clone()

    path, w_star = run()
    tracker = PathTracker(w_star)
    run(tracker)
    for row, w in zip(tracker.rows, path):
        grad, diff = hessian @ (w - m), w - w_star
        assert row.gamma == pytest.approx(float(grad @ diff / (grad.norm() * diff.norm())), rel=1e-9)


def test_pass_index_beyond_the_step_raises():
    w = torch.nn.Parameter(torch.ones(2))
    opt = nonlocal_opt.compose([w], "local", lr=0.1)

    closure = make_closure(opt, lambda: (w**2).sum())

    with pytest.raises(ValueError, match="pass_index"):
        PathTracker(pass_index=1).step(opt, closure)
    with pytest.raises(ValueError, match="pass_index"):
        PathTracker(pass_index=-1)


def test_mlp_runs_replay_bit_identically_and_nondeterminism_warns():
    x, y = torch.randn(64, 5, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    dataset = torch.utils.data.TensorDataset(x, y)

    def train(tracker, seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = nonlocal_opt.compose(model.parameters(), "local", lr=0.1, momentum=0.9)
        for epoch in range(2):
            for xb, yb in seeded_loader(dataset, 16, seed=epoch):

                def closure(xb=xb, yb=yb):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                tracker.step(opt, closure, epoch)

    result = measure_path_geometry(train)
    assert result.replay_error == 0.0
    assert [r.epoch for r in result.rows] == [0] * 4 + [1] * 4
    assert all(math.isfinite(r.gamma) and -1 <= r.gamma <= 1 for r in result.rows)

    seeds = iter([0, 1])
    with pytest.warns(RuntimeWarning, match="not bit-identical"):
        measure_path_geometry(lambda tracker: train(tracker, next(seeds)))


def geometry_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_geometry_arguments(parser)
    return parser.parse_args(["--dataset", "landscape:alm", "--batch-size", "64", "--limit-train-batches", "6",
                              "--epochs", "2", "--out", str(tmp_path), *extra])


def test_cli_writes_csv_tensorboard_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run_geometry(geometry_args(tmp_path, "--optimizer", "local", "--lr", "0.001")) == 0
    rows = read_csv(tmp_path / "path_geometry.csv")
    assert [r.step for r in rows] == list(range(12)) and {r.epoch for r in rows} == {0, 1}
    assert all(math.isfinite(r.gamma) and -1 <= r.gamma <= 1 for r in rows)
    assert (tmp_path / "path_geometry.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "replay error 0" in capsys.readouterr().out


def test_cli_measures_the_trainers_path(tmp_path, capsys):
    """``nonlocal-opt geometry`` runs the trainer: on ALM (every batch's loss is f(θ), θ_0 = 0) its rows are
    those of plain GD θ_{t+1} = θ_t − η∇f(θ_t) written here, with w* = θ_12; the second run's logdir holds
    the trainer's metrics, whose per-step loss is copied to TensorBoard and the summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lr = 0.001
    assert run_geometry(geometry_args(tmp_path, "--optimizer", "local", "--lr", str(lr))) == 0
    landscape = LANDSCAPES["alm"]()
    landscape.theta.data.zero_()
    path, grads, losses = [], [], []
    for _ in range(12):
        loss = landscape()
        (grad,) = torch.autograd.grad(loss, landscape.theta)
        path.append(landscape.theta.detach().clone())
        grads.append(grad)
        losses.append(loss.item())
        landscape.theta.data -= lr * grad
    w_star = landscape.theta.detach()
    rows = read_csv(tmp_path / "path_geometry.csv")
    for row, w, grad in zip(rows, path, grads, strict=True):
        diff = w - w_star
        assert row.rsi == pytest.approx(float(grad @ diff / diff.dot(diff)), rel=1e-5)
        assert row.eb == pytest.approx(float(grad.norm() / diff.norm()), rel=1e-5)
    steps = [r for r in read_metrics(tmp_path / "run2" / "metrics.csv") if r["scope"] == "step"]
    assert [float(r["train/loss"]) for r in steps] == pytest.approx(losses, rel=1e-5)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(12))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-5)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([lr] * 12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(losses[-1], rel=1e-5) and summary["replay_error"] == 0.0
    assert summary["last_epoch"]["val/loss"] == pytest.approx(landscape().item(), rel=1e-5)
    assert "replay error 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizer", "nope"], "unknown rule"),
        (["--optimizer", "local", "--rho-schedule", "cosine"], "rho"),
        (["--optimizer", "rbo", "--rho-schedule", "cosine", "--rho-final", "0"], "--rho-final 0 must be a finite number > 0"),
        (["--set", "momentum"], "key=value"),
        (["--gradient-pass", "-1"], "--gradient-pass must be >= 0"),
        (["--train-subset", "10"], "--batch-size 128 is larger than the 10 training samples"),
        (["--optimizer", "sam", "--gradient-pass", "2"], "pass_index"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    argv = ["geometry", "--dataset", "landscape:alm", "--limit-train-batches", "1", "--out", str(tmp_path), *extra]
    try:
        code = main(argv)
    except SystemExit as error:  # argparse rejects malformed flags before the command runs
        code = error.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
