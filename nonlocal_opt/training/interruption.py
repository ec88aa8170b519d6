"""Stopping a run on SIGINT/SIGTERM at a step boundary, after a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from nonlocal_opt.training.config import TrainingInterrupted
from nonlocal_opt.training.progress import Progress


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the run to stop at the next step boundary (after a
    checkpoint); a second one raises ``KeyboardInterrupt`` at once (no checkpoint)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once without one)", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """Whether any process received a signal (every process must call it: it reduces over them)."""
        flag = self.signum is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0)
            self.signum = self.signum or signal.SIGINT if flag else self.signum
        return flag

    def interruption(self, progress: Progress, checkpoint: Path) -> TrainingInterrupted:
        """The error that ends the run, naming where it stopped and the checkpoint it saved."""
        return TrainingInterrupted(f"interrupted at epoch {progress.epoch + (progress.batch > 0)}, step {progress.step}; "
                                   f"saved checkpoint {checkpoint}", checkpoint, self.signum or signal.SIGINT)
