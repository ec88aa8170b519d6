"""Keep BatchNorm running statistics out of the optimizer's extra forward passes.

Non-local optimizers run the forward pass several times per step on the same batch (projection
iterates, SAM's perturbed point, Langevin steps). Only the first pass — at the parameters the
model actually has — should update ``running_mean`` / ``running_var`` / ``num_batches_tracked``.
Inside :func:`frozen_batchnorm_stats` every BatchNorm module in training mode normalises with the
batch statistics exactly as usual but does not touch its running buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_stats(enabled: bool = True) -> Iterator[None]:
    """Within this block, BatchNorm layers in training mode leave their running statistics alone."""
    if not enabled:
        yield
        return
    paused: list[_BatchNorm] = []

    def pause_tracking(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            # With track_running_stats=False a training-mode BN uses batch statistics and passes no
            # running buffers to F.batch_norm, so nothing is updated; the output is unchanged.
            module.track_running_stats = False
            paused.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pause_tracking)
    try:
        yield
    finally:
        handle.remove()
        for module in paused:
            module.track_running_stats = True
