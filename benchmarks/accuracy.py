"""Accuracy table (RBO paper Table 1 protocol) and label-noise robustness, through the trainer.

For every label-noise level, optimizer and seed: ``nonlocal_opt.training.train`` for ``--epochs``
epochs; per run the best validation loss and accuracy over the epochs (and the final accuracy);
per optimizer the mean over seeds with a 95 % t-interval (n − 1 degrees of freedom).

    python benchmarks/accuracy.py --quick                       # a few minutes on 2 CPU cores
    python benchmarks/accuracy.py                               # Fashion-MNIST MLP, 5 seeds, 10 epochs
    python benchmarks/accuracy.py --label-noise 0,0.2,0.4       # the noise table
    python benchmarks/accuracy.py --dataset cifar10 --model resnet8 --data-dir DIR   # on a GPU machine

Writes, under ``--out`` (default ``benchmarks/out/accuracy``), for ``TAG = DATASET_MODEL``:
``runs_TAG.csv`` (one row per run), ``summary_TAG.csv``, ``results_TAG.md`` (markdown tables),
``curves_TAG_noiseP.png`` (train and validation loss per epoch, mean over seeds, one line per optimizer)
and the trainer's log directories under ``--runs-dir`` (default ``OUT/runs``). Finished runs are reused when rerun with the same
settings (``--no-cache`` to retrain).
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from _common import (
    PAPER_OPTIMIZERS,
    RunSummary,
    UserError,
    comma_list,
    common_arguments,
    fmt_ci,
    machine,
    markdown_table,
    mean_ci,
    parse_optimizers,
    positive_int,
    prepare,
    run_script,
    run_training,
    train_config,
    write_csv,
)

from nonlocal_opt.analysis.figures import pyplot

FULL = {"seeds": 5, "epochs": 10, "limit_train_batches": None, "limit_val_batches": None}
QUICK = {"seeds": 2, "epochs": 2, "limit_train_batches": 10, "limit_val_batches": 10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "accuracy")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, cifar100")
    parser.add_argument("--model", default="mlp", help="mlp, logreg, resnet6, resnet8, vgg9")
    parser.add_argument("--optimizers", default=",".join(PAPER_OPTIMIZERS),
                        help="comma-separated presets (sgd, entropy-sgd, sam, rbo, rbo-gn, rbo-newton, rbo-lbfgs, "
                             "rbo-tangent), each optionally with @key=value overrides, e.g. rbo@lr=1")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds 0..N−1 (full 5, quick 2)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="full 10, quick 2")
    parser.add_argument("--label-noise", type=comma_list(float, "probabilities"), default=[0.0],
                        help="comma-separated symmetric label-noise levels, e.g. 0,0.2,0.4")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--limit-train-batches", type=positive_int, default=None,
                        help="steps per epoch (each epoch: the first N batches of a fresh shuffle; full: all, quick 10)")
    parser.add_argument("--limit-val-batches", type=positive_int, default=None, help="validation batches (full: all, quick 10)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the trainer's run directories go (default OUT/runs); share it to reuse runs")
    parser.add_argument("--no-cache", action="store_true", help="retrain runs that already have a summary")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run_row(args, noise: float, label: str, seed: int, run: RunSummary) -> dict:
    val_loss = [e["val/loss"] for e in run.epochs]
    val_acc = [e["val/acc"] for e in run.epochs]
    return {
        "dataset": args.dataset, "model": args.model, "label_noise": noise, "optimizer": label, "seed": seed,
        "epochs_done": len(run.epochs),
        "best_val_loss": min(val_loss, default=math.nan),
        "best_val_acc": max(val_acc, default=math.nan),
        "final_val_acc": val_acc[-1] if val_acc else math.nan,
        "refused_frac": run.refused_fraction,
        "passes_per_step": statistics.fmean(run.passes) if run.passes else math.nan,
        "wall_s": run.wall_s,
        "diverged": run.diverged or "",
    }


def summary_rows(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["label_noise"], r["optimizer"]) for r in rows):
        group = [r for r in rows if (r["label_noise"], r["optimizer"]) == key]
        row = {"dataset": group[0]["dataset"], "model": group[0]["model"], "label_noise": key[0], "optimizer": key[1]}
        for metric in ("best_val_loss", "best_val_acc", "final_val_acc"):
            mean, half, n = mean_ci(r[metric] for r in group)
            row.update({metric: mean, f"{metric}_ci95": half})
        row.update({"n": n, "runs": len(group), "diverged": sum(bool(r["diverged"]) for r in group),
                    "refused_frac": statistics.fmean(r["refused_frac"] for r in group),
                    "wall_s": statistics.fmean(r["wall_s"] for r in group)})
        out.append(row)
    return out


def tables(summary: list[dict], noises: list[float]) -> str:
    parts = []
    for noise in noises:
        rows = [
            (s["optimizer"], s["n"], fmt_ci(s["best_val_loss"], s["best_val_loss_ci95"]),
             fmt_ci(s["best_val_acc"], s["best_val_acc_ci95"], 100, 2, " %"),
             fmt_ci(s["final_val_acc"], s["final_val_acc_ci95"], 100, 2, " %"),
             f"{100 * s['refused_frac']:.1f} %", s["diverged"], f"{s['wall_s']:.0f}")
            for s in summary if s["label_noise"] == noise
        ]
        parts.append(f"Label noise {noise:g}:\n\n" + markdown_table(
            ("optimizer", "n", "best val loss", "best val acc", "final val acc", "steps refused", "diverged", "s / run"), rows))
    if len(noises) > 1:
        labels = list(dict.fromkeys(s["optimizer"] for s in summary))
        cell = {(s["optimizer"], s["label_noise"]): s for s in summary}
        rows = [(label, *(fmt_ci(cell[label, p]["final_val_acc"], cell[label, p]["final_val_acc_ci95"], 100, 2, " %")
                          for p in noises)) for label in labels]
        parts.append("Final test accuracy by label noise:\n\n" + markdown_table(("optimizer", *(f"noise {p:g}" for p in noises)), rows))
    return "\n\n".join(parts)


def plot_curves(curves: dict[str, list[RunSummary]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for index, (label, runs) in enumerate(curves.items()):
        for ax, key in zip(axes, ("epoch/train_loss", "val/loss")):
            epochs = min(len(run.epochs) for run in runs)
            if epochs == 0:
                continue
            mean = [statistics.fmean(run.epochs[e][key] for run in runs) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), mean, marker="o", markersize=3, color=f"C{index}", label=label)
    for ax, name in zip(axes, ("train loss (mean over the epoch's steps)", "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    presets = parse_optimizers(args.optimizers)
    bad = [p for p in args.label_noise if not 0 <= p <= 1]
    if bad:
        raise UserError(f"--label-noise levels must be probabilities in [0, 1], got {bad}; e.g. --label-noise 0,0.2,0.4")
    out = prepare(args)
    tag = f"{args.dataset}_{args.model}"
    command = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# accuracy: {tag}, {len(presets)} optimizers × {args.seeds} seeds × noise {args.label_noise}, "
          f"{args.epochs} epochs of {args.limit_train_batches or 'all'} batches\n# {machine()}", flush=True)
    start = time.perf_counter()
    rows, figures = [], []
    for noise in args.label_noise:
        curves: dict[str, list[RunSummary]] = {}
        for label, preset in presets.items():
            for seed in range(args.seeds):
                logdir = (args.runs_dir or out / "runs") / tag / f"noise{noise:g}" / label / f"seed{seed}"
                config = train_config(preset, dataset=args.dataset, model=args.model, epochs=args.epochs,
                                      batch_size=args.batch_size, seed=seed, logdir=str(logdir), label_noise=noise,
                                      limit_train_batches=args.limit_train_batches,
                                      limit_val_batches=args.limit_val_batches, data_dir=args.data_dir,
                                      download=args.download)
                run = run_training(config, cache=not args.no_cache)
                curves.setdefault(label, []).append(run)
                rows.append(run_row(args, noise, label, seed, run))
                r = rows[-1]
                print(f"noise {noise:g} {label} seed {seed}: best val acc {r['best_val_acc']:.4f}, best val loss "
                      f"{r['best_val_loss']:.4f}, refused {r['refused_frac']:.1%}, {r['wall_s']:.0f} s"
                      + (" (diverged)" if r["diverged"] else ""), flush=True)
        figures.append(plot_curves(curves, out / f"curves_{tag}_noise{noise:g}.png",
                                   f"{args.dataset} {args.model}, label noise {noise:g}: mean over {args.seeds} seeds"))
    summary = summary_rows(rows)
    wall = time.perf_counter() - start
    compute = sum(r["wall_s"] for r in rows)
    report = (f"<!-- produced by `{command}` in {wall:.0f} s (runs: {compute:.0f} s in all, reused ones at their "
              f"original cost) on {machine()} -->\n\n"
              f"{args.dataset} / {args.model}: {args.epochs} epochs of {args.limit_train_batches or 'all'} batches of "
              f"{args.batch_size}, validation on {args.limit_val_batches or 'all'} batches; n = finished seeds; "
              f"± = 95 % t-interval (n − 1 dof).\n\n{tables(summary, args.label_noise)}\n")
    written = [write_csv(out / f"runs_{tag}.csv", rows), write_csv(out / f"summary_{tag}.csv", summary)]
    (out / f"results_{tag}.md").write_text(report)
    print("\n" + report)
    for path in [*written, out / f"results_{tag}.md", *figures]:
        print(f"wrote {path}")
    print(f"total {wall:.0f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
