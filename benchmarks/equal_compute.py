"""The equal-compute study: optimizers at one budget of forward+backward passes, each composition tuned on
a validation split of the noisy training set at the budget it is scored at, reported on the test set over
disjoint seeds.

Parts (each its own resumable results file under ``--out``, so parts can run side by side in separate
processes with ``--parts``; ``--jobs N`` trains N runs of a part at once):

- ``mlp_noise0``, ``mlp_noise0.2``, ``mlp_noise0.4``: Fashion-MNIST MLP 784-256-256-10, B = 4 690 passes
  (10 epochs of SGD at batch 128), every family of ``FAMILIES`` swept (learning rate always; ρ for the
  sharpness-aware rules; k for the cheap ones) on tuning seed 0 and rerun on final seeds 1, 2, 3;
- ``conv_noise0``, ``conv_noise0.4``: ResNet-6 with BatchNorm, ``--conv-budget`` passes (3 000), random crop
  and horizontal flip, ``CONV`` plus the two best cheap rules of the MLP parts, final seeds 1, 2;
- ``long_noise0.4``: the MLP at 5 × B, 40 % noise, ``LONG`` plus the best cheap rule, retuned at 5 × B.

A cheap rule takes at most ``CHEAP`` passes per update; "best" is the mean final test accuracy over the MLP
parts run so far, so the conv and long parts run after them.

``--publish`` writes docs/results/equal_compute.json and docs/img/results/equal_compute_*.png;
``--report-only`` summarises what the results files hold without running anything.

Each part records the commit that produced it, the wall-clock seconds it took over every sitting and the
largest ``--jobs`` of its sittings, in ``OUT/PART.provenance.json``. A part runs only from a clean tree, and
resumes at a later commit only when no code changed in between; ``--publish`` refuses parts of different
code, of a dirty tree or of ``--quick`` runs (which run from any tree and record whether it was dirty).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_ROOT, machine, pct, run_script
from provenance import ProvenanceError, dirty_code, head_commit, resume_commit, same_code

from nonlocal_opt.comparison import ComparisonConfig, load_specs, run_comparison, summarize
from nonlocal_opt.comparison.curves import markdown_table
from nonlocal_opt.comparison.plots import plot_summary
from nonlocal_opt.comparison.quick import QUICK_SETTINGS
from nonlocal_opt.comparison.workers import WorkerDied

ROOT = Path(__file__).resolve().parents[1]
SGDM = {"base": "sgd", "momentum": 0.9}
GN = {"rule": "rbo", "base": "sgd", "projector": "gauss-newton"}


def rbo_gn(k: int, rho: float) -> dict:
    return {"name": f"rbo-gn K={k} ρ={rho:g}", **GN, "fixed": {"max_iters": k, "rho": rho}, "sweep": {"lr": [0.1, 0.3]}}


def over_sgdm(name: str, rule: str, sweep: dict, **fixed) -> dict:
    """A rule over SGD with momentum 0.9, its learning rate swept at 0.01 and 0.03 next to ``sweep``."""
    return {"name": name, "rule": rule, "base": "sgd", "fixed": {"momentum": 0.9, **fixed}, "sweep": {"lr": [0.01, 0.03], **sweep}}


RHO = {"rho": [0.05, 0.2]}
# The families and their sweeps. Every composition sweeps its learning rate (around earlier picks: SGD-m 0.01–0.1,
# AdamW 1e-3, RBO-GN η 0.1–0.3), the sharpness-aware rules ρ, and the cheap ones (refresh policy) k as well.
FAMILIES = [
    {"name": "sgd-m", "rule": "local", "base": "sgd", "fixed": {"momentum": 0.9}, "sweep": {"lr": [0.01, 0.03, 0.1]}},
    {"name": "adamw", "rule": "local", "base": "adamw", "fixed": {"weight_decay": 0.01}, "sweep": {"lr": [3e-4, 1e-3, 3e-3]}},
    over_sgdm("sam/sgd-m", "sam", {"rho": [0.02, 0.05, 0.2]}),
    {"name": "sam/adamw", "rule": "sam", "base": "adamw", "fixed": {"weight_decay": 0.01},
     "sweep": {"lr": [3e-4, 1e-3], "rho": [0.02, 0.05, 0.2]}},
    over_sgdm("asam/sgd-m", "sam", {"rho": [0.2, 1.0]}, adaptive=True),
    over_sgdm("gsam/sgd-m", "gsam", RHO),
    over_sgdm("friendly-sam/sgd-m", "friendly-sam", RHO),
    over_sgdm("looksam/sgd-m", "sam", {**RHO, "refresh_every": [2, 5]}),
    over_sgdm("periodic-sam/sgd-m", "sam", {**RHO, "refresh_every": [2, 5]}, reuse="none"),
    over_sgdm("ae-sam/sgd-m", "sam", RHO, refresh="gradient-norm", reuse="none"),
    over_sgdm("msam/sgd-m", "msam", {"rho": [0.1, 0.5]}),
    {"name": "entropy-sgd", "rule": "entropy-sgd", "base": "sgd",
     "fixed": {"gamma": 3e-3, "scoping": 1e-3, "scale_outer_by_gamma": False, "fresh_batches": True, "seed": 0},
     "sweep": {"lr": [0.3, 1.0], "inner_steps": [5, 20]}},
    *(rbo_gn(k, rho) for k in (1, 2, 4, 20) for rho in (0.1, 1.0)),
    {"name": "rbo-gn K=2 ρ=1 reuse", **GN, "fixed": {"max_iters": 2, "rho": 1.0}, "sweep": {"lr": [0.1, 0.3], "refresh_every": [2, 5]}},
    {"name": "rbo-gn/sgd-m K=2 ρ=1", **GN, "fixed": {"max_iters": 2, "rho": 1.0, "momentum": 0.9}, "sweep": {"lr": [0.01, 0.03]}},
    {"name": "rbo-gn K=2 ρ=1→0.1 cosine", **GN, "fixed": {"max_iters": 2, "rho": 1.0}, "sweep": {"lr": [0.1, 0.3]},
     "schedule": {"name": "cosine", "rho_final": 0.1}},
]
BASELINES = ("sgd-m", "adamw")
CONV = ("sgd-m", "adamw", "sam/sgd-m", "rbo-gn K=2 ρ=1")  # plus the two best cheap rules of the MLP parts
LONG = ("sgd-m", "adamw", "sam/sgd-m")  # plus the best cheap rule of the MLP parts
QUICK = ("sgd-m", "sam/sgd-m", "looksam/sgd-m", "msam/sgd-m", "rbo-gn K=2 ρ=1")
CHEAP = 1.5  # passes per update at most, for a cheap rule
NOISE = (0.0, 0.2, 0.4)


def families(names: tuple[str, ...], quick: bool) -> list[dict]:
    """The families ``names``; ``quick``: each sweep cut to its first value (the learning rate to two)."""
    chosen = [f for f in FAMILIES if f["name"] in names]
    if not quick:
        return chosen
    return [f | {"sweep": {k: v[: 2 if k == "lr" else 1] for k, v in f["sweep"].items()}} for f in chosen]


def cheap_best(out: Path, count: int) -> tuple[str, ...]:
    """The ``count`` non-baseline families of the MLP parts at most ``CHEAP`` passes per update, best first by
    their mean final test accuracy over the noise levels run so far."""
    scores: dict[str, list[float]] = {}
    for path in sorted(p for p in out.glob("mlp_noise*.json") if not p.name.endswith(".provenance.json")):
        data = json.loads(path.read_text())
        budget = data["settings"]["budget"]
        for level in summarize(data).values():
            for name, row in level["optimizers"].items():
                if name not in BASELINES and row["steps"] and budget / row["steps"] <= CHEAP:
                    scores.setdefault(name, []).append(row["fractions"]["1.0"]["final"]["mean"])
    if len(scores) < count:
        raise SystemExit(f"error: the conv and long parts need {count} cheap rule(s) from the mlp parts; run those first")
    return tuple(sorted(scores, key=lambda name: -sum(scores[name]) / len(scores[name]))[:count])


def parts(args) -> dict[str, tuple[ComparisonConfig, callable]]:
    """Part name → (settings, a function returning its specs when the part starts); one part per workload
    and noise level, so that parts can run side by side in separate processes (``--parts``)."""
    data = {"dataset": args.dataset, "data_dir": args.data_dir}
    quick = args.quick
    if quick:  # the settings of `nonlocal-opt compare --quick`
        data |= {key: QUICK_SETTINGS[key] for key in ("train_subset", "val_size", "test_subset", "evals")}
    seeds = {"final_seeds": QUICK_SETTINGS["final_seeds"] if quick else (1, 2, 3)}
    budget = QUICK_SETTINGS["budget"] if quick else 4690
    noise_levels = (0.0, 0.4) if quick else NOISE
    plan = {}
    for noise in noise_levels:
        config = ComparisonConfig(budget=budget, label_noise=(noise,), **seeds, **data)
        plan[f"mlp_noise{noise:g}"] = (config, lambda: families(QUICK if quick else tuple(f["name"] for f in FAMILIES), quick))
    conv = {"model": "resnet6", "augment": "crop-flip", "final_seeds": seeds["final_seeds"] if quick else (1, 2),
            "evals": data["evals"] if quick else 10}
    for noise in (0.0, 0.4):
        config = ComparisonConfig(budget=200 if quick else args.conv_budget, label_noise=(noise,), **{**data, **conv})
        plan[f"conv_noise{noise:g}"] = (config, lambda: families(CONV + cheap_best(args.out, 1 if quick else 2), quick))
    long = ComparisonConfig(budget=5 * budget, label_noise=(0.4,), fractions=(0.2, 0.5, 1.0), **seeds, **data)
    plan["long_noise0.4"] = (long, lambda: families(LONG + cheap_best(args.out, 1), quick))
    return plan


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


class Sitting:
    """One sitting of a part, called after each run: the part's ledger gets the machine seconds of every
    sitting so far, rewritten atomically, so a sitting that is killed keeps the time of its finished runs;
    ``progress``: a line per run."""

    def __init__(self, ledger: Path, produced: dict, progress: bool):
        self.ledger, self.produced, self.progress = ledger, produced, progress
        self.before, self.start = produced["seconds"], time.perf_counter()

    def record(self) -> None:
        self.produced["seconds"] = self.before + time.perf_counter() - self.start
        partial = self.ledger.with_name(f".{self.ledger.name}.tmp")
        partial.write_text(json.dumps(self.produced, indent=1, sort_keys=True))
        os.replace(partial, self.ledger)

    def __call__(self, done: int, total: int, run, record: dict, cached: bool) -> None:
        self.record()
        if self.progress:
            state = "cached" if cached else f"{record['wall_seconds']:.0f} s"
            print(f"run {done}/{total}: {run.spec.name}, noise {run.noise:g}, seed {run.seed}, {run.phase}, {state}", flush=True)


def reported(name: str, config: ComparisonConfig, produced: dict, args) -> dict:
    """The published form of part ``name``: :func:`report` of its results file and, from its ledger ``produced``,
    the commit, ``dirty``, ``quick`` and machine seconds."""
    return report(name, config, args.out / f"{name}.json", args) | {
        "commit": produced.get("commit"), "dirty": produced.get("dirty"), "quick": produced.get("quick"),
        "machine_seconds": produced.get("seconds"), "jobs": produced.get("jobs", 1)}


def ledger_of(out: Path, name: str) -> dict:
    """The ledger of part ``name`` in ``out``: its commit, ``dirty``, ``quick`` and machine ``seconds`` so far."""
    ledger = out / f"{name}.provenance.json"
    return json.loads(ledger.read_text()) if ledger.exists() else {"seconds": 0.0}


def sit(name: str, config: ComparisonConfig, specs: list[dict], args) -> dict:
    """One sitting of part ``name``: run (or resume) ``specs`` into ``args.out/{name}.json`` under the commit it
    comes from (:func:`resume_commit`; a ``--quick`` run takes any tree and says whether it was dirty), its ledger
    rewritten after every run. Returns the ledger; Ctrl-C says how to resume and exits with 130.

    Raises:
        ProvenanceError: the tree is dirty, or the part's runs came from other code.
    """
    path, ledger = args.out / f"{name}.json", args.out / f"{name}.provenance.json"
    produced = ledger_of(args.out, name)
    produced["commit"] = quick_commit() if args.quick else resume_commit(produced.get("commit"))
    produced["dirty"] = args.quick and bool(produced["commit"] and dirty_code())
    produced["quick"] = args.quick
    produced["jobs"] = max(produced.get("jobs", 1), args.jobs)
    sitting = Sitting(ledger, produced, progress=not args.no_progress)
    try:
        run_comparison(config, load_specs(specs), path, progress=sitting, jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"part {name}: interrupted; its finished runs are in {path} and its machine time in {ledger}: "
              "rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except WorkerDied as error:
        print(f"part {name}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sitting.record()
    print(f"part {name}: {produced['seconds'] - sitting.before:.0f} s (all sittings: {produced['seconds']:.0f} s)")
    return produced


def quick_commit() -> str | None:
    """``HEAD`` for a ``--quick`` run, which may run from a dirty tree or outside git (``None``)."""
    try:
        return head_commit()
    except ProvenanceError:
        return None


def publishable(reports: dict) -> None:
    """Refuse to publish parts without a commit, from a dirty tree, or of different code."""
    for name, part in reports.items():
        if part["quick"]:
            raise ProvenanceError(f"part {name} comes from a --quick run, a smoke test; run it without --quick")
        if not part["commit"] or part["dirty"]:
            raise ProvenanceError(f"part {name} was not produced by a clean commit; rerun it from a clean tree")
    dirty = dirty_code()
    if dirty:
        raise ProvenanceError(f"the code has uncommitted changes ({', '.join(dirty[:5])}); commit them before publishing")
    same_code(sorted({part["commit"] for part in reports.values()}))


def parse_sitting_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add what a script running parts shares (``--data-dir``, ``--threads``, ``--jobs``, ``--docs``, ``--no-progress``),
    parse, set the torch threads and create ``args.out``."""
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (1: the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process: the same records, up to JOBS cores busy "
                             "(the ledger's seconds are wall-clock; it keeps the largest JOBS of its sittings)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="the docs directory --publish writes into")
    parser.add_argument("--no-progress", action="store_true", help="no line per run")
    args = parser.parse_args()
    for flag in ("threads", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: 6 000 training images, 300 passes, five families with the sweeps cut short")
    parser.add_argument("--parts", default=None, help="comma-separated parts to run (default: all, in order)")
    parser.add_argument("--out", type=Path, default=OUT_ROOT / "equal_compute", help="results directory")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (or synthetic, for smoke tests)")
    parser.add_argument("--conv-budget", type=int, default=3000, help="passes per ResNet-6 run")
    parser.add_argument("--report-only", action="store_true", help="summarise the results files, run nothing")
    parser.add_argument("--publish", action="store_true", help="write docs/results/equal_compute.json and docs/img/results/ figures")
    args = parse_sitting_arguments(parser)
    plan = parts(args)
    chosen = [p.strip() for p in args.parts.split(",")] if args.parts else list(plan)
    unknown = [p for p in chosen if p not in plan]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(plan)}", file=sys.stderr)
        return 2
    print(machine())
    reports = {}
    for name in chosen:
        config, specs = plan[name]
        try:
            produced = ledger_of(args.out, name) if args.report_only else sit(name, config, specs(), args)
        except ProvenanceError as error:
            print(f"error: part {name}: {error}", file=sys.stderr)
            return 2
        if (args.out / f"{name}.json").exists():
            reports[name] = reported(name, config, produced, args)
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
        shutil.copy(combined, args.docs / "results" / "equal_compute.json")
        for part in reports.values():
            for figure in part["figures"]:
                shutil.copy(args.out / figure, args.docs / "img" / "results" / figure)
        print(f"published to {args.docs / 'results'} and {args.docs / 'img' / 'results'}")
    return 0


if __name__ == "__main__":
    run_script(main)
