"""Reach the composed optimizer inside the wrappers hosts put around it: Accelerate's
``AcceleratedOptimizer`` keeps it as ``.optimizer``, Lightning's ``LightningOptimizer`` as ``._optimizer``."""

from __future__ import annotations

from typing import Any

from nonlocal_opt.optim.composed import ComposedOptimizer

WRAPPER_ATTRIBUTES = ("optimizer", "_optimizer")  # Accelerate's, Lightning's
MAX_DEPTH = 16


def unwrap(optimizer: Any) -> ComposedOptimizer:
    """The ``ComposedOptimizer`` inside host wrappers, at any depth.

    Args:
        optimizer: a composed optimizer, or a wrapper of one (``WRAPPER_ATTRIBUTES``).

    Raises:
        TypeError: ``optimizer`` is no composed optimizer and wraps none.
    """
    seen = optimizer
    for _ in range(MAX_DEPTH):
        if isinstance(seen, ComposedOptimizer):
            return seen
        seen = next((inner for name in WRAPPER_ATTRIBUTES if (inner := getattr(seen, name, None)) is not None), None)
        if seen is None:
            break
    raise TypeError(
        f"{type(optimizer).__name__} is not a nonlocal-opt optimizer and wraps none (looked through .optimizer and ._optimizer)"
    )


def first_pass(optimizer: Any) -> bool:
    """Whether code running now runs once per step of ``optimizer``: ``False`` only inside the second and
    later closure calls of a step. Guard the side effects of a closure with it, e.g. ``self.log`` in a
    Lightning ``training_step`` under automatic optimization, which runs once per pass; the first pass is at ``θ_t``.

    Args:
        optimizer: a composed optimizer or a wrapper of one (see :func:`unwrap`).
    """
    return unwrap(optimizer).resources.closure_pass in (None, 0)


def stats(optimizer: Any) -> dict[str, float]:
    """``ComposedOptimizer.stats`` of the last step.

    Args:
        optimizer: a composed optimizer or a wrapper of one (see :func:`unwrap`).
    """
    return unwrap(optimizer).stats
