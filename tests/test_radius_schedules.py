"""Radius schedules: ρ in param_groups and in the logs follows the formulas written here."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.cli.geometry import add_geometry_arguments, run_geometry
from nonlocal_opt.cli.parsing import add_radius_schedule_arguments
from nonlocal_opt.optim.radius_schedules import CosineRadius, LinearRadius, StepRadius, radius_scheduler, rho_final_problem
from nonlocal_opt.training.config import RHO_FINAL_FRACTION, ConfigError, TrainConfig, build_radius_scheduler

RHO0, RHO_F, T = 2.0, 0.1, 10


def cosine(t):
    return RHO_F + (RHO0 - RHO_F) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))


def linear(t):
    return RHO0 + (RHO_F - RHO0) * min(t, T) / T


def three_drops(t):
    """Drops by (ρ_f/ρ_0)^{1/3} at t = 2.5, 5, 7.5 (T/4, 2T/4, 3T/4), i.e. from t = 3, 5, 8."""
    k = sum(t >= boundary for boundary in (2.5, 5, 7.5))
    return RHO0 * (RHO_F / RHO0) ** (k / 3)


def rbo(rho=RHO0, lr=0.5):
    w = torch.nn.Parameter(torch.tensor([1.5, -0.5]))
    return w, nonlocal_opt.compose([w], "rbo", lr=lr, rho=rho, max_iters=3)


@pytest.mark.parametrize(("cls", "formula"), [(CosineRadius, cosine), (LinearRadius, linear), (StepRadius, three_drops)])
def test_schedule_writes_the_formula_into_param_groups(cls, formula):
    _, opt = rbo()
    sched = cls(opt, total_steps=T, rho_final=RHO_F)
    for t in range(T + 3):  # held at ρ_final after T
        assert opt.param_groups[0]["rho"] == pytest.approx(formula(t), rel=1e-12)
        assert sched.get_last_rho() == [opt.param_groups[0]["rho"]]
        sched.step()


@pytest.mark.parametrize(("cls", "formula"), [(CosineRadius, cosine), (StepRadius, three_drops)])
def test_step_by_several_units_follows_the_formula(cls, formula):
    """A budget counted in passes advances by a step's passes: ``step(n)`` lands on the formula at ``t + n``."""
    _, opt = rbo()
    sched = cls(opt, total_steps=T, rho_final=RHO_F)
    t = 0
    for n in (3, 1, 4, 5):
        sched.step(n)
        t += n
        assert opt.param_groups[0]["rho"] == pytest.approx(formula(t), rel=1e-12)


def test_rbo_run_uses_the_scheduled_rho_each_step_and_couples_lr():
    w, opt = rbo(lr=0.5)
    sched = CosineRadius(opt, total_steps=T, rho_final=RHO_F, couple_lr=True)
    seen = []  # (ρ, η) the step's closure passes run with

    def closure():
        seen.append((opt.param_groups[0]["rho"], opt.param_groups[0]["lr"]))
        opt.zero_grad()
        loss = torch.sin(3 * w).sum() + (w**2).sum()
        loss.backward()
        return loss

    for t in range(T):
        opt.step(closure)
        passes = opt.stats["grad_evals"]
        assert all(rho == pytest.approx(cosine(t)) for rho, _ in seen[-int(passes) :])
        assert seen[-1][1] == pytest.approx(0.5 * cosine(t) / RHO0)
        sched.step()
    assert opt.param_groups[0]["rho"] == pytest.approx(RHO_F)


def test_state_dict_round_trip():
    _, opt = rbo()
    sched = StepRadius(opt, total_steps=T, rho_final=RHO_F, couple_lr=True)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    assert "optimizer" not in state

    _, opt2 = rbo()
    resumed = StepRadius(opt2, total_steps=1, rho_final=1.0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for _ in range(T):
        assert opt2.param_groups[0]["rho"] == opt.param_groups[0]["rho"]
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        sched.step()
        resumed.step()


def test_bad_input_raises_value_error():
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="no 'rho'"):
        CosineRadius(nonlocal_opt.compose([w], "local"), T, RHO_F)
    with pytest.raises(ValueError, match="rho_final"):
        CosineRadius(rbo()[1], T, rho_final=0.0)  # the offset manifold needs ρ > 0
    with pytest.raises(ValueError, match="total_steps"):
        LinearRadius(rbo()[1], 0, RHO_F)
    with pytest.raises(ValueError, match="unknown radius schedule"):
        radius_scheduler("exp", rbo()[1], T, RHO_F)
    sam = nonlocal_opt.compose([w], "sam", rho=0.05)
    assert LinearRadius(sam, T, rho_final=0.0).get_last_rho() == [0.05]  # SAM allows ρ = 0


def test_cli_arguments_build_the_scheduler():
    parser = argparse.ArgumentParser()
    add_radius_schedule_arguments(parser)

    def build(*argv):
        return build_radius_scheduler(TrainConfig.from_namespace(parser.parse_args(argv)), rbo()[1], T)

    assert build() is None
    sched = build("--rho-schedule", "linear", "--rho-final", "0.1")
    assert isinstance(sched, LinearRadius) and sched.rho_final == 0.1
    assert build("--rho-schedule", "cosine").rho_final == pytest.approx(RHO_FINAL_FRACTION * RHO0)
    with pytest.raises(ConfigError, match="--couple-lr"):
        build("--couple-lr")
    with pytest.raises(ConfigError, match=r"--rho-final 0 must be a finite number > 0"):
        build("--rho-schedule", "cosine", "--rho-final", "0")  # the offset manifold needs ρ > 0


@pytest.mark.parametrize("cls", [CosineRadius, LinearRadius, StepRadius])
def test_rho_final_has_one_rule(cls):
    """Every schedule refuses a ρ_final above the initial ρ (it decays ρ), in hyperparameter terms."""
    with pytest.raises(ValueError, match=r"^rho_final=2\.0 is larger than the initial radius 1"):
        cls(nonlocal_opt.compose([torch.nn.Parameter(torch.ones(1))], "rbo", rho=1.0), T, rho_final=2.0)
    sam = nonlocal_opt.compose([torch.nn.Parameter(torch.ones(1))], "sam", rho=0.05)
    assert rho_final_problem(sam, 0.0) is None and rho_final_problem(sam, 0.0, geometric=True) is not None
    assert rho_final_problem(sam, float("nan")) == "must be a finite number >= 0"


def test_geometry_run_logs_the_scheduled_rho(tmp_path):
    """The ρ logged to TensorBoard by ``nonlocal-opt geometry`` follows the cosine formula step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    parser = argparse.ArgumentParser()
    add_geometry_arguments(parser)
    args = parser.parse_args(["--dataset", "landscape:alm", "--optimizer", "rbo", "--lr", "0.001", "--rho", str(RHO0),
                              "--set", "max_iters=2", "--batch-size", "256", "--epochs", "3", "--limit-train-batches", "4",
                              "--rho-schedule", "cosine", "--rho-final", str(RHO_F), "--out", str(tmp_path)])
    assert run_geometry(args) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("rho")}
    total = 12  # 3 epochs × 4 steps
    assert sorted(logged) == list(range(total))
    for t, value in logged.items():
        expected = RHO_F + (RHO0 - RHO_F) * 0.5 * (1 + math.cos(math.pi * t / total))
        assert value == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
