"""When may a plugin read a tensor's value on the host (``.item()``, ``bool()``, a Python branch)?

On the CPU it costs nothing, and the projector loops use it: early stopping, Python-float scalar
arithmetic, accept/reject by a Python ``if``. On an accelerator it would synchronise the host with
the device every iteration, so there the loops keep scalars as 0-d device tensors and decide with
``torch.where``. :func:`host_reads` tells a plugin which path to take.

:func:`as_if_on_device` runs the CPU on the device path, so that path is tested without a GPU:
``nonlocal_opt.testing.check_device_path`` runs steps under it with host reads made to raise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_device_path_forced = False


def host_reads(tensor: torch.Tensor) -> bool:
    """True when reading ``tensor``'s values on the host is free: it is on the CPU (and the device
    path is not forced by :func:`as_if_on_device`)."""
    return tensor.device.type == "cpu" and not _device_path_forced


@contextlib.contextmanager
def as_if_on_device() -> Iterator[None]:
    """Within this block :func:`host_reads` is False for CPU tensors too."""
    global _device_path_forced
    previous, _device_path_forced = _device_path_forced, True
    try:
        yield
    finally:
        _device_path_forced = previous
