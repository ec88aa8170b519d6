"""What a comparison runs: optimizer specs (registry names + fixed and swept hyperparameters) and the
comparison settings (data, model, budget ``B`` in passes, label noise, seeds, evaluation grid)."""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import attrs
import torch

from nonlocal_opt.optim.radius_schedules import SCHEDULES
from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.training.hyperparameter_checks import check_hyperparameters, components_of

SPEC_KEYS = ("name", "rule", "base", "projector", "manifold", "fixed", "sweep", "schedule")
SCHEDULE_KEYS = ("name", "rho_final", "couple_lr")
SELECT_BY = ("best", "final")
AUGMENTATIONS = ("none", "crop-flip")


class SpecError(ValueError):
    """A bad optimizer spec or comparison setting; the message names the field."""


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise SpecError(f"{where}: {value!r} is not a JSON value (numbers, strings, booleans, lists)") from None


@attrs.frozen
class OptimizerSpec:
    """``rule`` over ``base`` (with ``projector``/``manifold`` for projecting rules), all registry names
    (a base's name as ``rule`` runs that base as it is, as in ``compose``); ``fixed`` hyperparameters,
    ``sweep`` lists (the grid is their Cartesian product) and an optional radius ``schedule``
    ``{"name": "cosine", "rho_final": ρ_f, "couple_lr": false}`` driven by the fraction of the budget spent,
    ``ρ(s)`` with ``s = passes/B`` (``ρ_f`` checked by the schedules' one rule, ``rho_final_problem``).

    Args:
        name: the label in results and plots.
        rule: a registered rule, or a base optimizer's name.
        base: a registered base (``None``: ``sgd``, or the base ``rule`` names).
        projector: for projecting rules (``None``: the rule's default).
        manifold: for projecting rules (``None``: the rule's default).
        fixed: hyperparameters every run uses.
        sweep: hyperparameter → values tried when tuning.
        schedule: the radius schedule, or ``None``.
    """

    name: str
    rule: str
    base: str | None = None
    projector: str | None = None
    manifold: str | None = None
    fixed: dict[str, Any] = attrs.field(factory=dict)
    sweep: dict[str, list[Any]] = attrs.field(factory=dict)
    schedule: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any) -> OptimizerSpec:
        """A spec from a mapping; unknown keys, empty sweeps and unknown components raise :class:`SpecError`."""
        if not isinstance(data, dict):
            raise SpecError(f"an optimizer spec must be a table/object with keys {', '.join(SPEC_KEYS)}, got {data!r}")
        name = data.get("name")
        label = f"optimizer spec {name!r}" if name else "optimizer spec"
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise SpecError(f"{label}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
        for key in ("name", "rule"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise SpecError(f"{label}: '{key}' must be a non-empty string")
        for key in ("base", "projector", "manifold"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise SpecError(f"{label}: '{key}' must be a registered name (a string)")
        fixed, sweep = data.get("fixed", {}) or {}, data.get("sweep", {}) or {}
        if not isinstance(fixed, dict) or not isinstance(sweep, dict):
            raise SpecError(f"{label}: 'fixed' and 'sweep' must be tables of hyperparameters")
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"{label}: sweep {key!r} must be a non-empty list of values, got {values!r}")
            if key in fixed:
                raise SpecError(f"{label}: {key!r} is both fixed and swept")
        schedule = data.get("schedule")
        if schedule is not None:
            if not isinstance(schedule, dict) or schedule.get("name") not in SCHEDULES:
                raise SpecError(f"{label}: schedule needs a 'name' in {', '.join(SCHEDULES)}, got {schedule!r}")
            extra = sorted(set(schedule) - set(SCHEDULE_KEYS))
            if extra or "rho_final" not in schedule:
                raise SpecError(f"{label}: schedule takes name, rho_final and couple_lr, got {schedule!r}")
        spec = cls(name, data["rule"], data.get("base"), data.get("projector"), data.get("manifold"),
                   _jsonable(fixed, f"{label} fixed"), _jsonable(sweep, f"{label} sweep"),
                   _jsonable(schedule, f"{label} schedule") if schedule is not None else None)
        spec.check()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def points(self) -> list[dict[str, Any]]:
        """The sweep grid: one hyperparameter dict per point, ``fixed`` merged in."""
        keys = sorted(self.sweep)
        return [{**self.fixed, **dict(zip(keys, values))} for values in itertools.product(*(self.sweep[k] for k in keys))]

    def build(self, params, hyperparameters: dict[str, Any]):
        """``compose(params, rule, base=…, projector=…, manifold=…, **hyperparameters)``."""
        return compose(params, self.rule, base=self.base, projector=self.projector, manifold=self.manifold, **hyperparameters)

    def check(self) -> None:
        """Every grid point composes: names registered, hyperparameters checked as ``nonlocal-opt train``
        checks its own (``check_hyperparameters``: the key, the value and its expected type), the schedule's
        ``ρ_final`` by ``rho_final_problem``; else :class:`SpecError`."""
        for point in self.points():
            try:
                check_hyperparameters(*components_of(self.rule, self.base, self.projector, self.manifold), point)
                opt = self.build([torch.nn.Parameter(torch.zeros(2))], point)
                if self.schedule is not None:
                    SCHEDULES[self.schedule["name"]](opt, 1, self.schedule["rho_final"], bool(self.schedule.get("couple_lr", False)))
            except (ValueError, TypeError) as error:
                raise SpecError(f"optimizer spec {self.name!r}: {' '.join(str(error).split())}") from None


def load_specs(source: str | Path | list[Any]) -> list[OptimizerSpec]:
    """Specs from a list of mappings, a ``.json`` file (a list, or ``{"optimizers": [...]}``) or a
    ``.toml`` file (``[[optimizers]]`` tables). Names must be unique."""
    if isinstance(source, list):
        raw = source
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as error:
            raise SpecError(f"cannot read optimizer specs {path}: {error.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            raise SpecError(f"optimizer specs {path} are not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {error}") from None
        raw = data.get("optimizers") if isinstance(data, dict) else data
        if not isinstance(raw, list):
            raise SpecError(f"optimizer specs {path}: expected a list of specs (JSON) or [[optimizers]] tables")
    specs = [OptimizerSpec.from_dict(item) for item in raw]
    if not specs:
        raise SpecError("no optimizer specs given")
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"optimizer spec names must be unique; repeated: {', '.join(duplicates)}")
    return specs


def _seeds(value: Any, field: str) -> tuple[int, ...]:
    seeds = tuple(value)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise SpecError(f"{field} must be a non-empty list of integers >= 0, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{field} has repeated seeds: {list(seeds)}")
    return seeds


@attrs.frozen
class ComparisonConfig:
    """Settings shared by every run of a comparison. ``budget`` = ``B`` passes per run; ``val_size``
    samples are held out of the (noisy) training set for tuning and early stopping; ``tuning_seeds``
    and ``final_seeds`` must be disjoint; ``tune_at_noise``: tune once at this noise level and reuse
    the pick at every level (``None``: tune at each level); ``augment``: ``"crop-flip"`` draws a random
    crop of the zero-padded image and a horizontal flip per training sample (``comparison.data.crop_flip``)."""

    budget: int
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    batch_size: int = 128
    label_noise: tuple[float, ...] = (0.0,)
    val_size: int = 5000
    split_seed: int = 0
    tuning_seeds: tuple[int, ...] = (0,)
    final_seeds: tuple[int, ...] = (1, 2, 3)
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    evals: int = 20
    select_by: str = "best"
    tune_at_noise: float | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    data_dir: str | None = None
    augment: str = "none"

    def __attrs_post_init__(self) -> None:
        for field in ("budget", "batch_size", "val_size", "evals"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{field} must be an integer >= 1, got {value!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise SpecError(f"split_seed must be an integer >= 0, got {self.split_seed!r}")
        for field in ("train_subset", "test_subset"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SpecError(f"{field} must be an integer >= 1 or None, got {value!r}")
        tuning, final = _seeds(self.tuning_seeds, "tuning_seeds"), _seeds(self.final_seeds, "final_seeds")
        overlap = sorted(set(tuning) & set(final))
        if overlap:
            raise SpecError(f"final seeds must be disjoint from the tuning seeds; both contain {', '.join(map(str, overlap))} "
                            "(a final result on a tuning seed is scored on the run that chose its hyperparameters)")
        noise = tuple(float(p) for p in self.label_noise)
        if not noise or any(not 0 <= p < 1 for p in noise):
            raise SpecError(f"label_noise must be probabilities in [0, 1), got {list(self.label_noise)}")
        fractions = tuple(sorted(float(f) for f in self.fractions))
        if not fractions or any(not 0 < f <= 1 or not math.isfinite(f) for f in fractions):
            raise SpecError(f"fractions must be in (0, 1], got {list(self.fractions)}")
        if self.select_by not in SELECT_BY:
            raise SpecError(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if self.augment not in AUGMENTATIONS:
            raise SpecError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.tune_at_noise is not None and float(self.tune_at_noise) not in noise:
            raise SpecError(f"tune_at_noise {self.tune_at_noise} is not one of the label noise levels {list(noise)}")
        object.__setattr__(self, "label_noise", noise)
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "tuning_seeds", tuning)
        object.__setattr__(self, "final_seeds", final)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(attrs.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonConfig:
        unknown = sorted(set(data) - set(attrs.fields_dict(cls)))
        if unknown:
            raise SpecError(f"unknown comparison setting(s) {', '.join(unknown)}")
        return cls(**data)

    def tuning_noise(self, noise: float) -> float:
        """The noise level whose tuning runs choose the hyperparameters used at ``noise``."""
        return float(self.tune_at_noise) if self.tune_at_noise is not None else noise

    def pass_grid(self) -> list[float]:
        """Evaluation points in passes: ``B k/evals`` for ``k = 1..evals`` and ``B f`` per fraction ``f``."""
        return sorted({self.budget * k / self.evals for k in range(1, self.evals + 1)} | {self.budget * f for f in self.fractions})


def step_grid(limit: float) -> list[int]:
    """Evaluation points in updates: the 1-2-5 sequence 10, 20, 50, 100, … up to ``limit``."""
    out, scale = [], 10
    while scale <= limit:
        out += [m * scale for m in (1, 2, 5) if m * scale <= limit]
        scale *= 10
    return out
