"""fp16 loss scaling with closures: ``GradScaler``, a ``torch.amp.GradScaler`` whose ``step(opt, closure)``
works for a :class:`~nonlocal_opt.optim.composed.ComposedOptimizer`, and ``ScaledPasses``, the per-pass
unscaling the optimizer's step runs while the scaler steps it.

torch's own scaler cannot be used unchanged: ``step`` asserts when no ``scale()`` has run yet (the closure
runs ``scale`` only inside the step), refuses ``closure=``, and unscales the gradients once, before the step,
while a multi-pass rule makes new gradients in every pass and uses the first (SAM's ascent) before the last.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from nonlocal_opt.optim.composed import ComposedOptimizer
from nonlocal_opt.optim.flat_params import FlatParams, local


class ScaledPasses:
    """One step's loss scale ``S``: every pass's gradients are unscaled in place, ``g ← g/S``, when its
    closure returns, and an overflow (a non-finite entry) in any pass is kept in ``found_inf``; the step's
    base step is then skipped as for any non-finite step (parameters and base state unchanged,
    ``stats["nonfinite"]`` = 1, :meth:`StepContext.apply <nonlocal_opt.optim.step_context.StepContext.apply>`).
    No host reads.

    Args:
        inv_scale: ``1/S``, a 0-d float32 tensor on the parameters' device.

    Attributes:
        found_inf: 1.0 once a pass of the step overflowed, else 0.0 (0-d float32, what ``GradScaler.update`` reads).
        unscaled: whether the closure of the running pass already unscaled its gradients (``scaler.unscale_(opt)``).
    """

    def __init__(self, inv_scale: torch.Tensor):
        self.inv_scale = inv_scale
        self.found_inf = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
        self.unscaled = False

    def unscale(self, grads: list[torch.Tensor | None]) -> None:
        """Unscale ``grads`` in place and record an overflow (torch's fused check-and-unscale, per dtype).

        Args:
            grads: this process's part of each gradient (``None`` where a parameter has none).
        """
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(local(grad))
        for same in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same, self.found_inf, self.inv_scale)
        self.unscaled = True

    def after_pass(self, flat: FlatParams) -> None:
        """Finish a pass: unscale its gradients (unless its closure did) and agree on overflows over the shards.

        Args:
            flat: the flat view of the parameters, whose ``p.grad`` the pass left.
        """
        if not self.unscaled:
            self.unscale(flat.grads())
        self.unscaled = False
        if flat.group is not None:  # a shard's overflow skips the step in every process
            self.found_inf = flat.sum(self.found_inf).clamp_(max=1.0)

    def overflowed(self) -> torch.Tensor:
        """Whether a pass of the step overflowed, as a 0-d bool tensor."""
        return self.found_inf > 0


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also takes ``scaler.step(opt, closure)`` for a composed optimizer:
    inside the closure ``scaler.scale(loss).backward()``, then ``scaler.step(opt, closure)`` and
    ``scaler.update()``. Every pass's gradients are unscaled before the rule uses them; an overflow in any
    pass skips the whole step and ``update()`` backs the scale off. Without a closure it is torch's scaler.

    After such a step the gradients in ``p.grad`` (the last pass's) are unscaled already: an ``unscale_(opt)``
    before any new backward (a host reading the gradient norm after the step) leaves them as they are.

    Args:
        *args: ``torch.amp.GradScaler``'s.
        **kwargs: ``torch.amp.GradScaler``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stepped_grads: dict[int, list[tuple[Any, int]]] = {}  # id(opt) → its gradients after a closure step

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """``optimizer.step(closure)`` with every pass unscaled (:meth:`scaled_step`); torch's ``step`` without a closure.

        Args:
            optimizer: the composed optimizer (not a host's wrapper of it: Accelerate passes the inner one).
            *args: ``closure``, or nothing.
            **kwargs: ``closure=``, or nothing.

        Raises:
            RuntimeError: a closure for an optimizer that is not a ``ComposedOptimizer``.
        """
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None or not self.is_enabled():
            return super().step(optimizer, *args, **kwargs)
        with self.scaled_step(optimizer):
            return optimizer.step(*args, **kwargs)

    @contextlib.contextmanager
    def scaled_step(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The steps of ``optimizer`` inside unscale each pass with this scaler, and the last one's
        overflow is what :meth:`update` reads: ``with scaler.scaled_step(opt): opt.step(closure)`` is
        ``scaler.step(opt, closure)`` for code that makes the step itself.

        Args:
            optimizer: the composed optimizer.

        Raises:
            RuntimeError: ``optimizer`` is no ``ComposedOptimizer``; or ``step`` came twice, or after
                ``unscale_(opt)``, since the last ``update()``.
        """
        if not self.is_enabled():
            yield
            return
        if not isinstance(optimizer, ComposedOptimizer):
            raise RuntimeError(
                f"GradScaler.step(opt, closure) unscales each pass of a nonlocal_opt ComposedOptimizer, not of "
                f"{type(optimizer).__name__}: pass the composed optimizer (nonlocal_opt.unwrap(opt) for a host's "
                "wrapper), or call scaler.step(opt) without a closure after one scaled backward"
            )
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("GradScaler.step() has already been called since the last update(): call scaler.update() after each step")
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "scaler.unscale_(opt) was called before scaler.step(opt, closure), but the closure makes the step's gradients: "
                "unscale inside the closure, after backward, where you need unscaled gradients (clipping: the optimizer's "
                "max_grad_norm clips the unscaled gradient by itself)"
            )
        device = optimizer.param_groups[0]["params"][0].device
        if self._scale is None:  # the closure's scale() comes only inside the step
            self._lazy_init_scale_growth_tracker(device)
        passes = ScaledPasses(self._scale.double().reciprocal().float().to(device))
        optimizer.resources.scaled_passes = passes
        try:
            yield
        finally:
            optimizer.resources.scaled_passes = None
        self._stepped_grads[id(optimizer)] = _grad_versions(optimizer)
        state["found_inf_per_device"] = {device: passes.found_inf}
        state["stage"] = OptState.STEPPED

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Torch's ``unscale_``; inside the closure of :meth:`step`, unscale the running pass (once per pass);
        nothing for gradients a closure step left and no backward has changed since.

        Args:
            optimizer: the optimizer whose gradients to unscale.
        """
        passes = optimizer.resources.scaled_passes if isinstance(optimizer, ComposedOptimizer) else None
        if passes is None and _unchanged(self._stepped_grads.get(id(optimizer)), optimizer):
            return
        if passes is None or not self.is_enabled():
            super().unscale_(optimizer)
        elif not passes.unscaled:
            passes.unscale(_grads(optimizer))


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
    return [p.grad for group in optimizer.param_groups for p in group["params"]]


def _grad_versions(optimizer: torch.optim.Optimizer) -> list[tuple[Any, int]]:
    """Each parameter's ``p.grad`` as a weak reference (a freed gradient is never taken for a new one) with its
    version counter, which a backward writing into it advances."""
    return [(None, 0) if g is None else (weakref.ref(g), g._version) for g in _grads(optimizer)]


def _unchanged(recorded: list[tuple[Any, int]] | None, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s gradients are still the ones :func:`_grad_versions` ``recorded``, unwritten since."""
    grads = _grads(optimizer)
    if recorded is None or len(recorded) != len(grads):
        return False
    return all(g is None if ref is None else (ref() is g and g._version == version) for (ref, version), g in zip(recorded, grads))
