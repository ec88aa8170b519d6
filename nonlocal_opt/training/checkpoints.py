"""Checkpoint layout: ``LOGDIR/checkpoints/epoch_N`` written by ``accelerator.save_state`` after epoch N."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nonlocal_opt.training.config import ConfigError

PATTERN = re.compile(r"epoch_(\d+)$")


class Progress:
    """Epochs finished and optimizer steps taken; saved with the checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch = 0
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]


def checkpoint_dir(logdir: Path, epoch: int) -> Path:
    return Path(logdir) / "checkpoints" / f"epoch_{epoch}"


def latest_checkpoint(logdir: Path) -> Path | None:
    """The checkpoint of the highest epoch under ``logdir``, or ``None``."""
    found = [(int(m.group(1)), p) for p in (Path(logdir) / "checkpoints").glob("epoch_*") if (m := PATTERN.search(p.name))]
    return max(found)[1] if found else None


def resolve_resume(logdir: Path, resume: str) -> Path:
    """``"latest"`` → the newest checkpoint in ``logdir``; otherwise the given directory (must exist)."""
    path = latest_checkpoint(logdir) if resume == "latest" else Path(resume)
    if path is None or not path.is_dir():
        looked = Path(logdir) / "checkpoints" if resume == "latest" else path
        raise ConfigError(f"no checkpoint to resume from at {looked}; run without --resume first or pass --resume DIR")
    return path
