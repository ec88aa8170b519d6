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
from nonlocal_opt.optim.amp import GradScaler


class LossScale:
    """The trainer's dynamic fp16 loss scale ``S``: a :class:`~nonlocal_opt.optim.amp.GradScaler` (back-propagate
    ``S·L``, each pass unscaled by ``1/S``; ``S ← S/2`` after an overflow, ``S ← 2S`` after ``interval`` steps
    without one) and its checkpoint state. ``S = 1`` and inert when disabled.

    Args:
        enabled: fp16 loss scaling is on.
        device: the device the scale lives on (the parameters').
        scale: the initial scale.
        interval: clean steps before the scale doubles.

    Attributes:
        scaler: the ``GradScaler``.
        restored_from_other: the last :meth:`load_state_dict` kept the initial scale (a checkpoint of the other kind).
    """

    def __init__(self, enabled: bool, device: torch.device | str = "cpu", scale: float = 2.0**16, interval: int = 2000):
        self.enabled = enabled
        self.scaler = GradScaler(torch.device(device).type, init_scale=scale, growth_interval=interval, enabled=enabled)
        self.restored_from_other = False

    @property
    def scale(self) -> float:
        """``S`` (1.0 when disabled)."""
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        """``{"scale", "good_steps", "enabled"}``: the checkpoint format of every version of the trainer."""
        good_steps = self.scaler.state_dict()["_growth_tracker"] if self.enabled else 0
        return {"scale": self.scale, "good_steps": good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale, but only into a scaler of the same kind: a run without fp16 keeps ``S = 1``
        (a checkpoint's 65536 would divide every gradient), and an fp16 run resumed from a run without
        loss scaling starts at its initial scale (``restored_from_other`` says so).

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.restored_from_other = state.get("enabled", state["scale"] != 1.0) != self.enabled
        if self.enabled and not self.restored_from_other:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": state["scale"], "_growth_tracker": state["good_steps"]})


class BatchClosure:
    """``closure(fresh_batch=False) -> L``: zero grads, forward, per-sample losses, backward, global reduce.

    ``start(batch)`` begins an optimizer step on ``batch``; ``fresh_batch=True`` first draws the next
    batch from ``fresh_batches``. With ``micro_batches = k > 1`` each call cuts the batch into ``k``
    micro-batches and back-propagates them one after the other (``--grad-accum k``: the activations of
    one micro-batch at a time), so every pass still sees the whole batch. Non-finite gradients are
    zeroed and the call returns ``inf``, so the step is refused (the base optimizer's update is skipped
    and the optimizer's ``stats["nonfinite"]`` is 1). With fp16 loss scaling the gradients are left
    scaled: the step runs inside ``loss_scale.scaler.scaled_step``, which unscales each pass and refuses
    a step whose pass overflowed. After the step, ``first_loss`` / ``first_accuracy`` describe the step's
    first pass (the trainer stops when that loss is not finite).
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
        self.loss_scale.scaler.scale(local_sum).backward()

    def _reduce(self, local_sum: torch.Tensor, count: int, correct: torch.Tensor) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dtype = grads[0].dtype
        totals = torch.stack([local_sum.to(dtype), torch.tensor(float(count), dtype=dtype, device=local_sum.device),
                              correct.to(dtype=dtype, device=local_sum.device)])
        flat = torch.cat([g.reshape(-1) for g in grads] + [totals])
        if self.distributed:
            dist.all_reduce(flat)
        loss_sum, total, total_correct = flat[-3], flat[-2], flat[-1]
        flat_grad = flat[:-3].div_(total)  # fp16: still scaled; the optimizer unscales and checks each pass
        finite_grad = torch.isfinite(flat_grad).all() | self.loss_scale.enabled
        flat_grad = torch.where(finite_grad, flat_grad, torch.zeros_like(flat_grad))
        for p, piece in zip(self.params, flat_grad.split([p.numel() for p in self.params])):
            p.grad = piece.view_as(p)
        loss = loss_sum / total
        if self.calls == 0:
            self.first_loss, self.first_accuracy = loss, total_correct / total
        self.calls += 1
        return torch.where(finite_grad, loss, torch.full_like(loss, math.inf))


def classification_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max logit is the label."""
    return (outputs.argmax(dim=1) == targets).sum()
