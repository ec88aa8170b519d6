"""A flat view ``θ ∈ R^d`` over every trainable parameter of every parameter group, or over this
process's shard of it when the parameters are sharded (FSDP2 ``DTensor``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch


@functools.cache
def _dtensor_type() -> type | tuple[()]:
    """``torch.distributed.tensor.DTensor`` where this torch build has it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: the local shard of a ``DTensor`` (a view that writes
    through), ``tensor`` itself otherwise.

    Args:
        tensor: a tensor or ``DTensor``.
    """
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖(t_1, …, t_n)‖₂`` over every entry of every tensor, as a 0-d tensor.

    Args:
        tensors: tensors of one dtype and device.
    """
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def sharded_norm(tensors: Sequence[torch.Tensor], flat: FlatParams) -> torch.Tensor:
    """:func:`global_norm` over the whole of sharded tensors: the local sums of squares, all-reduced.

    Args:
        tensors: this process's shard of each tensor.
        flat: the flat view whose :meth:`FlatParams.sum` adds up the shards.
    """
    return flat.sum(torch.stack(torch._foreach_norm(tensors)).square().sum()).sqrt()


def shard_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group the parameters are sharded over, ``None`` for ordinary tensors.

    Supported: every parameter a ``DTensor`` sharded (``Shard``) on one 1-D device mesh, as
    ``fully_shard`` makes them. Anything else that mixes sharded and whole tensors is refused: a
    reduction over ``R^d`` would count the whole tensors once per process.

    Args:
        params: the parameters.

    Raises:
        ValueError: a mix of sharded and whole parameters, or a layout other than ``Shard`` on one 1-D mesh.
    """
    dtensor = _dtensor_type()
    sharded = [isinstance(p, dtensor) for p in params]
    if not any(sharded):
        return None
    from torch.distributed.tensor import Shard

    if not all(sharded):
        raise ValueError(
            "some parameters are sharded (DTensor) and others are not: apply fully_shard to the root module too, "
            "so that every parameter is sharded over the same mesh"
        )
    meshes = {p.device_mesh for p in params}
    mesh = meshes.pop()
    if meshes or mesh.ndim != 1 or not all(len(p.placements) == 1 and isinstance(p.placements[0], Shard) for p in params):
        raise ValueError(
            "sharded parameters must all be Shard-placed on one 1-D device mesh (fully_shard over one process group); "
            "hybrid or replicated DTensor layouts are not supported"
        )
    return mesh.get_group()


class FlatParams:
    """Gathers parameters (and their gradients) into one flat vector and writes it back.

    The order is the order of ``param_groups`` and of the parameters inside each group. All
    parameters must share one dtype and device: one ball in ``R^{d+1}``.

    ``params`` are the parameters themselves; ``tensors`` are what this process holds of them (the
    local shards under FSDP2, else the parameters), and every flat vector is built from ``tensors``.
    A sum over ``R^d`` is then a sum of partial sums over the processes: :meth:`sum`. ``shards``:
    accept sharded parameters (the caller reduces every such sum with :meth:`sum`).

    Args:
        param_groups: the optimizer's parameter groups (parameters without ``requires_grad`` are left out).
        shards: accept sharded parameters.

    Attributes:
        groups: the parameters of each group.
        params: the parameters, in order.
        tensors: this process's part of each parameter.
        group: the process group of the shards (``None``: not sharded).
        shard_rank: this process's rank in ``group`` (0 when not sharded).
        dtype: the parameters' dtype.
        device: the parameters' device.
        numels: the number of entries of each of ``tensors``.
        numel: their total, ``d`` (this process's part of it).

    Raises:
        ValueError: no trainable parameter, mixed dtypes or devices, or an unsupported sharding.
        NotImplementedError: sharded parameters without ``shards``.
    """

    def __init__(self, param_groups: Sequence[dict[str, Any]], shards: bool = False):
        self.groups = [[p for p in group["params"] if p.requires_grad] for group in param_groups]
        self.params = [p for group in self.groups for p in group]
        if not self.params:
            raise ValueError("the optimizer has no parameters with requires_grad=True")
        self.group = shard_group(self.params)
        if self.group is not None and not shards:
            raise NotImplementedError(
                "parameters sharded with FSDP2 (DTensor) are not supported here: this works on the whole parameter "
                "vector; train with DDP (replicated parameters) or in one process"
            )
        self.shard_rank = torch.distributed.get_rank(self.group) if self.group is not None else 0
        self.tensors = [local(p) for p in self.params]
        first = self.tensors[0]
        for p in self.tensors:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "all parameters must share one dtype and device for a non-local optimizer; found "
                    f"{first.dtype}/{first.device} and {p.dtype}/{p.device}: cast the model first"
                )
        self.dtype, self.device = first.dtype, first.device
        self.numels = [p.numel() for p in self.tensors]
        self.numel = sum(self.numels)
        self._flat_tensors: list[torch.Tensor] | None = None  # made by the first write (see _pieces)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The pieces of a flat vector, shaped like the parameters (views: writes go through).

        Args:
            flat: a flat vector of :attr:`numel` entries.
        """
        return [v.view_as(p) for v, p in zip(flat.split_with_sizes(self.numels), self.tensors)]

    def _pieces(self, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | tuple[torch.Tensor, ...]]:
        """(parameters, the matching pieces of ``flat``), shaped alike. When every parameter is contiguous its
        flat view takes the pieces as they come, without a view per piece."""
        if self._flat_tensors is None:
            contiguous = all(p.is_contiguous() for p in self.tensors)
            self._flat_tensors = [p.view(-1) for p in self.tensors] if contiguous else []
        if self._flat_tensors:
            return self._flat_tensors, flat.split_with_sizes(self.numels)
        return self.tensors, self.views(flat)

    def grads(self) -> list[torch.Tensor | None]:
        """This process's part of each ``p.grad`` (``None`` where a parameter has no gradient)."""
        if self.group is None:
            return [p.grad for p in self.params]
        return [None if p.grad is None else p.grad.to_local() for p in self.params]

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sums over ``R^d`` from this process's partial sums: all-reduced over the shard group when the
        parameters are sharded, ``partial`` itself otherwise.

        Args:
            partial: this process's partial sums (a small tensor of them).
        """
        if self.group is None:
            return partial
        total = partial.clone()
        torch.distributed.all_reduce(total, group=self.group)
        return total

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``θ``: a flat tensor holding the current parameter values.

        Args:
            out: a flat tensor to write into (``None``: a new one).
        """
        return torch.cat([p.detach().reshape(-1) for p in self.tensors], out=out)

    def gather_grad(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``g = ∇f(θ)`` as a flat tensor; a parameter without ``.grad`` contributes zeros.

        Args:
            out: a flat tensor to write into (``None``: a new one).
        """
        grads = [(g.detach() if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(self.tensors, self.grads())]
        return torch.cat(grads, out=out) if out is not None else torch.cat(grads).to(self.dtype)

    def write(self, theta: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy ``θ`` into the parameters, in place.

        Args:
            theta: a flat vector, or one tensor per parameter.
        """
        if isinstance(theta, torch.Tensor):
            torch._foreach_copy_(*self._pieces(theta))
        else:
            torch._foreach_copy_(self.tensors, list(theta))

    def write_sum(self, theta: torch.Tensor, offset: torch.Tensor) -> None:
        """Write ``θ + offset`` into the parameters without forming it.

        Args:
            theta: a flat vector.
            offset: a flat vector.
        """
        params, pieces = self._pieces(theta)
        torch._foreach_copy_(params, pieces)
        torch._foreach_add_(params, self._pieces(offset)[1])

    def write_grad(self, flat: torch.Tensor) -> None:
        """Copy a flat vector into ``p.grad`` (allocated where it is ``None``).

        Args:
            flat: a flat vector of :attr:`numel` entries.
        """
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        torch._foreach_copy_(self.grads(), self.views(flat))

    def per_coordinate(self, values: Sequence[float]) -> float | torch.Tensor:
        """Spread one value per parameter group over the coordinates of that group.

        Args:
            values: one value per parameter group.

        Returns:
            The plain float when every group has the same value (the common case), else a flat tensor.
        """
        if len(set(values)) == 1:
            return float(values[0])
        sizes = [sum(local(p).numel() for p in group) for group in self.groups]
        return torch.cat([torch.full((n,), float(v), dtype=self.dtype, device=self.device) for n, v in zip(sizes, values)])
