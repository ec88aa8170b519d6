"""One run at a budget of ``B`` forward+backward passes: passes are charged from the optimizer's own
``stats(opt)["grad_evals"]``, and every evaluation point records passes, updates (optimizer steps),
batches read, training seconds and accuracies. A non-finite loss ends the run as diverged."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from nonlocal_opt.comparison.data import BatchStream, Splits
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec, step_grid
from nonlocal_opt.integrations.wrappers import stats
from nonlocal_opt.optim.radius_schedules import radius_scheduler
from nonlocal_opt.training.models import build_model

# Settings that change what a run computes (the others only choose or summarise runs).
RUN_SETTINGS = ("budget", "dataset", "model", "batch_size", "val_size", "split_seed", "evals", "fractions",
                "train_subset", "test_subset", "augment")
# Run settings added after results files existed, with the value those files' runs had: a run at that value
# leaves the setting out of its identity, so its key and the files that hold it stay valid.
ADDED_RUN_SETTINGS = {"augment": "none"}


def run_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``RUN_SETTINGS`` of a comparison's settings, an added one left out at its original value.

    Args:
        settings: ``ComparisonConfig.to_dict()``, or the settings a results file stores.
    """
    return {k: settings.get(k, ADDED_RUN_SETTINGS.get(k)) for k in RUN_SETTINGS
            if k not in ADDED_RUN_SETTINGS or settings.get(k, ADDED_RUN_SETTINGS[k]) != ADDED_RUN_SETTINGS[k]}
EVAL_CHUNK = 2048


@attrs.frozen
class RunSpec:
    """One run: ``spec`` at hyperparameters ``hp``, model/batch seed ``seed``, label noise ``noise``;
    ``phase`` is ``"tune"`` (validation only) or ``"final"`` (validation and test)."""

    spec: OptimizerSpec
    hp: dict[str, Any]
    seed: int
    noise: float
    phase: str

    def identity(self, config: ComparisonConfig) -> dict[str, Any]:
        optimizer = {k: v for k, v in self.spec.to_dict().items() if k not in ("name", "sweep", "fixed")}
        return {"settings": run_settings(config.to_dict()), "optimizer": optimizer, "hp": self.hp,
                "seed": self.seed, "noise": self.noise, "phase": self.phase}

    def key(self, config: ComparisonConfig) -> str:
        """SHA-256 (first 16 hex digits) of the canonical JSON of everything the run depends on."""
        text = json.dumps(self.identity(config), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        loss += float(F.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)


class Curve:
    """Columns of the evaluation points; ``test_*`` only for final runs."""

    def __init__(self, test: bool):
        names = ["passes", "steps", "batches", "seconds", "train_loss", "val_loss", "val_acc"]
        self.columns: dict[str, list[float]] = {name: [] for name in names + (["test_loss", "test_acc"] if test else [])}

    def add(self, **values: float) -> None:
        for name, column in self.columns.items():
            value = values[name]
            column.append(value if math.isfinite(value) else None)


def train_run(config: ComparisonConfig, run: RunSpec, splits: Splits) -> dict[str, Any]:
    """Train ``run`` until its passes reach ``B`` (the last step may overshoot by less than its own pass
    count) and return the run record (JSON-ready)."""
    torch.manual_seed(run.seed)
    model = build_model(config.model, splits.input_shape, splits.num_classes)
    opt = run.spec.build(model.parameters(), dict(run.hp))
    schedule = None
    if run.spec.schedule is not None:
        sch = run.spec.schedule
        schedule = radius_scheduler(sch["name"], opt, config.budget, sch["rho_final"], bool(sch.get("couple_lr", False)))
    stream = BatchStream(splits.train_x, splits.train_y, config.batch_size, torch.Generator().manual_seed(run.seed),
                         augment=config.augment == "crop-flip")
    test = run.phase == "final"
    curve = Curve(test)
    pass_points, step_points = config.pass_grid(), step_grid(config.budget)
    passes = steps = refused = 0.0
    seconds, loss_sum, loss_count = 0.0, 0.0, 0
    diverged: dict[str, Any] | None = None
    batch: list[torch.Tensor] = []

    first_loss: list[torch.Tensor] = []

    def closure(fresh_batch: bool = False):
        if fresh_batch:
            batch[:] = stream.next()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        if not first_loss:
            first_loss.append(loss.detach())
        return loss

    def record() -> None:
        nonlocal loss_sum, loss_count
        val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y)
        test_loss, test_acc = evaluate(model, splits.test_x, splits.test_y) if test else (math.nan, math.nan)
        train_loss = loss_sum / loss_count if loss_count else math.nan
        curve.add(passes=passes, steps=steps, batches=stream.read, seconds=seconds, train_loss=train_loss,
                  val_loss=val_loss, val_acc=val_acc, test_loss=test_loss, test_acc=test_acc)
        loss_sum, loss_count = 0.0, 0

    wall = time.perf_counter()
    record()
    next_pass, next_step = 0, 0
    while passes < config.budget:
        start = time.perf_counter()
        batch[:] = stream.next()
        first_loss.clear()
        returned = opt.step(closure)
        # f(θ_t): what the step returns, else the step's first pass
        loss = float(returned.detach() if torch.is_tensor(returned) else returned if returned is not None else first_loss[0])
        step_stats = stats(opt)
        passes += step_stats["grad_evals"]
        refused += step_stats.get("nonfinite", 0.0)
        steps += 1
        if schedule is not None:  # T = the budget in passes; ρ stops at ρ_f once it is spent (s = min(t/T, 1))
            schedule.step(int(step_stats["grad_evals"]))
        seconds += time.perf_counter() - start
        if not math.isfinite(loss):
            diverged = {"passes": passes, "steps": steps, "reason": f"non-finite training loss {loss}"}
            record()
            break
        loss_sum += loss
        loss_count += 1
        due = False
        while next_pass < len(pass_points) and passes >= pass_points[next_pass]:
            next_pass, due = next_pass + 1, True
        while next_step < len(step_points) and steps >= step_points[next_step]:
            next_step, due = next_step + 1, True
        if due or passes >= config.budget:
            record()
            if curve.columns["val_loss"][-1] is None:
                diverged = {"passes": passes, "steps": steps, "reason": "non-finite validation loss"}
                break
    return {
        "name": run.spec.name,
        "phase": run.phase,
        "optimizer": {k: v for k, v in run.spec.to_dict().items() if k not in ("sweep", "fixed")},
        "hp": run.hp,
        "seed": run.seed,
        "noise": run.noise,
        "diverged": diverged,
        "passes": passes,
        "steps": steps,
        "batches": stream.read,
        "steps_refused": refused / steps if steps else 0.0,
        "train_seconds": seconds,
        "wall_seconds": time.perf_counter() - wall,
        "curve": curve.columns,
    }
