"""Experiments of docs/geometry.md: path geometry (RSI / EB / γ) and radius annealing.

    python benchmarks/geometry.py --quick            # a few minutes on 2 CPU cores
    python benchmarks/geometry.py                    # full mode (see docs/geometry.md for its cost)
    python benchmarks/geometry.py --only bumps       # one section: mlp, resnet6, counter, bumps

Sections:
- ``mlp`` / ``resnet6``: ``nonlocal-opt geometry`` (``run_geometry``) on Fashion-MNIST with SGD, SAM
  (G_t = plain gradient, and = perturbed gradient) and RBO; per-epoch medians of RSI, EB, γ.
- ``counter``: the no-wrong-turns counter-examples ALM (stochastic, convex) and SM (deterministic,
  non-convex), through the Python API with custom loops.
- ``bumps``: the preprint's Gaussian-bump field (eq. 14), 10 nearby starts, 300 iterations: GD, RBO with
  fixed small / large ρ, RBO with ρ annealed (cosine) from large to small.
Numbers are printed; figures go to ``--figures`` (default docs/img/geometry).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import nonlocal_opt
from nonlocal_opt.analysis.path_geometry import measure_path_geometry, read_csv, summarize
from nonlocal_opt.cli.geometry import add_geometry_arguments, run_geometry
from nonlocal_opt.landscapes import AsymmetricLinearModel, GaussianBumps, SinusoidalMixture
from nonlocal_opt.optim.radius_schedules import CosineRadius

SECTIONS = ("mlp", "resnet6", "counter", "bumps")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------- #
# Fashion-MNIST paths
# --------------------------------------------------------------------------------------------- #
def network_runs(model: str, quick: bool) -> dict[str, list[str]]:
    """label → extra CLI arguments of ``nonlocal-opt geometry``."""
    runs = {
        "sgd": ["--optimizer", "local", "--lr", "0.05"],
        "sam (G = ∇f(w))": ["--optimizer", "sam", "--lr", "0.05", "--rho", "0.05"],
        "sam (G = ∇f(w+ε))": ["--optimizer", "sam", "--lr", "0.05", "--rho", "0.05", "--gradient-pass", "1"],
        # The paper's footpoint solver (γ = 0.1, K = 20) diverges here at η = 6 (every step after the
        # first is refused as non-finite, see docs/geometry.md), so RBO uses the Gauss–Newton projector.
        "rbo": ["--optimizer", "rbo", "--projector", "gauss-newton", "--lr", "6", "--rho", "1", "--set", "max_iters=10"],
    }
    if model == "resnet6" and quick:
        runs = {key: runs[key] for key in ("sgd", "sam (G = ∇f(w))")}
    return runs


def network_section(model: str, quick: bool, out: Path, figures: Path) -> None:
    subset, epochs = {("mlp", True): (4096, 4), ("mlp", False): (60000, 10),
                      ("resnet6", True): (1024, 3), ("resnet6", False): (60000, 5)}[(model, quick)]
    parser = argparse.ArgumentParser()
    add_geometry_arguments(parser)
    print(f"\n## {model} on Fashion-MNIST: first {subset} training samples, batch 128, {epochs} epochs")
    paths = {}
    for label, extra in network_runs(model, quick).items():
        run_dir = out / model / label.split()[0].replace("(", "") / ("pass1" if "ε" in label else "pass0")
        args = parser.parse_args(["--model", model, "--epochs", str(epochs), "--train-subset", str(subset),
                                  "--out", str(run_dir), *extra])
        start = time.perf_counter()
        if run_geometry(args) != 0:
            raise SystemExit(f"geometry run {label} failed")
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = read_csv(run_dir / "path_geometry.csv")
        paths[label] = rows
        no_last = summarize(rows, skip_last=1 / epochs)
        print(f"\n### {label}: {time.perf_counter() - start:.0f} s, final loss {summary['final_loss']:.3f}, "
              f"replay error {summary['replay_error']:.3g}")
        print(f"γ > 0 on {summary['frac_gamma_positive']:.1%} of all steps, {no_last['frac_gamma_positive']:.1%} "
              f"without the last epoch; γ median {no_last['gamma_median']:.4f} "
              f"[10%: {no_last['gamma_q10']:.4f}, 90%: {no_last['gamma_q90']:.4f}] without the last epoch")
        print("| epoch | median RSI | median EB | median γ | min γ | median lolr |\n|---|---|---|---|---|---|")
        for epoch in range(epochs):
            part = [r for r in rows if r.epoch == epoch]
            med = {k: statistics.median(getattr(r, k) for r in part) for k in ("rsi", "eb", "gamma", "lolr")}
            print(f"| {epoch + 1} | {med['rsi']:.4g} | {med['eb']:.4g} | {med['gamma']:.4f} | "
                  f"{min(r.gamma for r in part):.4f} | {med['lolr']:.4g} |")
        if label == "sgd":
            shutil.copy(run_dir / "path_geometry.png", figures / f"{model}_sgd.png")
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for label, rows in paths.items():
        steps = [r.step for r in rows]
        for ax, key in zip(axes, ("rsi", "eb", "gamma")):
            ax.plot(steps, [getattr(r, key) for r in rows], lw=0.7, label=label)
    for ax, key, scale in zip(axes, ("RSI", "EB", "γ"), ("symlog", "log", "linear")):
        ax.set_yscale(scale, **({"linthresh": 1e-3} if scale == "symlog" else {}))
        ax.set_ylabel(key)
    axes[2].axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=7)
    axes[2].set_xlabel("step")
    fig.suptitle(f"{model} on Fashion-MNIST ({subset} samples, {epochs} epochs)")
    fig.tight_layout()
    fig.savefig(figures / f"{model}_compare.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- #
# ALM / SM counter-examples
# --------------------------------------------------------------------------------------------- #
def alm_path(steps: int, lr: float):
    """ALM (dim 20, 1000 samples), SGD on seeded mini-batches of 10: RMSE of the positive part."""
    landscape = AsymmetricLinearModel(dim=20, samples=1000, seed=0)

    def train(tracker):
        w = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(1)))
        opt = nonlocal_opt.compose([w], "local", lr=lr)
        order = torch.Generator().manual_seed(2)
        batches = torch.cat([torch.randperm(1000, generator=order) for _ in range(steps * 10 // 1000 + 1)])
        for t in range(steps):
            index = batches[10 * t : 10 * t + 10]

            def closure():
                opt.zero_grad()
                residual = landscape.x[index] @ w - landscape.y[index]
                loss = torch.clamp(residual, min=0).square().mean().add(1e-12).sqrt()
                loss.backward()
                return loss

            tracker.step(opt, closure)

    return measure_path_geometry(train)


def sm_path(steps: int, lr: float):
    """SM (dim 10), full-batch GD from w0 ~ N(0, 2² I)."""
    landscape = SinusoidalMixture(dim=10, seed=0)

    def train(tracker):
        w = torch.nn.Parameter(2 * torch.randn(10, generator=torch.Generator().manual_seed(1)))
        opt = nonlocal_opt.compose([w], "local", lr=lr)

        def closure():
            opt.zero_grad()
            loss = landscape.value(w)
            loss.backward()
            return loss

        for _ in range(steps):
            tracker.step(opt, closure)

    return measure_path_geometry(train)


def counter_section(quick: bool, figures: Path) -> None:
    steps = 500 if quick else 3000
    print(f"\n## Counter-examples, {steps} steps each")
    results = {
        "ALM (SGD η = 0.01, batch 10)": alm_path(steps, 0.01),
        "ALM (SGD η = 0.05, batch 10)": alm_path(steps, 0.05),
        "SM (GD η = 0.001)": sm_path(steps, 1e-3),
        "SM (GD η = 0.005)": sm_path(steps, 5e-3),
    }
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 5), sharex="col")
    for col, (label, result) in enumerate(results.items()):
        rows = result.rows
        s, s_no_last = summarize(rows), summarize(rows, skip_last=0.1)
        negative = [r.step for r in rows if r.gamma < 0]
        print(f"{label}: γ > 0 on {s['frac_gamma_positive']:.1%} of steps ({s_no_last['frac_gamma_positive']:.1%} "
              f"without the last 10%), min γ {min(r.gamma for r in rows):.3f}, median γ {s['gamma_median']:.4f} "
              f"[10%: {s['gamma_q10']:.4f}, 90%: {s['gamma_q90']:.4f}], first negative step "
              f"{negative[0] if negative else None}, min RSI {min(r.rsi for r in rows):.4g}, replay {result.replay_error}")
        steps_axis = [r.step for r in rows]
        axes[0, col].plot(steps_axis, [r.rsi for r in rows], lw=0.6)
        axes[0, col].set_yscale("symlog", linthresh=1e-2)
        axes[1, col].plot(steps_axis, [r.gamma for r in rows], lw=0.6)
        axes[0, col].set_title(label)
        for row_ax in axes[:, col]:
            row_ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].set_ylabel("RSI")
    axes[1, 0].set_ylabel("γ")
    fig.tight_layout()
    fig.savefig(figures / "counter_examples.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- #
# Gaussian bumps: annealed radius
# --------------------------------------------------------------------------------------------- #
def descend(landscape: GaussianBumps, points: torch.Tensor, steps: int = 3000, lr: float = 2e-3) -> torch.Tensor:
    """The local minimum each point's basin leads to: batched plain gradient descent."""
    points = points.clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(landscape.value(points).sum(), points)
        points = (points - lr * grad).detach().requires_grad_(True)
    return points.detach()


