"""``nonlocal-opt train``: one run of ``nonlocal_opt.training.train`` from flags whose defaults are
``TrainConfig``'s (docs/trainer.md)."""

from __future__ import annotations

import argparse
import shlex
import sys

from nonlocal_opt.cli import EXIT_DIVERGED, EXIT_OK, PROG
from nonlocal_opt.cli.parsing import DEFAULTS, add_composition_arguments, add_radius_schedule_arguments, add_run_arguments
from nonlocal_opt.training.config import MIXED_PRECISION


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocal-opt train``: one flag per ``TrainConfig`` field, with its default.

    Args:
        parser: the ``train`` subcommand's parser.
    """
    add_run_arguments(parser)
    add_composition_arguments(parser)
    parser.add_argument("--logdir", default=DEFAULTS.logdir, help="TensorBoard events, metrics.csv, checkpoints (one run per dir)")
    parser.add_argument("--overwrite", action="store_true", default=DEFAULTS.overwrite,
                        help="replace the run already in --logdir (its metrics, checkpoints, events)")
    parser.add_argument("--mixed-precision", default=DEFAULTS.mixed_precision, choices=MIXED_PRECISION,
                        help="no, bf16 autocast, or fp16 with loss scaling")
    parser.add_argument("--label-noise", type=float, default=DEFAULTS.label_noise, help="symmetric label noise probability P")
    parser.add_argument("--resume", nargs="?", const="latest", default=DEFAULTS.resume, metavar="CHECKPOINT",
                        help="continue the run in --logdir from its newest complete checkpoint (or the given checkpoint directory)")
    parser.add_argument("--progress-every", type=float, default=DEFAULTS.progress_every, metavar="SECONDS",
                        help="when stdout is not a terminal: a progress line at most every SECONDS (0: every step)")
    add_radius_schedule_arguments(parser)


def run_train(args: argparse.Namespace) -> int:
    """Train; the trainer prints a summary line. 1 when the run diverged (most steps refused, loss exploded).

    Args:
        args: the parsed ``train`` arguments.
    """
    from nonlocal_opt.training import TrainConfig, train

    result = train(TrainConfig.from_namespace(args))
    if result.diverged:
        print(f"{PROG}: the run diverged: {result.diverged}; see the warnings above", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run ``argv`` started: ``--overwrite`` and any ``--resume [DIR]``
    dropped, ``--resume`` added (the newest checkpoint in its log dir).

    Args:
        argv: the arguments after the program name.
    """
    kept, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--resume":
            index += 2 if index + 1 < len(argv) and not argv[index + 1].startswith("-") else 1
            continue
        if token != "--overwrite" and not token.startswith("--resume="):
            kept.append(token)
        index += 1
    return shlex.join([PROG, *kept, "--resume"])
