"""The ``nonlocal-opt`` command: ``train``, ``plugins`` and ``landscape`` (see docs/trainer.md).

Bad input exits with code 2 and one line on stderr; a diverged run exits with code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from nonlocal_opt.data import DATASETS
from nonlocal_opt.models import MODELS

PROG = "nonlocal-opt"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message}\n")


def parse_value(text: str) -> Any:
    """``--set`` values: ``None``, booleans, ints, floats, else the string itself."""
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
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value (e.g. --set max_iters=10), got {text!r}")
    return key.strip(), parse_value(value)


def parse_float_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.5,1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Non-local optimizers (RBO, SAM, Entropy-SGD) for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a model with a composed optimizer (Accelerate)")
    train.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)}")
    train.add_argument("--model", default=None, help=f"one of: {', '.join(MODELS)} (default mlp)")
    train.add_argument("--optimizer", default="rbo", help="a registered rule (see `nonlocal-opt plugins`)")
    train.add_argument("--projector", default=None, help="a registered projector (default: the rule's)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the RBO paper's setting)")
    train.add_argument("--rho", type=float, default=None, help="radius ρ for rules/manifolds that have one")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=128, help="global batch size (split over processes)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--logdir", default="runs/default", help="TensorBoard events, metrics.csv, checkpoints")
    train.add_argument("--set", dest="overrides", action="append", type=parse_assignment, default=[],
                       metavar="KEY=VALUE", help="any rule/projector/manifold hyperparameter (repeatable)")
    train.add_argument("--limit-train-batches", type=int, default=None)
    train.add_argument("--limit-val-batches", type=int, default=None)
    train.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    train.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    train.add_argument("--download", action="store_true", help="let torchvision download MNIST/CIFAR")
    train.add_argument("--label-noise", type=float, default=0.0, help="symmetric label noise probability P")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from LOGDIR's latest checkpoint (or the given checkpoint directory)")
    train.set_defaults(handler=run_train)

    plugins = commands.add_parser("plugins", help="list registered rules, projectors and manifolds")
    plugins.set_defaults(handler=run_plugins)

    landscape = commands.add_parser("landscape", help="centre trajectories on an analytic 1-D landscape (PNG)")
    landscape.add_argument("--landscape", default="riemann")
    landscape.add_argument("--optimizer", default="rbo")
    landscape.add_argument("--projector", default=None)
    landscape.add_argument("--rho", type=parse_float_list, default=[0.1, 0.5, 1.0], help="comma-separated radii")
    landscape.add_argument("--lr", type=float, default=0.005)
    landscape.add_argument("--steps", type=int, default=60)
    landscape.add_argument("--start", type=float, default=1.0, help="initial θ")
    landscape.add_argument("--set", dest="overrides", action="append", type=parse_assignment, default=[],
                           metavar="KEY=VALUE")
    landscape.add_argument("--out", default="landscape.png")
    landscape.set_defaults(handler=run_landscape)
    return parser


def run_train(args) -> int:
    from nonlocal_opt.training import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset, model=args.model, optimizer=args.optimizer, projector=args.projector, lr=args.lr,
        rho=args.rho, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, logdir=args.logdir,
        overrides=dict(args.overrides), limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches, mixed_precision=args.mixed_precision, data_dir=args.data_dir,
        download=args.download, label_noise=args.label_noise, resume=args.resume,
    )
    result = train(config)
    if result.epochs:
        print(f"finished: {', '.join(f'{k} {v:.4g}' for k, v in result.epochs[-1].items())}; checkpoint {result.checkpoint}")
    return 0


def run_plugins(args) -> int:
    from nonlocal_opt.optimizer import OPTIMIZER_HYPERPARAMETERS
    from nonlocal_opt.registry import registrations

    def describe(specs) -> None:
        for key, spec in specs.items():
            print(f"      {key} = {spec.default!r}  [{spec.symbol}] {spec.doc}")

    print("optimizer (every composition)")
    describe(OPTIMIZER_HYPERPARAMETERS)
    for kind in ("rule", "projector", "manifold"):
        print(f"{kind}s")
        for name, entry in sorted(registrations(kind).items()):
            print(f"  {name}  — {entry.provider}")
            describe(entry.cls.hyperparameters)
    return 0


def run_landscape(args) -> int:
    from nonlocal_opt.figures import Trajectory, plot_landscape_trajectories
    from nonlocal_opt.interfaces import GraphPoint
    from nonlocal_opt.landscapes import LANDSCAPES, offset_function
    from nonlocal_opt.optimizer import compose
    from nonlocal_opt_rolling_ball import OffsetManifold

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
        opt = compose(surface.parameters(), args.optimizer, args.projector, **{"lr": args.lr, "rho": rho, **dict(args.overrides)})

        def closure():
            opt.zero_grad()
            loss = surface()
            loss.backward()
            return loss

        centres = []
        for _ in range(args.steps + 1):
            point = GraphPoint(surface.theta.detach().clone(), closure().detach(), surface.theta.grad.clone())
            nu_theta, nu_height = OffsetManifold.normal(point.grad)
            centres.append((float(point.theta + rho * nu_theta), float(point.loss + rho * nu_height)))
            opt.step(closure)
        thetas, heights = torch.tensor(centres).T
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
    from nonlocal_opt.figures import MissingPlotDependency
    from nonlocal_opt.training import ConfigError, TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, MissingPlotDependency) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        if args.command == "train":
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if args.command != "landscape":
            raise
        print(f"{PROG}: error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
