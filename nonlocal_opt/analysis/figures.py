"""Figures (PNG) drawn with matplotlib, the optional extra ``plots``: imported only when a figure is made."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import torch


class MissingPlotDependency(ImportError):
    """matplotlib is not installed."""


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a clear error naming the fix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingPlotDependency(
            "figures need matplotlib: pip install 'nonlocal-opt[plots]' (or pip install matplotlib)"
        ) from error
    return plt


@attrs.frozen
class Trajectory:
    """One run on a 1-D landscape: centres ``(θ_c, y_c)`` per step and, optionally, ``f_ρ`` on the grid."""

    label: str
    thetas: torch.Tensor
    heights: torch.Tensor
    envelope: torch.Tensor | None = None


def plot_landscape_trajectories(
    grid: torch.Tensor, values: torch.Tensor, trajectories: Sequence[Trajectory], out: str | Path, title: str
) -> Path:
    """The landscape ``f`` on ``grid``, each run's centre trajectory (start ○, end ×) and its ``f_ρ``
    (dashed, same colour): the RBO paper's Figure 2 style. Writes ``out`` and returns its path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(grid, values, color="black", linewidth=0.8, label="f")
    for index, run in enumerate(trajectories):
        color = f"C{index}"
        if run.envelope is not None:
            ax.plot(grid, run.envelope, color=color, linestyle="--", linewidth=0.8)
        ax.plot(run.thetas, run.heights, color=color, marker=".", markersize=3, linewidth=1, label=run.label)
        ax.plot(run.thetas[:1], run.heights[:1], color=color, marker="o", fillstyle="none")
        ax.plot(run.thetas[-1:], run.heights[-1:], color=color, marker="x")
    ax.set_xlabel("θ")
    ax.set_ylabel("f(θ)  /  centre height")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
