"""The log dir a run writes into: writable, locked for the run, and this run's.

``LOGDIR/.lock`` (``fcntl.flock``, released when the process ends, even on SIGKILL) keeps a second writer out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from nonlocal_opt.training.checkpoints import remove_unfinished
from nonlocal_opt.training.config import ConfigError
from nonlocal_opt.training.main_process import on_main

LOCK_FILE = ".lock"
RUN_ARTEFACTS = ("metrics.csv", "checkpoints", "tensorboard")  # what --overwrite removes
ARTEFACT_DIRS = ("checkpoints", "tensorboard")


def writable_logdir(logdir: str) -> Path:
    """``logdir`` as a ``Path``, created if missing; ``ConfigError`` naming the fix when it cannot be written.

    Args:
        logdir: The directory (``--logdir``, or ``--out`` of ``nonlocal-opt geometry``).
    """
    path = Path(logdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: several processes probe at once
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to log dir {logdir!r} ({error.strerror}); pass --logdir DIR you can write to") from None
    return path


def new_dirs(logdir: str | Path) -> list[Path]:
    """The directories of ``logdir`` and its parents that do not exist yet, deepest first: what
    :func:`writable_logdir` will create, and :func:`discard_unused` may remove again.

    Args:
        logdir: The directory about to be created.
    """
    path = Path(logdir).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def discard_unused(logdir: Path, created: list[Path]) -> None:
    """Remove ``created`` (deepest first) again when the run that made them wrote nothing into ``logdir``
    but its lock file: a refused or failed start leaves no directory behind.

    Args:
        logdir: The run's log dir.
        created: What :func:`new_dirs` returned before the log dir was made.
    """
    if not created or not logdir.is_dir() or any(entry.name != LOCK_FILE for entry in logdir.iterdir()):
        return
    (logdir / LOCK_FILE).unlink(missing_ok=True)
    for directory in created:
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            directory.rmdir()


def check_artefacts_writable(logdir: Path) -> None:
    """Raise ``ConfigError`` when a run artefact already in ``logdir`` (``metrics.csv``, ``checkpoints/``,
    ``tensorboard/``) cannot be written, or removed by ``--overwrite``: checked before anything changes.

    Args:
        logdir: The run's log dir.
    """
    for name in RUN_ARTEFACTS:
        target = Path(logdir) / name
        if not target.exists() and not target.is_symlink():
            continue
        directory = name in ARTEFACT_DIRS
        if directory and not target.is_dir():
            problem = "it is not a directory"
        elif not directory and not target.is_file():
            problem = "it is not a file"
        elif not os.access(target, os.W_OK | (os.X_OK if directory else 0)):
            problem = "permission denied"
        else:
            continue
        raise ConfigError(f"cannot write {target} ({problem}); make it a writable {'directory' if directory else 'file'}, "
                          "or pass another --logdir")


class LogdirLock:
    """An exclusive ``flock`` on ``LOGDIR/.lock`` holding the owner's pid; released by ``release`` or when the
    process ends (also on SIGKILL: the kernel drops the lock). A lock held by another process raises
    ``ConfigError`` naming its pid.

    Args:
        logdir: The log dir to lock.
    """

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
    """Lock ``logdir`` for this run and make it this run's: artefacts already there must be writable
    (:func:`check_artefacts_writable`); a new run into a log dir that already holds files is refused unless
    ``resume`` or ``overwrite`` (which removes the earlier run's metrics.csv, checkpoints and TensorBoard
    events); partial checkpoints of an interrupted save are removed.

    Args:
        logdir: The run's log dir.
        resume: The run continues the one in ``logdir`` (``--resume``).
        overwrite: The run replaces the one in ``logdir`` (``--overwrite``).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in --logdir, "
                          "--overwrite replaces it")
    lock = LogdirLock(logdir)
    try:
        check_artefacts_writable(logdir)
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
        notes = remove_unfinished(logdir)
    except BaseException:
        lock.release()
        raise
    return lock, notes


@contextlib.contextmanager
def claimed_logdir(accelerator, logdir: str, resume: bool, overwrite: bool) -> Iterator[tuple[Path, list[str]]]:
    """Hold ``logdir`` for the run; yields it as a ``Path`` and the notes to print. The main process alone
    creates it (:func:`writable_logdir`), claims it (:func:`claim_logdir`) and keeps the lock, so that no other
    process's files are in it while it is checked. When the run fails having written nothing, the directories
    it created go again (:func:`discard_unused`).

    Args:
        accelerator: The run's ``Accelerator``.
        logdir: The run's log dir (``--logdir``).
        resume: The run continues the one in ``logdir`` (``--resume``).
        overwrite: The run replaces the one in ``logdir`` (``--overwrite``).
    """
    held: list[LogdirLock] = []
    created: list[Path] = []

    def claim() -> list[str]:
        created.extend(new_dirs(logdir))
        lock, notes = claim_logdir(writable_logdir(logdir), resume, overwrite)
        held.append(lock)
        return notes

    try:
        notes = on_main(accelerator, claim)
    except BaseException:
        discard_unused(Path(logdir), created)
        raise
    try:
        yield Path(logdir), notes
    except BaseException:
        for lock in held:
            lock.release()
        if held:  # the main process, which wrote whatever there is
            discard_unused(Path(logdir), created)
        raise
    finally:
        for lock in held:
            lock.release()
