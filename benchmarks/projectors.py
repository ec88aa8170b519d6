"""Projector benchmark (issue 3): accuracy per pass, cost, and the paper's ρ = 1, η = 6 training run.

Prints markdown tables (pasted into docs/projectors.md):

1. MLP 784-256-256-10 on Fashion-MNIST at a point reached by 100 SGD steps (batch 128): for each
   projector and (ρ, η), the median over mini-batches of the relative residual ‖∇φ‖/‖θ̃ − θ_t‖ after
   one RBO step at a budget of B forward+backward passes (the rule's first pass and every HVP
   included), and the median CPU time of that step;
2. the 50-D quadratic (Hessian eigenvalues in [0.1, 1]): passes per step for ``gauss-newton`` to reach
   1e-6 relative, at ρ = 0.05 (η = 0.1) and at larger ρ;
3. the floor of that residual: the best ``lbfgs`` reaches with 300 passes, and how much ``∇φ`` changes
   within 1e-4·‖θ̃ − θ_t‖ of the point it returns compared with its linearisation (ReLU kinks);
4. the share of step time spent outside closure calls (the O(d) arithmetic), the share beyond the
   time of as many plain passes, and the framework's floor of both (:class:`PassesOnly`);
5. training at ρ = 1, η = 6 from that point: which projectors train and which diverge.

Times are CPU time of this process (``time.process_time``), not wall time, so that other jobs on a
shared machine do not count; ``--threads`` sets torch's intra-op threads (default 1).

Usage: ``python benchmarks/projectors.py [--quick] [--threads N] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_script

import nonlocal_opt
from nonlocal_opt.landscapes import Quadratic
from nonlocal_opt.training.data import load_dataset
from nonlocal_opt.training.models import build_model

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
            start = time.process_time()
            opt.zero_grad()
            loss = self.loss(x, y)
            loss.backward()
            if clock is not None:
                clock[0] += time.process_time() - start
            return loss

        return closure

    def target(self, x, y, rho: float, eta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(θ̃, ỹ)`` of the first RBO step from ``θ_0`` on the batch, and ``‖θ̃ − θ_t‖ = (ρ/N + η)‖g‖``."""
        self.reset()
        self.model.zero_grad()
        loss = self.loss(x, y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        norm = float(g.norm())
        n = math.sqrt(1 + norm**2)
        return theta - (rho / n + eta) * g, loss.detach() + rho / n - eta * norm**2, (rho / n + eta) * norm

    def move_norm(self, x, y, rho: float, eta: float) -> float:
        """``‖θ̃ − θ_t‖ = (ρ/N + η)‖g‖`` at ``θ_0`` on the batch."""
        return self.target(x, y, rho, eta)[2]

    def grad_phi_at(self, theta: torch.Tensor, x, y, target_theta: torch.Tensor, target_height: torch.Tensor) -> torch.Tensor:
        """``∇φ(θ) = (θ − θ̃) + (f(θ) − ỹ)∇f(θ)`` on the batch, computed here with autograd."""
        load(self.model.parameters(), theta)
        self.model.zero_grad()
        loss = self.loss(x, y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        return (theta - target_theta) + (loss.detach() - target_height) * g


class ReferenceFootpoint:
    """The smallest ``φ*`` found for one mini-batch and ``(ρ, η)``, in float64, independently of the
    budgets being compared: a smoothing continuation (ReLU → Softplus(β), β = 30 … 1e4, ``CONTINUATION``
    passes of ``gauss-newton`` each, warm-started, towards the fixed target ``c̃``), then ``POLISH`` passes
    of ``gauss-newton`` and of ``lbfgs`` on the ReLU network. The smoothed ``φ_β`` has a stationary
    minimiser the solvers can converge to; the ReLU ``φ`` has kinks where they stall. ``φ*`` is the
    lowest ReLU ``φ`` among all of these end points."""

    BETAS = (30.0, 100.0, 300.0, 1000.0, 3000.0, 1e4)
    CONTINUATION, POLISH = 80, 150

    def __init__(self, problem: Problem, x, y, rho: float, eta: float):
        self.model = copy.deepcopy(problem.model).double()
        self.params = list(self.model.parameters())
        with torch.no_grad():
            for p, p0 in zip(self.params, problem.theta0):
                p.copy_(p0)
        self.x, self.y = x.double(), y
        self.theta_t = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        start = self.evaluate(self.theta_t)
        norm = float(start.grad.norm())
        n = math.sqrt(1 + norm**2)
        self.target = nonlocal_opt.Centre(theta=self.theta_t - (rho / n + eta) * start.grad, height=start.loss + rho / n - eta * norm**2)
        self.phi_t = self.phi(self.theta_t)
        ends, theta = [], self.theta_t
        for beta in self.BETAS:
            theta = self.solve("gauss-newton", theta, self.CONTINUATION, beta)
            ends.append(theta)
        ends += [self.solve(name, theta, self.POLISH) for name in ("gauss-newton", "lbfgs")]
        self.phi_star = min(self.phi(end) for end in ends)

    def network(self, beta: float | None) -> torch.nn.Module:
        """The float64 network with every ReLU replaced by Softplus(β) (``None``: ReLU)."""
        activation = torch.nn.ReLU() if beta is None else torch.nn.Softplus(beta=beta)
        return torch.nn.Sequential(*(activation if isinstance(m, (torch.nn.ReLU, torch.nn.Softplus)) else m for m in self.model))

    def evaluate(self, theta: torch.Tensor, beta: float | None = None) -> nonlocal_opt.GraphPoint:
        load(self.params, theta)
        self.model.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(self.network(beta)(self.x), self.y)
            loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self.params])
        return nonlocal_opt.GraphPoint(theta=theta.clone(), loss=loss.detach(), grad=grad)

    def phi(self, theta: torch.Tensor) -> float:
        point = self.evaluate(theta)
        return float(0.5 * ((point.theta - self.target.theta).square().sum() + (point.loss - self.target.height) ** 2))

    def solve(self, projector: str, theta: torch.Tensor, passes: int, beta: float | None = None) -> torch.Tensor:
        """``passes`` passes of ``projector`` from ``theta`` towards the fixed ``c̃`` on the (smoothed) network."""
        network = self.network(beta)
        opt = nonlocal_opt.compose(self.params, "rbo", projector=projector, max_iters=passes - 1, rtol=None)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(self.x), self.y)
            loss.backward()
            return loss

        load(self.params, theta)
        with torch.no_grad():
            ctx = opt.step_context(closure)
            return ctx.project(self.target, ctx.evaluate(extra=False)).point.theta.clone()

    def gap(self, theta: torch.Tensor) -> float:
        """``(φ(θ) − φ*) / φ(θ_t)``, ``φ`` in float64 on the ReLU network."""
        return (self.phi(theta.double()) - self.phi_star) / self.phi_t


