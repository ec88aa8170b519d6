"""Keep BatchNorm running statistics out of the optimizer's extra forward passes.

Non-local optimizers run the forward pass several times per step on the same batch (projection
iterates, SAM's perturbed point, Langevin steps). Only the first pass — at the parameters the
model actually has — should update ``running_mean`` / ``running_var`` / ``num_batches_tracked``.
Inside :meth:`BatchNormFreezer.paused` every BatchNorm module in training mode normalises with the
batch statistics exactly as usual but does not touch its running buffers.

The optimizer knows parameters, not modules, so it finds the layers two ways: any training-mode
layer the first paused pass of a step runs, through a global forward pre-hook (eager models), and —
once compiled code has run in the process, since compiled modules never run global hooks — the layers
whose affine parameters it optimizes, by identity among the live objects (:func:`layers_of`, once per
optimizer). A compiled layer without affine parameters is not seen.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterable, Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def layers_of(params: Iterable[torch.Tensor]) -> list[_BatchNorm]:
    """The BatchNorm modules whose own parameters are among ``params`` (matched by identity), once compiled
    code has run in this process (:func:`compiled_code_ran`); else none: eager models are served by the
    hook, and scanning the live objects costs tens of milliseconds.

    Args:
        params: the parameters an optimizer steps.
    """
    if not compiled_code_ran():
        return []
    ours = {id(p) for p in params}
    return [obj for obj in gc.get_objects()  # type(), not isinstance(): a dead weak proxy raises on the latter
            if issubclass(type(obj), _BatchNorm) and any(id(p) in ours for p in obj.parameters(recurse=False))]


def compiled_code_ran() -> bool:
    """Whether ``torch.compile`` (Dynamo) has run a compiled frame in this process."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and bool(dynamo.utils.counters["frames"]["total"])


class BatchNormFreezer:
    """Pauses the running statistics of the training-mode BatchNorm layers a closure runs: the ``known``
    ones (:func:`layers_of`) and those the first paused pass finds with a global forward pre-hook. The
    hook slows every module call of that pass, so one freezer serves one step (one closure, one model):
    later passes pause the layers found directly.

    Args:
        known: layers to pause besides those the first paused pass finds (:func:`layers_of`).
    """

    def __init__(self, known: Iterable[_BatchNorm] = ()) -> None:
        self.known = list(known)
        self.layers: list[_BatchNorm] | None = None  # None until the first paused pass has run

    def paused(self) -> contextlib.AbstractContextManager:
        """Within this block the layers leave their running statistics alone (nothing to do once the first
        paused pass found none)."""
        if self.layers is None:
            return self._searching()
        return _tracking_off(self.layers) if self.layers else contextlib.nullcontext()

    @contextlib.contextmanager
    def _searching(self) -> Iterator[None]:
        """The first paused pass: pause the known layers and find the others with a global pre-hook."""
        found: list[_BatchNorm] = []

        def pause_tracking(module: torch.nn.Module, args: object) -> None:
            if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
                # With track_running_stats=False a training-mode BN uses batch statistics and passes no
                # running buffers to F.batch_norm, so nothing is updated; the output is unchanged.
                module.track_running_stats = False
                found.append(module)

        handle = torch.nn.modules.module.register_module_forward_pre_hook(pause_tracking)
        try:
            with _tracking_off(self.known):
                yield
        finally:
            handle.remove()
            for module in found:
                module.track_running_stats = True
        self.layers = self.known + found


@contextlib.contextmanager
def _tracking_off(layers: list[_BatchNorm]) -> Iterator[None]:
    paused = [m for m in layers if m.training and m.track_running_stats]
    for module in paused:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in paused:
            module.track_running_stats = True
