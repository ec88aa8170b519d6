"""Exact gradient accumulation inside one closure call: every pass of a multi-pass rule sees all micro-batches.

For a step's batch ``B = B_1 ∪ … ∪ B_k`` (over all processes), the closure returns
``L = Σ_{i∈B} ℓ_i / |B|`` and leaves ``∇L`` in ``p.grad``: it back-propagates each micro-batch's *sum*
``Σ_{i∈B_j} ℓ_i`` divided by the step's sample count ``|B|`` (not the mean of the micro-batch means,
which differs when the sizes differ). Under DDP only the last micro-batch synchronises: ``no_sync``
wraps the forward *and* backward of the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist


def sample_count(batch: Any) -> int:
    """The number of samples in ``batch``: the length of the first dimension of its first tensor
    (``batch`` a tensor, or a tuple, list or mapping holding tensors at any depth).

    Args:
        batch: A micro-batch.

    Raises:
        TypeError: ``batch`` holds no tensor.
    """
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return sample_count(item)
        except TypeError:
            continue
    raise TypeError(f"cannot count the samples of a {type(batch).__name__}: pass count=... to say how many it holds")


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut along its first dimension into ``parts`` micro-batches (``torch.tensor_split``: sizes
    differ by at most one); tensors inside tuples, lists and mappings are cut alike, other values repeated.

    Args:
        batch: A tensor, or a tuple, list or mapping holding tensors.
        parts: The number of micro-batches ``k ≥ 1``.
    """
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, parts))
    if isinstance(batch, Mapping):
        pieces = {key: split_batch(value, parts) for key, value in batch.items()}
        return [type(batch)({key: value[j] for key, value in pieces.items()}) for j in range(parts)]
    if isinstance(batch, (list, tuple)):
        columns = [split_batch(item, parts) for item in batch]
        return [type(batch)(column[j] for column in columns) for j in range(parts)]
    return [batch] * parts


def backward_micro_batches(micro_batches: Sequence[Any], loss_sum: Callable[[Any], torch.Tensor],
                           backward: Callable[[torch.Tensor], Any],
                           no_sync: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """``backward(loss_sum(B_j))`` for each micro-batch ``B_j`` in turn, ``no_sync()`` around the forward and
    backward of all but the last; returns ``Σ_j loss_sum(B_j)`` (detached).

    Args:
        micro_batches: The micro-batches ``B_1, …, B_k`` of the step (at least one).
        loss_sum: ``loss_sum(B_j)``: the sum ``Σ_{i∈B_j} ℓ_i`` (a scalar tensor with its graph).
        backward: Back-propagates a micro-batch's sum (scaled as the caller needs it).
        no_sync: A context in which the gradients are not synchronised.
    """
    total: torch.Tensor | None = None
    for index, micro_batch in enumerate(micro_batches):
        with no_sync() if index < len(micro_batches) - 1 else contextlib.nullcontext():
            part = loss_sum(micro_batch)
            backward(part)
        total = part.detach() if total is None else total + part.detach()
    return total


class MicroBatchClosure:
    """``closure() -> L = Σ_{i∈B} ℓ_i / |B|``, with ``∇L`` in ``p.grad``, over the step's micro-batches
    ``B_1, …, B_k``; a fresh object for every step (``opt.step(MicroBatchClosure(model, batches, loss_sum))``).

    Each call sets the model's gradients to ``None``, then back-propagates every micro-batch (so it never
    relies on gradients surviving between passes). When ``model`` synchronises gradients (DDP: it has
    ``no_sync``), ``|B|`` and ``Σℓ`` are summed over the processes (``|B|`` once) and each process
    back-propagates ``W · Σ_{B_j} ℓ / |B|``, which DDP's mean over the ``W`` processes turns into ``∇L``;
    every process must then hold the same number ``k`` of micro-batches.

    Args:
        model: The model (DDP-wrapped or not) whose parameters get the gradient.
        micro_batches: The step's micro-batches.
        loss_sum: ``loss_sum(B_j)``: the *sum* of the per-sample losses of micro-batch ``B_j`` (for a
            loss that averages, ``mean · sample_count(B_j)``).
        count: ``count(B_j)``: the samples in ``B_j`` (default :func:`sample_count`).
        backward: Back-propagates a loss: ``Tensor.backward`` by default; ``accelerator.backward`` under
            Accelerate, ``lambda loss: scaler.scale(loss).backward()`` with a loss scaler.
    """

    def __init__(self, model: torch.nn.Module, micro_batches: Iterable[Any], loss_sum: Callable[[Any], torch.Tensor], *,
                 count: Callable[[Any], int] = sample_count, backward: Callable[[torch.Tensor], Any] | None = None):
        self.model, self.micro_batches, self.loss_sum = model, list(micro_batches), loss_sum
        if not self.micro_batches:
            raise ValueError("MicroBatchClosure needs at least one micro-batch")
        self.backward = backward or torch.Tensor.backward
        self.synced = hasattr(model, "no_sync") and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.synced else 1
        self.local_count = sum(count(micro_batch) for micro_batch in self.micro_batches)
        self.total: torch.Tensor | None = None  # |B|, summed over the processes at the first call

    def __call__(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        device = params[0].device if params else torch.device("cpu")
        if self.total is None:
            self.total = torch.tensor(float(self.local_count), dtype=torch.float64, device=device)
            if self.synced:
                dist.all_reduce(self.total)
        no_sync = self.model.no_sync if self.synced else contextlib.nullcontext
        factor = self.world / float(self.total)
        with torch.enable_grad():
            loss_sum = backward_micro_batches(self.micro_batches, self.loss_sum, lambda part: self.backward(part * factor),
                                              no_sync)
        if self.synced:
            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum)
        return loss_sum / self.total.to(loss_sum.dtype)
