"""``nonlocal-opt geometry``: the trainer's run, twice, stepped through a path tracker.

``nonlocal-opt geometry --dataset … --model … --optimizer … --epochs N --out DIR`` runs
:func:`nonlocal_opt.training.trainer.train` twice with ``step=PathTracker.step`` (logdirs ``DIR/run1``
and ``DIR/run2``), as :func:`nonlocal_opt.analysis.path_geometry.measure_path_geometry` asks: the first
run gives ``w* = w_T``, the second records ``RSI_t``, ``EB_t``, ``γ_t`` and ``lolr_t``. It writes
``DIR/path_geometry.csv`` (``step,epoch,rsi,eb,gamma,lolr``), TensorBoard scalars under
``DIR/tensorboard`` (``geometry/*`` and the second run's ``train/loss``, ``lr``, ``rho`` per step),
``DIR/path_geometry.png`` and ``DIR/summary.json`` (:func:`nonlocal_opt.analysis.path_geometry.summarize`,
replay error, final loss, last epoch's metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import attrs

from nonlocal_opt.analysis.path_geometry import GeometryRow, measure_path_geometry, plot_path_geometry, summarize, write_csv
from nonlocal_opt.cli.parsing import add_composition_arguments, add_radius_schedule_arguments, add_run_arguments
from nonlocal_opt.training.config import ConfigError, TrainConfig, check_run_settings
from nonlocal_opt.training.logdir import discard_unused, new_dirs, writable_logdir
from nonlocal_opt.training.metrics import read_metrics
from nonlocal_opt.training.trainer import TrainResult, train

LOGGED = ("train/loss", "lr", "rho")  # per-step scalars of the second run copied next to the geometry


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocal-opt geometry``: those of a training run (``TrainConfig``'s defaults),
    ``--gradient-pass K`` and ``--out DIR``.

    Args:
        parser: the ``geometry`` subcommand's parser.
    """
    add_run_arguments(parser)
    add_composition_arguments(parser)
    parser.add_argument("--gradient-pass", type=int, default=0,
                        help="which closure pass of a step gives G_t (0: the gradient at w_t; 1: e.g. SAM's perturbed gradient)")
    parser.add_argument("--out", required=True, help="output directory")
    add_radius_schedule_arguments(parser)


def run_geometry(args: argparse.Namespace) -> int:
    """Run ``nonlocal-opt geometry``; 0 on success. Bad input raises ``ConfigError`` (a ``ValueError``).

    Args:
        args: the parsed ``geometry`` arguments.
    """
    if args.gradient_pass < 0:
        raise ConfigError(f"--gradient-pass must be >= 0, got {args.gradient_pass}")
    config = TrainConfig.from_namespace(args)
    check_run_settings(config)  # before --out is created
    created = new_dirs(args.out)
    out = writable_logdir(args.out)
    runs: list[TrainResult] = []

    def run(tracker) -> None:
        logdir = out / f"run{len(runs) + 1}"
        shutil.rmtree(logdir, ignore_errors=True)  # metrics.csv of an earlier invocation would be appended to
        runs.append(train(attrs.evolve(config, logdir=str(logdir), overwrite=True), step=tracker.step))

    try:
        result = measure_path_geometry(run, pass_index=args.gradient_pass)
    except BaseException:
        discard_unused(out, created)  # a first run that failed to start leaves --out as it found it
        raise
    log = [row for row in read_metrics(out / "run2" / "metrics.csv") if row["scope"] == "step"]
    write_csv(result.rows, out / "path_geometry.csv")
    _write_tensorboard(result.rows, log, out / "tensorboard")
    try:
        plot_path_geometry(result.rows, out / "path_geometry.png", f"{config.optimizer} on {config.dataset}")
    except ImportError as error:
        print(f"nonlocal-opt geometry: no PNG written ({error})", file=sys.stderr)
    stats = summarize(result.rows)
    final_loss = float(log[-1]["train/loss"])
    summary = {**stats, "replay_error": result.replay_error, "final_loss": final_loss, "last_epoch": runs[-1].epochs[-1]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(result.rows)} steps, replay error {result.replay_error:.3g} (0 = bit-identical runs), "
          f"gamma > 0 on {stats['frac_gamma_positive']:.1%} of steps, median gamma {stats['gamma_median']:.4g}, "
          f"final loss {final_loss:.4g}; wrote {out / 'path_geometry.csv'}")
    return 0


def _write_tensorboard(rows: list[GeometryRow], log: list[dict[str, str]], logdir: Path) -> None:
    """``geometry/*`` of each row and the ``LOGGED`` scalars of the same step (``metrics.csv`` row ``t + 1``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for row, values in zip(rows, log, strict=True):
            for key in ("rsi", "eb", "gamma", "lolr"):
                writer.add_scalar(f"geometry/{key}", getattr(row, key), row.step)
            for key in LOGGED:
                if values.get(key):
                    writer.add_scalar(key, float(values[key]), row.step)
