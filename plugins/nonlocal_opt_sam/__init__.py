"""First-party plugin: Sharpness-Aware Minimization (Foret et al.) and adaptive SAM (ASAM, Kwon et al.).

Registers the ``sam`` rule (constructor ``nonlocal_opt.SAM``). Registered through the ``nonlocal_opt``
entry-point group.
"""

from __future__ import annotations

import contextlib

import torch

from nonlocal_opt import DescentRule, Hyperparameter, hookimpl
from nonlocal_opt.optim.hyperparameters import boolean, non_negative

Tensors = list[torch.Tensor]


def perturb_(target: Tensors, grads: Tensors, w: Tensors, scratch: Tensors, rho: float, adaptive: bool, ctx) -> None:
    """``target ← target + ε``, ``ε = ρ T² g / (‖T g‖ + 1e-12)`` with ``T = |w|`` (ASAM) or ``T = 1`` (SAM); one
    global norm over all tensors (``ctx.norm``).

    Args:
        target: The tensors to perturb, in place.
        grads: ``g`` per tensor; overwritten (SAM).
        w: The weights ``w`` (ASAM's ``T = |w|``).
        scratch: Work tensors like ``w``, overwritten (ASAM; unused for SAM).
        rho: ``ρ``.
        adaptive: ASAM (``True``) or SAM.
        ctx: The step's context (the global norm).
    """
    if adaptive:
        torch._foreach_copy_(scratch, w)
        torch._foreach_mul_(scratch, grads)  # w g: ‖w g‖ = ‖T g‖
        norm = ctx.norm(scratch)
        torch._foreach_mul_(scratch, w)  # w² g = T² g
        direction = scratch
    else:
        norm = ctx.norm(grads)
        direction = grads
    torch._foreach_mul_(direction, rho / (norm + 1e-12))  # a 0-d tensor factor: no host read
    torch._foreach_add_(target, direction)


def owns_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is all of its storage: no other tensor can see a change of what it points to.

    Args:
        tensor: A parameter.

    Returns:
        ``True`` when re-pointing it (``p.data = v``) affects no other tensor.
    """
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor.storage_offset() == 0 and tensor.is_contiguous() and whole


@contextlib.contextmanager
def pointing_at(params: Tensors, values: Tensors):
    """Point every parameter at the matching tensor of ``values`` (``p.data = v``), and back on exit, also on an error.

    Args:
        params: The parameters.
        values: One tensor per parameter, of its shape.
    """
    kept = [p.data for p in params]
    for p, v in zip(params, values):
        p.data = v
    try:
        yield
    finally:
        for p, v in zip(params, kept):
            p.data = v


class SAMRule(DescentRule):
    """SAM (docs/math.md §7): ``g_ε = ∇f(w + ε)`` on the same batch; the base steps from ``w`` with ``g_ε``.

    Two passes per step: the first (at ``w``) alone updates BatchNorm running statistics by default.
    ``rho = 0`` is the base optimizer exactly. ``w + ε`` is formed in a buffer kept between steps (two
    for ASAM), which the parameters point at for the second pass; ``w`` itself is never written, so the
    base steps from it exactly. Parameters that share their storage with other tensors (views of a flat
    buffer, FSDP2 shards) are not re-pointed: ``w`` is copied aside and written back instead.
    """

    name = "sam"
    alias = "SAM"
    shardable = True
    hyperparameters = {
        "rho": Hyperparameter(0.05, "ρ", "radius of the neighbourhood where the loss is maximised", non_negative),
        "adaptive": Hyperparameter(False, "T", "ASAM: T = diag(abs(w)) scales the neighbourhood per coordinate (False: T = I)", boolean),
    }
    presets = {"paper": {"lr": 0.01, "rho": 0.05}}

    def step(self, ctx):
        """Two passes: at ``w``, then at ``w + ε``; the base steps from ``w`` with ``g_ε``.

        Args:
            ctx: The step's context.

        Returns:
            The loss at ``w``.
        """
        loss = torch.as_tensor(ctx.loss(extra=False)).detach()
        present = [g is not None for g in ctx.grads()]
        params = [p for p, has in zip(ctx.params, present) if has]
        buffers = ctx.buffers("w")
        kept = [b for b, has in zip(buffers, present) if has]
        grads = [g for g in ctx.grads() if g is not None]
        adaptive = ctx.hp("adaptive")
        scratch = ctx.buffers("scratch") if adaptive else []
        repoint = ctx.flat.group is None and all(owns_storage(p) for p in params)
        if repoint:
            torch._foreach_copy_(kept, params)
            perturb_(kept, grads, params, scratch, ctx.hp("rho"), adaptive, ctx)  # w + ε beside w
        else:
            torch._foreach_copy_(buffers, ctx.params)
            ctx.keep_start(buffers)
            perturb_(params, grads, kept, scratch, ctx.hp("rho"), adaptive, ctx)
        # The first pass's gradients are spent: the device path's skip keeps a copy of the base state in
        # them (when every parameter has one), the host path lets them go before the second pass.
        spare = [buffers, grads] if not ctx.host_reads and all(present) else [buffers]
        del grads
        if repoint:
            with pointing_at([p for p, has in zip(ctx.flat.params, present) if has], kept):
                perturbed = torch.as_tensor(ctx.loss())
            ctx.apply(finite=ctx.finite(loss, perturbed), spare=spare)  # from w, with g_ε in p.grad
        else:
            perturbed = torch.as_tensor(ctx.loss())
            ctx.apply(theta=buffers, finite=ctx.finite(loss, perturbed), spare=spare)
        return loss


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register the ``sam`` rule.

    Args:
        register: The registry's callback.
    """
    register(SAMRule)
