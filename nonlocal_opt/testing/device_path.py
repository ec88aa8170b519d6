"""The device path on the CPU: a projector's steps run as on a GPU (no host reads) must match the CPU path."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nonlocal_opt import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.testing.compositions import Composition


class HostReadError(AssertionError):
    """A value was read on the host inside a step on the device path."""


class NoHostReads(TorchDispatchMode):
    """Within this mode an operator that copies a tensor's value to the host (``aten._local_scalar_dense``:
    ``.item()``, ``bool()``, ``float()``, a Python ``if`` on a tensor) raises :class:`HostReadError`. On a
    GPU each such read waits for the device. ``Tensor.tolist()`` does not dispatch on the CPU and is not seen.

    Args:
        of: only reads of these tensors raise (by storage; ``None``: any read), e.g. a tensor ``lr`` that the
            CPU stand-in keeps on the CPU, where other code may read it but a step on a GPU must not.
    """

    def __init__(self, of: Sequence[torch.Tensor] | None = None):
        super().__init__()
        self.watched = None if of is None else {t.untyped_storage().data_ptr() for t in of}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and (
            self.watched is None or args[0].untyped_storage().data_ptr() in self.watched
        ):
            raise HostReadError(
                "a tensor value was read on the host (.item(), bool(), float(), if tensor: ...): on a GPU this waits for the device"
            )
        return func(*args, **(kwargs or {}))


def check_device_path(
    name_or_instance: str | Projector,
    *,
    rule: str | DescentRule | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    steps: int = 5,
) -> float:
    """Run ``steps`` steps on a small BatchNorm MLP (float64) twice: on the host path
    (``device_path=False``), and on the device path a GPU takes (``device_path=True``) under
    :class:`NoHostReads`. Returns the largest difference of the parameters, relative to their change;
    raises :class:`HostReadError` (an ``AssertionError``) on a host read. The base is plain SGD, which
    keeps no state (a base that creates state reads once, on its first step, to drop that state again
    after a skipped step). In float64 the two paths agree to rounding (the host path's scalars are
    Python floats, so in float32 near-ties of accept/reject can go either way).

    The rule and manifold are chosen as by :func:`~nonlocal_opt.testing.check_projector`. Early
    stopping is off in both runs (``tol``/``rtol`` set to ``None`` where declared): it needs host reads.

    Args:
        name_or_instance: a registered projector name or a ``Projector``.
        rule: the rule to run it under (``None``: the first registered rule, by sorted name, on the manifold).
        manifold: the manifold (``None``: the projector's first).
        hyperparameters: added to every run.
        steps: the steps of the rule.
    """
    composition = Composition.for_projector(name_or_instance, rule, manifold)
    hp = {key: None for key in ("tol", "rtol") if key in composition.projector.hyperparameters} | dict(hyperparameters or {})
    start, on_cpu = _mlp_steps(composition, hp, 0), _mlp_steps(composition, hp, steps)
    on_device = _mlp_steps(composition, hp, steps, device_path=True)
    return float((on_cpu - on_device).abs().max() / (on_cpu - start).abs().max())


def _mlp_steps(composition: Composition, hp: Mapping[str, Any], steps: int, device_path: bool = False) -> torch.Tensor:
    """The parameters of a seeded float64 BatchNorm MLP after ``steps`` steps on a fixed batch
    (``η = ρ = 0.5``), run on the device path with host reads raising when ``device_path``."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (32,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()
    opt = composition.compose(model.parameters(), lr=0.5, device_path=device_path, **composition.radius(0.5), **hp)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with NoHostReads() if device_path else contextlib.nullcontext():
        for _ in range(steps):
            opt.step(closure)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
