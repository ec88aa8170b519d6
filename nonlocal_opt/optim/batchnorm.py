"""Keep BatchNorm running statistics out of the optimizer's extra forward passes.

Non-local optimizers run the forward pass several times per step on the same batch (projection
iterates, SAM's perturbed point, Langevin steps). Only the first pass — at the parameters the
model actually has — should update ``running_mean`` / ``running_var`` / ``num_batches_tracked``.
Inside :meth:`BatchNormFreezer.paused` every BatchNorm module in training mode normalises with the
batch statistics exactly as usual but does not touch its running buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNormFreezer:
    """Pauses the running statistics of the training-mode BatchNorm layers a closure runs.

    The optimizer does not know the model, so the first paused pass finds the layers with a global
    forward pre-hook. That hook slows every module call of every pass, so one freezer serves one
    step (one closure, one model): later passes pause the layers it found directly.
    """

    def __init__(self) -> None:
        self.layers: list[_BatchNorm] | None = None  # None until the first paused pass has run

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block the layers leave their running statistics alone."""
        if self.layers is not None:
            with _tracking_off(self.layers):
                yield
            return
        found: list[_BatchNorm] = []

        def pause_tracking(module: torch.nn.Module, args: object) -> None:
            if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
                # With track_running_stats=False a training-mode BN uses batch statistics and passes no
                # running buffers to F.batch_norm, so nothing is updated; the output is unchanged.
                module.track_running_stats = False
                found.append(module)

        handle = torch.nn.modules.module.register_module_forward_pre_hook(pause_tracking)
        try:
            yield
        finally:
            handle.remove()
            for module in found:
                module.track_running_stats = True
        self.layers = found


@contextlib.contextmanager
def _tracking_off(layers: list[_BatchNorm]) -> Iterator[None]:
    for module in layers:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in layers:
            module.track_running_stats = True
