"""The base parameter update shared by point-like rules: SGD with momentum, Nesterov, weight decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    group: dict[str, Any],
    state: dict[torch.Tensor, dict[str, Any]],
) -> None:
    """``θ ← θ − η d`` with ``d = g + λθ``, momentum ``b ← μ b + (1 − τ) d`` and Nesterov ``d + μ b``.

    Same operations, in the same order, as ``torch.optim.SGD`` (bit-identical results); the
    momentum buffer lives in ``state[p]["momentum_buffer"]``.
    """
    if not params:
        return
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    weight_decay, nesterov = group["weight_decay"], group["nesterov"]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        bufs = [state[p].get("momentum_buffer") for p in params]
        if any(buf is None for buf in bufs):  # first step: the buffer starts as d itself
            bufs = [torch.clone(d).detach() if buf is None else buf.mul_(momentum).add_(d, alpha=1 - dampening)
                    for buf, d in zip(bufs, grads)]
            for p, buf in zip(params, bufs):
                state[p]["momentum_buffer"] = buf
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)
