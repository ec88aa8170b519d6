"""The checkpoint layout, its manifest, and writing a checkpoint.

Layout: ``LOGDIR/checkpoints/epoch_N`` (written after epoch N) and ``LOGDIR/checkpoints/epoch_N_step_S``
(written when a run is interrupted at global step ``S``, N epochs finished). A checkpoint is written by
``accelerator.save_state`` into ``checkpoints/.NAME.partial``, completed with the run's flat config
(``config.json``) and a ``manifest.json`` holding the sha256 of every file, then renamed into place: a
directory named ``epoch_*`` is complete, and a file that changed since is caught by the checksums.
The last checkpoint of a run that diverged carries ``"diverged": REASON`` in its manifest; ``--resume``
does not continue from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from nonlocal_opt.training.main_process import warn
from nonlocal_opt.training.progress import Progress

PATTERN = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"


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


def remove_unfinished(logdir: Path) -> list[str]:
    """Delete the ``.NAME.partial`` and ``.NAME.old`` directories a save interrupted by a kill left behind;
    returns a note for each.

    Args:
        logdir: The run's log dir.
    """
    root = Path(logdir) / "checkpoints"
    notes = []
    for partial in sorted(root.glob(f".*{PARTIAL_SUFFIX}")) + sorted(root.glob(".*.old")) if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed {partial} (a checkpoint whose save was interrupted)")
    return notes


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
    if manifest.get("diverged"):
        return f"the run diverged there ({manifest['diverged']}), so continuing it would not train"
    return None


def mark_diverged(checkpoint: Path, reason: str) -> None:
    """Record in ``checkpoint``'s manifest that the run ended diverged (``reason``), replacing the manifest
    atomically; :func:`verify` then refuses it for ``--resume``.

    Args:
        checkpoint: a complete checkpoint directory.
        reason: why the run counts as diverged.
    """
    manifest = {**read_manifest(checkpoint), "diverged": reason}
    partial = Path(checkpoint) / f".{MANIFEST}{PARTIAL_SUFFIX}"
    partial.write_text(json.dumps(manifest, indent=1))
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    partial.replace(Path(checkpoint) / MANIFEST)


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


class CheckpointWriter:
    """Writes the run's checkpoints (every process takes part) and remembers the last one.

    Args:
        accelerator: The run's ``Accelerator`` (its ``save_state`` writes the model, optimizer, RNG states
            and the objects registered for checkpointing).
        logdir: The run's log dir.
        config: The run's flat config, saved as ``config.json``.
        progress: The run's progress, named in the manifest.
        last: The checkpoint the run resumed from, if any.
    """

    def __init__(self, accelerator, logdir: Path, config: dict[str, Any], progress: Progress, last: Path | None = None):
        self.accelerator, self.logdir, self.config, self.progress = accelerator, logdir, config, progress
        self.last = last

    def save(self, step: int | None = None) -> Path:
        """Write ``epoch_N`` (``step=None``, after an epoch) or ``epoch_N_step_S`` and return it; a complete
        checkpoint replaces the mid-epoch ones before it."""
        accelerator = self.accelerator
        final = checkpoint_dir(self.logdir, self.progress.epoch, step)
        partial = partial_dir(self.logdir, final.name)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(partial, final, self.config, self.progress)
            remove_interrupt_checkpoints(self.logdir, final)
        accelerator.wait_for_everyone()
        self.last = final
        return final

    def mark_diverged(self, reason: str) -> None:
        """Mark the last checkpoint written by this run as diverged (:func:`mark_diverged`), with a warning.

        Args:
            reason: why the run's state is unusable.
        """
        if self.accelerator.is_main_process and self.last is not None:
            mark_diverged(self.last, reason)
            warn(self.accelerator, f"{reason}: checkpoint {self.last} is marked diverged, so --resume will not continue it")
        self.accelerator.wait_for_everyone()