def load(params, theta: torch.Tensor) -> None:
    """Copy the flat ``theta`` into ``params``. (``torch.nn.utils.vector_to_parameters`` would make the
    parameters views of ``theta``, so that later in-place updates of the parameters overwrite it.)"""
    with torch.no_grad():
        params = list(params)
        for p, piece in zip(params, theta.split([p.numel() for p in params])):
            p.copy_(piece.view_as(p))


def fmt(value: float) -> str:
    return "NaN" if not math.isfinite(value) else f"{value:.1e}"


def residual_tables(problem: Problem, data: list, gap_settings: int = 2) -> tuple[list[str], list[str]]:
    """The relative residual table over all settings, and the φ-gap table (:class:`ReferenceFootpoint`)
    over the first ``gap_settings`` settings."""
    budgets = " | ".join(f"B={b}" for b in BUDGETS)
    lines = [f"| ρ | η | projector | {budgets} | step ms (B=21) |", "|---" * (4 + len(BUDGETS)) + "|"]
    gap_lines = [f"| ρ | η | projector | {budgets} |", "|---" * (3 + len(BUDGETS)) + "|"]
    for setting, (rho, eta) in enumerate(SETTINGS):
        scales = [problem.move_norm(x, y, rho, eta) for x, y in data]
        references = [ReferenceFootpoint(problem, x, y, rho, eta) for x, y in data] if setting < gap_settings else None
        for name in PROJECTORS:
            cells, gap_cells, step_ms = [], [], "—"
            for budget in BUDGETS:
                hp = budget_hyperparameters(name, 2 if name == "tangent" else budget)
                if hp is None or (name == "tangent" and budget != BUDGETS[0]):
                    cells.append("—")
                    gap_cells.append("—")
                    continue
                relative, gaps, times, spent = [], [], [], []
                for index, ((x, y), scale) in enumerate(zip(data, scales)):
                    problem.reset()
                    opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", projector=name, lr=eta, rho=rho, **hp)
                    start = time.process_time()
                    opt.step(problem.closure_for(opt, x, y))
                    times.append(time.process_time() - start)
                    stats = opt.stats
                    relative.append(stats["proj_residual"] / scale if not stats.get("nonfinite") else math.nan)
                    spent.append(stats["grad_evals"])
                    if references is not None:
                        theta = torch.nn.utils.parameters_to_vector(problem.model.parameters()).detach()
                        gaps.append(references[index].gap(theta) if not stats.get("nonfinite") else math.nan)
                med = statistics.median(relative) if not any(math.isnan(r) for r in relative) else math.nan
                cells.append(f"{fmt(med)} ({int(max(spent))})" if name != "tangent" else f"{fmt(med)} (2, vs c_t+δ)")
                if gaps:
                    gap_cells.append(fmt(statistics.median(gaps)) if not any(math.isnan(g) for g in gaps) else "NaN")
                if budget == 21 or name == "tangent":
                    step_ms = f"{1e3 * statistics.median(times):.1f}"
            lines.append(f"| {rho} | {eta} | {name} | " + " | ".join(cells) + f" | {step_ms} |")
            if references is not None and name != "tangent":
                gap_lines.append(f"| {rho} | {eta} | {name} | " + " | ".join(gap_cells) + " |")
    return lines, gap_lines


