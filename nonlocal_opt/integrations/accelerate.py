"""Accelerate: refuse its gradient accumulation before a multi-pass step; let its fp16 scaler step closures.

The refusal is registered with the core's host checks (:mod:`nonlocal_opt.optim.host_checks`) when
``nonlocal_opt`` is imported. It reads Accelerate's state only where a program has imported Accelerate, and
never imports it.
"""

from __future__ import annotations

import sys
from typing import Any

from nonlocal_opt.optim.host_checks import HostGradientError


def accumulation_steps() -> int:
    """Accelerate's ``gradient_accumulation_steps`` in this process; 1 when Accelerate is not in use.

    Its ``GradientState`` (one per process, set by ``Accelerator(gradient_accumulation_steps=k)``) is what
    ``accelerator.accumulate()`` and the wrapped optimizer's ``step`` read to skip steps.
    """
    state = getattr(sys.modules.get("accelerate.state"), "GradientState", None)
    return state().num_steps if state is not None and state._shared_state else 1


def refuse_host_accumulation(rule: str) -> None:
    """Raise when Accelerate's gradient accumulation is on in this process.

    Args:
        rule: the name of the multi-pass rule about to step, for the message.

    Raises:
        HostGradientError: ``gradient_accumulation_steps`` is more than 1.
    """
    steps = accumulation_steps()
    if steps > 1:
        raise HostGradientError(
            f"gradient accumulation by the host is on (Accelerate's gradient_accumulation_steps={steps}): "
            f"accelerator.accumulate() skips opt.step, and with it the closure, on {steps - 1} of every {steps} batches, "
            f"and accelerator.backward divides the loss by {steps}; rule {rule!r} runs the closure several times per step "
            "and needs each step's whole gradient from it. Create the Accelerator without gradient_accumulation_steps and "
            "accumulate inside the closure: opt.step(nonlocal_opt.integrations.accumulation.MicroBatchClosure(model, "
            "micro_batches, loss_sum, backward=accelerator.backward)) runs all k micro-batches in every pass "
            "(docs/integrations.md, Gradient accumulation)"
        )


def use_closure_scaler(accelerator: Any) -> None:
    """Replace the ``torch.amp.GradScaler`` of ``accelerator`` (``mixed_precision="fp16"``) by a
    :class:`~nonlocal_opt.optim.amp.GradScaler` with its settings and state, in the optimizers it has
    prepared too: their ``step(closure)`` calls ``scaler.step(opt, closure)``, which torch's scaler refuses.
    Nothing to do where Accelerate has no scaler (fp16 on the CPU, bf16, no mixed precision).

    Args:
        accelerator: an ``accelerate.Accelerator``.

    Raises:
        NotImplementedError: its scaler is another kind (FSDP1's ``ShardedGradScaler``).
    """
    import torch

    from nonlocal_opt.optim.amp import GradScaler

    old = accelerator.scaler
    if old is None or isinstance(old, GradScaler):
        return
    if type(old) not in (torch.amp.GradScaler, torch.cuda.amp.GradScaler):
        raise NotImplementedError(
            f"Accelerate's scaler is a {type(old).__name__}: nonlocal_opt.GradScaler replaces torch.amp.GradScaler only; "
            "train with DDP or FSDP2 (fully_shard), or in bf16"
        )
    new = GradScaler(old._device, enabled=old.is_enabled())
    if old.is_enabled():
        new.load_state_dict(old.state_dict())
    accelerator.scaler = new
    for prepared in accelerator._optimizers:
        if prepared.scaler is old:
            prepared.scaler = new
