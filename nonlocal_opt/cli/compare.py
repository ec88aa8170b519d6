"""``nonlocal-opt compare``: optimizers from a spec file at an equal budget of forward+backward passes
(see docs/comparison.md). Bad input → one line, exit code 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nonlocal_opt.cli.parsing import finite_float, parse_float_list


def parse_int_list(text: str) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]``.

    Args:
        text: comma-separated integers.
    """
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocal-opt compare``.

    Args:
        parser: the ``compare`` subcommand's parser.
    """
    parser.add_argument("--specs", required=True, metavar="FILE",
                        help="optimizer specs: a JSON list or TOML [[optimizers]] tables "
                             "(name, rule, base, projector, manifold, fixed, sweep, schedule)")
    parser.add_argument("--out", default="runs/compare/results.json", help="results JSON (resumed when it exists with the same settings)")
    parser.add_argument("--budget", type=int, default=4690, help="forward+backward passes per run (B)")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, cifar100 or synthetic")
    parser.add_argument("--model", default="mlp", help="a model of nonlocal_opt.training.models (mlp, resnet6, ...)")
    parser.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    parser.add_argument("--label-noise", type=parse_float_list, default=[0.0], help="comma-separated label-noise levels, e.g. 0,0.2,0.4")
    parser.add_argument("--val-size", type=int, default=5000, help="validation samples held out of the (noisy) training set")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split and of the label noise")
    parser.add_argument("--tuning-seeds", type=parse_int_list, default=[0], help="seeds of the sweep runs")
    parser.add_argument("--final-seeds", type=parse_int_list, default=[1, 2, 3],
                        help="seeds of the final runs (disjoint from --tuning-seeds)")
    parser.add_argument("--fractions", type=parse_float_list, default=[0.25, 0.5, 1.0], help="budget fractions reported")
    parser.add_argument("--evals", type=int, default=20, help="evaluations at B/evals, 2B/evals, ... (plus 10, 20, 50, 100, ... updates)")
    parser.add_argument("--select-by", choices=("best", "final"), default="best",
                        help="tuning score: best or final validation accuracy of a run")
    parser.add_argument("--tune-at-noise", type=finite_float, default=None,
                        help="tune at this noise level only and reuse the pick at every level")
    parser.add_argument("--train-subset", type=int, default=None, help="use the first N training samples only")
    parser.add_argument("--test-subset", type=int, default=None, help="use the first N test samples only")
    parser.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    parser.add_argument("--plots", default=None, metavar="PREFIX", help="write PREFIX_passes.png, PREFIX_seconds.png, PREFIX_updates.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_compare(args) -> int:
    """Run or resume the comparison, print the summary table per noise level; 0 also when runs diverged
    (they are recorded as diverged).

    Args:
        args: the parsed ``compare`` arguments.
    """
    from nonlocal_opt.comparison import ComparisonConfig, load_specs, run_comparison, summarize
    from nonlocal_opt.comparison.curves import markdown_table

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    specs = load_specs(args.specs)
    config = ComparisonConfig(
        budget=args.budget, dataset=args.dataset, model=args.model, batch_size=args.batch_size,
        label_noise=tuple(args.label_noise), val_size=args.val_size, split_seed=args.split_seed,
        tuning_seeds=tuple(args.tuning_seeds), final_seeds=tuple(args.final_seeds), fractions=tuple(args.fractions),
        evals=args.evals, select_by=args.select_by, tune_at_noise=args.tune_at_noise, train_subset=args.train_subset,
        test_subset=args.test_subset, data_dir=args.data_dir,
    )
    from nonlocal_opt.training.models import MODELS

    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; available: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    store = run_comparison(config, specs, Path(args.out), progress=not args.no_progress)
    summary = summarize(json.loads(Path(args.out).read_text()))
    for noise in config.label_noise:
        level = summary[repr(noise)]
        print(f"\nlabel noise {noise:g}: budget {config.budget} passes; Pareto front (passes): "
              f"{', '.join(level['pareto']['passes'])}; (seconds): {', '.join(level['pareto']['seconds'])}")
        print(markdown_table(summary, noise))
    diverged = sum(bool(r["diverged"]) for r in store.runs.values())
    if diverged:
        print(f"\n{diverged} run(s) diverged (recorded as diverged in {args.out})")
    print(f"wrote {args.out}")
    if args.plots:
        from nonlocal_opt.comparison.plots import plot_summary

        for path in plot_summary(summary, args.plots, f"{config.model}, {config.dataset}, budget {config.budget} passes"):
            print(f"wrote {path}")
    return 0
