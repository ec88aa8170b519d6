"""The workload tables of docs/results.md, from a published ``equal_compute.json``.

A workload is the parts that share a model and a budget (``mlp_noise0``, ``mlp_noise0.2``, ``mlp_noise0.4``
make one). Per workload, one row per composition: passes per update (per noise level where they differ),
test accuracy (%) at matched passes (final and early-stopped at B) and at matched updates (final at U) for
each noise level, as mean ± sd over the final seeds, the training seconds of a run, and the noise levels at
which the composition is on the Pareto front of accuracy against passes and against seconds. Rows are
sorted by mean final accuracy at B over the noise levels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, markdown_table, pct, run_script

ROOT = Path(__file__).resolve().parents[1]


def workloads(parts: dict) -> dict[str, list[tuple[str, dict, dict]]]:
    """``"model, B passes"`` → ``[(noise, level summary, settings)]`` over the parts of that workload."""
    grouped: dict[str, list[tuple[str, dict, dict]]] = {}
    for part in parts.values():
        settings = part["settings"]
        title = f"{settings['model']}, B = {settings['budget']} passes"
        grouped.setdefault(title, []).extend((noise, level, settings) for noise, level in part["summary"].items())
    return {title: sorted(levels, key=lambda item: float(item[0])) for title, levels in grouped.items()}


def workload_table(levels: list[tuple[str, dict, dict]]) -> str:
    """The markdown table of one workload (see the module docstring)."""
    names = sorted({name for _, level, _ in levels for name in level["optimizers"]})
    noise = [f"{float(n) * 100:g} %" for n, _, _ in levels]
    header = ["optimizer", "passes / update",
              *(f"final @B, {n}" for n in noise), *(f"early-stopped @B, {n}" for n in noise),
              *(f"@{level['matched_updates']} updates, {n}" for n, (_, level, _) in zip(noise, levels)),
              "train s / run", "front: passes", "front: seconds"]
    rows = []
    for name in names:
        present = [(n, level["optimizers"].get(name), level, settings) for n, (_, level, settings) in zip(noise, levels)]
        finals = [row["fractions"]["1.0"]["final"]["mean"] for _, row, _, _ in present if row]
        if not finals:
            continue
        per_update = [f"{settings['budget'] / row['steps']:.2f}" if row and row["steps"] else "—" for _, row, _, settings in present]
        seconds = [row["train_seconds"] for _, row, _, _ in present if row]
        cells = [name, per_update[0] if len(set(per_update)) == 1 else "; ".join(per_update)]
        cells += [pct(row["fractions"]["1.0"]["final"]) if row else "—" for _, row, _, _ in present]
        cells += [pct(row["fractions"]["1.0"]["early_stopped"]) if row else "—" for _, row, _, _ in present]
        cells += [pct(row["matched_updates"]["final"]) if row else "—" for _, row, _, _ in present]
        cells.append(f"{statistics.mean(seconds):.0f}")
        for axis in ("passes", "seconds"):
            cells.append(", ".join(n for n, _, level, _ in present if name in level["pareto"][axis]) or "—")
        rows.append((-statistics.mean(finals), cells))
    return markdown_table(header, [cells for _, cells in sorted(rows, key=lambda row: row[0])])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "equal_compute.json",
                        help="a results file written by equal_compute.py")
    args = parser.parse_args()
    try:
        data = json.loads(args.results.read_text())
        parts = data["parts"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"cannot read results file {args.results} ({error}); pass --results FILE written by equal_compute.py") from None
    commits = sorted({part.get("commit") or "none" for part in parts.values()})
    print(f"results {args.results}; code {', '.join(c[:12] for c in commits)}; {data.get('machine', '')}")
    for title, levels in workloads(parts).items():
        print(f"\n### {title}\n")
        print(workload_table(levels))
    return 0


if __name__ == "__main__":
    run_script(main)
