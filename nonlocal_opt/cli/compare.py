"""``nonlocal-opt compare``: optimizers from a spec file at an equal budget of forward+backward passes
(see docs/comparison.md). Bad input → one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

from nonlocal_opt.cli.parsing import finite_float, parse_float_list
from nonlocal_opt.comparison.quick import QUICK_SETTINGS
from nonlocal_opt.comparison.specs import AUGMENTATIONS, ComparisonConfig

DEFAULT_BUDGET = 4690


def setting_default(name: str, quick: bool) -> Any:
    """The value of comparison setting ``name`` when its flag is not given: ``QUICK_SETTINGS`` under
    ``--quick``, else ``ComparisonConfig``'s default (``DEFAULT_BUDGET`` passes for ``budget``).

    Args:
        name: a ``ComparisonConfig`` field.
        quick: whether ``--quick`` was given.
    """
    if quick and name in QUICK_SETTINGS:
        return QUICK_SETTINGS[name]
    return DEFAULT_BUDGET if name == "budget" else attrs.fields_dict(ComparisonConfig)[name].default


def _quick_default(name: str) -> str:
    """Help text for a flag ``--quick`` changes: both of its defaults."""
    show = lambda value: ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # noqa: E731
    return f"default {show(setting_default(name, False))}; {show(setting_default(name, True))} with --quick"


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
    parser.add_argument("--specs", default=None, metavar="FILE",
                        help="optimizer specs: a JSON list or TOML [[optimizers]] tables "
                             "(name, rule, base, projector, manifold, fixed, sweep, schedule); "
                             "without it, --quick runs every registered rule's comparison_specs")
    parser.add_argument("--quick", action="store_true",
                        help="a small comparison for a first look: the rules' own specs (unless --specs) on a "
                             f"{QUICK_SETTINGS['train_subset']}-image subset at {QUICK_SETTINGS['budget']} passes, one final seed")
    parser.add_argument("--out", default="runs/compare/results.json", help="results JSON (resumed when it exists with the same settings)")
    parser.add_argument("--budget", type=int, default=argparse.SUPPRESS,
                        help=f"forward+backward passes per run (B) ({_quick_default('budget')})")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, cifar100 or synthetic")
    parser.add_argument("--model", default="mlp", help="a model of nonlocal_opt.training.models (mlp, resnet6, ...)")
    parser.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    parser.add_argument("--label-noise", type=parse_float_list, default=[0.0], help="comma-separated label-noise levels, e.g. 0,0.2,0.4")
    parser.add_argument("--val-size", type=int, default=argparse.SUPPRESS,
                        help=f"validation samples held out of the (noisy) training set ({_quick_default('val_size')})")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split and of the label noise")
    parser.add_argument("--tuning-seeds", type=parse_int_list, default=[0], help="seeds of the sweep runs")
    parser.add_argument("--final-seeds", type=parse_int_list, default=argparse.SUPPRESS,
                        help=f"seeds of the final runs, disjoint from --tuning-seeds ({_quick_default('final_seeds')})")
    parser.add_argument("--fractions", type=parse_float_list, default=[0.25, 0.5, 1.0], help="budget fractions reported")
    parser.add_argument("--evals", type=int, default=argparse.SUPPRESS,
                        help=f"evaluations at B/evals, 2B/evals, ... plus 10, 20, 50, 100, ... updates ({_quick_default('evals')})")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default="none",
                        help="training batches: none, or crop-flip (a random crop of the zero-padded image and a horizontal flip)")
    parser.add_argument("--select-by", choices=("best", "final"), default="best",
                        help="tuning score: best or final validation accuracy of a run")
    parser.add_argument("--tune-at-noise", type=finite_float, default=None,
                        help="tune at this noise level only and reuse the pick at every level")
    parser.add_argument("--train-subset", type=int, default=argparse.SUPPRESS,
                        help=f"use the first N training samples only ({_quick_default('train_subset')})")
    parser.add_argument("--test-subset", type=int, default=argparse.SUPPRESS,
                        help=f"use the first N test samples only ({_quick_default('test_subset')})")
    parser.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    parser.add_argument("--plots", default=None, metavar="PREFIX", help="write PREFIX_passes.png, PREFIX_seconds.png, PREFIX_updates.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (of each run, with --jobs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process; the records are the same as with 1, "
                             "the seconds of each run see the others")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_compare(args) -> int:
    """Run or resume the comparison, print the summary table per noise level; 0 also when runs diverged
    (they are recorded as diverged), 1 when a worker process of ``--jobs`` died.

    Args:
        args: the parsed ``compare`` arguments.
    """
    from nonlocal_opt.comparison import load_specs, run_comparison, summarize
    from nonlocal_opt.comparison.curves import markdown_table
    from nonlocal_opt.comparison.quick import quick_specs
    from nonlocal_opt.comparison.workers import WorkerDied

    for flag in ("threads", "jobs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.specs is None and not args.quick:
        raise ValueError("compare needs --specs FILE (the optimizers to compare), or --quick for the registered rules' own specs")
    specs = load_specs(args.specs) if args.specs is not None else quick_specs()
    chosen = {name: getattr(args, name, setting_default(name, args.quick))
              for name in ("budget", "val_size", "final_seeds", "evals", "train_subset", "test_subset")}
    config = ComparisonConfig(
        dataset=args.dataset, model=args.model, batch_size=args.batch_size, label_noise=tuple(args.label_noise),
        split_seed=args.split_seed, tuning_seeds=tuple(args.tuning_seeds), fractions=tuple(args.fractions),
        select_by=args.select_by, tune_at_noise=args.tune_at_noise, data_dir=args.data_dir, augment=args.augment,
        **chosen | {"final_seeds": tuple(chosen["final_seeds"])},
    )
    from nonlocal_opt.training.models import MODELS

    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; available: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    try:
        store = run_comparison(config, specs, Path(args.out), progress=not args.no_progress, jobs=args.jobs,
                               threads=args.threads)
    except WorkerDied as error:
        print(f"nonlocal-opt compare: {error}", file=sys.stderr)
        return 1
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
