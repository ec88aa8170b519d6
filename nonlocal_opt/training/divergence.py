"""Divergence reporting: a non-finite loss stops the run; most steps refused or a loss that exploded is
warned about once while training, and these, non-finite weights or a non-finite validation loss make the
finished run count as diverged."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nonlocal_opt.training.config import TrainingDiverged
from nonlocal_opt.training.main_process import warn
from nonlocal_opt.training.progress import Progress

REFUSED_FRACTION = 0.5  # more than this fraction of steps refused: a warning, and the run counts as diverged
REFUSED_MIN_STEPS = 10  # ... the warning only after this many steps
EXPLODE_FACTOR = 1e3  # a step loss above this × max(|first loss|, 1): the loss exploded


class DivergenceWatch:
    """Watches the step losses ``L_t`` and refused steps of a run through its ``Progress``; the warnings
    given are recorded there, so a resumed run does not repeat them.

    Args:
        accelerator: The run's ``Accelerator`` (warnings come from the main process).
        progress: The run's progress.
    """

    def __init__(self, accelerator, progress: Progress):
        self.accelerator, self.progress = accelerator, progress

    def explosion_threshold(self) -> float:
        """``EXPLODE_FACTOR · max(|L_1|, 1)``, ``L_1`` the run's first step loss."""
        return EXPLODE_FACTOR * max(abs(self.progress.first_loss), 1.0)

    def stop_if_not_finite(self, loss: float, epoch: int, last_checkpoint: Path | None) -> None:
        """Raise ``TrainingDiverged`` when the step loss ``loss`` of epoch ``epoch`` (0-based) is not finite."""
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training stopped: the loss became {loss} at epoch {epoch + 1}, step "
                f"{self.progress.step + 1}; last good checkpoint: {last_checkpoint or 'none (no epoch finished)'}; "
                "try a smaller --lr"
            )

    def warn_after_step(self, loss: float) -> None:
        """Warn (once per run) when most steps so far were refused, or when the step loss ``loss`` exploded."""
        progress = self.progress
        if (not progress.refused_warned and progress.step >= REFUSED_MIN_STEPS
                and progress.refused > REFUSED_FRACTION * progress.step):
            progress.refused_warned = True
            warn(self.accelerator, f"{progress.refused} of {progress.step} steps so far were refused by the rule (non-finite "
                 "trial point or projection): the model is not training; try another --projector or a smaller --lr")
        if not progress.exploded_warned and loss > self.explosion_threshold():
            progress.exploded_warned = True
            warn(self.accelerator, f"the loss exploded to {loss:.4g} at step {progress.step} (started at "
                 f"{progress.first_loss:.4g}); try a smaller --lr")

    def not_finite(self, final: dict[str, float], model: torch.nn.Module) -> str | None:
        """Why the finished run's state is unusable (its weights or its last validation loss ``final["val/loss"]``
        are NaN/inf), else ``None``: such a run counts as diverged and its checkpoint is not resumed.

        Args:
            final: the last epoch's metrics (``{}`` when no epoch ran).
            model: the trained model, whose floating-point parameters and buffers must be finite.
        """
        bad = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            return f"the weights are not finite (NaN or inf in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        if final and not math.isfinite(final.get("val/loss", 0.0)):
            return f"the validation loss is {final['val/loss']}"
        return None

    def verdict(self, final: dict[str, float]) -> str | None:
        """Why the run counts as diverged (most steps refused, or the last epoch's mean loss ``final``
        exploded), else ``None``."""
        progress = self.progress
        if progress.refused > REFUSED_FRACTION * progress.step:
            return f"{progress.refused} of {progress.step} steps were refused"
        if final and final["epoch/train_loss"] > self.explosion_threshold():
            return f"the loss exploded (epoch mean {final['epoch/train_loss']:.4g}, first step {progress.first_loss:.4g})"
        return None
