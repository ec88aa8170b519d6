"""``nonlocal-opt landscape``: centre trajectories of a composed optimizer on an analytic 1-D landscape,
one per radius, over the landscape and its offset ``f_ρ`` (PNG)."""

from __future__ import annotations

import argparse

import torch

from nonlocal_opt.cli.parsing import add_base_argument, add_set_argument, finite_float, non_negative_float, parse_float_list
from nonlocal_opt.optim.interfaces import Centre
from nonlocal_opt.plugins.compose import compose


def add_landscape_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocal-opt landscape``.

    Args:
        parser: the ``landscape`` subcommand's parser.
    """
    parser.add_argument("--landscape", default="riemann", help="a 1-D analytic landscape (riemann, sine, ...)")
    parser.add_argument("--optimizer", default="rbo", help="a registered rule, or a base optimizer run as it is")
    add_base_argument(parser)
    parser.add_argument("--projector", default=None, help="a registered projector (default: the rule's)")
    parser.add_argument("--rho", type=parse_float_list, default=[0.1, 0.5, 1.0], help="comma-separated radii")
    parser.add_argument("--lr", type=non_negative_float, default=0.005, help="learning rate of the base")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per radius")
    parser.add_argument("--start", type=finite_float, default=1.0, help="initial θ (a finite number)")
    add_set_argument(parser)
    parser.add_argument("--out", default="landscape.png", help="the PNG to write")


def run_landscape(args: argparse.Namespace) -> int:
    """Step the optimizer from ``--start`` on the landscape once per radius and plot the centres' paths.

    Args:
        args: the parsed ``landscape`` arguments.
    """
    from nonlocal_opt.analysis.figures import Trajectory, plot_landscape_trajectories
    from nonlocal_opt.landscapes import LANDSCAPES, offset_function
    from nonlocal_opt.training.hyperparameter_checks import check_hyperparameters, components_of

    if args.landscape not in LANDSCAPES:
        raise ValueError(f"unknown landscape {args.landscape!r}; available: {', '.join(LANDSCAPES)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not args.rho:
        raise ValueError("--rho needs at least one radius, e.g. --rho 0.1,0.5")
    components, base, owner = components_of(args.optimizer, args.base, args.projector)
    for rho in args.rho:
        check_hyperparameters(components, base, owner, {"lr": args.lr, "rho": rho, **dict(args.overrides)})
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
