"""Reading runs: accuracy at budget fractions (final, best so far, early-stopped pick), at matched
updates, mean curves over seeds, the Pareto front, and the summary table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from nonlocal_opt.comparison.specs import ComparisonConfig, step_grid


def index_at(curve: dict[str, list], column: str, x: float) -> int:
    """The first evaluation with ``column ≥ x`` (the one taken when the run crossed ``x``), else the last."""
    for index, value in enumerate(curve[column]):
        if value is not None and value >= x:
            return index
    return len(curve[column]) - 1


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def at_index(curve: dict[str, list], index: int) -> dict[str, float]:
    """At evaluation ``index``: ``final`` test accuracy, ``best`` test accuracy so far, ``early_stopped``
    = test accuracy at the evaluation ``≤ index`` with the best validation accuracy, ``val``, and the
    cost there (``passes``, ``steps``, ``batches``, ``seconds``)."""
    val = [_num(v) for v in curve["val_acc"][: index + 1]]
    test = [_num(v) for v in curve.get("test_acc", [None] * len(val))[: index + 1]]
    finite_val = [v if math.isfinite(v) else -math.inf for v in val]
    pick = max(range(len(finite_val)), key=lambda i: (finite_val[i], -i))
    finite_test = [t for t in test if math.isfinite(t)]
    cost = {column: _num(curve[column][index]) for column in ("passes", "steps", "batches", "seconds")}
    return {"final": test[-1], "best": max(finite_test) if finite_test else math.nan,
            "early_stopped": test[pick], "early_stopped_at": _num(curve["passes"][pick]), "val": val[-1], **cost}


def mean_sd(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    sd = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": len(finite)}


def final_runs(data: dict[str, Any], noise: float, name: str) -> list[dict[str, Any]]:
    """The final runs of ``name``'s pick at ``noise`` (sorted by seed)."""
    pick = data["picks"][repr(float(noise))][name]["hp"]
    seeds = set(data["settings"]["final_seeds"])
    runs = [r for r in data["runs"].values() if r["phase"] == "final" and r["name"] == name and r["noise"] == noise
            and r["hp"] == pick and r["seed"] in seeds]
    return sorted(runs, key=lambda r: r["seed"])


def matched_updates(data: dict[str, Any], noise: float) -> int:
    """``U``: the largest 1-2-5 evaluation point (in updates) every non-diverged final run at ``noise`` reached."""
    steps = [r["steps"] for name in data["picks"][repr(float(noise))] for r in final_runs(data, noise, name) if not r["diverged"]]
    reached = step_grid(min(steps)) if steps else []
    return reached[-1] if reached else 0


def mean_curve(runs: list[dict[str, Any]], config: ComparisonConfig) -> dict[str, list[float]]:
    """Means over ``runs`` at the start and at each point of the pass grid: passes, steps, seconds, test accuracy."""
    out: dict[str, list[float]] = {"passes": [], "steps": [], "seconds": [], "test_acc": []}
    for x in [0.0, *config.pass_grid()]:
        rows = [(r["curve"], index_at(r["curve"], "passes", x)) for r in runs]
        for column in out:
            out[column].append(statistics.fmean(_num(c[column][i]) for c, i in rows) if rows else math.nan)
    return out


def pareto_front(points: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """For ``name → [(cost, accuracy), …]``: each name's points that no point (of any name) beats, i.e.
    none has cost ≤ and accuracy > (or cost < and accuracy ≥). Names with no such point are left out."""
    flat = sorted(((c, -a, n) for n, pts in points.items() for c, a in pts if math.isfinite(c) and math.isfinite(a)))
    front: dict[str, list[tuple[float, float]]] = {}
    best = -math.inf
    for cost, neg_acc, name in flat:
        if -neg_acc > best:
            front.setdefault(name, []).append((cost, -neg_acc))
            best = -neg_acc
    return front


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Per noise level and optimizer: pick, seeds, divergences, cost, accuracy at each budget fraction
    and at matched updates ``U``; per noise level the Pareto front in passes and in seconds (the
    names, and each name's points on it)."""
    config = ComparisonConfig.from_dict(data["settings"])
    out: dict[str, Any] = {}
    for noise in config.label_noise:
        if repr(noise) not in data.get("picks", {}):
            continue
        level = data["picks"][repr(noise)]
        updates = matched_updates(data, noise)
        rows, curves = {}, {}
        for name, pick in level.items():
            runs = final_runs(data, noise, name)
            if not runs:
                continue
            curves[name] = mean_curve(runs, config)
            row: dict[str, Any] = {"hp": pick["hp"], "tuned_at_noise": pick["tuned_at_noise"], "seeds": [r["seed"] for r in runs],
                                   "diverged": sum(bool(r["diverged"]) for r in runs)}
            for column in ("passes", "steps", "batches", "train_seconds", "steps_refused"):
                row[column] = statistics.fmean(r[column] for r in runs)
            row["fractions"] = {}
            for fraction in config.fractions:
                values = [at_index(r["curve"], index_at(r["curve"], "passes", fraction * config.budget)) for r in runs]
                row["fractions"][repr(fraction)] = {k: mean_sd([v[k] for v in values]) for k in values[0]}
            at_u = [at_index(r["curve"], index_at(r["curve"], "steps", updates)) for r in runs]
            row["matched_updates"] = {"updates": updates, **{k: mean_sd([v[k] for v in at_u]) for k in ("final", "early_stopped")}}
            rows[name] = row
        fronts, front_points = {}, {}
        for axis in ("passes", "seconds"):
            points = {n: list(zip(c[axis], c["test_acc"]))[1:] for n, c in curves.items()}  # without the initial point
            front_points[axis] = pareto_front(points)
            fronts[axis] = sorted(front_points[axis])
        out[repr(noise)] = {"matched_updates": updates, "optimizers": rows, "curves": curves, "pareto": fronts,
                            "pareto_points": front_points}
    return out


def _pct(stat: dict[str, float]) -> str:
    if not math.isfinite(stat["mean"]):
        return "—"
    sd = f" ± {100 * stat['sd']:.1f}" if math.isfinite(stat["sd"]) else ""
    return f"{100 * stat['mean']:.2f}{sd}"


def markdown_table(summary: dict[str, Any], noise: float, fraction: float = 1.0) -> str:
    """One row per optimizer at ``noise``: test accuracy (%) at ``fraction`` of the budget (final,
    early-stopped pick, best so far) and the cost there; test accuracy at matched updates; the
    fraction of refused steps over the whole run."""
    level = summary[repr(float(noise))]
    header = ["optimizer", "hyperparameters", "n", "diverged", "final test %", "early-stopped test %", "best test %",
              f"test % at {level['matched_updates']} updates", "passes", "updates", "batches", "train s", "refused"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in level["optimizers"].items():
        at = row["fractions"][repr(float(fraction))]
        hp = ", ".join(f"{k}={v}" for k, v in row["hp"].items())
        lines.append("| " + " | ".join([
            name, hp, str(len(row["seeds"])), str(row["diverged"]), _pct(at["final"]), _pct(at["early_stopped"]), _pct(at["best"]),
            _pct(row["matched_updates"]["final"]), f"{at['passes']['mean']:.0f}", f"{at['steps']['mean']:.0f}",
            f"{at['batches']['mean']:.0f}", f"{at['seconds']['mean']:.1f}", f"{100 * row['steps_refused']:.0f} %"]) + " |")
    return "\n".join(lines)
