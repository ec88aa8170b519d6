"""Projector benchmark (issue 3): accuracy per pass, cost, and the paper's ρ = 1, η = 6 training run.

Prints markdown tables (pasted into docs/projectors.md):

1. MLP 784-256-256-10 on Fashion-MNIST at a point reached by 100 SGD steps (batch 128): for each
   projector and (ρ, η), the median over mini-batches of the relative residual ‖∇φ‖/‖θ̃ − θ_t‖ after
   one RBO step at a budget of B forward+backward passes (the rule's first pass and every HVP
   included), and the median wall time of that step;
2. the 50-D quadratic (Hessian eigenvalues in [0.1, 1]): passes per step for ``gauss-newton`` to reach
   1e-6 relative, at ρ = 0.05 (η = 0.1) and at larger ρ;
3. the share of step time spent outside closure calls (the O(d) arithmetic);
4. training at ρ = 1, η = 6 from that point: which projectors train and which diverge.

Usage: ``python benchmarks/projectors.py [--quick] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import nonlocal_opt
from nonlocal_opt.data import DatasetNotFoundError, load_dataset
from nonlocal_opt.landscapes import Quadratic
from nonlocal_opt.models import build_model

PROJECTORS = ("footpoint", "gauss-newton", "newton", "lbfgs", "tangent")
SETTINGS = ((0.1, 0.1), (1.0, 0.1), (1.0, 1.0), (1.0, 6.0))
BUDGETS = (5, 11, 21, 51)


def budget_hyperparameters(name: str, passes: int) -> dict | None:
    """Hyperparameters spending at most ``passes`` passes in one step (no early stop); ``None`` if impossible."""
    inner = passes - 1  # the rule's pass at θ_t
    if name == "tangent":
        return {} if passes == 2 else None
    if name == "newton":
        return {"max_iters": inner // 3, "cg_iters": 2, "rtol": None} if inner >= 3 else None
    if name == "footpoint":
        return {"max_iters": inner}
    return {"max_iters": inner, "rtol": None}


class Problem:
    """The MLP, its weights after 100 SGD steps, and a stream of mini-batches."""

    def __init__(self, data_dir: str | None, seed: int = 0, batch: int = 128):
        torch.manual_seed(seed)
        self.train = load_dataset("fashion-mnist", "train", data_dir)
        self.test = load_dataset("fashion-mnist", "test", data_dir)
        self.model = build_model("mlp", self.train.input_shape, 10)
        self.batch, self.generator = batch, torch.Generator().manual_seed(seed)
        sgd = torch.optim.SGD(self.model.parameters(), lr=0.1)
        for _ in range(100):
            x, y = self.next_batch()
            sgd.zero_grad()
            self.loss(x, y).backward()
            sgd.step()
        self.theta0 = [p.detach().clone() for p in self.model.parameters()]

    def next_batch(self):
        index = torch.randint(len(self.train), (self.batch,), generator=self.generator)
        return self.train.images[index], self.train.labels[index]

    def loss(self, x, y):
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.model.parameters(), self.theta0):
                p.copy_(p0)

    def closure_for(self, opt, x, y, clock: list[float] | None = None):
        def closure():
            start = time.perf_counter()
            opt.zero_grad()
            loss = self.loss(x, y)
            loss.backward()
            if clock is not None:
                clock[0] += time.perf_counter() - start
            return loss

        return closure

    def move_norm(self, x, y, rho: float, eta: float) -> float:
        """``‖θ̃ − θ_t‖ = (ρ/N + η)‖g‖`` at ``θ_0`` on the batch."""
        self.reset()
        self.model.zero_grad()
        self.loss(x, y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        norm = float(g.norm())
        return (rho / math.sqrt(1 + norm**2) + eta) * norm


def fmt(value: float) -> str:
    return "NaN" if not math.isfinite(value) else f"{value:.1e}"


def residual_table(problem: Problem, batches: int) -> list[str]:
    data = [problem.next_batch() for _ in range(batches)]
    lines = ["| ρ | η | projector | " + " | ".join(f"B={b}" for b in BUDGETS) + " | step ms (B=21) |", "|---" * (4 + len(BUDGETS)) + "|"]
    for rho, eta in SETTINGS:
        scales = [problem.move_norm(x, y, rho, eta) for x, y in data]
        for name in PROJECTORS:
            cells, step_ms = [], "—"
            for budget in BUDGETS:
                hp = budget_hyperparameters(name, 2 if name == "tangent" else budget)
                if hp is None or (name == "tangent" and budget != BUDGETS[0]):
                    cells.append("—")
                    continue
                relative, times, spent = [], [], []
                for (x, y), scale in zip(data, scales):
                    problem.reset()
                    opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", name, lr=eta, rho=rho, **hp)
                    start = time.perf_counter()
                    opt.step(problem.closure_for(opt, x, y))
                    times.append(time.perf_counter() - start)
                    stats = opt.stats
                    relative.append(stats["proj_residual"] / scale if not stats.get("nonfinite") else math.nan)
                    spent.append(stats["grad_evals"])
                med = statistics.median(relative) if not any(math.isnan(r) for r in relative) else math.nan
                cells.append(f"{fmt(med)} ({int(max(spent))})" if name != "tangent" else f"{fmt(med)} (2, vs c_t+δ)")
                if budget == 21 or name == "tangent":
                    step_ms = f"{1e3 * statistics.median(times):.1f}"
            lines.append(f"| {rho} | {eta} | {name} | " + " | ".join(cells) + f" | {step_ms} |")
    return lines


def quadratic_table(steps: int) -> list[str]:
    eigenvalues = torch.linspace(0.1, 1.0, 50).tolist()
    lines = ["| ρ | η | ρ·max κ | median passes per step to 1e-6 rel. | max |", "|---|---|---|---|---|"]
    for rho in (0.05, 0.5, 0.9):
        torch.manual_seed(0)
        landscape = Quadratic(torch.randn(50).tolist(), eigenvalues=eigenvalues, seed=0).double()
        opt = nonlocal_opt.compose(landscape.parameters(), "rbo", "gauss-newton", lr=0.1, rho=rho, rtol=1e-6, tol=None, max_iters=200)

        def closure():
            opt.zero_grad()
            loss = landscape()
            loss.backward()
            return loss

        passes = []
        for _ in range(steps):
            opt.step(closure)
            passes.append(opt.stats["grad_evals"] - 1)
        lines.append(f"| {rho} | 0.1 | {rho * 1.0:.2f} | {statistics.median(passes):g} | {max(passes):g} |")
    return lines


def overhead_table(problem: Problem, batches: int) -> list[str]:
    data = [problem.next_batch() for _ in range(batches)]
    lines = ["| projector | passes | step ms | closure ms | O(d) share |", "|---|---|---|---|---|"]
    for name in PROJECTORS:
        hp = budget_hyperparameters(name, 2 if name == "tangent" else 21)
        totals, closures = [], []
        for x, y in data:
            problem.reset()
            opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", name, lr=0.1, rho=1.0, **hp)
            clock = [0.0]
            start = time.perf_counter()
            opt.step(problem.closure_for(opt, x, y, clock))
            totals.append(time.perf_counter() - start)
            closures.append(clock[0])
        total, inside = sum(totals), sum(closures)
        lines.append(
            f"| {name} | {int(opt.stats['grad_evals'])} | {1e3 * total / batches:.1f} | {1e3 * inside / batches:.1f} | {100 * (total - inside) / total:.0f}% |"
        )
    return lines


def training_table(problem: Problem, steps: int) -> list[str]:
    eval_index = torch.arange(4096)
    x_eval, y_eval = problem.train.images[eval_index], problem.train.labels[eval_index]
    x_test, y_test = problem.test.images[:2000], problem.test.labels[:2000]
    lines = ["| projector | passes/step | train loss start → end | test acc. | non-finite steps refused | verdict |", "|---|---|---|---|---|---|"]
    for name in PROJECTORS:
        problem.reset()
        problem.generator.manual_seed(1)
        opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", name, lr=6.0, rho=1.0)
        with torch.no_grad():
            start_loss = float(problem.loss(x_eval, y_eval))
        refused, passes = 0, []
        for _ in range(steps):
            x, y = problem.next_batch()
            opt.step(problem.closure_for(opt, x, y))
            refused += int(opt.stats.get("nonfinite", 0))
            passes.append(opt.stats["grad_evals"])
        with torch.no_grad():
            end_loss = float(problem.loss(x_eval, y_eval))
            accuracy = float((problem.model(x_test).argmax(1) == y_test).float().mean())
        trains = math.isfinite(end_loss) and end_loss < start_loss and refused == 0
        verdict = "trains" if trains else ("diverges (NaN guard)" if refused else "does not improve")
        lines.append(
            f"| {name} | {statistics.mean(passes):.1f} | {start_loss:.3f} → {end_loss:.3f} | {100 * accuracy:.1f}% | {refused}/{steps} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer mini-batches and steps (a few minutes on 2 cores)")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX .gz files")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    try:
        problem = Problem(args.data_dir)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batches, quad_steps, train_steps = (3, 20, 50) if args.quick else (10, 100, 200)
    command = "python benchmarks/projectors.py" + (" --quick" if args.quick else "")
    print(f"<!-- produced by `{command}` on a {torch.get_num_threads()}-thread CPU, torch {torch.__version__} -->\n")
    print(f"### Relative residual ‖∇φ‖/‖θ̃ − θ_t‖ after one step at a budget of B passes (median of {batches} mini-batches; passes actually spent in brackets)\n")
    print("\n".join(residual_table(problem, batches)), "\n")
    print(f"### Gently curved 50-D quadratic, `gauss-newton`, rtol = 1e-6 ({quad_steps} steps)\n")
    print("\n".join(quadratic_table(quad_steps)), "\n")
    print(f"### Time outside closure calls (ρ = 1, η = 0.1, budget 21 passes; mean of {batches} steps)\n")
    print("\n".join(overhead_table(problem, batches)), "\n")
    print(f"### Training at ρ = 1, η = 6 from the same point ({train_steps} steps, batch 128, default budgets)\n")
    print("\n".join(training_table(problem, train_steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
