"""Where a run is (``Progress``, saved with every checkpoint) and how it shows it while it trains
(``ProgressDisplay``: a tqdm bar on a terminal, periodic progress lines when stdout is not one)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """Where the run is: epochs finished, optimizer steps taken, steps into the current epoch, fresh batches
    drawn in it and its running sums (loss, accuracy, refused steps), plus run-wide counters; saved with
    the checkpoint (``register_for_checkpointing``), so a run interrupted mid-epoch resumes exactly."""

    FIELDS = ("epoch", "step", "batch", "fresh_drawn", "sums", "refused", "first_loss", "exploded_warned",
              "refused_warned", "passes")

    def __init__(self):
        self.epoch = 0
        self.step = 0
        self.batch = 0  # steps taken in the epoch in progress
        self.fresh_drawn = 0  # fresh batches drawn in the epoch in progress
        self.sums = [0.0, 0.0, 0.0]  # loss, accuracy, refused steps of the epoch in progress
        self.refused = 0  # refused steps of the whole run
        self.passes = 0  # forward+backward passes of the whole run (the steps' grad_evals)
        self.first_loss = 0.0  # the loss of the run's first step (the scale for "the loss exploded")
        self.exploded_warned = False
        self.refused_warned = False

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.FIELDS:
            if key in state:
                setattr(self, key, state[key])

    def record_step(self, values: dict[str, float], fresh_drawn: int) -> None:
        """Count the step whose scalars are ``values`` (``train/loss``, ``nonfinite``, maybe ``train/acc``).

        Args:
            values: The step's scalars (:func:`~nonlocal_opt.training.metrics.step_metrics`).
            fresh_drawn: Fresh batches drawn so far in the epoch.
        """
        if self.step == 0:
            self.first_loss = values["train/loss"]
        self.step += 1
        self.batch += 1
        self.fresh_drawn = fresh_drawn
        refused = float(values["nonfinite"]) > 0
        self.refused += refused
        self.passes += int(values.get("grad_evals", 1))
        self.sums = [self.sums[0] + values["train/loss"], self.sums[1] + values.get("train/acc", 0.0), self.sums[2] + refused]

    def epoch_means(self, classification: bool) -> dict[str, float]:
        """``epoch/train_loss`` (and ``epoch/train_acc``): means over the epoch's steps."""
        done = max(self.batch, 1)
        means = {"epoch/train_loss": self.sums[0] / done}
        if classification:
            means["epoch/train_acc"] = self.sums[1] / done
        return means

    def finish_epoch(self) -> int:
        """Close the epoch in progress; returns its refused steps."""
        refused = int(self.sums[2])
        self.epoch, self.batch, self.fresh_drawn, self.sums = self.epoch + 1, 0, 0, [0.0, 0.0, 0.0]
        return refused


class ProgressDisplay:
    """The epoch's tqdm bar (local main process, on a terminal) and, when stdout is not a terminal, a line
    ``epoch E/N step B/S: loss …, refused R, T s`` every ``every`` seconds and at each epoch's end.

    Args:
        accelerator: The run's ``Accelerator``.
        epochs: The run's ``--epochs``.
        steps_per_epoch: Optimizer steps in one epoch.
        every: Seconds between progress lines (``--progress-every``).
        started: ``time.perf_counter()`` when the run started (the lines show the time since).
    """

    def __init__(self, accelerator, epochs: int, steps_per_epoch: int, every: float, started: float):
        self.accelerator, self.epochs, self.steps_per_epoch = accelerator, epochs, steps_per_epoch
        self.every, self.started = every, started
        self.lines = not sys.stdout.isatty() and accelerator.is_main_process
        self.last_line = time.monotonic()
        self.bar: Any = None
        self.epoch = 0

    def start_epoch(self, epoch: int, batch: int) -> None:
        """Open the bar of epoch ``epoch`` (0-based), ``batch`` of its steps already done."""
        self.epoch = epoch
        self.bar = tqdm(total=self.steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                        disable=None if self.accelerator.is_local_main_process else True, leave=False)

    def step(self, values: dict[str, float], progress: Progress) -> None:
        """Show the step just taken (its scalars ``values``; ``progress`` already counts it)."""
        self.bar.update()
        self.bar.set_postfix({key.split("/")[1]: f"{values[key]:.4f}" for key in ("train/loss", "train/acc") if key in values})
        if self.lines and (time.monotonic() - self.last_line >= self.every or progress.batch == self.steps_per_epoch):
            self.last_line = time.monotonic()
            acc = f", acc {values['train/acc']:.4f}" if "train/acc" in values else ""
            print(f"epoch {self.epoch + 1}/{self.epochs} step {progress.batch}/{self.steps_per_epoch}: "
                  f"loss {values['train/loss']:.4g}{acc}, refused {int(progress.sums[2])}, "
                  f"{time.perf_counter() - self.started:.1f} s", flush=True)

    def close(self) -> None:
        self.bar.close()

    def epoch_line(self, progress: Progress, values: dict[str, float], refused: int) -> None:
        """``epoch E/N: KEY VALUE, …, refused steps R`` after an epoch (main process)."""
        self.accelerator.print(f"epoch {progress.epoch}/{self.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                               + f", refused steps {refused}")
