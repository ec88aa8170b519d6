"""The closure every rule calls: the *global* mini-batch loss and gradient, in one or many processes.

On ``n`` processes holding samples ``B_1, …, B_n`` of one global batch ``B``, a call returns
``L = Σ_{i∈B} ℓ_i / |B|`` and leaves ``∇L`` in ``p.grad``. Each process back-propagates its local
*sum* ``Σ_{i∈B_r} ℓ_i`` inside ``accelerator.no_sync`` (DDP's own reduction is skipped), then one flat
``all_reduce`` sums ``[∇Σℓ, Σℓ, count, correct]`` over processes, and everything is divided by
``|B|``. So every inner pass of RBO / SAM / Entropy-SGD sees the same numbers on every rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from nonlocal_opt.integrations.accumulation import backward_micro_batches, sample_count, split_batch


class LossScale:
    """Dynamic fp16 loss scale ``S``: back-propagate ``S·L``, unscale by ``1/S``; ``S ← S/2`` after an
    overflow, ``S ← 2S`` after ``interval`` steps without one. ``S = 1`` and inert when disabled."""

    def __init__(self, enabled: bool, scale: float = 2.0**16, interval: int = 2000):
        self.enabled, self.interval = enabled, interval
        self.scale = scale if enabled else 1.0
        self.good_steps = 0
        self.restored_from_other = False

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale, but only into a scaler of the same kind: a run without fp16 keeps ``S = 1``
        (a checkpoint's 65536 would divide every gradient), and an fp16 run resumed from a run without
        loss scaling starts at its initial scale (``restored_from_other`` says so)."""
        self.restored_from_other = state.get("enabled", state["scale"] != 1.0) != self.enabled
        if not self.restored_from_other:
            self.scale, self.good_steps = state["scale"], state["good_steps"]


class BatchClosure:
    """``closure(fresh_batch=False) -> L``: zero grads, forward, per-sample losses, backward, global reduce.

    ``start(batch)`` begins an optimizer step on ``batch``; ``fresh_batch=True`` first draws the next
    batch from ``fresh_batches``. With ``micro_batches = k > 1`` each call cuts the batch into ``k``
    micro-batches and back-propagates them one after the other (``--grad-accum k``: the activations of
    one micro-batch at a time), so every pass still sees the whole batch. Non-finite gradients (an fp16
    overflow) are zeroed and the call returns ``inf``, so the step is refused (the base optimizer's
    update is skipped and the optimizer's ``stats["nonfinite"]`` is 1). After the step,
    ``first_loss`` / ``first_accuracy`` describe the step's first pass (the trainer stops when that
    loss is not finite) and ``overflow`` (a 0-d bool tensor) says whether any pass had a non-finite
    gradient (the fp16 loss scale then backs off).
    """

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        count_correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        fresh_batches: Iterator[Any],
        loss_scale: LossScale,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        micro_batches: int = 1,
    ):
        self.accelerator, self.model = accelerator, model
        self.per_sample_loss, self.count_correct = per_sample_loss, count_correct
        self.fresh_batches, self.loss_scale = fresh_batches, loss_scale
        self.forward = forward or model  # e.g. the torch.compile'd model; ``model`` is the one DDP syncs
        self.micro_batches = micro_batches
        self.fresh_drawn = 0  # batches drawn from ``fresh_batches``
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed = accelerator.num_processes > 1

    def start(self, batch) -> None:
        self.batch, self.calls = batch, 0
        self.overflow = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)

    def __call__(self, fresh_batch: bool = False) -> torch.Tensor:
        if fresh_batch:
            self.batch = next(self.fresh_batches)
            self.fresh_drawn += 1
        for p in self.params:
            p.grad = None
        self.correct = torch.zeros((), device=self.accelerator.device)
        with torch.enable_grad(), self.accelerator.no_sync(self.model):
            local_sum = backward_micro_batches(split_batch(self.batch, self.micro_batches), self._micro_batch_sum,
                                               self._backward, contextlib.nullcontext)
        with torch.no_grad():
            return self._reduce(local_sum, sample_count(self.batch), self.correct)

    def _micro_batch_sum(self, micro_batch) -> torch.Tensor:
        inputs, targets = micro_batch
        outputs = self.forward(inputs)
        if self.count_correct:
            with torch.no_grad():
                self.correct = self.correct + self.count_correct(outputs, targets)
        return self.per_sample_loss(outputs, targets).float().sum()

    def _backward(self, local_sum: torch.Tensor) -> None:
        (local_sum * self.loss_scale.scale if self.loss_scale.enabled else local_sum).backward()

    def _reduce(self, local_sum: torch.Tensor, count: int, correct: torch.Tensor) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dtype = grads[0].dtype
        totals = torch.stack([local_sum.to(dtype), torch.tensor(float(count), dtype=dtype, device=local_sum.device),
                              correct.to(dtype=dtype, device=local_sum.device)])
        flat = torch.cat([g.reshape(-1) for g in grads] + [totals])
        if self.distributed:
            dist.all_reduce(flat)
        loss_sum, total, total_correct = flat[-3], flat[-2], flat[-1]
        flat_grad = flat[:-3].div_(total * self.loss_scale.scale)
        finite_grad = torch.isfinite(flat_grad).all()
        flat_grad = torch.where(finite_grad, flat_grad, torch.zeros_like(flat_grad))
        for p, piece in zip(self.params, flat_grad.split([p.numel() for p in self.params])):
            p.grad = piece.view_as(p)
        loss = loss_sum / total
        self.overflow = self.overflow | ~finite_grad
        if self.calls == 0:
            self.first_loss, self.first_accuracy = loss, total_correct / total
        self.calls += 1
        return torch.where(finite_grad, loss, torch.full_like(loss, math.inf))


def classification_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max logit is the label."""
    return (outputs.argmax(dim=1) == targets).sum()
