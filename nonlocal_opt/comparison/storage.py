"""The results file: one JSON holding the comparison settings, the specs and every finished run keyed
by its run hash; rewritten atomically (temporary file, then ``os.replace``) after each run, so a
killed sweep resumes from the runs it finished."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from nonlocal_opt.comparison.runner import ADDED_RUN_SETTINGS, RUN_SETTINGS
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec

FORMAT = "nonlocal-opt comparison 1"


class StorageError(ValueError):
    """The results file cannot be used (unreadable, or written for different settings)."""


class ResultStore:
    """``runs`` maps a run hash to its record, ``picks`` noise level → optimizer → the chosen
    hyperparameters and the tuning scores. Opening a file written with other run settings (data,
    model, budget, batch size, validation split, evaluation grid: ``RUN_SETTINGS``) raises
    :class:`StorageError` naming them. Specs, seeds, noise levels and the selection rule may change
    between sessions: runs are keyed by everything they depend on, and the summary reads only the
    runs of the current plan."""

    def __init__(self, path: str | Path, config: ComparisonConfig, specs: list[OptimizerSpec]):
        self.path, self.config = Path(path), config
        self.runs: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.picks: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()
        for spec in specs:
            self.specs[spec.name] = spec.to_dict()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StorageError(f"cannot read results file {self.path} ({error}); pass another --out or remove it") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StorageError(f"{self.path} is not a comparison results file; pass another --out")
        stored, current = data.get("settings", {}), self.config.to_dict()
        stored = {k: stored.get(k, ADDED_RUN_SETTINGS.get(k)) for k in RUN_SETTINGS}  # a file from before a setting existed
        differ = sorted(k for k in RUN_SETTINGS if stored[k] != current[k])
        if differ:
            detail = "; ".join(f"{k}: file {stored.get(k)!r}, now {current.get(k)!r}" for k in differ)
            raise StorageError(f"{self.path} holds results of a different comparison ({detail}); "
                               "pass another --out, or the same settings to resume")
        self.runs, self.specs, self.picks = data.get("runs", {}), data.get("specs", {}), data.get("picks", {})

    def get(self, key: str) -> dict[str, Any] | None:
        return self.runs.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Add a run and rewrite the file atomically."""
        self.runs[key] = record
        self.save()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "settings": self.config.to_dict(), "specs": self.specs, "picks": self.picks, "runs": self.runs}

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True, allow_nan=False)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return self.path
