"""The base parameter update shared by point-like rules: SGD with momentum, Nesterov, weight decay.

Also the hyperparameter declarations of that update, shared by every rule built on it (``sgd``,
``sam``, ``entropy-sgd``), and :func:`guarded_sgd_step`: gradient clipping plus a refusal of
non-finite steps (fp16 overflow) that leaves parameters and momentum buffers untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from nonlocal_opt.optim.hyperparameters import Hyperparameter, boolean, non_negative, optional, positive

if TYPE_CHECKING:
    from nonlocal_opt.optim.step_context import StepContext

SGD_HYPERPARAMETERS = {
    "lr": Hyperparameter(1e-3, "η", "learning rate", non_negative),
    "momentum": Hyperparameter(0.0, "μ", "heavy-ball momentum factor", non_negative),
    "dampening": Hyperparameter(0.0, "τ", "dampening of the momentum buffer", non_negative),
    "nesterov": Hyperparameter(False, "—", "Nesterov momentum (needs momentum > 0, dampening = 0)", boolean),
    "weight_decay": Hyperparameter(0.0, "λ", "coupled L2 weight decay added to the gradient", non_negative),
}

MAX_GRAD_NORM = Hyperparameter(
    None,
    "c",
    "clip the global norm of the gradient the base update uses to c (None: no clipping)",
    optional(positive),
)


def check_nesterov(group: dict) -> None:
    """Nesterov momentum needs ``momentum > 0`` and ``dampening = 0`` (as in ``torch.optim.SGD``)."""
    if group.get("nesterov") and (group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
        raise ValueError("invalid hyperparameter nesterov=True: it requires momentum > 0 and dampening = 0")


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


def clip_global_norm(grad: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``g · min(1, c / (‖g‖ + 1e-6))`` — what ``torch.nn.utils.clip_grad_norm_`` does, on a flat ``g``."""
    if max_norm is None:
        return grad
    return grad * (max_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp(max=1.0)


def guarded_sgd_step(ctx: StepContext, theta: torch.Tensor, grad: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Base update from ``θ`` with the flat gradient ``g``: ``sgd_update`` per group on ``clip(g)``.

    Refused — parameters and momentum buffers keep their values, ``stats['nonfinite']`` is set —
    unless ``finite`` (the caller's verdict on its passes), ``clip(g)`` and the new ``θ`` are finite.
    Decided with ``torch.where``; the only host synchronisation is on a step that would create the
    momentum buffers. Returns the 0-d bool tensor "step accepted". Needs ``max_grad_norm`` declared.
    """
    flat, state = ctx.flat, ctx.optimizer.state
    flat.write(theta)
    grad = clip_global_norm(grad, ctx.hp("max_grad_norm"))
    finite = finite & torch.isfinite(grad).all()
    creates_buffers = any(
        group["momentum"] != 0 and "momentum_buffer" not in state[p]
        for group, params in zip(ctx.optimizer.param_groups, flat.groups)
        for p in params
    )
    if creates_buffers and not bool(finite):
        ctx.stats["nonfinite"] = ~finite
        return finite
    saved = {p: state[p]["momentum_buffer"].clone() for p in flat.params if "momentum_buffer" in state[p]}
    grads = iter(flat.split(grad))
    for group, params in zip(ctx.optimizer.param_groups, flat.groups):
        sgd_update(params, [next(grads) for _ in params], group, state)
    # commit() refuses a non-finite θ or loss: hand it the caller's verdict in the loss slot.
    ctx.commit(flat.gather(), fallback=theta, loss=torch.where(finite, 0.0, torch.nan))
    accepted = ~ctx.stats["nonfinite"]
    for p, old in saved.items():
        buf = state[p]["momentum_buffer"]
        buf.copy_(torch.where(accepted, buf, old))
    return accepted
