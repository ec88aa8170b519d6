"""The device path on the CPU: a projector's steps run as on a GPU (no host reads) must match the CPU path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from nonlocal_opt import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.optim.host_reads import as_if_on_device
from nonlocal_opt.testing.compositions import Composition

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what would synchronise with a device


@contextlib.contextmanager
def host_reads_raise() -> Iterator[None]:
    """Within this block reading a tensor's value on the host (``.item()``, ``bool()``, …) raises ``AssertionError``."""

    def forbidden(name: str) -> Callable:
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a value on the host: on a GPU this synchronises every call")

        return read

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def check_device_path(
    name_or_instance: str | Projector,
    *,
    rule: str | DescentRule | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    steps: int = 5,
) -> float:
    """Run ``steps`` steps on a small BatchNorm MLP (float64) twice: on the CPU path, and on the path a
    GPU takes (:func:`nonlocal_opt.optim.host_reads.as_if_on_device`) with every host read raising.
    Returns the largest difference of the parameters, relative to their change; raises
    ``AssertionError`` on a host read. In float64 the two paths agree to rounding (the CPU path's
    scalars are Python floats, so in float32 near-ties of accept/reject can go either way).

    The rule and manifold are chosen as by :func:`~nonlocal_opt.testing.check_projector`. Early
    stopping is off in both runs (``tol``/``rtol`` set to ``None`` where declared): it needs host reads.
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
    opt = composition.compose(model.parameters(), lr=0.5, **composition.radius(0.5), **hp)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with contextlib.ExitStack() as guards:
        if device_path:
            guards.enter_context(as_if_on_device())
            guards.enter_context(host_reads_raise())
        for _ in range(steps):
            opt.step(closure)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
