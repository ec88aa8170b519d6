"""Checkpoints and the ownership of a log dir.

Layout: ``LOGDIR/checkpoints/epoch_N`` (written after epoch N) and ``LOGDIR/checkpoints/epoch_N_step_S``
(written when a run is interrupted at global step ``S``, N epochs finished). A checkpoint is written by
``accelerator.save_state`` into ``checkpoints/.NAME.partial``, completed with the run's flat config
(``config.json``) and a ``manifest.json`` holding the sha256 of every file, then renamed into place: a
directory named ``epoch_*`` is complete, and a file that changed since is caught by the checksums.

``LOGDIR/.lock`` (``fcntl.flock``, released when the process ends, even on SIGKILL) keeps a second writer out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from nonlocal_opt.training.config import ConfigError

PATTERN = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
PARTIAL_SUFFIX = ".partial"
RUN_ARTEFACTS = ("metrics.csv", "checkpoints", "tensorboard")  # what --overwrite removes
# A checkpoint's optimizer/model state belongs to these: resuming with another value is refused.
MUST_MATCH = ("optimizer", "base", "projector", "model", "dataset", "rho_schedule", "rho_final", "couple_lr")
# Hyperparameters come from the checkpoint: a differing flag is reported as not used.
FROM_CHECKPOINT = ("preset", "lr", "rho")
FLAG = {"optimizer": "--optimizer", "overrides": "--set"}


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


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``epoch_N`` after epoch N; ``epoch_N_step_S`` for a run stopped at step ``S`` during epoch N + 1."""
    return f"epoch_{epoch}" if step is None else f"epoch_{epoch}_step_{step}"


def checkpoint_dir(logdir: Path, epoch: int, step: int | None = None) -> Path:
    return Path(logdir) / "checkpoints" / checkpoint_name(epoch, step)


def _order(path: Path) -> tuple[int, int]:
    match = PATTERN.match(path.name)
    return int(match.group(1)), -1 if match.group(2) is None else int(match.group(2))


def checkpoints(logdir: Path) -> list[Path]:
    """Every checkpoint directory under ``logdir``, newest first (complete or not)."""
    root = Path(logdir) / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)] if root.is_dir() else []
    return sorted(found, key=_order, reverse=True)


def latest_checkpoint(logdir: Path) -> Path | None:
    """The newest checkpoint directory under ``logdir`` (not verified), or ``None``."""
    found = checkpoints(logdir)
    return found[0] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def partial_dir(logdir: Path, name: str) -> Path:
    return Path(logdir) / "checkpoints" / f".{name}{PARTIAL_SUFFIX}"


def finish_checkpoint(partial: Path, final: Path, config: dict[str, Any], progress: Progress) -> None:
    """Complete the checkpoint ``accelerator.save_state`` wrote into ``partial``: add ``config.json`` and the
    checksum manifest, flush, and rename it to ``final`` (a checkpoint of that name is replaced)."""
    (partial / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    files = {p.name: _sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
    for name in files:
        with (partial / name).open("rb") as handle:
            os.fsync(handle.fileno())
    manifest = {"epoch": progress.epoch, "step": progress.step, "batch": progress.batch, "sha256": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with (partial / MANIFEST).open("rb") as handle:
        os.fsync(handle.fileno())
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / MANIFEST).read_text())


def verify(checkpoint: Path) -> str | None:
    """``None`` if ``checkpoint`` is complete and every file matches its checksum; else what is wrong."""
    path = Path(checkpoint) / MANIFEST
    if not path.is_file():
        return f"{path.name} is missing (an incomplete or foreign checkpoint)"
    try:
        manifest = read_manifest(checkpoint)
        files = manifest["sha256"]
        int(manifest["epoch"]), int(manifest["step"])
    except (ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    for name, expected in files.items():
        file = Path(checkpoint) / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != expected:
            return f"{file} does not match its checksum (corrupt)"
    return None


def select_checkpoint(logdir: Path, resume: str) -> tuple[Path, list[str]]:
    """The checkpoint ``--resume`` names and the notes to print: ``"latest"`` → the newest *complete*
    checkpoint in ``logdir`` (a newer damaged one is skipped, with a note); otherwise the given checkpoint
    directory, which must verify. Anything else raises ``ConfigError`` with one line naming the fix."""
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
    (hyperparameters come from its optimizer state) and for changes that make the run another run."""
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
    changed = [key for key in ("batch_size", "seed", "train_subset", "label_noise", "limit_train_batches")
               if key in saved and key in config and saved[key] != config[key]]
    if changed:
        notes.append("warning: " + ", ".join(f"{_flag(k)} {config[k]} (checkpoint: {saved[k]})" for k in changed)
                     + " differ from the checkpoint's run: the resumed run is not a continuation of it bit for bit")
    return notes


class LogdirLock:
    """An exclusive ``flock`` on ``LOGDIR/.lock`` holding the owner's pid; released by ``release`` or when the
    process ends (also on SIGKILL: the kernel drops the lock)."""

    def __init__(self, logdir: Path):
        import fcntl

        self.path = Path(logdir) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"log dir {logdir} is in use by another run (pid {holder}); wait for it to finish "
                                  "or pass another --logdir") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def claim_logdir(logdir: Path, resume: bool, overwrite: bool) -> tuple[LogdirLock, list[str]]:
    """Lock ``logdir`` for this run and make it this run's: a new run into a log dir that already holds
    files is refused unless ``resume`` or ``overwrite`` (which removes the earlier run's metrics.csv,
    checkpoints and TensorBoard events); partial checkpoints of an interrupted save are removed."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in --logdir, "
                          "--overwrite replaces it")
    lock = LogdirLock(logdir)
    notes = []
    try:
        if overwrite:
            for name in RUN_ARTEFACTS:
                target = Path(logdir) / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        held = sorted(p.name for p in Path(logdir).iterdir() if p.name != LOCK_FILE)
        if held and not resume:
            shown = ", ".join(held[:3]) + (", …" if len(held) > 3 else "")
            fix = "pass --resume to continue it, --overwrite to replace it, or another --logdir"
            if not set(held) & set(RUN_ARTEFACTS):
                fix = "pass another --logdir (an empty or new directory)"
            raise ConfigError(f"log dir {logdir} is not empty ({shown}); {fix}")
        root = Path(logdir) / "checkpoints"
        for partial in sorted(root.glob(f".*{PARTIAL_SUFFIX}")) + sorted(root.glob(".*.old")) if root.is_dir() else []:
            shutil.rmtree(partial, ignore_errors=True)
            notes.append(f"removed {partial} (a checkpoint whose save was interrupted)")
    except BaseException:
        lock.release()
        raise
    return lock, notes


def supersede_newer(logdir: Path, checkpoint: Path) -> list[str]:
    """Checkpoints newer than the one resumed from belong to an abandoned continuation: move them to
    ``checkpoints/superseded/`` so that a later ``--resume`` cannot pick them up."""
    notes = []
    for path in checkpoints(logdir):
        if _order(path) > _order(checkpoint):
            target = Path(logdir) / "checkpoints" / "superseded" / path.name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(exist_ok=True)
            path.rename(target)
            notes.append(f"moved {path} to {target}: it is newer than the checkpoint resumed from")
    return notes


def remove_interrupt_checkpoints(logdir: Path, before: Path) -> None:
    """Delete the mid-epoch checkpoints (``epoch_N_step_S``) older than the complete checkpoint ``before``."""
    for path in checkpoints(logdir):
        if PATTERN.match(path.name).group(2) is not None and _order(path) < _order(before):
            shutil.rmtree(path, ignore_errors=True)
