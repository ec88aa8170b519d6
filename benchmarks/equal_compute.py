"""The equal-compute study (issue 16): optimizers at one budget of forward+backward passes, tuned on a
validation split of the noisy training set, reported on the test set over disjoint seeds.

Parts (each its own resumable results file under ``--out``; run in this order):

- ``mlp``: Fashion-MNIST MLP 784-256-256-10, B = 4 690 passes (10 epochs of SGD at batch 128), label
  noise 0 and 0.4, every family swept at each level (tuning seed 0) and rerun on final seeds 1, 2, 3;
- ``mlp_noise0.2``: the same at label noise 0.2, every family at its 0.4 pick (no sweep), seeds 1, 2, 3;
- ``long``: B = 23 450 (5×), noise 0 and 0.4, five families at the ``mlp`` part's picks, seeds 1, 2, 3;
- ``resnet6``: ResNet-6, a tiny budget, four families at the ``mlp`` picks (noise 0), seed 1.

``--publish`` writes docs/results/equal_compute.json and docs/img/results/equal_compute_*.png;
``--report-only`` summarises what the results files hold without running anything.

Each part records the commit that produced it and the machine seconds it took, over every sitting, in
``OUT/provenance.json``. A part runs only from a clean tree, and resumes at a later commit only when no
code changed in between; ``--publish`` refuses parts of different code or of a dirty tree. ``--quick``
runs from any tree and records whether it was dirty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_ROOT, machine
from provenance import ProvenanceError, dirty_code, head_commit, resume_commit, same_code

from nonlocal_opt.comparison import ComparisonConfig, load_specs, run_comparison, summarize
from nonlocal_opt.comparison.curves import markdown_table
from nonlocal_opt.comparison.plots import plot_summary

ROOT = Path(__file__).resolve().parents[1]
SGDM = {"base": "sgd", "momentum": 0.9}
GN = {"rule": "rbo", "base": "sgd", "projector": "gauss-newton"}


def rbo_gn(k: int, rho: float) -> dict:
    return {"name": f"rbo-gn K={k} ρ={rho:g}", **GN, "fixed": {"max_iters": k, "rho": rho}, "sweep": {"lr": [0.1, 0.3]}}


# The families and their sweeps (sized from earlier measurements: SGD-m lr 0.03, AdamW 1e-3, SAM ρ 0.02–0.2,
# RBO-GN η ≤ 0.3). SAM, Friendly-SAM and ASAM keep their base's known learning rate and sweep ρ only, and so do
# LookSAM, periodic SAM (k = 5, 1.2 passes per step), AE-SAM and Momentum-SAM (one pass per step).
FAMILIES = [
    {"name": "sgd-m", "rule": "local", "base": "sgd", "fixed": {"momentum": 0.9}, "sweep": {"lr": [0.01, 0.03, 0.1]}},
    {"name": "adamw", "rule": "local", "base": "adamw", "fixed": {"weight_decay": 0.01}, "sweep": {"lr": [3e-4, 1e-3, 3e-3]}},
    {"name": "sam/sgd-m", "rule": "sam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03}, "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "sam/adamw", "rule": "sam", "base": "adamw", "fixed": {"weight_decay": 0.01, "lr": 1e-3},
     "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "friendly-sam/sgd-m", "rule": "friendly-sam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03},
     "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "asam/sgd-m", "rule": "sam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03, "adaptive": True},
     "sweep": {"rho": [0.2, 1.0]}},
    {"name": "asam/adamw", "rule": "sam", "base": "adamw", "fixed": {"weight_decay": 0.01, "lr": 1e-3, "adaptive": True},
     "sweep": {"rho": [0.2, 1.0]}},
    {"name": "looksam/sgd-m k=5", "rule": "sam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03, "refresh_every": 5},
     "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "periodic-sam/sgd-m k=5", "rule": "sam", "base": "sgd",
     "fixed": {"momentum": 0.9, "lr": 0.03, "refresh_every": 5, "reuse": "none"}, "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "ae-sam/sgd-m", "rule": "sam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03, "refresh": "gradient-norm",
     "reuse": "none"}, "sweep": {"rho": [0.02, 0.05, 0.2]}},
    {"name": "msam/sgd-m", "rule": "msam", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03}, "sweep": {"rho": [0.05, 0.2, 0.5]}},
    {"name": "entropy-sgd", "rule": "entropy-sgd", "base": "sgd",
     "fixed": {"lr": 1.0, "gamma": 3e-3, "scoping": 1e-3, "scale_outer_by_gamma": False, "fresh_batches": True, "seed": 0},
     "sweep": {"inner_steps": [5, 20]}},
    *(rbo_gn(k, rho) for k in (1, 2, 4, 20) for rho in (0.1, 1.0)),
    {"name": "rbo-gn K=2 ρ=1 refresh_every=5", **GN, "fixed": {"max_iters": 2, "rho": 1.0, "refresh_every": 5},
     "sweep": {"lr": [0.1, 0.3]}},
    {"name": "rbo-gn/sgd-m K=2 ρ=1", **GN, "fixed": {"max_iters": 2, "rho": 1.0, "momentum": 0.9}, "sweep": {"lr": [0.01, 0.03]}},
    {"name": "rbo-gn K=2 ρ=1→0.1 cosine", **GN, "fixed": {"max_iters": 2, "rho": 1.0}, "sweep": {"lr": [0.1, 0.3]},
     "schedule": {"name": "cosine", "rho_final": 0.1}},
]
LONG = ("sgd-m", "adamw", "sam/sgd-m", "rbo-gn K=2 ρ=1", "entropy-sgd")
CONV = ("sgd-m", "adamw", "sam/sgd-m", "rbo-gn K=2 ρ=1")
QUICK = ("sgd-m", "sam/sgd-m", "friendly-sam/sgd-m", "looksam/sgd-m k=5", "msam/sgd-m", "rbo-gn K=2 ρ=1")


def picked(source: Path, names: tuple[str, ...], noise: float) -> list[dict]:
    """The families ``names`` frozen at the picks ``source`` made at ``noise`` (one-point specs)."""
    picks = json.loads(source.read_text())["picks"][repr(float(noise))]
    out = []
    for family in FAMILIES:
        if family["name"] in names:
            fixed = picks[family["name"]]["hp"]
            out.append({k: v for k, v in family.items() if k not in ("fixed", "sweep")} | {"fixed": fixed})
    return out


def parts(args) -> dict[str, tuple[ComparisonConfig, callable]]:
    """Part name → (settings, a function returning its specs when the part starts)."""
    data = {"dataset": args.dataset, "data_dir": args.data_dir}
    if args.quick:
        small = {**data, "train_subset": 6000, "val_size": 1000, "test_subset": 2000, "evals": 5}
        mlp = ComparisonConfig(budget=300, label_noise=(0.0, 0.4), final_seeds=(1,), **small)
        return {"mlp": (mlp, lambda: [f for f in FAMILIES if f["name"] in QUICK]),
                "long": (ComparisonConfig(budget=900, label_noise=(0.0, 0.4), final_seeds=(1,), **small), None)}
    mlp = ComparisonConfig(budget=4690, label_noise=(0.0, 0.4), final_seeds=(1, 2, 3), **data)
    mid = ComparisonConfig(budget=4690, label_noise=(0.2,), final_seeds=(1, 2, 3), **data)
    long = ComparisonConfig(budget=5 * 4690, label_noise=(0.0, 0.4), final_seeds=(1, 2, 3), fractions=(0.2, 0.5, 1.0), **data)
    conv = ComparisonConfig(budget=args.conv_budget, model="resnet6", final_seeds=(1,), val_size=2000, test_subset=2000,
                            evals=4, **data)
    everything = tuple(f["name"] for f in FAMILIES)
    return {"mlp": (mlp, lambda: FAMILIES),
            "mlp_noise0.2": (mid, lambda: picked(args.out / "mlp.json", everything, 0.4)),
            "long": (long, None),  # specs per noise level, from that level's picks (see main)
            "resnet6": (conv, lambda: picked(args.out / "mlp.json", CONV, 0.0))}



def report(name: str, config: ComparisonConfig, path: Path, args) -> dict:
    data = json.loads(path.read_text())
    summary = summarize(data)
    print(f"\n## {name}: {config.model}, budget {config.budget} passes, results {path}")
    for noise, level in summary.items():
        print(f"\nlabel noise {float(noise):g}; Pareto front in passes: {', '.join(level['pareto']['passes'])}; "
              f"in seconds: {', '.join(level['pareto']['seconds'])}")
        for fraction in config.fractions:
            print(f"\nat {fraction:g} of the budget:")
            print(markdown_table(summary, float(noise), fraction))
    title = f"{config.model} on {config.dataset}, budget {config.budget} passes"
    figures = plot_summary(summary, args.out / f"equal_compute_{name}", title)
    for figure in figures:
        print(f"wrote {figure}")
    return {"settings": data["settings"], "specs": data["specs"], "picks": data["picks"], "summary": summary,
            "runs": data["runs"], "figures": [f.name for f in figures]}


def pct(stat: dict) -> str:
    if stat["n"] == 0:
        return "—"
    sd = f" ± {100 * stat['sd']:.1f}" if stat["n"] > 1 else ""
    return f"{100 * stat['mean']:.1f}{sd}"


def hp_text(hp: dict) -> str:
    short = {"momentum": None, "weight_decay": None, "fresh_batches": None, "scale_outer_by_gamma": None, "seed": None,
             "adaptive": None, "scoping": None, "gamma": None}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items() if k not in short)


def headline(summary: dict, noise: str, fractions: tuple[float, ...]) -> str:
    """Per optimizer: the pick, final test accuracy at each budget fraction, early-stopped pick and best
    at B, accuracy at matched updates U, updates, training seconds, diverged runs, refused steps."""
    level = summary[noise]
    last = repr(float(fractions[-1]))
    head = ["optimizer", "pick", *(f"final @{f:g}B" for f in fractions), "early-stopped @B", "best @B",
            f"@{level['matched_updates']} updates", "updates", "train s", "div.", "refused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(level["optimizers"].items(), key=lambda kv: -kv[1]["fractions"][last]["final"]["mean"])
    for name, row in rows:
        at = row["fractions"]
        bold = "**" if name in level["pareto"]["passes"] else ""
        lines.append("| " + " | ".join([
            f"{bold}{name}{bold}", hp_text(row["hp"]), *(pct(at[repr(float(f))]["final"]) for f in fractions),
            pct(at[last]["early_stopped"]), pct(at[last]["best"]), pct(row["matched_updates"]["final"]),
            f"{row['steps']:.0f}", f"{row['train_seconds']:.0f}", f"{row['diverged']}/{len(row['seeds'])}",
            f"{100 * row['steps_refused']:.0f} %"]) + " |")
    return "\n".join(lines)


def write_markdown(reports: dict, path: Path) -> Path:
    """The headline tables of every part (bold: on the Pareto front in passes) and the Pareto fronts."""
    out = []
    for name, part in reports.items():
        settings = part["settings"]
        fractions = tuple(settings["fractions"])
        for noise, level in part["summary"].items():
            out.append(f"### {name}, label noise {float(noise):g} (B = {settings['budget']} passes, "
                       f"U = {level['matched_updates']} updates)\n")
            out.append(headline(part["summary"], noise, fractions) + "\n")
            for axis in ("passes", "seconds"):
                points = level["pareto_points"][axis]
                spans = "; ".join(f"{n} ({min(c for c, _ in pts):.4g}–{max(c for c, _ in pts):.4g} {axis}, "
                                  f"{100 * max(a for _, a in pts):.1f} % max)" for n, pts in sorted(points.items()))
                out.append(f"Pareto front in {axis}: {spans}\n")
    path.write_text("\n".join(out))
    return path


def run_part(name: str, config: ComparisonConfig, specs, args) -> None:
    """Run or resume part ``name``; the long part runs each noise level at that level's picks, one
    results file per level."""
    files = part_files(name, config, args.out / f"{name}.json", args.out)
    for (_, level, path), noise in zip(files, config.label_noise):  # one file per noise level for the long part
        level_specs = specs() if name != "long" else picked(args.out / "mlp.json", LONG if not args.quick else QUICK, noise)
        run_comparison(level, load_specs(level_specs), path, progress=not args.no_progress)


def part_files(name: str, config: ComparisonConfig, path: Path, out: Path) -> list[tuple[str, ComparisonConfig, Path]]:
    """(report name, settings, results file) of part ``name``: one per noise level for the long part."""
    if name != "long":
        return [(name, config, path)]
    levels = [ComparisonConfig.from_dict({**config.to_dict(), "label_noise": [noise]}) for noise in config.label_noise]
    return [(f"long_noise{noise:g}", level, out / f"long_noise{noise:g}.json") for noise, level in zip(config.label_noise, levels)]


def quick_commit() -> str | None:
    """``HEAD`` for a ``--quick`` run, which may run from a dirty tree or outside git (``None``)."""
    try:
        return head_commit()
    except ProvenanceError:
        return None


def publishable(reports: dict) -> None:
    """Refuse to publish parts without a commit, from a dirty tree, or of different code."""
    for name, part in reports.items():
        if not part["commit"] or part["dirty"]:
            raise ProvenanceError(f"part {name} was not produced by a clean commit; rerun it without --quick from a clean tree")
    dirty = dirty_code()
    if dirty:
        raise ProvenanceError(f"the code has uncommitted changes ({', '.join(dirty[:5])}); commit them before publishing")
    same_code(sorted({part["commit"] for part in reports.values()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: 6 000 training images, 300 passes, four families")
    parser.add_argument("--parts", default=None, help="comma-separated parts to run (default: all, in order)")
    parser.add_argument("--out", type=Path, default=OUT_ROOT / "equal_compute", help="results directory")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (or synthetic, for smoke tests)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    parser.add_argument("--conv-budget", type=int, default=400, help="passes per ResNet-6 run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--report-only", action="store_true", help="summarise the results files, run nothing")
    parser.add_argument("--publish", action="store_true", help="write docs/results/equal_compute.json and docs/img/results/ figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = parts(args)
    chosen = [p.strip() for p in args.parts.split(",")] if args.parts else list(plan)
    unknown = [p for p in chosen if p not in plan]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(plan)}", file=sys.stderr)
        return 2
    print(machine())
    ledger_path = args.out / "provenance.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    reports = {}
    for name in chosen:
        config, specs = plan[name]
        path = args.out / f"{name}.json"
        if not args.report_only:
            entry = ledger.setdefault(name, {"seconds": 0.0})
            try:
                entry["commit"] = quick_commit() if args.quick else resume_commit(entry.get("commit"))
            except ProvenanceError as error:
                print(f"error: part {name}: {error}", file=sys.stderr)
                return 2
            entry["dirty"] = args.quick and bool(entry["commit"] and dirty_code())
            start = time.perf_counter()
            try:
                run_part(name, config, specs, args)
            finally:
                entry["seconds"] += time.perf_counter() - start
                ledger_path.write_text(json.dumps(ledger, indent=1, sort_keys=True))
            print(f"part {name}: {time.perf_counter() - start:.0f} s (all sittings: {entry['seconds']:.0f} s)")
        produced = ledger.get(name, {})
        for key, level, level_path in part_files(name, config, path, args.out):
            if level_path.exists():
                reports[key] = report(key, level, level_path, args) | {
                    "commit": produced.get("commit"), "dirty": produced.get("dirty"), "machine_seconds": produced.get("seconds")}
    combined = args.out / "equal_compute.json"
    combined.write_text(json.dumps({"machine": machine(), "parts": reports}, sort_keys=True, separators=(",", ":")))
    print(f"wrote {combined}")
    print(f"wrote {write_markdown(reports, args.out / 'equal_compute.md')}")
    if args.publish:
        try:
            publishable(reports)
        except ProvenanceError as error:
            print(f"error: not published: {error}", file=sys.stderr)
            return 2
        shutil.copy(combined, ROOT / "docs" / "results" / "equal_compute.json")
        for part in reports.values():
            for figure in part["figures"]:
                shutil.copy(args.out / figure, ROOT / "docs" / "img" / "results" / figure)
        print("published to docs/results/ and docs/img/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
