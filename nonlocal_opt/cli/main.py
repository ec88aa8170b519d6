"""The ``nonlocal-opt`` command: ``train``, ``plugins``, ``landscape``, ``geometry`` and ``compare`` (see docs/trainer.md).

Exit codes: 0 success; 1 the run diverged (non-finite loss, most steps refused, or the loss exploded);
2 bad input, one line on stderr; 130 interrupted (Ctrl-C / SIGINT; 143 for SIGTERM), after a checkpoint
and with the command that resumes the run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tomllib
from pathlib import Path

import torch

from nonlocal_opt.cli.compare import add_compare_arguments, run_compare
from nonlocal_opt.cli.geometry import add_geometry_arguments, run_geometry
from nonlocal_opt.cli.parsing import (
    add_base_argument,
    add_composition_arguments,
    add_radius_schedule_arguments,
    add_run_arguments,
    add_set_argument,
    parse_float_list,
)
from nonlocal_opt.training.config import MIXED_PRECISION

PROG = "nonlocal-opt"
EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump), exit code 2; help shows every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Non-local optimizers (RBO, SAM, Entropy-SGD) for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a model with a composed optimizer (Accelerate)",
                                description="Train a model with a composed optimizer. Exit codes: 0 ok, 1 diverged, "
                                            "2 bad input, 130 interrupted (a checkpoint is saved; resume with --resume).")
    add_run_arguments(train)
    add_composition_arguments(train, rule="entropy-sgd")
    train.add_argument("--logdir", default="runs/default", help="TensorBoard events, metrics.csv, checkpoints (one run per dir)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --logdir (its metrics, checkpoints, events)")
    train.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION, help="no, bf16 autocast, or fp16 with loss scaling")
    train.add_argument("--label-noise", type=float, default=0.0, help="symmetric label noise probability P")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue the run in --logdir from its newest complete checkpoint (or the given checkpoint directory)")
    train.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                       help="when stdout is not a terminal: a progress line at most every SECONDS (0: every step)")
    add_radius_schedule_arguments(train)
    train.set_defaults(handler=run_train)

    plugins = commands.add_parser("plugins", help="list registered rules, base optimizers, projectors and manifolds")
    plugins.set_defaults(handler=run_plugins)

    landscape = commands.add_parser("landscape", help="centre trajectories on an analytic 1-D landscape (PNG)")
    landscape.add_argument("--landscape", default="riemann", help="a 1-D analytic landscape (riemann, sine, ...)")
    landscape.add_argument("--optimizer", default="rbo", help="a registered rule")
    add_base_argument(landscape)
    landscape.add_argument("--projector", default=None, help="a registered projector (default: the rule's)")
    landscape.add_argument("--rho", type=parse_float_list, default=[0.1, 0.5, 1.0], help="comma-separated radii")
    landscape.add_argument("--lr", type=float, default=0.005, help="learning rate of the base")
    landscape.add_argument("--steps", type=int, default=60, help="optimizer steps per radius")
    landscape.add_argument("--start", type=float, default=1.0, help="initial θ")
    add_set_argument(landscape)
    landscape.add_argument("--out", default="landscape.png", help="the PNG to write")
    landscape.set_defaults(handler=run_landscape)

    geometry = commands.add_parser("geometry", help="RSI / error-bound / γ along a training path (CSV, PNG, TensorBoard)")
    add_geometry_arguments(geometry)
    geometry.set_defaults(handler=run_geometry)

    compare = commands.add_parser("compare", help="compare optimizers at an equal budget of forward+backward passes (JSON, PNG)")
    add_compare_arguments(compare)
    compare.set_defaults(handler=run_compare)
    return parser


def run_train(args) -> int:
    """Train; the trainer prints a summary line. 1 when the run diverged (most steps refused, loss exploded)."""
    from nonlocal_opt.training import TrainConfig, train

    result = train(TrainConfig.from_namespace(args))
    if result.diverged:
        print(f"{PROG}: the run diverged: {result.diverged}; see the warnings above", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run ``argv`` started: ``--overwrite`` and any ``--resume [DIR]``
    dropped, ``--resume`` added (the newest checkpoint in its log dir)."""
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


def load_config_file(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser, path: str, argv: list[str]):
    """Parse ``argv`` again with the TOML file ``path`` as the defaults of ``subparser`` (flags win)."""
    try:
        with Path(path).open("rb") as handle:
            values = tomllib.load(handle)
    except OSError as error:
        raise ConfigFileError(f"cannot read --config {path}: {error.strerror}") from None
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
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    return parser.parse_args(argv)


class ConfigFileError(ValueError):
    """A bad ``--config`` file."""


