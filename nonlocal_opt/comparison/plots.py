"""Accuracy-vs-passes, -seconds and -updates figures (PNG) of a comparison summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nonlocal_opt.analysis.figures import pyplot

AXES = {"passes": "forward+backward passes", "seconds": "training seconds (one core)", "updates": "updates (optimizer steps)"}
MARKERS = ("o", "s", "^", "D", "v", "P")


def line_styles(names: list[str]) -> dict[str, tuple[Any, str]]:
    """Name → (colour, marker): ten colours, then the next marker, so that no two names share both."""
    plt = pyplot()
    return {n: (plt.get_cmap("tab10")(i % 10), MARKERS[i // 10 % len(MARKERS)]) for i, n in enumerate(names)}


def draw(summary: dict[str, Any], axis: str, title: str):
    """The figure of one x ``axis`` (a key of ``AXES``): one panel per noise level, one line per optimizer,
    solid if on the Pareto front of that axis (passes for updates), the legend below the panels, two columns per
    panel."""
    plt = pyplot()
    names = sorted({n for level in summary.values() for n in level["curves"]})
    styles = line_styles(names)
    column, front = ("steps" if axis == "updates" else axis), ("seconds" if axis == "seconds" else "passes")
    columns = min(len(names), 2 * len(summary))
    rows = -(-len(names) // columns) if names else 0
    fig, panels = plt.subplots(1, len(summary), figsize=(5.2 * len(summary) + 1.0, 4.4 + 0.22 * rows),
                               squeeze=False, layout="constrained")
    for panel, (noise, level) in zip(panels[0], summary.items()):
        finals, tops = [], []
        for name, curve in level["curves"].items():
            xs, ys = curve[column], curve["test_acc"]
            if axis != "passes":  # log axis: without the evaluation at 0
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if x > 0]) if any(x > 0 for x in xs) else ((), ())
            colour, marker = styles[name]
            panel.plot(xs, ys, "-" if name in level["pareto"][front] else "--", color=colour, marker=marker,
                       markersize=3, linewidth=1.1, label=name)
            finals.append(curve["test_acc"][-1])
            tops += [v for v in curve["test_acc"] if v == v]
        good = sorted(v for v in finals if v == v)
        if good:
            panel.set_ylim(max(0.0, good[len(good) // 4] - 0.12), min(1.0, max(tops) + 0.01))
        if axis != "passes":
            panel.set_xscale("log")
        panel.set_title(f"label noise {float(noise):g}")
        panel.set_xlabel(AXES[axis])
        panel.set_ylabel("test accuracy (mean over final seeds)")
        panel.grid(alpha=0.3)
    handles = {label: handle for panel in panels[0] for handle, label in zip(*panel.get_legend_handles_labels())}
    fig.legend([handles[n] for n in sorted(handles)], sorted(handles), loc="outside lower center", ncols=max(columns, 1),
               fontsize="small")
    fig.suptitle(f"{title}; solid: on the Pareto front ({front})", fontsize="medium")
    return fig


def plot_summary(summary: dict[str, Any], prefix: str | Path, title: str) -> list[Path]:
    """``{prefix}_{passes,seconds,updates}.png``: mean test accuracy of the final runs (:func:`draw`).
    Returns the paths written."""
    plt = pyplot()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for axis in AXES:
        fig = draw(summary, axis, title)
        path = prefix.with_name(f"{prefix.name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
