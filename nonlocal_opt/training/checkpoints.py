"""Checkpoint layout: ``LOGDIR/checkpoints/epoch_N`` written by ``accelerator.save_state`` after epoch N,
with the run's flat config in ``config.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nonlocal_opt.training.config import ConfigError

PATTERN = re.compile(r"epoch_(\d+)$")
CONFIG_FILE = "config.json"
COMPOSITION = ("optimizer", "base", "projector")  # what the saved optimizer state belongs to


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


def save_config(checkpoint: Path, config: dict[str, Any]) -> None:
    """Write the flat run config (``TrainConfig.flat()``) next to the checkpoint's state."""
    (Path(checkpoint) / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def check_resume_config(checkpoint: Path, config: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` with another rule, base or projector than it was written with
    (its optimizer state belongs to those); checkpoints without ``config.json`` are not checked."""
    path = Path(checkpoint) / CONFIG_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    for key in COMPOSITION:
        if key in saved and saved[key] != config[key]:
            raise ConfigError(f"cannot resume {checkpoint}: it was written with --{key} {saved[key]}, this run has "
                              f"--{key} {config[key]}; pass --{key} {saved[key]}")