def quadratic_table(steps: int) -> list[str]:
    eigenvalues = torch.linspace(0.1, 1.0, 50).tolist()
    lines = ["| ρ | η | ρ·max κ | median passes per step to 1e-6 rel. | max |", "|---|---|---|---|---|"]
    for rho in (0.05, 0.5, 0.9):
        torch.manual_seed(0)
        landscape = Quadratic(torch.randn(50).tolist(), eigenvalues=eigenvalues, seed=0).double()
        opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector="gauss-newton", lr=0.1, rho=rho,
                                   rtol=1e-6, tol=None, max_iters=200)

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


def floor_table(problem: Problem, data: list, passes: int = 301, probes: int = 8, radius: float = 1e-4) -> list[str]:
    """Per mini-batch: the relative residual ``lbfgs`` (history 20) reaches with ``passes`` passes, and at
    the point it returns the largest ``‖∇φ(θ + εu) − ∇φ(θ)‖/‖θ̃ − θ_t‖`` over ``probes`` random unit
    ``u``, ``ε = radius·‖θ̃ − θ_t‖``, next to its linearisation (100 × the change over ``ε/100``). A
    change far above the linearised one means ``∇φ`` jumps: ``θ`` sits next to kinks of the ReLU
    graph, and there ``‖∇φ‖`` cannot be driven to 0."""
    generator = torch.Generator().manual_seed(0)
    header = "| ρ | η | residual after 300 passes | max change of ∇φ within 1e-4·‖θ̃ − θ_t‖ | linearised |"
    lines = [header, "|---|---|---|---|---|"]
    for rho, eta in SETTINGS[:2]:
        reached, jumps, linear = [], [], []
        for x, y in data:
            target_theta, target_height, scale = problem.target(x, y, rho, eta)
            problem.reset()
            hp = {"history": 20, "max_iters": passes - 1, "rtol": None}
            opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", projector="lbfgs", lr=eta, rho=rho, **hp)
            opt.step(problem.closure_for(opt, x, y))
            reached.append(opt.stats["proj_residual"] / scale)
            theta = torch.nn.utils.parameters_to_vector(problem.model.parameters()).detach()
            base = problem.grad_phi_at(theta, x, y, target_theta, target_height)
            changes = {1.0: [], 0.01: []}
            for _ in range(probes):
                u = torch.randn(theta.shape, generator=generator)
                for fraction, found in changes.items():
                    moved = problem.grad_phi_at(theta + fraction * radius * scale * u / u.norm(), x, y, target_theta, target_height)
                    found.append(float((moved - base).norm()) / (scale * fraction))
            jumps.append(max(changes[1.0]))
            linear.append(max(changes[0.01]))
        cells = [" ".join(fmt(v) for v in column) for column in (reached, jumps, linear)]
        lines.append(f"| {rho} | {eta} | " + " | ".join(cells) + " |")
    return lines


