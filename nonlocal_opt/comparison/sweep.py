"""The comparison: per noise level, tuning runs on the tuning seeds (scored on the validation split),
the pick per optimizer, then final runs of the pick on the final seeds (scored on the test set)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from nonlocal_opt.comparison.data import Splits, load_splits
from nonlocal_opt.comparison.runner import RunSpec, train_run
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec
from nonlocal_opt.comparison.storage import ResultStore


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
    """Plans and runs a comparison into ``store``; ``progress`` is called after each run with
    ``(done, total, run, record, cached)``."""

    def __init__(self, config: ComparisonConfig, specs: list[OptimizerSpec], store: ResultStore,
                 progress: Callable[..., None] | None = None):
        self.config, self.specs, self.store, self.progress = config, specs, store, progress
        self._splits: dict[float, Splits] = {}
        self._picks: dict[tuple[str, float], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self.done = 0

    def splits(self, noise: float) -> Splits:
        if noise not in self._splits:
            self._splits[noise] = load_splits(self.config, noise)
        return self._splits[noise]

    def total(self) -> int:
        """Runs in the plan (tuning runs of one-point specs are skipped: there is nothing to choose)."""
        tuning_levels = {self.config.tuning_noise(n) for n in self.config.label_noise}
        tune = sum(len(s.points()) * len(self.config.tuning_seeds) for s in self.specs if len(s.points()) > 1)
        return tune * len(tuning_levels) + len(self.specs) * len(self.config.final_seeds) * len(self.config.label_noise)

    def run(self, run: RunSpec) -> dict[str, Any]:
        key = run.key(self.config)
        record = self.store.get(key)
        cached = record is not None
        if record is None:
            record = train_run(self.config, run, self.splits(run.noise))
            record["key"] = key
            self.store.put(key, record)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total(), run, record, cached)
        return record

    def pick(self, spec: OptimizerSpec, noise: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The grid point with the highest mean tuning score at ``noise`` and the table of scores
        (``None``: a tuning run diverged)."""
        if (spec.name, noise) in self._picks:
            return self._picks[spec.name, noise]
        points = spec.points()
        if len(points) == 1:
            return points[0], []
        table = []
        for hp in points:
            records = [self.run(RunSpec(spec, hp, seed, noise, "tune")) for seed in self.config.tuning_seeds]
            scores = [score(r, self.config.select_by) for r in records]
            mean = sum(scores) / len(scores)
            table.append({"hp": hp, "score": mean if math.isfinite(mean) else None,
                          "diverged": sum(bool(r["diverged"]) for r in records)})
        best = max(range(len(table)), key=lambda i: (-math.inf if table[i]["score"] is None else table[i]["score"], -i))
        self._picks[spec.name, noise] = points[best], table
        return points[best], table

    def execute(self) -> dict[str, Any]:
        """Run everything not already in the store; returns ``{noise: {name: {"hp", "tuning"}}}``."""
        self.store.picks = picks = {}
        for noise in self.config.label_noise:
            tuned_at = self.config.tuning_noise(noise)
            level: dict[str, Any] = picks.setdefault(repr(noise), {})
            for spec in self.specs:
                hp, table = self.pick(spec, tuned_at)
                level[spec.name] = {"hp": hp, "tuned_at_noise": tuned_at, "tuning": table}
                for seed in self.config.final_seeds:
                    self.run(RunSpec(spec, hp, seed, noise, "final"))
        self.store.save()
        return picks


def run_comparison(config: ComparisonConfig, specs: list[OptimizerSpec], out, progress: bool | Callable[..., None] = True
                   ) -> ResultStore:
    """Run (or resume) the comparison into the results file ``out``; ``progress=True`` shows a tqdm bar."""
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
        comparison = Comparison(config, specs, store, callback)
        comparison.execute()
    finally:
        if bar is not None:
            bar.close()
    return store
