"""The two passes of every sharpness-aware rule: ``g = ∇f(w)``, then ``g_p = ∇f(w + ε)`` on the same batch,
with ``w + ε`` formed beside ``w`` (never written over it), and the parameters back at ``w`` afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import attrs
import torch

from nonlocal_opt.optim.refresh_policy import RefreshPolicy
from nonlocal_opt_sam.ascent import Tensors, perturb_

Gradients = list[torch.Tensor | None]
AscentDirection = Callable[[Gradients, list[bool]], Tensors]


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


@attrs.frozen
class Passes:
    """What the two passes leave: the parameters are at ``w`` again and ``g_p`` is in ``p.grad``.

    Args:
        loss: ``f(w)``.
        perturbed_loss: ``f(w + ε)``.
        present: per tensor of ``ctx.params``, whether the first pass gave it a gradient.
        perturbed: per tensor of ``ctx.params``, whether it has a gradient and its group ``perturb``.
        spare: tensors per parameter the step no longer needs (for ``ctx.apply``'s ``spare``).
    """

    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    present: list[bool]
    perturbed: list[bool]
    spare: list[Tensors]

    def finite(self, ctx, *more: torch.Tensor) -> bool | torch.Tensor:
        """Whether both losses (and ``more``) are finite (``ctx.finite``).

        Args:
            ctx: The step's context.
            *more: Further 0-d tensors the verdict needs.
        """
        return ctx.finite(self.loss, self.perturbed_loss, *more)


def perturbed_flags(ctx) -> list[bool]:
    """Per tensor of ``ctx.params``, whether its group says ``perturb``.

    Args:
        ctx: The step's context.

    Raises:
        ValueError: no parameter group is perturbed.
    """
    flags = ctx.per_tensor("perturb")
    if not any(flags):
        raise ValueError(
            f"{ctx.rule_name!r}: every parameter group has perturb=False, so nothing is perturbed; "
            "set perturb=True on the groups to perturb (or use the base optimizer alone)"
        )
    return flags


def perturbed_passes(ctx, policy: RefreshPolicy, ascent_direction: AscentDirection, eta: list[float] | None = None) -> Passes:
    """Run the pass at ``w`` (unless ``policy`` ran it), form ``w + ε(d)`` and run the pass there; the parameters end at ``w``.

    ``w + ε`` lives in the buffer ``"w"``, which the parameters point at for the second pass (``p.data``).
    Parameters that share their storage with other tensors (views of a flat buffer, FSDP2 shards) are not
    re-pointed: ``w`` is copied into the buffer and written back after the pass.

    Args:
        ctx: The step's context.
        policy: The step's refresh policy (it keeps ``g`` at a ``'vertical'`` refresh).
        ascent_direction: ``(g, perturbed) → d``: from the first pass's gradients (one per tensor of
            ``ctx.params``, ``None`` where missing) and whether each tensor is perturbed, the direction ``d``
            of each perturbed tensor, which the ascent overwrites (it may be ``g`` itself).
        eta: ``η`` per tensor of ``ctx.params`` for ASAM's ``T = |w| + η``; ``None``: ``T = 1``.

    Returns:
        The :class:`Passes`.
    """
    flags = perturbed_flags(ctx)
    loss = torch.as_tensor(policy.first_pass()).detach()
    first = ctx.grads()
    policy.keep_gradient(first)
    present = [g is not None for g in first]
    moved = [has and flag for has, flag in zip(present, flags)]
    direction = ascent_direction(first, moved)
    # The first pass's gradients are spent once ε is formed: the host path lets them go before the second
    # pass; the device path's skip may keep its copies of the base state in them (when every parameter has one).
    spent = first if not ctx.host_reads and all(present) else None
    del first
    perturbed, buffers = pass_at_perturbed(ctx, moved, direction, eta)
    return Passes(loss, perturbed, present, moved, [buffers] if spent is None else [buffers, spent])


def pass_at_perturbed(ctx, moved: list[bool], direction: Tensors, eta: list[float] | None, extra: bool = True
                      ) -> tuple[torch.Tensor, Tensors]:
    """Form ``w + ε(d)`` and run a pass there; the parameters end at ``w``.

    ``w + ε`` lives in the buffer ``"w"``, which the parameters point at for the pass (``p.data``).
    Parameters that share their storage with other tensors (views of a flat buffer, FSDP2 shards) are not
    re-pointed: ``w`` is copied into the buffer and written back after the pass.

    Args:
        ctx: The step's context.
        moved: per tensor of ``ctx.params``, whether it is perturbed.
        direction: ``d`` of each perturbed tensor; overwritten, and the list emptied once ``ε`` is formed.
        eta: ``η`` per tensor of ``ctx.params`` for ASAM's ``T = |w| + η``; ``None``: ``T = 1``.
        extra: as in ``ctx.loss``: ``False`` when it is the step's first pass.

    Returns:
        ``f(w + ε)`` and the buffer ``"w"`` (spare once the pass has run).
    """
    w = [p for p, m in zip(ctx.params, moved) if m]
    buffers = ctx.buffers("w")
    kept = [b for b, m in zip(buffers, moved) if m]
    scratch = [b for b, m in zip(ctx.buffers("scratch"), moved) if m] if eta is not None else []
    eta = None if eta is None else [e for e, m in zip(eta, moved) if m]
    rho = ctx.hp("rho")
    repoint = ctx.flat.group is None and all(owns_storage(p) for p in w)
    if repoint:
        if w:
            torch._foreach_copy_(kept, w)
            perturb_(kept, direction, w, scratch, rho, eta, ctx)  # w + ε beside w
        direction.clear()  # the caller's list too: the tensors go before the pass
        with pointing_at([p for p, m in zip(ctx.flat.params, moved) if m], kept):
            perturbed = torch.as_tensor(ctx.loss(extra=extra))
    else:
        torch._foreach_copy_(buffers, ctx.params)
        ctx.keep_start(buffers)
        if w:
            perturb_(w, direction, kept, scratch, rho, eta, ctx)
        direction.clear()  # the caller's list too: the tensors go before the pass
        perturbed = torch.as_tensor(ctx.loss(extra=extra))
        ctx.flat.write(buffers)
    return perturbed, buffers


def passes_keeping_gradient(ctx, policy: RefreshPolicy, name: str) -> tuple[Passes, Tensors, Tensors, Tensors]:
    """:func:`perturbed_passes` with ``d = g``, for the rules that need ``g`` after the second pass: ``g`` is
    copied into the buffer ``name`` first.

    Args:
        ctx: The step's context.
        policy: The step's refresh policy.
        name: The buffer's name.

    Returns:
        The :class:`Passes`; ``g`` and ``g_p`` of the tensors the first pass gave a gradient (``g`` in the
        buffer, ``g_p`` in ``p.grad``); and the whole buffer (one tensor per tensor of ``ctx.params``).

    Raises:
        RuntimeError: the second pass left no gradient where the first left one.
    """
    buffer = ctx.buffers(name)

    def copy_then_ascend(first: Gradients, moved: list[bool]) -> Tensors:
        if any(g is not None for g in first):
            torch._foreach_copy_([b for b, g in zip(buffer, first) if g is not None], [g for g in first if g is not None])
        return [g for g, m in zip(first, moved) if m]

    passes = perturbed_passes(ctx, policy, copy_then_ascend)
    g_p = [g for g, has in zip(ctx.grads(), passes.present) if has]
    if any(g is None for g in g_p):
        raise RuntimeError(
            f"{ctx.rule_name!r}: the pass at w + ε left no gradient for a parameter the pass at w gave one: "
            "the closure must compute the same loss at both points"
        )
    return passes, [b for b, has in zip(buffer, passes.present) if has], g_p, buffer
