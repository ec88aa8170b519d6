"""Accuracy-vs-passes, -seconds and -updates figures (PNG) of a comparison summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nonlocal_opt.analysis.figures import pyplot

AXES = {"passes": "forward+backward passes", "seconds": "training seconds (one core)", "updates": "updates (optimizer steps)"}


def plot_summary(summary: dict[str, Any], prefix: str | Path, title: str) -> list[Path]:
    """``{prefix}_{passes,seconds,updates}.png``: mean test accuracy of the final runs, one panel per
    noise level, one line per optimizer. Returns the paths written."""
    plt = pyplot()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = sorted({n for level in summary.values() for n in level["curves"]})
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    paths = []
    for axis, label in AXES.items():
        column = "steps" if axis == "updates" else axis
        fig, panels = plt.subplots(1, len(summary), figsize=(5.2 * len(summary) + 2.8, 4.4), squeeze=False)
        for panel, (noise, level) in zip(panels[0], summary.items()):
            finals, tops = [], []
            for name, curve in level["curves"].items():
                style = "--" if name not in level["pareto"]["seconds" if axis == "seconds" else "passes"] else "-"
                xs, ys = curve[column], curve["test_acc"]
                if axis != "passes":  # log axis: without the evaluation at 0
                    xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if x > 0]) if any(x > 0 for x in xs) else ((), ())
                panel.plot(xs, ys, style, color=colours[name], marker=".", markersize=3, linewidth=1.1, label=name)
                finals.append(curve["test_acc"][-1])
                tops += [v for v in curve["test_acc"] if v == v]
            good = sorted(v for v in finals if v == v)
            if good:
                panel.set_ylim(max(0.0, good[len(good) // 4] - 0.12), min(1.0, max(tops) + 0.01))
            if axis != "passes":
                panel.set_xscale("log")
            panel.set_title(f"label noise {float(noise):g}")
            panel.set_xlabel(label)
            panel.set_ylabel("test accuracy (mean over final seeds)")
            panel.grid(alpha=0.3)
        handles, labels = panels[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize="small")
        fig.suptitle(f"{title}; solid: on the Pareto front ({'seconds' if axis == 'seconds' else 'passes'})", fontsize="medium")
        fig.tight_layout(rect=(0, 0, 1 - 2.6 / (5.2 * len(summary) + 2.8), 1))
        path = prefix.with_name(f"{prefix.name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