class PassesOnly(nonlocal_opt.Projector):
    """Not a projector: evaluates ``θ_t`` again ``max_iters`` times. Its time outside the closure is the
    framework's floor per pass (write ``θ`` into the parameters, gather ``∇f``) plus the rule's step."""

    name = "passes-only"
    hyperparameters = {"max_iters": nonlocal_opt.Hyperparameter(20, "K", "passes after the rule's")}

    def project(self, target, start, ctx):
        point = start
        for _ in range(ctx.hp("max_iters")):
            point = ctx.evaluate(start.theta)
        return nonlocal_opt.ProjectionResult(point=point, centre=None, iterations=ctx.hp("max_iters"), residual=start.loss)


def step_costs(problem: Problem, projector, hp: dict, data: list, repeats: int) -> tuple[float, float, float, int]:
    """Medians over ``repeats × len(data)`` steps (ρ = 1, η = 0.1) of the CPU time of one step, of its time
    outside closure calls, and of a plain pass (``zero_grad``, forward, backward outside any optimizer,
    timed next to each step); and the passes per step."""
    totals, outside, plain = [], [], []
    for _ in range(repeats):
        for x, y in data:
            problem.reset()
            opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", projector=projector, lr=0.1, rho=1.0, **hp)
            closure = problem.closure_for(opt, x, y)
            for _ in range(3):
                start = time.process_time()
                closure()
                plain.append(time.process_time() - start)
            clock = [0.0]
            start = time.process_time()
            opt.step(problem.closure_for(opt, x, y, clock))
            totals.append(time.process_time() - start)
            outside.append(totals[-1] - clock[0])
    return statistics.median(totals), statistics.median(outside), statistics.median(plain), int(opt.stats["grad_evals"])


def cost_cells(total: float, extra: float, one_pass: float, passes: int) -> tuple[str, ...]:
    """Step ms, closure ms, plain pass ms, outside-closure ms per pass, O(d) share, share beyond ``passes`` plain passes."""
    cells = (f"{1e3 * total:.1f}", f"{1e3 * (total - extra):.1f}", f"{1e3 * one_pass:.2f}", f"{1e3 * extra / passes:.2f}")
    return (*cells, f"{100 * extra / total:.0f}%", f"{100 * (1 - passes * one_pass / total):.0f}%")


def overhead_table(problem: Problem, batches: int, repeats: int = 3) -> list[str]:
    """Step costs of every projector at 21 passes (``tangent``: 2), and of :class:`PassesOnly`.

    "O(d) share" counts only time outside closure calls; "beyond passes" charges the step with
    everything that is not a plain pass, including what the framework adds inside closure calls."""
    data = [problem.next_batch() for _ in range(batches)]
    header = "| projector | passes | step ms | closure ms | plain pass ms | outside closure, ms per pass | O(d) share | beyond passes |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name in (*PROJECTORS, PassesOnly()):
        hp = {"max_iters": 20} if isinstance(name, PassesOnly) else budget_hyperparameters(name, 2 if name == "tangent" else 21)
        total, extra, one_pass, passes = step_costs(problem, name, hp, data, repeats)
        label = f"({name.name}: no arithmetic)" if isinstance(name, PassesOnly) else name
        lines.append("| " + " | ".join((str(label), str(passes), *cost_cells(total, extra, one_pass, passes))) + " |")
    return lines


