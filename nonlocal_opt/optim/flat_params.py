"""A flat view ``θ ∈ R^d`` over every trainable parameter of every parameter group."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _dtensor_type() -> type | tuple[()]:
    """``torch.distributed.tensor.DTensor`` where this torch build has it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖(t_1, …, t_n)‖₂`` over every entry of every tensor (one dtype and device), as a 0-d tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class FlatParams:
    """Gathers parameters (and their gradients) into one flat vector and writes it back.

    The order is the order of ``param_groups`` and of the parameters inside each group. All
    parameters must share one dtype and device: one ball in ``R^{d+1}``.
    """

    def __init__(self, param_groups: Sequence[dict[str, Any]]):
        self.groups = [[p for p in group["params"] if p.requires_grad] for group in param_groups]
        self.params = [p for group in self.groups for p in group]
        if not self.params:
            raise ValueError("the optimizer has no parameters with requires_grad=True")
        if any(type(p).__name__ == "DTensor" or isinstance(getattr(p, "data", None), _dtensor_type()) for p in self.params):
            raise NotImplementedError(
                "parameters sharded with FSDP2 (DTensor) are not supported: the rules work on the whole parameter "
                "vector; train with DDP (replicated parameters) or in one process"
            )
        first = self.params[0]
        for p in self.params:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "all parameters must share one dtype and device for a non-local optimizer; found "
                    f"{first.dtype}/{first.device} and {p.dtype}/{p.device}: cast the model first"
                )
        self.dtype, self.device = first.dtype, first.device
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self.numels), self.params)]

    def gather(self) -> torch.Tensor:
        """``θ``: a new flat tensor holding the current parameter values."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def gather_grad(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``g = ∇f(θ)`` as a flat tensor (written into ``out`` when given); a parameter without ``.grad`` contributes zeros."""
        grads = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
        return torch.cat(grads, out=out) if out is not None else torch.cat(grads).to(self.dtype)

    def write(self, theta: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy ``θ`` into the parameters, in place: a flat vector, or one tensor per parameter."""
        torch._foreach_copy_(self.params, self._views(theta) if isinstance(theta, torch.Tensor) else list(theta))

    def write_grad(self, flat: torch.Tensor) -> None:
        """Copy the flat vector ``flat`` into ``p.grad`` (allocated where it is ``None``)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        torch._foreach_copy_([p.grad for p in self.params], self._views(flat))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a flat vector (for per-parameter optimizer state)."""
        return self._views(flat)

    def join(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def per_coordinate(self, values: Sequence[float]) -> float | torch.Tensor:
        """Spread one value per parameter group over the coordinates of that group.

        Returns the plain float when every group has the same value (the common case).
        """
        if len(set(values)) == 1:
            return float(values[0])
        sizes = [sum(p.numel() for p in group) for group in self.groups]
        return torch.cat([torch.full((n,), float(v), dtype=self.dtype, device=self.device) for n, v in zip(sizes, values)])
