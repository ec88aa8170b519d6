"""Accelerate: refuse its gradient accumulation before a multi-pass step.

Registered with the core's host checks (:mod:`nonlocal_opt.optim.host_checks`) when ``nonlocal_opt`` is
imported. It reads Accelerate's state only where a program has imported Accelerate, and never imports it.
"""

from __future__ import annotations

import sys

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