def batch_size_table(problem: Problem, sizes: tuple[int, ...], repeats: int = 3) -> list[str]:
    """``gauss-newton`` at 21 passes for larger mini-batches: a pass grows with the batch, the O(d) work does not."""
    header = "| batch | step ms | closure ms | plain pass ms | outside closure, ms per pass | O(d) share | beyond passes |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    generator = torch.Generator().manual_seed(2)
    for size in sizes:
        index = [torch.randint(len(problem.train), (size,), generator=generator) for _ in range(2)]
        data = [(problem.train.images[i], problem.train.labels[i]) for i in index]
        total, extra, one_pass, passes = step_costs(problem, "gauss-newton", budget_hyperparameters("gauss-newton", 21), data, repeats)
        lines.append(f"| {size} | " + " | ".join(cost_cells(total, extra, one_pass, passes)) + " |")
    return lines


def training_table(problem: Problem, steps: int) -> list[str]:
    eval_index = torch.arange(4096)
    x_eval, y_eval = problem.train.images[eval_index], problem.train.labels[eval_index]
    x_test, y_test = problem.test.images[:2000], problem.test.labels[:2000]
    header = "| projector | passes/step | train loss start → end | test acc. | non-finite steps refused | verdict |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name in PROJECTORS:
        problem.reset()
        problem.generator.manual_seed(1)
        opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", projector=name, lr=6.0, rho=1.0)
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
            f"| {name} | {statistics.mean(passes):.1f} | {start_loss:.3f} → {end_loss:.3f} | {100 * accuracy:.1f}% "
            f"| {refused}/{steps} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer mini-batches and steps (a few minutes on 2 cores)")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX .gz files")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = Problem(args.data_dir)
    batches, quad_steps, train_steps = (3, 20, 50) if args.quick else (10, 100, 200)
    command = "python benchmarks/projectors.py" + (" --quick" if args.quick else "")
    print(f"<!-- produced by `{command}` on a {torch.get_num_threads()}-thread CPU, torch {torch.__version__} -->\n")
    print(
        "### Relative residual ‖∇φ‖/‖θ̃ − θ_t‖ after one step at a budget of B passes "
        f"(median of {batches} mini-batches; passes actually spent in brackets)\n"
    )
    data = [problem.next_batch() for _ in range(batches)]
    residuals, gaps = residual_tables(problem, data)
    print("\n".join(residuals), "\n")
    print(
        "### φ-gap (φ(θ) − φ*)/φ(θ_t) after one step at a budget of B passes, φ in float64 "
        f"(median of the same {batches} mini-batches; φ* from the smoothing continuation)\n"
    )
    print("\n".join(gaps), "\n")
    print(f"### Gently curved 50-D quadratic, `gauss-newton`, rtol = 1e-6 ({quad_steps} steps)\n")
    print("\n".join(quadratic_table(quad_steps)), "\n")
    print(f"### Floor of the relative residual: `lbfgs` (history 20) with 300 passes (the same {batches} mini-batches)\n")
    print("\n".join(floor_table(problem, data)), "\n")
    print(f"### CPU time outside closure calls (ρ = 1, η = 0.1, budget 21 passes; median of {3 * batches} steps)\n")
    print("\n".join(overhead_table(problem, batches)), "\n")
    print("### The same for `gauss-newton` with larger mini-batches (2 batches × 3 steps each)\n")
    print("\n".join(batch_size_table(problem, (128, 512, 2048))), "\n")
    print(f"### Training at ρ = 1, η = 6 from the same point ({train_steps} steps, batch 128, default budgets)\n")
    print("\n".join(training_table(problem, train_steps)))
    return 0


if __name__ == "__main__":
    run_script(main)
