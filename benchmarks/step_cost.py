"""Step cost side by side in one process: step time relative to a plain SGD (or AdamW) step, per pass and
relative to our SAM, and extra peak memory in parameter-sized vectors, for our rules (every SAM variant
and refresh policy among them) and peer SAM implementations. Where the passes vary from step to step (the
refresh policy) they are the mean of ``stats["grad_evals"]`` over the timed steps (read after each step,
inside its timing).

Every optimizer trains its own copy of one MLP on one fixed random batch; rounds are interleaved (each
round times ``--steps`` steps of every optimizer in turn) and the median over ``--rounds`` rounds is
reported, so drifts of a shared machine hit all optimizers alike. Ratios come from one run. Minor page
faults per step (a fresh allocation the kernel must map and zero) are counted over the timed steps.

    python benchmarks/step_cost.py                         # 0.27M MLP at batch 128, 5.8M MLP at 8 and 32
    python benchmarks/step_cost.py --base adamw            # the same over AdamW
    python benchmarks/step_cost.py --profile sam           # where the time of one composition goes
    python benchmarks/step_cost.py --quick --device-path   # the device path (what a GPU runs), on the CPU

Peers: pytorch-optimizer's ``SAM`` (``pip install -e ".[bench]"``; left out when missing) and a
two-pass SAM written here from the formulas with per-tensor ``_foreach`` ops.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import PeakMemory, UserError, machine, markdown_table, run_script
from torch.utils._pytree import tree_leaves

import nonlocal_opt

MODELS = {"mlp-0.27M": (256, 256), "mlp-5.8M": (2048, 2048)}
CASES = (("mlp-0.27M", 128), ("mlp-5.8M", 32), ("mlp-5.8M", 8))
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01))}


def mlp(widths: tuple[int, ...]) -> torch.nn.Module:
    sizes = (784, *widths, 10)
    layers: list[torch.nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class TwoPassSAM:
    """SAM from the formulas, per tensor: ``ε = ρ g/‖g‖``, ``w + ε``, second pass, ``w``, base step."""

    def __init__(self, params, base: type[torch.optim.Optimizer], rho: float, **kwargs: Any):
        self.params = list(params)
        self.base, self.rho = base(self.params, **kwargs), rho

    def zero_grad(self) -> None:
        self.base.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for p in self.params]
        scale = self.rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
        eps = torch._foreach_mul(grads, scale)
        torch._foreach_add_(self.params, eps)
        with torch.enable_grad():
            closure()
        torch._foreach_sub_(self.params, eps)
        self.base.step()
        return loss


class PeerSAM:
    """pytorch-optimizer's SAM driven the way its docs say: a first pass, then ``step(closure)``."""

    def __init__(self, params, base: type[torch.optim.Optimizer], rho: float, **kwargs: Any):
        from pytorch_optimizer import SAM

        self.opt = SAM(params, base, rho=rho, **kwargs)

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = closure()
        self.opt.step(closure)
        return loss


class Plain:
    """The base optimizer alone: one pass and its step (the unit of every ratio)."""

    def __init__(self, params, base: type[torch.optim.Optimizer], **kwargs: Any):
        self.opt = base(params, **kwargs)

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = closure()
        self.opt.step()
        return loss


def has_peer() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def contenders(base_name: str, device_path: bool = False) -> dict[str, tuple[Callable[..., Any], float | None]]:
    """Label → (factory ``params -> optimizer``, forward+backward passes per step, ``None`` where they vary from
    step to step and are measured from ``stats["grad_evals"]``); ``device_path``: our compositions take the
    device path (no host reads; what a GPU runs)."""
    base, kwargs = BASES[base_name]

    def ours(rule: str, **extra: Any) -> Callable[..., Any]:
        return lambda params: nonlocal_opt.compose(params, rule, base=base, device_path=device_path, **kwargs, **extra)

    table: dict[str, tuple[Callable[..., Any], float | None]] = {
        base_name: (lambda params: Plain(params, base, **kwargs), 1),
        "local": (ours("local"), 1),
        "sam": (ours("sam", rho=0.05), 2),
        "asam": (ours("sam", rho=0.5, adaptive=True), 2),
        "asam, eta=0.01": (ours("sam", rho=0.5, adaptive=True, eta=0.01), 2),
        "gsam": (ours("gsam", rho=0.05, alpha=0.4), 2),
        "wsam": (ours("wsam", rho=0.05, gamma=0.9), 2),  # decoupled, the default
        "wsam, coupled": (ours("wsam", rho=0.05, gamma=0.9, decoupled=False), 2),
        "friendly-sam": (ours("friendly-sam", rho=0.05, sigma=1.0, lmbda=0.9), 2),
        "looksam k=5": (ours("sam", rho=0.05, refresh_every=5), None),
        "periodic sam k=5": (ours("sam", rho=0.05, refresh_every=5, reuse="none"), None),
        "ae-sam": (ours("sam", rho=0.05, refresh="gradient-norm", reuse="none"), None),
        "msam": (ours("msam", rho=0.05, beta=0.9), 1),
        "two-pass SAM": (lambda params: TwoPassSAM(params, base, rho=0.05, **kwargs), 2),
    }
    if has_peer():
        table["pytorch-optimizer SAM"] = (lambda params: PeerSAM(params, base, rho=0.05, **kwargs), 2)
    rbo = dict(rho=1.0, rtol=None)
    table["rbo gauss-newton K=10"] = (ours("rbo", projector="gauss-newton", max_iters=10, **rbo), 11)
    table["rbo footpoint K=20"] = (ours("rbo", projector="footpoint", max_iters=20, step_size=0.1, rho=1.0), 21)
    table["rbo gauss-newton K=10, refresh_every=5"] = (ours("rbo", projector="gauss-newton", max_iters=10, refresh_every=5, **rbo), None)
    table["entropy-sgd L=10"] = (ours("entropy-sgd", inner_steps=10), 10)
    table["entropy-sgd L=10, no noise"] = (ours("entropy-sgd", inner_steps=10, noise=0.0), 10)
    return table


