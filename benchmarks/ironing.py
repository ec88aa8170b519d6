"""Ironing and exploration figures of the RBO papers, on analytic landscapes (float64).

Sections (``--only``, comma-separated):
- ``riemann``: centre trajectories of RBO on Riemann's function ``Σ_{k≤100} sin(k²θ)/k²`` for several ρ
  (ICLR paper Fig. 2; preprint Fig. 3 settings: θ_0 = 2, η = 1e-3, footpoint γ = 0.05 × P = 20), drawn by
  ``nonlocal-opt landscape``, once with the paper's footpoint solver and once with ``gauss-newton``;
- ``delta``: ``Δ(ρ) = sup f_ρ − inf f_ρ`` over θ ∈ [−3π, 3π] for f = sin (brute-force ``offset_function``),
  log-log, with the least-squares slope of log Δ against log ρ for ρ ≥ ``--fit-from`` (theory: −1) and
  the small-ρ plateau (theory: Δ = 2 below the reach ρ = 1) (preprint Fig. 2);
- ``bumps``: the Gaussian-bump field of preprint eq. 14 (1000 bumps, σ = 0.3), 10 starts
  (2, 2) + 0.1·N(0, I), 300 iterations, η = 0.01: GD and RBO with ρ ∈ {1, …, 5}; the fraction of starts
  whose final point lies in the global minimum's basin (GD from it ends there) (preprint Fig. 4).

    python benchmarks/ironing.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/ironing.py             # full mode

Writes PNGs, ``delta.csv``, ``bumps.csv`` and ``ironing.md`` under ``--out`` (default benchmarks/out/ironing).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import (
    UserError,
    common_arguments,
    machine,
    markdown_table,
    prepare,
    run_script,
    write_csv,
)
from geometry import bump_run, descend

from nonlocal_opt.analysis.figures import pyplot
from nonlocal_opt.cli.main import main as nonlocal_opt_cli
from nonlocal_opt.landscapes import GaussianBumps, Sine, offset_function

SECTIONS = ("riemann", "delta", "bumps")
RIEMANN_SOLVERS = {"footpoint": ["--set", "step_size=0.05", "--set", "max_iters=20"],
                   "gauss-newton": ["--projector", "gauss-newton", "--set", "max_iters=20"]}
BUMP_SOLVERS = {"gauss-newton": {"projector": "gauss-newton", "max_iters": 10},
                "footpoint": {"projector": "footpoint", "max_iters": 100, "step_size": 1e-3}}  # preprint: P = 100, γ = 1e-3


def riemann_section(args, out: Path) -> tuple[list[str], list[Path]]:
    lines, paths = [], []
    for solver, extra in RIEMANN_SOLVERS.items():
        path = out / f"riemann_{solver}.png"
        argv = ["landscape", "--landscape", "riemann", "--rho", args.riemann_rho, "--lr", "0.001", "--start", "2",
                "--steps", str(args.riemann_steps), "--out", str(path), *extra]
        if nonlocal_opt_cli(argv) != 0:
            raise UserError(f"nonlocal-opt {shlex.join(argv)} failed")
        lines.append(f"- `nonlocal-opt {shlex.join(argv)}` → {path.name}")
        paths.append(path)
    return lines, paths


def delta(rho: float, spacing: float, query_stride: int) -> float:
    """``Δ(ρ)`` for f = sin: ``f_ρ`` at every ``query_stride``-th point of a grid of step ``spacing`` on
    [−3π, 3π]; its sup runs over the grid of sin extended by ρ on both sides."""
    surface = Sine()
    half = 3 * math.pi
    points = torch.arange(-half - rho, half + rho + spacing / 2, spacing, dtype=torch.float64)
    inside = (points >= -half) & (points <= half)
    queries = points[inside][::query_stride]
    chunk = max(1, 2**22 // len(points))
    f_rho = offset_function(surface.value, rho, points.unsqueeze(-1), queries.unsqueeze(-1), chunk=chunk)
    return float(f_rho.max() - f_rho.min())


def fit_slope(rhos: list[float], deltas: list[float], fit_from: float) -> tuple[float, float]:
    """Least-squares (slope, intercept) of log Δ against log ρ over the radii ρ ≥ ``fit_from``."""
    pairs = [(math.log(r), math.log(d)) for r, d in zip(rhos, deltas) if r >= fit_from]
    if len(pairs) < 2:
        raise UserError(f"--fit-from {fit_from} leaves fewer than two radii to fit; lower it or widen --rho-range")
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return slope, float(y.mean() - slope * x.mean())


def delta_section(args, out: Path) -> tuple[list[str], list[Path]]:
    low, high, count = args.rho_range
    rhos = torch.logspace(math.log10(low), math.log10(high), int(count), dtype=torch.float64).tolist()
    deltas = [delta(rho, min(args.spacing, rho / 20), args.query_stride) for rho in rhos]
    slope, intercept = fit_slope(rhos, deltas, args.fit_from)
    plateau = [d for r, d in zip(rhos, deltas) if r <= 1]
    write_csv(out / "delta.csv", [{"rho": r, "delta": d} for r, d in zip(rhos, deltas)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(rhos, deltas, "o-", markersize=3, label="Δ(ρ), brute force")
    fitted = [r for r in rhos if r >= args.fit_from]
    ax.loglog(fitted, [math.exp(intercept) * r**slope for r in fitted], "k--", label=f"fit ρ ≥ {args.fit_from:g}: slope {slope:.3f}")
    ax.axvline(1.0, color="grey", linewidth=0.6, linestyle=":", label="reach of sin (ρ = 1)")
    ax.set_xlabel("ρ")
    ax.set_ylabel("Δ(ρ) = sup f_ρ − inf f_ρ")
    ax.set_title("sin on [−3π, 3π]: ironing Δ(ρ)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "delta_sine.png", dpi=120)
    plt.close(fig)
    slope_line = (f"- slope of log Δ vs log ρ for ρ ≥ {args.fit_from:g}: **{slope:.3f}** (theory −1); "
                  f"Δ·ρ at ρ = {rhos[-1]:g}: {deltas[-1] * rhos[-1]:.3f} (π²/2 = {math.pi**2 / 2:.3f} for periodic sin)")
    plateau_line = (f"- plateau: Δ(ρ) for the {len(plateau)} radii ρ ≤ 1 lies in [{min(plateau, default=math.nan):.4f}, "
                    f"{max(plateau, default=math.nan):.4f}] (theory: 2 = sup sin − inf sin)")
    lines = [slope_line, plateau_line, "", markdown_table(("ρ", "Δ(ρ)"), [(f"{r:.3g}", f"{d:.4f}") for r, d in zip(rhos, deltas)])]
    return lines, [out / "delta_sine.png", out / "delta.csv"]


def global_minimum(landscape: GaussianBumps, grid: torch.Tensor, values: torch.Tensor, candidates: int = 20) -> torch.Tensor:
    """The lowest of the local minima that gradient descent reaches from the ``candidates`` lowest grid points."""
    minima = descend(landscape, grid[values.topk(candidates, largest=False).indices])
    return minima[landscape.value(minima).argmin()]


def bumps_section(args, out: Path) -> tuple[list[str], list[Path]]:
    torch.set_default_dtype(torch.float64)
    try:
        landscape = GaussianBumps()
        axis = torch.linspace(-3, 3, 121)
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")
        field = torch.stack([landscape.value(row) for row in torch.stack([gx, gy], -1)])
        global_min = global_minimum(landscape, torch.stack([gx, gy], -1).reshape(-1, 2), field.reshape(-1))
        starts = torch.tensor([2.0, 2.0]) + 0.1 * torch.randn(args.starts, 2, generator=torch.Generator().manual_seed(0))
        configs = {"GD": ("local", {"lr": 0.01})}
        for solver in args.bump_solvers:
            for rho in args.bump_rho:
                configs[f"RBO {solver} ρ = {rho:g}"] = ("rbo", {"lr": 0.01, "rho": rho, **BUMP_SOLVERS[solver]})
        plt = pyplot()
        columns = 1 + len(args.bump_rho)
        fig, axes = plt.subplots(len(args.bump_solvers), columns, figsize=(3.2 * columns, 3.3 * len(args.bump_solvers)),
                                 squeeze=False, sharex=True, sharey=True)
        rows = []
        for index, (label, (rule, hp)) in enumerate(configs.items()):
            start_time = time.perf_counter()
            paths = [bump_run(landscape, s, args.bump_steps, rule, **hp) for s in starts]
            finals = torch.stack([p[-1] for p in paths])
            in_global = ((descend(landscape, finals) - global_min).norm(dim=1) < 1e-2).double()
            rows.append({"method": label, "starts": args.starts, "in_global_basin": int(in_global.sum()),
                         "fraction": float(in_global.mean()), "mean_final_f": float(landscape.value(finals).mean()),
                         "seconds": time.perf_counter() - start_time})
            print(f"bumps {label}: {rows[-1]['in_global_basin']}/{args.starts} in the global basin, "
                  f"{rows[-1]['seconds']:.0f} s", flush=True)
            panels = [axes[r][0] for r in range(len(args.bump_solvers))] if index == 0 else \
                [axes[(index - 1) // len(args.bump_rho)][1 + (index - 1) % len(args.bump_rho)]]
            for ax in panels:
                ax.contourf(gx, gy, field, levels=40, cmap="viridis")
                for path in paths:
                    ax.plot(path[:, 0], path[:, 1], "w-", lw=0.6)
                    ax.plot(path[-1, 0], path[-1, 1], "r.", ms=5)
                ax.plot(*global_min, "y*", ms=10)
                ax.set_title(f"{label}: {rows[-1]['in_global_basin']}/{args.starts}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bumps.png", dpi=100)
        plt.close(fig)
    finally:
        torch.set_default_dtype(torch.float32)
    write_csv(out / "bumps.csv", rows)
    header = (f"Global minimum f = {float(landscape.value(global_min)):.3f} at ({global_min[0]:.3f}, {global_min[1]:.3f}); "
              f"{args.starts} starts, {args.bump_steps} iterations, η = 0.01.\n")
    table = markdown_table(("method", "in global basin", "mean final f", "time"),
                           [(r["method"], f"{r['in_global_basin']}/{r['starts']}", f"{r['mean_final_f']:.3f}",
                             f"{r['seconds']:.0f} s") for r in rows])
    return [header, table], [out / "bumps.png", out / "bumps.csv"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "ironing")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--riemann-rho", default="0.01,0.1,0.3,1", help="radii of the Riemann trajectories")
    parser.add_argument("--riemann-steps", type=int, default=None, help="full 300, quick 60")
    parser.add_argument("--rho-range", type=float, nargs=3, default=(0.01, 100.0, 33), metavar=("LOW", "HIGH", "COUNT"),
                        help="log-spaced radii of Δ(ρ)")
    parser.add_argument("--fit-from", type=float, default=10.0, help="fit the slope of Δ for ρ ≥ this")
    parser.add_argument("--spacing", type=float, default=None, help="grid step of the Δ computation (full 2e-3, quick 1e-2)")
    parser.add_argument("--query-stride", type=int, default=5, help="evaluate f_ρ at every n-th grid point")
    parser.add_argument("--starts", type=int, default=None, help="bump-field starts (full 10, quick 4)")
    parser.add_argument("--bump-steps", type=int, default=None, help="full 300, quick 100")
    parser.add_argument("--bump-rho", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--bump-solvers", type=lambda s: s.split(","), default=["gauss-newton"],
                        help=f"RBO projectors on the bump field: {', '.join(BUMP_SOLVERS)} (footpoint at the preprint's "
                             "P = 100 costs ~10x more)")
    args = parser.parse_args(argv)
    quick = {"riemann_steps": 60, "spacing": 1e-2, "starts": 4, "bump_steps": 100}
    full = {"riemann_steps": 300, "spacing": 2e-3, "starts": 10, "bump_steps": 300}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(args.only) - set(SECTIONS)) + sorted(set(args.bump_solvers) - set(BUMP_SOLVERS))
    if unknown:
        raise UserError(f"unknown section or solver {unknown}; sections: {', '.join(SECTIONS)}; solvers: {', '.join(BUMP_SOLVERS)}")
    if min(args.starts, args.bump_steps, args.riemann_steps, args.query_stride) < 1 or args.spacing <= 0:
        raise UserError("--starts, --bump-steps, --riemann-steps, --query-stride and --spacing must be positive")
    if not 0 < args.rho_range[0] < args.rho_range[1] or args.rho_range[2] < 2:
        raise UserError("--rho-range LOW HIGH COUNT needs 0 < LOW < HIGH and COUNT >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = prepare(args)
    command = "python benchmarks/ironing.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# ironing: {', '.join(args.only)}\n# {machine()}", flush=True)
    start = time.perf_counter()
    parts, written = [], []
    sections = {"riemann": ("Riemann trajectories", riemann_section), "delta": ("Δ(ρ) on sin", delta_section),
                "bumps": ("Gaussian-bump field", bumps_section)}
    for name in args.only:
        title, section = sections[name]
        lines, paths = section(args, out)
        parts += [f"### {title}", "", *lines, ""]
        written += paths
    wall = time.perf_counter() - start
    report = f"<!-- produced by `{command}` in {wall:.0f} s on {machine()} -->\n\n" + "\n".join(parts) + "\n"
    (out / "ironing.md").write_text(report)
    print("\n" + report)
    for path in [*written, out / "ironing.md"]:
        print(f"wrote {path}")
    print(f"total {wall:.0f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
