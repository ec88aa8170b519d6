"""Landscape geometry along an optimisation path (no-wrong-turns paper, Algorithm 1 in appendix A.1).

Two identical runs (same initialisation, same batch order): the first gives ``w* = w_T``; the
second records, at every step ``t`` with iterate ``w_t`` and recorded gradient ``G_t``,

- ``RSI_t = G_tᵀ(w_t − w*) / ‖w_t − w*‖²`` (restricted secant inequality),
- ``EB_t = ‖G_t‖ / ‖w_t − w*‖`` (error bound),
- ``γ_t = RSI_t / EB_t``, the cosine between ``G_t`` and ``w_t − w*``,
- ``lolr_t = RSI_t / EB_t²``, the locally optimal learning rate ``argmin_η ‖w_t − η G_t − w*‖`` (eq. 5).

Which gradient is ``G_t``: the one the closure leaves in ``p.grad`` on its ``pass_index``-th call
of the step (default 0, the first pass). ``w_t`` is always the parameters *before* the step.

- ``sgd`` (any momentum): the only pass, ``G_t = ∇L_{B_t}(w_t)``.
- ``rbo``: pass 0 is the rule's ``ctx.evaluate(extra=False)`` at the contact point ``θ_t = w_t`` on the
  step's batch, so ``G_t = ∇L_{B_t}(θ_t)`` — the gradient that defines the normal ``ν(p_t)`` and the
  descent tangent ``τ(p_t)``, hence the proposed centre ``c̃``. Passes 1..K are at the projector's
  iterates, not at ``w_t``, so they are not a gradient *at the iterate* and are not used.
- ``sam``: pass 0 is the plain gradient ``∇L_{B_t}(w_t)`` (default: the landscape's own vector field
  at the iterate, comparable across optimizers, as in the paper where ``G`` is a sampled gradient at
  ``w``); ``pass_index=1`` gives ``∇L_{B_t}(w_t + ε)``, the gradient the base update uses, for which
  ``lolr`` is the optimal step along the direction SAM actually moves.
- ``entropy-sgd``: pass 0 is ``∇L_{B_t}(x_t)`` at the outer iterate (Langevin passes follow).
"""

from __future__ import annotations

import csv
import functools
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from nonlocal_opt.optim.flat_params import FlatParams

COLUMNS = ("step", "epoch", "rsi", "eb", "gamma", "lolr")


@attrs.frozen
class GeometryRow:
    """One step of the second run: ``RSI_t``, ``EB_t``, ``γ_t`` and ``lolr_t = RSI_t/EB_t²``."""

    step: int
    epoch: int
    rsi: float
    eb: float
    gamma: float
    lolr: float


def path_quantities(grad: torch.Tensor, w: torch.Tensor, w_star: torch.Tensor) -> tuple[float, float, float, float]:
    """``(RSI, EB, γ, lolr)`` for gradient ``G = grad`` at ``w`` towards ``w*``, computed in float64.

    ``w = w*`` gives ``inf``/``nan`` (the quantities are undefined there).
    """
    grad, diff = grad.double(), w.double() - w_star.double()
    dist_sq = diff.dot(diff)
    rsi = grad.dot(diff) / dist_sq
    eb = torch.linalg.vector_norm(grad) / dist_sq.sqrt()
    return float(rsi), float(eb), float(rsi / eb), float(rsi / eb**2)


def _tap(closure: Callable[..., Any], flat: FlatParams, pass_index: int) -> Callable[..., Any]:
    """``closure`` that also copies ``p.grad`` (flat) after its ``pass_index``-th call into ``.grad``.

    It keeps ``closure``'s signature (``functools.wraps``), so rules that check for the keyword
    ``fresh_batch`` see the same closure.
    """

    @functools.wraps(closure, updated=())
    def tapped(*args: Any, **kwargs: Any) -> Any:
        loss = closure(*args, **kwargs)
        if tapped.calls == pass_index:
            tapped.grad = flat.gather_grad()
        tapped.calls += 1
        return loss

    tapped.calls, tapped.grad = 0, None
    return tapped


