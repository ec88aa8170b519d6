"""Arguments shared by the ``nonlocal-opt`` subcommands: the training run (data, model, epochs), the
composition (rule, base, projector, preset, ``--set key=value``), the radius schedule, number lists."""

from __future__ import annotations

import argparse
import math
from typing import Any

from nonlocal_opt.optim.radius_schedules import SCHEDULES
from nonlocal_opt.plugins.compose import DEFAULT_BASE
from nonlocal_opt.training.config import DEVICES, NO_PRESET, RHO_FINAL_FRACTION, TrainConfig
from nonlocal_opt.training.data import DATASETS
from nonlocal_opt.training.models import MODELS

DEFAULTS = TrainConfig()  # every flag that sets a TrainConfig field takes its default from here


def parse_value(text: str) -> Any:
    """``--set`` values: ``None``, booleans, ints, floats, else the string itself; comma-separated values
    (``betas=0.9,0.999``, ``refresh_c=-1,1``) are a tuple of such values.

    Args:
        text: the value as typed.
    """
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, parse_value(value))``.

    Args:
        text: one ``--set`` argument.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value (e.g. --set max_iters=10), got {text!r}")
    return key.strip(), parse_value(value)


def finite_float(text: str) -> float:
    """A flag's number, refused (one line, exit 2) when it is not a finite number (``nan``, ``inf``).

    Args:
        text: the value as typed.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A flag's number, refused (one line, exit 2) unless finite and ``>= 0`` (a learning rate).

    Args:
        text: the value as typed.
    """
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def parse_float_list(text: str) -> list[float]:
    """``"0.1,0.5,1"`` → ``[0.1, 0.5, 1.0]``; ``nan`` and ``inf`` are refused.

    Args:
        text: comma-separated numbers.
    """
    try:
        return [finite_float(item) for item in text.split(",") if item.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.5,1 (finite: no nan or inf), "
                                         f"got {text!r}") from None


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) collected as ``args.overrides``, a list of pairs.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--set", dest="overrides", action="append", type=parse_assignment, default=list(DEFAULTS.overrides.items()),
                        metavar="KEY=VALUE",
                        help="any hyperparameter of the rule, projector, manifold or base, e.g. --set max_iters=10 (repeatable)")


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    """``--base NAME``: the base optimizer the rule's direction is handed to.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--base", default=DEFAULTS.base,
                        help=f"a registered base optimizer: sgd, adamw, … (None: the one --optimizer names, else {DEFAULT_BASE})")


def add_composition_arguments(parser: argparse.ArgumentParser, rule: str = DEFAULTS.optimizer) -> None:
    """``--optimizer RULE --base NAME --projector NAME --preset NAME --lr η --rho ρ --set KEY=VALUE``
    with ``TrainConfig``'s defaults.

    Args:
        parser: the subcommand's parser.
        rule: the default of ``--optimizer``.
    """
    parser.add_argument("--optimizer", default=rule,
                        help="a registered rule, or a base optimizer run as it is, e.g. adamw (`nonlocal-opt plugins` lists both)")
    add_base_argument(parser)
    parser.add_argument("--projector", default=DEFAULTS.projector,
                        help="a registered projector, for rules that project (None: the rule's default_projector, "
                             "which `nonlocal-opt plugins` lists)")
    parser.add_argument("--preset", default=DEFAULTS.preset,
                        help=f"named settings of the rule and projector (e.g. paper); {NO_PRESET}: every component's own defaults, "
                             "as from Python")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr,
                        help="learning rate η of the base (None: the preset's, else the base's own)")
    parser.add_argument("--rho", type=float, default=DEFAULTS.rho,
                        help="radius ρ for rules that have one (None: the preset's, else the rule's own)")
    add_set_argument(parser)


def add_radius_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rho-schedule {none,cosine,linear,step} --rho-final RHO [--couple-lr]``, defaults from ``TrainConfig``.

    Args:
        parser: the subcommand's parser.
    """
    group = parser.add_argument_group("radius schedule")
    group.add_argument("--rho-schedule", choices=("none", *SCHEDULES), default=DEFAULTS.rho_schedule,
                       help="decay rho from its initial value to --rho-final over the run")
    group.add_argument("--rho-final", type=float, default=DEFAULTS.rho_final,
                       help=f"radius at the end of the schedule, at most the initial rho (None: {RHO_FINAL_FRACTION:g} x the initial rho)")
    group.add_argument("--couple-lr", action="store_true", default=DEFAULTS.couple_lr,
                       help="scale lr with the radius: lr_t = lr_0 rho_t/rho_0")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``TrainConfig`` fields ``train`` and ``geometry`` share: data, model, epochs, batches, seed.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="read flags from a TOML file (keys: flag names, e.g. epochs = 3, a [set] table); flags given override it")
    parser.add_argument("--dataset", default=DEFAULTS.dataset, help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--model", default=DEFAULTS.model, help=f"one of: {', '.join(MODELS)} (None: mlp; a landscape is its own model)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                        help="epochs to train (with --resume: the total, including those done)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="global (micro-)batch size, split over processes; a step takes --grad-accum of them")
    parser.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum, metavar="N",
                        help="micro-batches per optimizer step: every pass of the rule sees all N (N x --batch-size samples)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initialisation and batch order, an integer in [0, 2**32 - 1]")
    parser.add_argument("--train-subset", type=int, default=DEFAULTS.train_subset, help="train on the first N training samples only")
    parser.add_argument("--limit-train-batches", type=int, default=DEFAULTS.limit_train_batches, help="steps per epoch at most")
    parser.add_argument("--limit-val-batches", type=int, default=DEFAULTS.limit_val_batches, help="validation batches per epoch at most")
    parser.add_argument("--data-dir", default=DEFAULTS.data_dir, help="directory holding the dataset files")
    parser.add_argument("--download", action="store_true", default=DEFAULTS.download,
                        help="let torchvision download MNIST/CIFAR")
    parser.add_argument("--device", default=DEFAULTS.device, choices=DEVICES, help="auto: CUDA when present, else CPU")
    parser.add_argument("--compile", action="store_true", default=DEFAULTS.compile,
                        help="torch.compile the model's forward (BatchNorm running statistics stay frozen in extra passes)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=DEFAULTS.sync_bn,
                        help="BatchNorm batch statistics over all processes, so results do not depend on the process count "
                             "(None: on in multi-process runs)")
