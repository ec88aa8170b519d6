"""Scalars to TensorBoard (through ``accelerator.log``) and, row by row, to ``metrics.csv``."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nonlocal_opt import unwrap
from nonlocal_opt.training.closure import BatchClosure, LossScale

# Per-step and per-epoch scalars; every metrics.csv row has all these columns (empty when absent).
STEP_KEYS = ("train/loss", "train/acc", "lr", "rho", "grad_evals", "proj_iters", "proj_residual", "offset_error",
             "nonfinite", "loss_scale", "step_time")
EPOCH_KEYS = ("epoch/train_loss", "epoch/train_acc", "val/loss", "val/acc", "epoch_time")
COLUMNS = ("scope", "epoch", "step", *STEP_KEYS, *EPOCH_KEYS)
TIMING_COLUMNS = ("step_time", "epoch_time")  # the only columns that differ between identical runs


def step_metrics(optimizer, closure: BatchClosure, loss_scale: LossScale, classification: bool, step_time: float):
    """The per-step scalars: first-pass loss/accuracy, lr, ρ, the optimizer's stats, time.

    Args:
        optimizer: The composed optimizer, as prepared (its wrapper is looked through with ``unwrap``).
        closure: The step's closure, after the step.
        loss_scale: The fp16 loss scale (logged when enabled).
        classification: Whether to log the accuracy ``train/acc``.
        step_time: The step's wall time in seconds.
    """
    group = optimizer.param_groups[0]
    stats = unwrap(optimizer).stats
    values = {"train/loss": float(closure.first_loss), **{k: v for k, v in stats.items() if k != "nonfinite"}}
    values["nonfinite"] = stats.get("nonfinite", 0.0)
    if classification:
        values["train/acc"] = float(closure.first_accuracy)
    values.update({key: float(group[key]) for key in ("lr", "rho") if key in group})
    if loss_scale.enabled:
        values["loss_scale"] = loss_scale.scale
    values["step_time"] = step_time
    return values


@contextlib.contextmanager
def tracking(accelerator, config: dict[str, Any], optimizer, resumed_step: int | None) -> Iterator[None]:
    """The TensorBoard tracker for the run, its hparams the flat ``config`` and the optimizer's first param
    group (``hp.NAME``); finished on exit (not ``end_training()``: that destroys the process group).

    Args:
        accelerator: The run's ``Accelerator``.
        config: The run's flat config.
        optimizer: The prepared optimizer.
        resumed_step: The step of the checkpoint the run resumed from (events after it are purged), or ``None``.
    """
    hparams = {f"hp.{key}": _scalar(value) for key, value in optimizer.param_groups[0].items() if key != "params"}
    init_kwargs = {} if resumed_step is None else {"tensorboard": {"purge_step": resumed_step + 1}}
    settings = {key: _scalar(value) for key, value in config.items()}  # a --set pair such as betas=0.9,0.999
    accelerator.init_trackers("tensorboard", config={**settings, **hparams}, init_kwargs=init_kwargs)
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def _scalar(value: Any) -> Any:
    """TensorBoard hparams take bool/int/float/str only."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class MetricsLogger:
    """``log(scope, values, epoch, step)`` writes the scalars to every tracker and a row to ``metrics.csv``.

    The CSV columns are ``COLUMNS`` plus any other stat of the rule (e.g. Entropy-SGD's ``gamma``). A row
    with a key the file has no column for rewrites the file with the union of the columns, so no value is
    dropped. Only the main process writes; a resumed run first cuts the file back to its checkpoint
    (:func:`truncate_metrics`), so no row is written twice.
    """

    def __init__(self, accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path
        self.columns: list[str] | None = None
        if path.exists():
            with path.open(newline="") as handle:
                self.columns = next(csv.reader(handle), None)

    def log(self, scope: str, values: dict[str, float], epoch: int, step: int) -> None:
        self.accelerator.log(values, step=step)
        if not self.accelerator.is_main_process:
            return
        row = {"scope": scope, "epoch": epoch, "step": step, **values}
        if self.columns is None:
            self.columns = [*COLUMNS, *sorted(set(row) - set(COLUMNS))]
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)
        elif set(row) - set(self.columns):
            self.columns = [*self.columns, *sorted(set(row) - set(self.columns))]
            _rewrite(self.path, self.columns, read_metrics(self.path))
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)


def _rewrite(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    """Replace ``path`` atomically by ``columns`` and ``rows`` (missing cells empty)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _int(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def truncate_metrics(path: Path, epoch: int, step: int) -> int:
    """Cut ``metrics.csv`` back to a checkpoint taken after ``epoch`` finished epochs and ``step`` steps: keep
    the step rows up to ``step`` and the epoch rows up to ``epoch`` (a half-written last row goes too).
    Returns the number of rows removed."""
    if not path.is_file():
        return 0
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = list(reader.fieldnames or []), list(reader)
    kept = [
        row for row in rows
        if None not in row and None not in row.values() and (
            (row.get("scope") == "step" and (_int(row.get("step")) or 0) <= step and _int(row.get("step")) is not None)
            or (row.get("scope") == "epoch" and _int(row.get("epoch")) is not None and _int(row.get("epoch")) <= epoch)
        )
    ]
    if len(kept) != len(rows) or not columns:
        _rewrite(path, columns or list(COLUMNS), kept)
    return len(rows) - len(kept)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as dicts (empty cells are empty strings)."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))