def run_plugins(args) -> int:
    import inspect

    from nonlocal_opt.optim.composed import OPTIMIZER_HYPERPARAMETERS
    from nonlocal_opt.plugins.registry import registrations

    def describe(specs) -> None:
        for key, spec in specs.items():
            print(f"      {key} = {spec.default!r}  [{spec.symbol}] {spec.doc}")

    def describe_base(cls) -> None:
        keywords = [f"{key}={p.default!r}" for key, p in inspect.signature(cls).parameters.items() if p.default is not p.empty]
        print(f"      {', '.join(keywords)}")

    print("optimizer (every composition)")
    describe(OPTIMIZER_HYPERPARAMETERS)
    for kind in ("rule", "base", "projector", "manifold"):
        print(f"{kind}s")
        for name, entry in sorted(registrations(kind).items()):
            print(f"  {name}  — {entry.provider}")
            if kind == "base":
                describe_base(entry.cls)
                continue
            if kind == "rule" and entry.cls.manifolds:
                rule = entry.cls
                print(f"    manifold {rule.default_manifold}, projector {rule.default_projector} "
                      f"(nonlocal-opt train: {rule.training_projector or rule.default_projector})")
            describe(entry.cls.hyperparameters)
            for preset, values in entry.cls.presets.items():
                print(f"    preset {preset}: {', '.join(f'{k}={v!r}' for k, v in values.items())}")
    return 0


def run_landscape(args) -> int:
    from nonlocal_opt.analysis.figures import Trajectory, plot_landscape_trajectories
    from nonlocal_opt.landscapes import LANDSCAPES, offset_function
    from nonlocal_opt.optim.interfaces import Centre
    from nonlocal_opt.plugins.compose import compose

    if args.landscape not in LANDSCAPES:
        raise ValueError(f"unknown landscape {args.landscape!r}; available: {', '.join(LANDSCAPES)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    runs = []
    for rho in args.rho:
        surface = LANDSCAPES[args.landscape]().double()
        if surface.dim != 1:
            raise ValueError(f"landscape {args.landscape!r} is {surface.dim}-D; this command plots 1-D landscapes")
        surface.theta.data.fill_(args.start)
        hyperparameters = {"lr": args.lr, "rho": rho, **dict(args.overrides)}
        opt = compose(surface.parameters(), args.optimizer, base=args.base, projector=args.projector,
                      **{**hyperparameters, "record_projection": True})

        def closure(opt=opt, surface=surface):
            opt.zero_grad()
            loss = surface()
            loss.backward()
            return loss

        centres = []
        for _ in range(args.steps + 1):
            # c_t: the centre the step moved from; the contact point (θ_t, f(θ_t)) for rules that do not project
            contact = Centre(surface.theta.detach().clone(), opt.step(closure).detach())
            record = opt.last_projection
            centre = record.centre if record is not None and record.centre is not None else contact
            centres.append((float(centre.theta), float(centre.height)))
        thetas, heights = torch.tensor(centres, dtype=torch.float64).T
        runs.append((rho, surface, thetas, heights))
    low = min(float(t.min()) for *_, t, _ in runs) - max(args.rho)
    high = max(float(t.max()) for *_, t, _ in runs) + max(args.rho)
    grid = torch.linspace(low, high, 4001, dtype=torch.float64)
    values = runs[0][1].value(grid.unsqueeze(-1))
    trajectories = [
        Trajectory(f"ρ = {rho:g}", thetas, heights, offset_function(surface.value, rho, grid.unsqueeze(-1)))
        for rho, surface, thetas, heights in runs
    ]
    title = f"{args.optimizer} on {args.landscape}: centre trajectories ({args.steps} steps, lr {args.lr:g}); dashed: f_ρ"
    path = plot_landscape_trajectories(grid, values, trajectories, args.out, title)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from nonlocal_opt.analysis.figures import MissingPlotDependency
    from nonlocal_opt.training import ConfigError, TrainingDiverged
    from nonlocal_opt.training.config import TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            args = load_config_file(parser, commands.choices[args.command], args.config, argv)
        return args.handler(args)
    except (ConfigError, ConfigFileError, MissingPlotDependency) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as error:
        print(f"{PROG}: {error}; resume with:\n  {resume_command(argv)}", file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:
        hint = f"; with a checkpoint in --logdir, resume with:\n  {resume_command(argv)}" if args.command == "train" else ""
        if args.command == "compare":
            hint = "; finished runs are kept in --out and the same command resumes the rest"
        print(f"\n{PROG}: interrupted without saving a checkpoint{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as error:
        if args.command == "train":
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if args.command not in ("landscape", "compare"):
            raise
        print(f"{PROG}: error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
