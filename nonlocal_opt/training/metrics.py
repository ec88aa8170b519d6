"""Scalars to TensorBoard (through ``accelerator.log``) and, row by row, to ``metrics.csv``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

# Per-step and per-epoch scalars; every metrics.csv row has all these columns (empty when absent).
STEP_KEYS = ("train/loss", "train/acc", "lr", "rho", "grad_evals", "proj_iters", "proj_residual", "offset_error",
             "nonfinite", "loss_scale", "step_time")
EPOCH_KEYS = ("epoch/train_loss", "epoch/train_acc", "val/loss", "val/acc", "epoch_time")
COLUMNS = ("scope", "epoch", "step", *STEP_KEYS, *EPOCH_KEYS)
TIMING_COLUMNS = ("step_time", "epoch_time")  # the only columns that differ between identical runs


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
