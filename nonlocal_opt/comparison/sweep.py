"""The comparison: per noise level, tuning runs on the tuning seeds (scored on the validation split),
the pick per optimizer, then final runs of the pick on the final seeds (scored on the test set)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nonlocal_opt.comparison.data import Splits, load_splits
from nonlocal_opt.comparison.runner import RunSpec, train_run
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec
from nonlocal_opt.comparison.storage import ResultStore
from nonlocal_opt.comparison.workers import check_workers_can_build, train_in_workers


def score(record: dict[str, Any], select_by: str) -> float:
    """Validation accuracy of a tuning run: the best over its evaluations (``"best"``) or the last
    (``"final"``); ``−inf`` for a diverged run."""
    if record["diverged"]:
        return -math.inf
    values = [v for v in record["curve"]["val_acc"] if v is not None]
    if not values:
        return -math.inf
    return max(values) if select_by == "best" else values[-1]


class Comparison:
    """Plans and runs a comparison into ``store``: every tuning run first, then the final runs of the picks;
    ``progress`` is called after each run with ``(done, total, run, record, cached)``. With ``jobs > 1`` the
    runs not in the store train in that many worker processes (:mod:`~nonlocal_opt.comparison.workers`) of
    ``threads`` torch threads each; the records are the same as with one."""

    def __init__(self, config: ComparisonConfig, specs: list[OptimizerSpec], store: ResultStore,
                 progress: Callable[..., None] | None = None, jobs: int = 1, threads: int = 1):
        self.config, self.specs, self.store, self.progress = config, specs, store, progress
        self.jobs, self.threads = jobs, threads
        self._splits: dict[float, Splits] = {}
        self.done = 0

    def splits(self, noise: float) -> Splits:
        if noise not in self._splits:
            self._splits[noise] = load_splits(self.config, noise)
        return self._splits[noise]

    def tuning_runs(self) -> list[RunSpec]:
        """The sweeps at every tuning noise level (none for one-point specs: there is nothing to choose)."""
        levels = dict.fromkeys(self.config.tuning_noise(n) for n in self.config.label_noise)
        return [RunSpec(spec, hp, seed, level, "tune") for level in levels for spec in self.specs
                if len(spec.points()) > 1 for hp in spec.points() for seed in self.config.tuning_seeds]

    def total(self) -> int:
        """Runs in the plan."""
        return len(self.tuning_runs()) + len(self.specs) * len(self.config.final_seeds) * len(self.config.label_noise)

    def record(self, run: RunSpec, record: dict[str, Any]) -> None:
        """Store the new ``record`` of ``run``."""
        record["key"] = run.key(self.config)
        self.store.put(record["key"], record)
        self.report(run, record, cached=False)

    def report(self, run: RunSpec, record: dict[str, Any], cached: bool) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total(), run, record, cached)

    def run_all(self, runs: list[RunSpec]) -> None:
        """Train the ``runs`` the store does not hold yet, in ``jobs`` processes."""
        missing = []
        for run in runs:
            record = self.store.get(run.key(self.config))
            if record is None:
                missing.append(run)
            else:
                self.report(run, record, cached=True)
        if self.jobs > 1 and len(missing) > 1:
            for run, record in train_in_workers(self.config, missing, self.jobs, self.threads):
                self.record(run, record)
            return
        for run in missing:
            self.record(run, train_run(self.config, run, self.splits(run.noise)))

    def pick(self, spec: OptimizerSpec, noise: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The grid point with the highest mean tuning score at ``noise`` and the table of scores
        (``None``: a tuning run diverged); its tuning runs must be in the store."""
        points = spec.points()
        if len(points) == 1:
            return points[0], []
        table = []
        for hp in points:
            records = [self.store.get(RunSpec(spec, hp, seed, noise, "tune").key(self.config)) for seed in self.config.tuning_seeds]
            scores = [score(r, self.config.select_by) for r in records]
            mean = sum(scores) / len(scores)
            table.append({"hp": hp, "score": mean if math.isfinite(mean) else None,
                          "diverged": sum(bool(r["diverged"]) for r in records)})
        best = max(range(len(table)), key=lambda i: (-math.inf if table[i]["score"] is None else table[i]["score"], -i))
        return points[best], table

    def execute(self) -> dict[str, Any]:
        """Run everything not already in the store; returns ``{noise: {name: {"hp", "tuning"}}}``."""
        self.store.picks = picks = {}  # the file holds the picks of a finished plan only
        self.run_all(self.tuning_runs())
        finals = []
        for noise in self.config.label_noise:
            tuned_at = self.config.tuning_noise(noise)
            level: dict[str, Any] = picks.setdefault(repr(noise), {})
            for spec in self.specs:
                hp, table = self.pick(spec, tuned_at)
                level[spec.name] = {"hp": hp, "tuned_at_noise": tuned_at, "tuning": table}
                finals += [RunSpec(spec, hp, seed, noise, "final") for seed in self.config.final_seeds]
        self.run_all(finals)
        self.store.save()
        return picks


def run_comparison(config: ComparisonConfig, specs: list[OptimizerSpec], out, progress: bool | Callable[..., None] = True,
                   jobs: int = 1, threads: int | None = None) -> ResultStore:
    """Run (or resume) the comparison into the results file ``out``; ``progress=True`` shows a tqdm bar.
    ``jobs`` runs train at once, each in a process of ``threads`` torch threads (default: this process's)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1:
        check_workers_can_build(specs)
    store = ResultStore(out, config, specs)
    bar = None
    callback = progress if callable(progress) else None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(desc="runs", unit="run", dynamic_ncols=True)

        def callback(done, total, run, record, cached):
            bar.total = total
            state = "cached" if cached else f"{record['train_seconds']:.1f}s"
            bar.set_postfix_str(f"{run.spec.name} noise={run.noise:g} seed={run.seed} {run.phase} {state}", refresh=False)
            bar.update(1)

    try:
        comparison = Comparison(config, specs, store, callback, jobs, threads or torch.get_num_threads())
        comparison.execute()
    finally:
        if bar is not None:
            bar.close()
    return store
