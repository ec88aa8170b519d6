"""Declared hyperparameters of components: defaults, paper symbols and validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_negative(value: Any) -> str | None:
    """Validator: a finite number ``≥ 0``.

    Args:
        value: the value to check.

    Returns:
        ``None`` when valid, else the problem as a short phrase (as every validator here).
    """
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        return "must be a finite number >= 0"
    return None


def positive(value: Any) -> str | None:
    """Validator: a finite number ``> 0``.

    Args:
        value: the value to check.
    """
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        return "must be a finite number > 0"
    return None


def positive_int(value: Any) -> str | None:
    """Validator: an integer ``≥ 1`` (not a bool).

    Args:
        value: the value to check.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return "must be an integer >= 1"
    return None


def non_negative_int(value: Any) -> str | None:
    """Validator: an integer ``≥ 0`` (not a bool).

    Args:
        value: the value to check.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer >= 0"
    return None


def unit_interval(value: Any) -> str | None:
    """Validator: a number in ``[0, 1]``.

    Args:
        value: the value to check.
    """
    if not _is_number(value) or not 0 <= value <= 1:
        return "must be a number in [0, 1]"
    return None


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A validator that allows ``None`` in addition to what ``check`` accepts.

    Args:
        check: a validator.
    """

    def check_or_none(value: Any) -> str | None:
        return None if value is None else check(value)

    return check_or_none


def boolean(value: Any) -> str | None:
    """Validator: ``True`` or ``False``.

    Args:
        value: the value to check.
    """
    return None if isinstance(value, bool) else "must be True or False"


@attrs.frozen
class Hyperparameter:
    """One scalar hyperparameter: its default, the paper symbol it stands for, and a validator.

    Args:
        default: the value a parameter group gets when none is given.
        symbol: the paper's symbol (``"—"`` for none).
        doc: what it sets, in a phrase.
        check: the validator: ``None`` for a valid value, else a short phrase such as ``"must be >= 0"``.
    """

    default: Any
    symbol: str
    doc: str
    check: Callable[[Any], str | None] = non_negative


def validate(specs: Mapping[str, Hyperparameter], values: Mapping[str, Any], owner: str) -> None:
    """Check ``values`` against their specs.

    Args:
        specs: the declared hyperparameters.
        values: the given ones.
        owner: who declares them, for the message.

    Raises:
        ValueError: naming the first unknown or invalid hyperparameter.
    """
    for key, value in values.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ValueError(f"unknown hyperparameter {key!r} for {owner}; known: {known}")
        problem = specs[key].check(value)
        if problem is not None:
            raise ValueError(f"invalid hyperparameter {key}={value!r} for {owner}: {problem}")


def is_finite(value: Any) -> bool:
    """Whether a hyperparameter's value holds no NaN or infinity: numbers, sequences of numbers (``betas``)
    and tensors on the CPU are checked; anything else (``None``, flags, strings, tensors on an accelerator,
    which would need a host read) counts as finite.

    Args:
        value: the value to check.
    """
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(is_finite(v) for v in value)
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.is_floating_point():
        return bool(torch.isfinite(value).all())
    return True


def check_finite(values: Mapping[str, Any], owner: str) -> None:
    """Refuse a NaN or infinite hyperparameter (see :func:`is_finite`), whoever declares it.

    Args:
        values: the hyperparameters, by name.
        owner: where they are, for the message.

    Raises:
        ValueError: naming the first non-finite one.
    """
    for key, value in values.items():
        if not is_finite(value):
            raise ValueError(f"hyperparameter {key}={value!r} of {owner} is not finite; set a finite value")


def merge_specs(*named_specs: tuple[str, Mapping[str, Hyperparameter]]) -> dict[str, Hyperparameter]:
    """Union of several components' hyperparameters.

    Args:
        *named_specs: ``(owner, specs)`` pairs.

    Raises:
        ValueError: a name is declared twice with different specs.
    """
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
