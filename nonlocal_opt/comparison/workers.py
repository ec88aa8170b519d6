"""Runs of a comparison in worker processes (``jobs > 1``). Each run is seeded by itself, so a run's record
is the same whichever process trains it and in whichever order; only its timings see the other runs.
The parent alone writes the results file."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from nonlocal_opt.comparison.data import Splits, load_splits
from nonlocal_opt.comparison.runner import RunSpec, train_run
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec
from nonlocal_opt.plugins.registry import CORE_PLUGIN, registrations

_splits: dict[float, Splits] = {}  # a worker's data splits, loaded once per noise level


def _start_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    torch.set_num_threads(threads)


def _train(config: ComparisonConfig, run: RunSpec) -> dict[str, Any]:
    if run.noise not in _splits:
        _splits[run.noise] = load_splits(config, run.noise)
    return train_run(config, run, _splits[run.noise])


def check_workers_can_build(specs: list[OptimizerSpec]) -> None:
    """Raise ``ValueError`` when a spec names a class that a plugin registered at run time: a worker process
    loads the installed plugins only (entry points), so it could not build that optimizer.

    Args:
        specs: The comparison's specs.
    """
    here_only = []
    for spec in specs:
        for kind, name in (("rule", spec.rule), ("base", spec.base), ("projector", spec.projector), ("manifold", spec.manifold)):
            found = registrations(kind).get(name) or (registrations("base").get(name) if kind == "rule" else None)
            if found is not None and found.distribution is None and found.plugin != CORE_PLUGIN:
                here_only.append(f"{kind} {name!r} of {found.provider}")
    if here_only:
        raise ValueError(f"{'; '.join(dict.fromkeys(here_only))} is registered in this process only, and worker processes "
                         "load installed plugins only: install the plugin as a package with a nonlocal_opt entry point, "
                         "or train one run at a time (--jobs 1)")


def train_in_workers(config: ComparisonConfig, runs: list[RunSpec], jobs: int, threads: int
                     ) -> Iterator[tuple[RunSpec, dict[str, Any]]]:
    """Train ``runs`` in ``jobs`` worker processes of ``threads`` torch threads each; yields each run with its
    record as it finishes. Leaving the loop early, an interrupt, or a failed run stops the workers; a worker
    that dies (killed, out of memory) raises ``WorkerDied``.

    Args:
        config: The comparison's settings.
        runs: The runs to train.
        jobs: Worker processes (at most ``len(runs)`` are started).
        threads: ``torch.set_num_threads`` of each worker.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    pool = ProcessPoolExecutor(min(jobs, len(runs)), mp_context=context, initializer=_start_worker, initargs=(threads,))
    futures = {pool.submit(_train, config, run): run for run in runs}
    try:
        for future in as_completed(futures):
            try:
                record = future.result()
            except BrokenProcessPool:
                raise WorkerDied(f"a worker process died while training {futures[future].spec.name} (killed, or out "
                                 "of memory?); the finished runs are kept: rerun to resume, with fewer --jobs if "
                                 "memory ran out") from None
            yield futures[future], record
    finally:
        for process in list((pool._processes or {}).values()):  # running runs end now, not when they finish
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


class WorkerDied(RuntimeError):
    """A worker process of :func:`train_in_workers` ended without finishing its run."""
