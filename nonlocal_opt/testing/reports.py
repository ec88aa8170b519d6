"""What the contract kits return: one :class:`Check` per check and case, gathered in a :class:`Report`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs


def nan_max(values: Sequence[float]) -> float:
    """The largest value, a NaN counting as larger than any number.

    Args:
        values: numbers (not empty).
    """
    return max(values, key=lambda v: math.inf if math.isnan(v) else v)


@attrs.frozen
class Check:
    """One check on one case: ``value`` (an error) against ``limit``.

    Args:
        name: the check (``accuracy``, ``passes``, ...).
        case: what it ran on.
        passed: whether it passed.
        value: the measured error.
        limit: the largest error allowed (``None``: reported only).
        detail: what ``value`` measures.
    """

    name: str
    case: str
    passed: bool
    value: float
    limit: float | None
    detail: str = ""

    @classmethod
    def at_most(cls, name: str, case: str, value: float, limit: float, detail: str = "") -> Check:
        """Passed when ``value ≤ limit`` (a NaN fails).

        Args:
            name: the check.
            case: what it ran on.
            value: the measured error.
            limit: the largest error allowed.
            detail: what ``value`` measures.
        """
        return cls(name, case, bool(value <= limit), value, limit, detail)

    @classmethod
    def holds(cls, name: str, case: str, passed: bool, detail: str = "") -> Check:
        """A yes/no check: ``value`` 0 when it holds, 1 when not.

        Args:
            name: the check.
            case: what it ran on.
            passed: whether the claim holds.
            detail: the claim.
        """
        return cls(name, case, passed, float(not passed), 0.0, detail)


@attrs.frozen
class Report:
    """Every check a kit ran on one component; ``failures`` lists those that did not pass.

    Args:
        subject: the component, e.g. ``"projector 'footpoint'"``.
        checks: the checks run.
    """

    subject: str
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.failures

    def worst(self, name: str) -> float:
        """The largest ``value`` among checks called ``name`` (NaN counts as largest; NaN when there is none).

        Args:
            name: a check's name.
        """
        values = [c.value for c in self.checks if c.name == name]
        return nan_max(values) if values else math.nan

    def raise_on_failure(self) -> Report:
        """``self``, or ``AssertionError`` with the whole report when a check failed."""
        if not self.ok:
            raise AssertionError(str(self))
        return self

    def __str__(self) -> str:
        lines = [f"{self.subject}: {len(self.checks) - len(self.failures)}/{len(self.checks)} checks passed"]
        for c in self.checks:
            limit = "report" if c.limit is None else f"<= {c.limit:.1e}"
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<12} {c.case:<34} {c.value:.3e} ({limit}) {c.detail}")
        return "\n".join(lines)
