"""The ``nonlocal-opt`` command: ``train``, ``plugins``, ``landscape``, ``geometry`` and ``compare`` (see docs/trainer.md).

Exit codes: 0 success; 1 the run diverged (non-finite loss, most steps refused, or the loss exploded), or a
worker process of ``compare --jobs`` died; 2 bad input, one line on stderr; 130 interrupted (Ctrl-C /
SIGINT; 143 for SIGTERM), after a checkpoint and with the command that resumes the run.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import attrs

from nonlocal_opt.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, PROG
from nonlocal_opt.cli.compare import add_compare_arguments, run_compare
from nonlocal_opt.cli.geometry import add_geometry_arguments, run_geometry
from nonlocal_opt.cli.landscape import add_landscape_arguments, run_landscape
from nonlocal_opt.cli.plugins import plugin_warnings_as_lines, run_plugins
from nonlocal_opt.cli.train import add_train_arguments, resume_command, run_train
from nonlocal_opt.training.config import ConfigError, TrainConfig, TrainingDiverged, TrainingInterrupted, type_problem

TRAIN_FIELDS = {field.name for field in attrs.fields(TrainConfig)}  # checked by TrainConfig.check


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump), exit code 2; help shows every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``nonlocal-opt`` parser: one subcommand per module of ``nonlocal_opt.cli``."""
    parser = OneLineParser(prog=PROG, description="Non-local optimizers (RBO, SAM, Entropy-SGD) for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a model with a composed optimizer (Accelerate)",
                                description="Train a model with a composed optimizer. Exit codes: 0 ok, 1 diverged, "
                                            "2 bad input, 130 interrupted (a checkpoint is saved; resume with --resume).")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    plugins = commands.add_parser("plugins", help="list registered rules, base optimizers, projectors and manifolds")
    plugins.set_defaults(handler=run_plugins)

    landscape = commands.add_parser("landscape", help="centre trajectories on an analytic 1-D landscape (PNG)")
    add_landscape_arguments(landscape)
    landscape.set_defaults(handler=run_landscape)

    geometry = commands.add_parser("geometry", help="RSI / error-bound / γ along a training path (CSV, PNG, TensorBoard)")
    add_geometry_arguments(geometry)
    geometry.set_defaults(handler=run_geometry)

    compare = commands.add_parser("compare", help="compare optimizers at an equal budget of forward+backward passes (JSON, PNG)")
    add_compare_arguments(compare)
    compare.set_defaults(handler=run_compare)
    return parser


def load_config_file(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser, path: str, argv: list[str]):
    """Parse ``argv`` again with the TOML file ``path`` as the defaults of ``subparser`` (flags win). The
    values of ``TrainConfig`` fields are checked by ``TrainConfig.check`` like flags; the other keys must
    have the type their flag converts to.

    Args:
        parser: the ``nonlocal-opt`` parser.
        subparser: the subcommand's parser.
        path: the ``--config`` file.
        argv: the arguments after the program name.
    """
    try:
        with Path(path).open("rb") as handle:
            values = tomllib.load(handle)
    except OSError as error:
        raise ConfigFileError(f"cannot read --config {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"--config {path} is not UTF-8 text (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"--config {path} is not valid TOML: {error}") from None
    destinations = {action.dest: action for action in subparser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = "overrides" if key == "set" else key.replace("-", "_")
        if dest not in destinations:
            flags = ", ".join(sorted(k.replace("_", "-") for k in destinations if k != "overrides"))
            raise ConfigFileError(f"--config {path}: unknown key {key!r}; keys are the flag names ({flags}) and a [set] table")
        if dest == "overrides":
            if not isinstance(value, dict):
                raise ConfigFileError(f"--config {path}: 'set' must be a table, e.g. [set] momentum = 0.9")
            value = list(value.items())
        action = destinations[dest]
        if action.choices is not None and value not in action.choices:
            raise ConfigFileError(f"--config {path}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
        if dest not in TRAIN_FIELDS:
            problem = type_problem(value, action.type if action.type in (int, float) else str)
            if problem is not None:
                raise ConfigFileError(f"--config {path}: {key} {problem}, got {value!r}")
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    return parser.parse_args(argv)


class ConfigFileError(ValueError):
    """A bad ``--config`` file."""


def end_process_group() -> None:
    """Destroy ``torch.distributed``'s default process group if a command left one (a run under torchrun):
    PyTorch's shutdown, without which gloo's threads can abort the finished process as it exits (SIGABRT)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group, and no torch import for it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run ``nonlocal-opt``; the exit code (module doc). Ctrl-C at any point, start-up included (parsing,
    imports, data loading, model build), exits 130 without a traceback. A process group the command leaves
    is destroyed before returning (:func:`end_process_group`).

    Args:
        argv: the arguments after the program name (``None``: ``sys.argv[1:]``).
    """
    code = run_command(sys.argv[1:] if argv is None else list(argv))
    end_process_group()
    return code


def run_command(argv: list[str]) -> int:
    """The exit code of the command ``argv`` (the arguments after the program name); bad input, divergence
    and interruption are reported on stderr."""
    command = None
    try:
        from nonlocal_opt.analysis.figures import MissingPlotDependency
        from nonlocal_opt.plugins.failures import PluginError

        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        if getattr(args, "config", None):
            (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            args = load_config_file(parser, commands.choices[args.command], args.config, argv)
        with plugin_warnings_as_lines(PROG):
            return args.handler(args)
    except KeyboardInterrupt:
        hint = f"; with a checkpoint in --logdir, resume with:\n  {resume_command(argv)}" if command == "train" else ""
        if command == "compare":
            hint = "; finished runs are kept in --out and the same command resumes the rest"
        print(f"\n{PROG}: interrupted without saving a checkpoint{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, ConfigFileError, MissingPlotDependency, PluginError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as error:
        print(f"{PROG}: {error}; resume with:\n  {resume_command(argv)}", file=sys.stderr)
        return 128 + error.signum
    except ValueError as error:
        if command == "train":
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if command not in ("landscape", "compare"):
            raise
        print(f"{PROG}: error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
