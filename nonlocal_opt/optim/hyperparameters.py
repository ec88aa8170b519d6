"""Declared hyperparameters of components: defaults, paper symbols and validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_negative(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        return "must be a finite number >= 0"
    return None


def positive(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        return "must be a finite number > 0"
    return None


def positive_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return "must be an integer >= 1"
    return None


def non_negative_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer >= 0"
    return None


def unit_interval(value: Any) -> str | None:
    if not _is_number(value) or not 0 <= value <= 1:
        return "must be a number in [0, 1]"
    return None


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """Allow ``None`` in addition to what ``check`` accepts."""

    def check_or_none(value: Any) -> str | None:
        return None if value is None else check(value)

    return check_or_none


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


@attrs.frozen
class Hyperparameter:
    """One scalar hyperparameter: its default, the paper symbol it stands for, and a validator.

    The validator returns ``None`` for a valid value, else a short phrase such as ``"must be >= 0"``.
    """

    default: Any
    symbol: str
    doc: str
    check: Callable[[Any], str | None] = non_negative


def validate(specs: Mapping[str, Hyperparameter], values: Mapping[str, Any], owner: str) -> None:
    """Raise ``ValueError`` naming the first unknown or invalid hyperparameter in ``values``."""
    for key, value in values.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ValueError(f"unknown hyperparameter {key!r} for {owner}; known: {known}")
        problem = specs[key].check(value)
        if problem is not None:
            raise ValueError(f"invalid hyperparameter {key}={value!r} for {owner}: {problem}")


def merge_specs(*named_specs: tuple[str, Mapping[str, Hyperparameter]]) -> dict[str, Hyperparameter]:
    """Union of several components' hyperparameters; a name declared twice must mean the same."""
    merged: dict[str, Hyperparameter] = {}
    owners: dict[str, str] = {}
    for owner, specs in named_specs:
        for key, spec in specs.items():
            if key in merged and merged[key] != spec:
                raise ValueError(
                    f"hyperparameter {key!r} is declared differently by {owners[key]} and {owner}; "
                    "rename it in one of the components"
                )
            merged[key] = spec
            owners.setdefault(key, owner)
    return merged
