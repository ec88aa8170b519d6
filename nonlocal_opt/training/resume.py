"""Resuming a run: which checkpoint ``--resume`` means, whether it fits this command, and loading it.

Loading restores the model, optimizer, RNG states, progress, fp16 loss scale and radius schedule
(everything registered for checkpointing), cuts ``metrics.csv`` back to the checkpoint and moves newer
checkpoints aside, so the resumed run continues the interrupted one bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nonlocal_opt.training.checkpoints import CONFIG_FILE, checkpoints, supersede_newer, verify
from nonlocal_opt.training.closure import LossScale
from nonlocal_opt.training.config import ConfigError, TrainConfig
from nonlocal_opt.training.main_process import on_main, warn
from nonlocal_opt.training.metrics import truncate_metrics
from nonlocal_opt.training.progress import Progress

# A checkpoint's optimizer/model state belongs to these: resuming with another value is refused.
MUST_MATCH = ("optimizer", "base", "projector", "model", "dataset", "rho_schedule", "rho_final", "couple_lr")
# Hyperparameters come from the checkpoint: a differing flag is reported as not used.
FROM_CHECKPOINT = ("preset", "lr", "rho")
FLAG = {"optimizer": "--optimizer", "overrides": "--set"}


def select_checkpoint(logdir: Path, resume: str) -> tuple[Path, list[str]]:
    """The checkpoint ``--resume`` names and the notes to print: ``"latest"`` → the newest *complete*
    checkpoint in ``logdir`` (a newer damaged one is skipped, with a note); otherwise the given checkpoint
    directory, which must verify. Anything else raises ``ConfigError`` with one line naming the fix.

    Args:
        logdir: The run's log dir.
        resume: ``"latest"`` or a checkpoint directory (``--resume [DIR]``).
    """
    logdir = Path(logdir)
    if resume != "latest":
        path = Path(resume)
        if (path / "checkpoints").is_dir() or (path.is_dir() and (path / "metrics.csv").is_file()):
            raise ConfigError(f"--resume {resume}: that is a log dir, not a checkpoint; to continue the run in it pass "
                              f"--logdir {resume} --resume (or --resume {path / 'checkpoints' / 'epoch_N'})")
        if not path.is_dir():
            raise ConfigError(f"--resume {resume}: no such checkpoint directory; pass --resume alone for the newest "
                              f"checkpoint in --logdir, or an existing LOGDIR/checkpoints/epoch_N")
        problem = verify(path)
        if problem is not None:
            raise ConfigError(f"cannot resume from {path}: {problem}; pass --resume alone for the newest complete "
                              "checkpoint, or an earlier one with --resume DIR")
        return path, []
    notes: list[str] = []
    for path in checkpoints(logdir):
        problem = verify(path)
        if problem is None:
            return path, notes
        notes.append(f"skipping checkpoint {path}: {problem}")
    if notes:
        raise ConfigError(f"no complete checkpoint to resume from in {logdir / 'checkpoints'} ({notes[0][len('skipping checkpoint '):]}); "
                          "start the run again with --overwrite")
    if (logdir / "metrics.csv").is_file():
        raise ConfigError(f"no checkpoint to resume from at {logdir / 'checkpoints'}: the run in {logdir} stopped before its "
                          "first checkpoint; start it again with --overwrite")
    raise ConfigError(f"no checkpoint to resume from at {logdir / 'checkpoints'}; run without --resume first or pass --resume DIR")


def saved_config(checkpoint: Path) -> dict[str, Any]:
    """The flat config ``checkpoint`` was written with (``{}`` when absent or unreadable).

    Args:
        checkpoint: A checkpoint directory.
    """
    path = Path(checkpoint) / CONFIG_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _flag(key: str) -> str:
    return FLAG.get(key, "--" + key.replace("_", "-"))


def check_resume_config(checkpoint: Path, config: dict[str, Any]) -> list[str]:
    """Refuse (``ConfigError``) to resume ``checkpoint`` with another rule, base, projector, model, dataset or
    radius schedule than it was written with; return notes for flags the checkpoint overrides
    (hyperparameters come from its optimizer state) and for changes that make the run another run.

    Args:
        checkpoint: The checkpoint to resume.
        config: This run's flat config (``TrainConfig.flat()``).
    """
    saved = saved_config(checkpoint)
    for key in MUST_MATCH:
        if key in saved and key in config and saved[key] != config[key]:
            raise ConfigError(f"cannot resume {checkpoint}: it was written with {_flag(key)} {saved[key]}, this run has "
                              f"{_flag(key)} {config[key]}; pass {_flag(key)} {saved[key]} (or start a new run with --overwrite)")
    notes = []
    ignored = [key for key in FROM_CHECKPOINT if key in saved and key in config and saved[key] != config[key]]
    sets = {k for k in (set(saved) | set(config)) if k.startswith("set.") and saved.get(k) != config.get(k)}
    if ignored or sets:
        given = ", ".join([f"{_flag(k)} {config[k]}" for k in ignored]
                          + [f"--set {k[4:]}={config.get(k, '(unset)')}" for k in sorted(sets)])
        notes.append(f"warning: not used on resume: {given}; hyperparameters come from the checkpoint "
                     "(start a new run with --overwrite or another --logdir to change them)")
    changed = [key for key in ("batch_size", "grad_accum", "seed", "train_subset", "label_noise", "limit_train_batches")
               if key in saved and key in config and saved[key] != config[key]]
    if changed:
        notes.append("warning: " + ", ".join(f"{_flag(k)} {config[k]} (checkpoint: {saved[k]})" for k in changed)
                     + " differ from the checkpoint's run: the resumed run is not a continuation of it bit for bit")
    return notes


def choose_checkpoint(accelerator, logdir: Path, config: TrainConfig) -> tuple[Path | None, list[str]]:
    """The checkpoint ``config.resume`` names, checked against ``config``, and the notes to print
    (decided on the main process, see :func:`select_checkpoint` and :func:`check_resume_config`);
    ``(None, [])`` for a run that does not resume.

    Args:
        accelerator: The run's ``Accelerator``.
        logdir: The run's log dir.
        config: The run's config.
    """
    if config.resume is None:
        return None, []

    def choose():
        path, skipped = select_checkpoint(logdir, config.resume)
        return path, skipped + check_resume_config(path, config.flat())
    return on_main(accelerator, choose)


def restore(accelerator, checkpoint: Path, logdir: Path, config: TrainConfig, *, progress: Progress,
            loss_scale: LossScale, radius: Any, total_steps: int) -> torch.Tensor:
    """Load ``checkpoint`` into the prepared run and report what resuming changes; returns the CPU RNG
    state right after loading (a run resumed mid-epoch restores it before its first step).

    Args:
        accelerator: The run's ``Accelerator``, with ``progress``, ``loss_scale`` and ``radius`` registered.
        checkpoint: The checkpoint :func:`choose_checkpoint` picked.
        logdir: The run's log dir.
        config: The run's config.
        progress: The run's progress, restored from the checkpoint.
        loss_scale: The run's fp16 loss scale, restored when of the same kind.
        radius: The run's radius schedule, or ``None``.
        total_steps: This command's steps (``--epochs`` × steps per epoch), against the schedule's horizon.
    """
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # a damaged or foreign checkpoint: one line, the file and the fix
        raise ConfigError(f"cannot load checkpoint {checkpoint} ({_one_line(error)}); it does not match this run: "
                          "resume an earlier checkpoint with --resume DIR, or start over with --overwrite") from None
    rng_after_load = torch.get_rng_state()
    accelerator.print(f"resuming from {checkpoint} (epoch {progress.epoch}, step {progress.step})")
    if loss_scale.restored_from_other:
        warn(accelerator, "the checkpoint's fp16 loss scale is not used: " + (
            f"this run starts loss scaling at {loss_scale.scale:g}" if loss_scale.enabled
            else "this run (--mixed-precision " + config.mixed_precision + ") does not scale the loss"))
    if radius is not None and radius.total_steps != total_steps:
        warn(accelerator, f"the radius schedule keeps the horizon it started with ({radius.total_steps} steps; rho stays at "
             f"{radius.rho_final:g} after it), not the {total_steps} steps of --epochs {config.epochs}; "
             "start a new run for a schedule over the longer horizon")
    if accelerator.is_main_process:
        in_logdir = checkpoint.resolve().parent == (logdir / "checkpoints").resolve()
        for note in supersede_newer(logdir, checkpoint) if in_logdir else []:
            accelerator.print(note)
        removed = truncate_metrics(logdir / "metrics.csv", progress.epoch, progress.step)
        if removed:
            accelerator.print(f"metrics.csv: removed {removed} rows written after the checkpoint")
    return rng_after_load


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