def bump_run(landscape, start, steps, rule, schedule=None, **hp):
    landscape.theta.data.copy_(start)
    opt = nonlocal_opt.compose(landscape.parameters(), rule, **hp)
    scheduler = CosineRadius(opt, steps, schedule) if schedule is not None else None

    def closure():
        opt.zero_grad()
        loss = landscape()
        loss.backward()
        return loss

    path = [start.clone()]
    for _ in range(steps):
        opt.step(closure)
        path.append(landscape.theta.detach().clone())
        if scheduler is not None:
            scheduler.step()
    return torch.stack(path)


def bumps_section(quick: bool, figures: Path) -> None:
    torch.set_default_dtype(torch.float64)
    landscape = GaussianBumps()  # eq. 14: 1000 bumps, σ = 0.3, θ_k ~ U([−3, 3]²), seed 0
    starts_n, steps = 10, 300
    axis = torch.linspace(-3, 3, 601)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    values = torch.cat([landscape.value(chunk) for chunk in grid.split(20000)])
    global_min = descend(landscape, grid[values.argmin()].unsqueeze(0))[0]
    f_min = float(landscape.value(global_min))
    starts = torch.tensor([2.0, 2.0]) + 0.1 * torch.randn(starts_n, 2, generator=torch.Generator().manual_seed(0))
    gn = {"projector": "gauss-newton", "max_iters": 10}
    configs = {
        "GD (η = 0.01)": ("local", None, {"lr": 0.01}),
        "RBO ρ = 0.5": ("rbo", None, {"lr": 0.01, "rho": 0.5, **gn}),
        "RBO ρ = 4": ("rbo", None, {"lr": 0.01, "rho": 4.0, **gn}),
        "RBO ρ: 4 → 0.5 (cosine)": ("rbo", 0.5, {"lr": 0.01, "rho": 4.0, **gn}),
        "RBO ρ: 4 → 0.05 (cosine)": ("rbo", 0.05, {"lr": 0.01, "rho": 4.0, **gn}),
    }
    if not quick:
        configs["RBO ρ = 2"] = ("rbo", None, {"lr": 0.01, "rho": 2.0, **gn})
        configs["RBO ρ: 8 → 0.05 (cosine)"] = ("rbo", 0.05, {"lr": 0.01, "rho": 8.0, **gn})
    print(f"\n## Gaussian bumps (eq. 14), {starts_n} starts (2, 2) + 0.1 N(0, I), {steps} iterations; global minimum "
          f"f = {f_min:.3f} at ({global_min[0]:.3f}, {global_min[1]:.3f})")
    print("| method | in global basin | mean final f | mean ‖θ_T − local min‖ | mean ‖θ_T − θ_{T−10}‖ | time |")
    print("|---|---|---|---|---|---|")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 4), sharey=True)
    fine = torch.linspace(-3, 3, 241)
    gx, gy = torch.meshgrid(fine, fine, indexing="xy")
    field = landscape.value(torch.stack([gx, gy], -1))
    for ax, (label, (rule, schedule, hp)) in zip(axes, configs.items()):
        start_time = time.perf_counter()
        paths = [bump_run(landscape, s, steps, rule, schedule, **hp) for s in starts]
        finals = torch.stack([p[-1] for p in paths])
        minima = descend(landscape, finals)
        in_global = ((minima - global_min).norm(dim=1) < 1e-2).double().mean()
        gap = (finals - minima).norm(dim=1).mean()
        moving = torch.stack([(p[-1] - p[-11]).norm() for p in paths]).mean()
        print(f"| {label} | {float(in_global):.0%} | {float(landscape.value(finals).mean()):.3f} | {float(gap):.3g} | "
              f"{float(moving):.3g} | {time.perf_counter() - start_time:.0f} s |")
        ax.contourf(gx, gy, field, levels=40, cmap="viridis")
        for path in paths:
            ax.plot(path[:, 0], path[:, 1], "w-", lw=0.6)
            ax.plot(path[-1, 0], path[-1, 1], "r.", ms=5)
        ax.plot(*global_min, "y*", ms=10)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / "bumps_annealing.png", dpi=100)
    plt.close(fig)
    torch.set_default_dtype(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets and short runs (a few minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--out", default="runs/geometry-benchmark", help="where the geometry runs write")
    parser.add_argument("--figures", default="docs/img/geometry", help="where the figures go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    sections = args.only.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    print(f"# geometry benchmark ({'quick' if args.quick else 'full'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    for model in ("mlp", "resnet6"):
        if model in sections:
            network_section(model, args.quick, Path(args.out), figures)
    if "counter" in sections:
        counter_section(args.quick, figures)
    if "bumps" in sections:
        bumps_section(args.quick, figures)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
