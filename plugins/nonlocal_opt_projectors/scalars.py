"""Scalar arithmetic of the projector loops, on the host for CPU tensors and on the device otherwise.

On the CPU a dot product is read into a Python float for free, and Python arithmetic on floats costs
far less than a 0-d tensor operation. On CUDA reading it would synchronise the host, so the same
formulas run on 0-d device tensors. Python's operators work on both; these helpers cover the rest.
"""

from __future__ import annotations

import math

import torch

Scalar = float | torch.Tensor


def read(values: torch.Tensor, on_host: bool) -> tuple[Scalar, ...]:
    """The entries of a small 1-d tensor: Python floats on the host, 0-d tensors otherwise.

    Args:
        values: A 1-d tensor.
        on_host: Whether to read it to the host (one ``tolist()``).

    Returns:
        One scalar per entry.
    """
    return tuple(values.tolist()) if on_host else values.unbind()


def scalar(value: torch.Tensor, on_host: bool) -> Scalar:
    """A 0-d tensor as a Python float on the host, unchanged otherwise.

    Args:
        value: A 0-d tensor.
        on_host: Whether to read it to the host.

    Returns:
        The scalar.
    """
    return value.item() if on_host else value


def where(flag: bool | torch.Tensor, new: Scalar, old: Scalar) -> Scalar:
    """``new if flag else old``; ``torch.where`` when ``flag`` is a tensor (no host synchronisation).

    Args:
        flag: A ``bool`` or a 0-d bool tensor.
        new: The scalar where ``flag`` holds.
        old: The scalar otherwise.

    Returns:
        The chosen scalar.
    """
    if isinstance(flag, torch.Tensor):
        return torch.where(flag, new, old)
    return new if flag else old


def at_least(value: Scalar, low: float) -> Scalar:
    """``max(value, low)``; a NaN stays NaN on both paths.

    Args:
        value: A scalar.
        low: The floor.

    Returns:
        The clamped scalar.
    """
    if isinstance(value, torch.Tensor):
        return torch.clamp(value, min=low)
    return value if math.isnan(value) else max(value, low)


def sqrt(value: Scalar) -> Scalar:
    """``√value`` of a non-negative scalar.

    Args:
        value: A float or a 0-d tensor.

    Returns:
        The square root, of the same kind.
    """
    return torch.sqrt(value) if isinstance(value, torch.Tensor) else math.sqrt(value)


def combine(alpha: Scalar, x: torch.Tensor, beta: Scalar, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = α x + β y`` in two sweeps over ``R^d`` (one when ``α`` is the float 0), for float or 0-d
    tensor coefficients.

    Args:
        alpha: ``α``.
        x: ``x``.
        beta: ``β``.
        y: ``y``.
        out: Where to write the result.

    Returns:
        ``out``.
    """
    if not isinstance(alpha, torch.Tensor) and alpha == 0:
        return torch.mul(y, representable(beta, out.dtype), out=out)
    return axpy_(torch.mul(x, alpha, out=out), beta, y)


def axpy_(x: torch.Tensor, alpha: Scalar, y: torch.Tensor) -> torch.Tensor:
    """``x ← x + α y`` in place, for a float or 0-d tensor ``α``.

    A Python float beyond the range of ``x``'s dtype becomes ±inf, as a 0-d tensor of that dtype would
    (``add_`` refuses to convert it): the trial is then non-finite and the safeguard rejects it.

    Args:
        x: Updated in place.
        alpha: ``α``.
        y: ``y``.

    Returns:
        ``x``.
    """
    if isinstance(alpha, torch.Tensor):
        return x.addcmul_(y, alpha)
    return x.add_(y, alpha=representable(alpha, x.dtype))


def representable(alpha: Scalar, dtype: torch.dtype) -> Scalar:
    """A Python float beyond the range of ``dtype`` as ±inf (what a 0-d tensor of that dtype would hold);
    anything else unchanged.

    Args:
        alpha: A float or a 0-d tensor.
        dtype: The floating dtype it will multiply.

    Returns:
        ``alpha``, or ``±inf``.
    """
    if not isinstance(alpha, torch.Tensor) and abs(alpha) > torch.finfo(dtype).max:
        return math.copysign(math.inf, alpha)
    return alpha