class PathTracker:
    """One of the two runs. ``tracker.step(optimizer, closure, epoch)`` replaces ``optimizer.step(closure)``;
    in a loop without closure, call ``tracker.observe(model.parameters(), epoch)`` after ``backward()``
    and before ``optimizer.step()`` (then ``G_t`` is what ``backward`` left in ``p.grad``).

    Without ``w_star`` (first run) it only counts steps; with ``w_star`` (second run) it appends a
    :class:`GeometryRow` to ``rows`` per step. ``final_weights()`` is the flat ``w`` after the last step.
    """

    def __init__(self, w_star: torch.Tensor | None = None, pass_index: int = 0):
        if not isinstance(pass_index, int) or pass_index < 0:
            raise ValueError(f"pass_index must be an integer >= 0 (0 = the step's first closure pass), got {pass_index!r}")
        self.w_star, self.pass_index = w_star, pass_index
        self.rows: list[GeometryRow] = []
        self.steps = 0
        self._flat: FlatParams | None = None

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable[..., Any], epoch: int = 0) -> Any:
        """``optimizer.step(closure)``, recording ``G_t`` from the closure's ``pass_index``-th pass."""
        flat = FlatParams(optimizer.param_groups)
        w = flat.gather()
        tapped = _tap(closure, flat, self.pass_index)
        loss = optimizer.step(tapped)
        if tapped.grad is None:
            raise ValueError(
                f"step {self.steps}: the optimizer called the closure {tapped.calls} time(s), so pass_index="
                f"{self.pass_index} recorded nothing; use a pass_index below {max(tapped.calls, 1)}"
            )
        self._record(flat, w, tapped.grad, epoch)
        return loss

    def observe(self, params: Iterable[torch.Tensor], epoch: int = 0) -> None:
        """Record ``G_t = p.grad`` at ``w_t = p`` for a custom loop (call before ``optimizer.step()``)."""
        flat = FlatParams([{"params": list(params)}])
        self._record(flat, flat.gather(), flat.gather_grad(), epoch)

    def _record(self, flat: FlatParams, w: torch.Tensor, grad: torch.Tensor, epoch: int) -> None:
        self._flat = flat
        if self.w_star is not None:
            self.rows.append(GeometryRow(self.steps, epoch, *path_quantities(grad, w, self.w_star)))
        self.steps += 1

    def final_weights(self) -> torch.Tensor:
        if self._flat is None:
            raise ValueError("the run took no step: the training function must call tracker.step or tracker.observe")
        return self._flat.gather()


@attrs.frozen
class PathGeometry:
    """Result of :func:`measure_path_geometry`. ``replay_error = max|w_T(run 2) − w*|``: 0.0 when the
    two runs were bit-identical (on CPU they are, given the same seeds and batch order)."""

    rows: list[GeometryRow]
    w_star: torch.Tensor
    replay_error: float


def measure_path_geometry(train: Callable[[PathTracker], None], pass_index: int = 0) -> PathGeometry:
    """Algorithm 1 of the no-wrong-turns paper: ``train(tracker)`` runs one whole training — building
    model, optimizer and data order from fixed seeds — stepping through ``tracker``. It is called twice.

    Warns when the second run does not end at ``w*`` exactly (a non-deterministic run).
    """
    first = PathTracker(pass_index=pass_index)
    train(first)
    w_star = first.final_weights()
    second = PathTracker(w_star, pass_index)
    train(second)
    if second.steps != first.steps:
        raise RuntimeError(f"the two runs took {first.steps} and {second.steps} steps: train() must be deterministic")
    replay_error = float((second.final_weights().double() - w_star.double()).abs().max())
    if replay_error != 0.0:
        warnings.warn(
            f"the second run ended {replay_error:.3g} away from w* (max |Δw|): the runs are not bit-identical, "
            "so the last steps' RSI/EB are distorted; seed the model and the DataLoader's sampler",
            RuntimeWarning,
            stacklevel=2,
        )
    return PathGeometry(second.rows, w_star, replay_error)


def seeded_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` whose batch order depends only on ``seed`` (a fresh ``torch.Generator`` per call)."""
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def write_csv(rows: Iterable[GeometryRow], path: str | Path) -> None:
    """``path`` with the columns ``step,epoch,rsi,eb,gamma,lolr``."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(attrs.astuple(row) for row in rows)


def read_csv(path: str | Path) -> list[GeometryRow]:
    with Path(path).open(newline="") as handle:
        return [
            GeometryRow(int(r["step"]), int(r["epoch"]), *(float(r[k]) for k in COLUMNS[2:]))
            for r in csv.DictReader(handle)
        ]


def summarize(rows: list[GeometryRow], skip_last: float = 0.0) -> dict[str, float]:
    """Plain statistics of a path: fraction of steps with ``γ > 0``, median and quartiles of ``γ``,
    medians of RSI / EB / lolr. ``skip_last`` drops that fraction of the final steps (the paper drops
    the last epoch, where ``w_t → w*`` makes RSI and EB blow up)."""
    keep = rows[: max(1, math.floor(len(rows) * (1 - skip_last)))]
    gamma = torch.tensor([r.gamma for r in keep], dtype=torch.float64)

    def median(key: str) -> float:
        return float(torch.tensor([getattr(r, key) for r in keep], dtype=torch.float64).median())

    return {
        "steps": len(keep),
        "frac_gamma_positive": float((gamma > 0).double().mean()),
        "gamma_median": float(gamma.median()),
        "gamma_q10": float(gamma.quantile(0.1)),
        "gamma_q90": float(gamma.quantile(0.9)),
        "rsi_median": median("rsi"),
        "eb_median": median("eb"),
        "lolr_median": median("lolr"),
    }


def plot_path_geometry(rows: list[GeometryRow], path: str | Path, title: str = "") -> None:
    """A PNG with RSI (symlog), EB (log) and γ against the step. Needs matplotlib (extra ``plots``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'nonlocal-opt[plots]'") from error
    steps = [r.step for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, key, label, scale in zip(axes, ("rsi", "eb", "gamma"), ("RSI", "EB", "γ"), ("symlog", "log", "linear")):
        ax.plot(steps, [getattr(r, key) for r in rows], lw=0.8)
        ax.set_yscale(scale, **({"linthresh": 1e-3} if scale == "symlog" else {}))
        ax.set_ylabel(label)
        if key != "eb":
            ax.axhline(0.0, color="k", lw=0.5)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
