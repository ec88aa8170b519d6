"""The guarded base step: ``base.step()`` on the gradients in ``p.grad``, skipped unless they and the
parameters it writes are finite."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nonlocal_opt.optim.flat_params import FlatParams, global_norm, local, sharded_norm

TRUE, FALSE = torch.tensor(True), torch.tensor(False)  # the host path's verdicts (never written to)


def all_finite(tensors: list[torch.Tensor], norm: torch.Tensor | None, host_reads: bool, flat: FlatParams) -> torch.Tensor:
    """Whether every entry of ``tensors`` is finite, in every process's shard.

    On the host path from their total 2-norm ``norm`` (one fused sweep): a finite norm settles it, an
    infinite one may be an overflow of large finite entries, so then the entries are checked. On the
    device path with ``aminmax`` (one sweep; it propagates NaN), no host read.

    Args:
        tensors: this process's part of each tensor.
        norm: ``‖tensors‖₂`` over every shard (read on the host path only; ``None`` on the device path).
        host_reads: whether the verdict may be read on the host.
        flat: the flat view whose ``sum`` adds up the shards.

    Returns:
        A 0-d bool tensor.
    """
    if host_reads:
        if math.isfinite(norm.item()):
            return TRUE
        here = all(bool(torch.isfinite(t).all()) for t in tensors)
        return TRUE if bool(flat.sum(torch.tensor(float(not here), device=flat.device)) == 0) else FALSE
    extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors])
    here = torch.isfinite(extremes).all()
    return here if flat.group is None else flat.sum((~here).to(flat.dtype)) == 0


def saved_copies(tensors: list[torch.Tensor], params: list[torch.Tensor], state: Mapping[Any, dict], spare: list[list[torch.Tensor]]
                 ) -> tuple[list[torch.Tensor], dict[Any, dict[str, torch.Tensor]]]:
    """Copies of ``tensors`` and of every tensor in the base ``state`` of ``params``, to restore a skipped step from.

    Args:
        tensors: this process's part of each parameter.
        params: the parameters, the keys of ``state``.
        state: the base optimizer's state.
        spare: lists of one tensor per parameter, shaped like ``tensors``, free to overwrite. Each holds
            the copy of the parameters, or of one state entry that every parameter has in their shape
            (momentum, Adam's moments); the rest are cloned.

    Returns:
        The copy of ``tensors``, and per parameter with state the copies of its state tensors.
    """
    spare = list(spare)
    if spare:
        saved_params = spare.pop(0)
        torch._foreach_copy_(saved_params, tensors)
    else:
        saved_params = [t.clone() for t in tensors]
    saved_state: dict[Any, dict[str, torch.Tensor]] = {p: {} for p in params if p in state}
    entries = {k for p in saved_state for k, v in state[p].items() if isinstance(v, torch.Tensor)}
    for key in sorted(entries):
        now = [local(state[p][key]) if p in saved_state and isinstance(state[p].get(key), torch.Tensor) else None for p in params]
        if spare and all(v is not None and v.shape == t.shape and v.dtype == t.dtype for v, t in zip(now, tensors)):
            kept = spare.pop(0)
            torch._foreach_copy_(kept, now)
        else:
            kept = [None if v is None else v.clone() for v in now]
        for p, v in zip(params, kept):
            if v is not None:
                saved_state[p][key] = v
    return saved_params, saved_state


def guarded_base_step(
    base: torch.optim.Optimizer,
    param_groups: Sequence[Mapping[str, Any]],
    flat: FlatParams,
    finite: torch.Tensor | bool,
    stats: dict[str, Any],
    host_reads: bool,
    spare: Sequence[list[torch.Tensor]] = (),
) -> torch.Tensor:
    """``base.step()`` with the gradients in ``p.grad``, clipped to ``max_grad_norm``, skipped unless
    ``finite``, every gradient, and every parameter the base writes are finite.

    The parameters and base state are copied first (into ``spare`` as far as it goes). On the host path
    the verdict on the gradients is read and the step skipped before any copy (as ``GradScaler`` does);
    the verdict on the written parameters is read after the base step, which a non-finite one undoes from
    the copies. On the device path (no host synchronisation) the step runs and ``torch.where`` puts back
    the parameters and base state unless the whole verdict holds; only a step that creates base state (a
    first step) reads the verdict, to drop that state again. Norms and verdicts cover every shard (``flat.sum``).

    Args:
        base: the base optimizer, stepping on ``flat.params``.
        param_groups: the groups holding ``max_grad_norm`` (one value for all).
        flat: the flat view of the parameters.
        finite: the rule's verdict on its passes (a bool, or a 0-d bool tensor on the device path).
        stats: the step's stats; ``stats["nonfinite"]`` is set.
        host_reads: whether verdicts may be read on the host (the host path).
        spare: lists of one tensor per parameter the step no longer needs, for the copies.

    Returns:
        "Step taken" as a 0-d bool tensor.

    Raises:
        ValueError: ``max_grad_norm`` differs between parameter groups.
    """
    stepped = [(i, p, t, g) for i, (p, t, g) in enumerate(zip(flat.params, flat.tensors, flat.grads())) if g is not None]
    if not stepped:
        stats["nonfinite"] = 0.0
        return TRUE
    max_norms = {group["max_grad_norm"] for group in param_groups}
    if len(max_norms) != 1:
        raise ValueError(f"max_grad_norm clips one global norm and must be the same in every parameter group; got {max_norms}")
    max_norm = max_norms.pop()
    indices, params, tensors, grads = (list(column) for column in zip(*stepped))
    norm = None
    if host_reads or max_norm is not None:
        norm = global_norm(grads) if flat.group is None else sharded_norm(grads, flat)
    if max_norm is not None:  # torch.nn.utils.clip_grads_with_norm_, on this process's part of each gradient
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    verdict = all_finite(grads, norm, host_reads, flat)
    if host_reads and not (bool(verdict) and bool(finite)):  # every shard takes part in the test
        stats["nonfinite"] = 1.0
        return FALSE
    finite = TRUE if host_reads else verdict & finite
    state = base.state
    keys = {p: set(state[p]) if p in state else set() for p in params}
    saved_params, saved_state = saved_copies(tensors, params, state, [[s[i] for i in indices] for s in spare])
    base.step()
    written = None if not host_reads else global_norm(tensors) if flat.group is None else sharded_norm(tensors, flat)
    taken = finite & all_finite(tensors, written, host_reads, flat)  # an overflow can write non-finite parameters
    if host_reads:
        taken = TRUE if bool(taken) else FALSE
    created = [p for p in params if p in state and set(state[p]) - keys[p]]
    if created and not bool(taken):
        for p in created:
            for key in set(state[p]) - keys[p]:
                del state[p][key]
            if not state[p]:
                del state[p]
    if not (host_reads and taken is TRUE):
        for t, old in zip(tensors, saved_params):
            torch.where(taken, t, old, out=t)
        for p, kept in saved_state.items():
            for key, old in kept.items():
                now = local(state[p][key])
                torch.where(taken, now, old, out=now)
    stats["nonfinite"] = float(taken is FALSE) if host_reads else ~taken
    return taken
