"""``nonlocal-opt geometry`` and the ``--rho-schedule`` options, as functions the CLI wires in.

``nonlocal-opt geometry --dataset … --model … --optimizer … --epochs N --out DIR`` runs the two
identical runs of :func:`nonlocal_opt.analysis.path_geometry.measure_path_geometry` and writes
``DIR/path_geometry.csv`` (``step,epoch,rsi,eb,gamma,lolr``), TensorBoard scalars under
``DIR/tensorboard`` (``geometry/*``, ``train/loss``, ``lr``, ``rho``), ``DIR/path_geometry.png`` and
``DIR/summary.json`` (:func:`nonlocal_opt.analysis.path_geometry.summarize`, replay error, final loss).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from nonlocal_opt.analysis.path_geometry import measure_path_geometry, plot_path_geometry, seeded_loader, summarize, write_csv
from nonlocal_opt.cli.parsing import add_set_argument
from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.optim.radius_schedules import SCHEDULES, build_radius_scheduler
from nonlocal_opt.training.closure import BatchClosure, LossScale
from nonlocal_opt.training.config import TrainConfig, optimizer_hyperparameters
from nonlocal_opt.training.trainer import FRESH_SEED_OFFSET, build_data_and_model, cycle


def add_radius_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rho-schedule {none,cosine,linear,step} --rho-final RHO [--couple-lr]``."""
    group = parser.add_argument_group("radius schedule")
    group.add_argument("--rho-schedule", choices=("none", *SCHEDULES), default="none",
                       help="decay rho from its initial value to --rho-final over the run (default: none)")
    group.add_argument("--rho-final", type=float, default=0.1, help="radius at the end of the schedule (default 0.1)")
    group.add_argument("--couple-lr", action="store_true", help="scale lr with the radius: lr_t = lr_0 rho_t/rho_0")


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocal-opt geometry`` (includes :func:`add_radius_schedule_arguments`)."""
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, cifar100 or landscape:NAME")
    parser.add_argument("--model", default=None, help="mlp, logreg, resnet6, resnet8, vgg9 (default mlp)")
    parser.add_argument("--optimizer", default="sgd", help="a registered rule: sgd, rbo, sam, entropy-sgd, …")
    parser.add_argument("--projector", default=None, help="projector for rbo (default: the rule's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's setting)")
    parser.add_argument("--rho", type=float, default=None, help="radius for rbo / sam (default: the paper's setting)")
    add_set_argument(parser)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="steps per epoch at most")
    parser.add_argument("--gradient-pass", type=int, default=0,
                        help="which closure pass of a step gives G_t (0: the gradient at w_t; 1: e.g. SAM's perturbed gradient)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--out", required=True, help="output directory")
    add_radius_schedule_arguments(parser)


def _config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_namespace(args)
    config.check()
    if args.train_subset is not None and args.train_subset < args.batch_size:
        raise ValueError(f"--train-subset must be >= --batch-size ({args.batch_size}), got {args.train_subset}")
    if args.gradient_pass < 0:
        raise ValueError(f"--gradient-pass must be >= 0, got {args.gradient_pass}")
    return config


def run_geometry(args: argparse.Namespace) -> int:
    """Run ``nonlocal-opt geometry``; 0 on success, 2 (one line on stderr) for bad input."""
    try:
        config = _config(args)
        hyperparameters = optimizer_hyperparameters(config)
        torch.manual_seed(config.seed)  # the initialisation w_0 depends on --seed only
        train_set, _, model0, per_sample_loss, count_correct = build_data_and_model(config)
        probe = compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, projector=config.projector, **hyperparameters)
        build_radius_scheduler(args, probe, 1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as error:
        print(f"nonlocal-opt geometry: error: {error}", file=sys.stderr)
        return 2
    if args.train_subset is not None:
        train_set = Subset(train_set, range(min(args.train_subset, len(train_set))))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    log: list[dict[str, float]] = []  # per step of the latest run: first-pass loss, lr, rho

    def train(tracker) -> None:
        torch.manual_seed(config.seed)
        model = copy.deepcopy(model0).train()
        optimizer = compose(model.parameters(), config.optimizer, projector=config.projector, **hyperparameters)
        loader = seeded_loader(train_set, config.batch_size, config.seed, drop_last=True)
        fresh_loader = seeded_loader(train_set, config.batch_size, config.seed, drop_last=True)
        fresh = cycle(fresh_loader, fresh_loader.sampler.generator, config.seed + FRESH_SEED_OFFSET)
        steps_per_epoch = min(len(loader), config.limit_train_batches or len(loader))
        scheduler = build_radius_scheduler(args, optimizer, steps_per_epoch * config.epochs)
        closure = BatchClosure(accelerator, model, per_sample_loss, count_correct, fresh, LossScale(False))
        log.clear()
        for epoch in range(config.epochs):
            for _, batch in zip(range(steps_per_epoch), loader):
                closure.start(batch)
                group = optimizer.param_groups[0]
                values = {key: float(group[key]) for key in ("lr", "rho") if key in group}
                tracker.step(optimizer, closure, epoch)
                log.append({"train/loss": float(closure.first_loss), **values})
                if scheduler is not None:
                    scheduler.step()

    result = measure_path_geometry(train, pass_index=args.gradient_pass)
    write_csv(result.rows, out / "path_geometry.csv")
    _write_tensorboard(result.rows, log, out / "tensorboard")
    try:
        plot_path_geometry(result.rows, out / "path_geometry.png", f"{config.optimizer} on {config.dataset}")
    except ImportError as error:
        print(f"nonlocal-opt geometry: no PNG written ({error})", file=sys.stderr)
    stats = summarize(result.rows)
    summary = {**stats, "replay_error": result.replay_error, "final_loss": log[-1]["train/loss"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(result.rows)} steps, replay error {result.replay_error:.3g} (0 = bit-identical runs), "
          f"gamma > 0 on {stats['frac_gamma_positive']:.1%} of steps, median gamma {stats['gamma_median']:.4g}, "
          f"final loss {log[-1]['train/loss']:.4g}; wrote {out / 'path_geometry.csv'}")
    return 0


def _write_tensorboard(rows, log: list[dict[str, float]], logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for row, values in zip(rows, log):
            for key in ("rsi", "eb", "gamma", "lolr"):
                writer.add_scalar(f"geometry/{key}", getattr(row, key), row.step)
            for key, value in values.items():
                writer.add_scalar(key, value, row.step)