def closure_for(opt: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def measure(model_name: str, batch: int, base_name: str, rounds: int, steps: int, device_path: bool = False) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    template = mlp(MODELS[model_name])
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    d = sum(p.numel() for p in template.parameters())
    runs = {}
    for label, (factory, passes) in contenders(base_name, device_path).items():
        model = copy.deepcopy(template)
        opt = factory(model.parameters())
        closure = closure_for(opt, model, x, y)
        opt.step(closure)  # warm-up: creates the state
        runs[label] = (model, opt, closure, passes)
    times: dict[str, list[float]] = {label: [] for label in runs}
    faults, counted = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for label, (_, opt, closure, passes) in runs.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(steps):
                opt.step(closure)
                if passes is None:
                    counted[label] += opt.stats["grad_evals"]
            times[label].append((time.perf_counter() - start) / steps)
            faults[label] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    peaks = {label: peak_bytes(model, opt, closure) for label, (model, opt, closure, _) in runs.items()}
    unit, sam = statistics.median(times[base_name]), statistics.median(times["sam"])
    rows = []
    for label, (_, _, _, passes) in runs.items():
        passes = counted[label] / (rounds * steps) if passes is None else passes
        step = statistics.median(times[label])
        rows.append({
            "model": model_name, "batch": batch, "base": base_name, "optimizer": label, "passes": passes,
            "step_ms": 1e3 * step, "ratio": step / unit, "ratio_per_pass": step / unit / passes, "ratio_to_sam": step / sam,
            "extra_peak_vectors": (peaks[label] - peaks[base_name]) / (4 * d),
            "page_faults_per_step": faults[label] / (rounds * steps),
        })
    return rows


def peak_bytes(model: torch.nn.Module, opt: Any, closure: Callable[[], torch.Tensor]) -> int:
    """Peak bytes of live tensors during one step, counting what the step starts with: parameters,
    gradients, optimizer state (tensors in lists too, such as an EMA per parameter) and the scratch buffers
    a composed optimizer keeps between steps."""
    held = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    states = [getattr(o, "state", {}) for o in (opt, getattr(opt, "base", None), getattr(opt, "opt", None)) if o is not None]
    held += [v for state in states for entry in state.values() for v in tree_leaves(entry) if isinstance(v, torch.Tensor)]
    resources = getattr(opt, "resources", None)
    held += resources.scratch_tensors() if resources is not None else []
    with PeakMemory(held) as tracker:
        opt.step(closure)
    return tracker.peak


def profile(label: str, base_name: str, model_name: str, batch: int, steps: int) -> str:
    """The ten most expensive operators of ``steps`` steps of ``label`` (self CPU time)."""
    factory, _ = contenders(base_name)[label]
    torch.manual_seed(0)
    model = mlp(MODELS[model_name])
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    opt = factory(model.parameters())
    closure = closure_for(opt, model, x, y)
    opt.step(closure)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step(closure)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="sgd", help="base optimizer of every composition")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median reported)")
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--profile", metavar="OPTIMIZER", default=None, help="print where the time of one optimizer goes instead")
    parser.add_argument("--quick", action="store_true", help="only the 0.27M MLP at batch 128")
    parser.add_argument("--device-path", action="store_true", help="our compositions take the device path (device_path=True)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise UserError("--rounds and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    if args.profile is not None:
        if args.profile not in contenders(args.base):
            raise UserError(f"unknown optimizer {args.profile!r}; choose from {', '.join(contenders(args.base))}")
        print(profile(args.profile, args.base, "mlp-0.27M", 128, 20))
        return 0
    path = "device" if args.device_path else "host"
    print(f"{machine()}; {args.threads} thread(s), {args.rounds} interleaved rounds x {args.steps} steps, base {args.base}, {path} path")
    if not has_peer():
        print("pytorch-optimizer not installed (pip install -e '.[bench]'): its SAM is left out")
    for model_name, batch in CASES[:1] if args.quick else CASES:
        print(f"\n### {model_name}, batch {batch}, base {args.base}\n")
        print(report(model_name, batch, args.base, args.rounds, args.steps, args.device_path), flush=True)
    return 0


def report(model_name: str, batch: int, base_name: str, rounds: int, steps: int, device_path: bool = False) -> str:
    """The table of :func:`measure` as markdown."""
    rows = measure(model_name, batch, base_name, rounds, steps, device_path)
    header = ["optimizer", "passes", "ms/step", f"× {base_name} step", "per pass", "× sam step", "extra peak (vectors)",
              "page faults/step"]
    return markdown_table(header, [[r["optimizer"], f"{r['passes']:.3g}", f"{r['step_ms']:.2f}", f"{r['ratio']:.2f}",
                                    f"{r['ratio_per_pass']:.2f}", f"{r['ratio_to_sam']:.2f}", f"{r['extra_peak_vectors']:.1f}",
                                    f"{r['page_faults_per_step']:.0f}"] for r in rows])


if __name__ == "__main__":
    run_script(main)
