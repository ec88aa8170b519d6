"""Scalars to TensorBoard (through ``accelerator.log``) and, row by row, to ``metrics.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

# Per-step and per-epoch scalars; every metrics.csv row has all these columns (empty when absent).
STEP_KEYS = ("train/loss", "train/acc", "lr", "rho", "grad_evals", "proj_iters", "proj_residual", "offset_error",
             "nonfinite", "loss_scale", "step_time")
EPOCH_KEYS = ("epoch/train_loss", "epoch/train_acc", "val/loss", "val/acc", "epoch_time")
COLUMNS = ("scope", "epoch", "step", *STEP_KEYS, *EPOCH_KEYS)


class MetricsLogger:
    """``log(scope, values, epoch, step)`` writes the scalars to every tracker and a row to ``metrics.csv``.

    The CSV columns are ``COLUMNS`` plus any other stat of the rule in the first row (e.g. Entropy-SGD's
    ``gamma``), fixed when the file is created. Only the main process writes; resuming appends.
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
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as dicts (empty cells are empty strings)."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))
