"""On a CUDA GPU: step time of every rule with CUDA events, whether a step synchronises with the host,
and whether one step can be captured in a CUDA graph. Without a GPU it says so and exits 0.

    python benchmarks/gpu_step.py                    # MLP 784-2048-2048-10, batch 128, SGD base
    python benchmarks/gpu_step.py --base adamw --batch 32

For each composition (device path on, the default on CUDA):

- ``ms/step``: median of ``--steps`` steps timed with ``torch.cuda.Event`` after a warm-up, and the
  ratio to a plain step of the base optimizer;
- ``host syncs``: ``none`` when a step runs under ``torch.cuda.set_sync_debug_mode("error")`` without
  an error, else the first error (the CPU stand-in of this check is ``nonlocal_opt.testing.NoHostReads``);
- ``CUDA graph``: ``captured`` when ``torch.cuda.graph`` captures one step (closure included) and a
  replay changes the parameters like an eager step, else the error.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import UserError, machine, markdown_table, run_script
from step_cost import BASES, mlp

import nonlocal_opt

RULES = {
    "local": ("local", {}),
    "sam": ("sam", dict(rho=0.05)),
    "asam": ("sam", dict(rho=0.5, adaptive=True)),
    "rbo gauss-newton K=10": ("rbo", dict(projector="gauss-newton", max_iters=10, rho=1.0, rtol=None)),
    "rbo footpoint K=20": ("rbo", dict(projector="footpoint", max_iters=20, rho=1.0)),
    "entropy-sgd L=10": ("entropy-sgd", dict(inner_steps=10, seed=0)),
}


def build(label: str, base_name: str, batch: int) -> tuple[torch.nn.Module, Any, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    model = mlp((2048, 2048)).cuda()
    x, y = torch.randn(batch, 784, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")
    base, kwargs = BASES[base_name]
    kwargs = {**kwargs, "capturable": True} if base_name == "adamw" else kwargs
    if label == base_name:
        opt: Any = base(model.parameters(), **kwargs)
    else:
        rule, extra = RULES[label]
        opt = nonlocal_opt.compose(model.parameters(), rule, base=base, **kwargs, **extra)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure


def step(opt: Any, closure: Callable[[], torch.Tensor]) -> None:
    if isinstance(opt, nonlocal_opt.ComposedOptimizer):
        opt.step(closure)
    else:
        closure()
        opt.step()


def time_steps(opt: Any, closure: Callable[[], torch.Tensor], steps: int) -> float:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(opt, closure)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_syncs(opt: Any, closure: Callable[[], torch.Tensor]) -> str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(opt, closure)
    except RuntimeError as error:
        return str(error).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


def capture(label: str, base_name: str, batch: int) -> str:
    model, opt, closure = build(label, base_name, batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(opt, closure)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(opt, closure)
    except (RuntimeError, AssertionError) as error:
        return "failed: " + str(error).splitlines()[0][:80]
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    graph.replay()
    torch.cuda.synchronize()
    moved = (torch.nn.utils.parameters_to_vector(model.parameters()) - before).norm().item()
    return "captured" if moved > 0 else "captured, but a replay did not move the parameters"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="sgd")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per composition (median reported)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        raise UserError("--batch and --steps must be >= 1")
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (run this script on a machine with a GPU)")
        return 0
    print(f"{machine()}; {torch.cuda.get_device_name()}; MLP 784-2048-2048-10, batch {args.batch}, base {args.base}")
    rows, unit = [], None
    for label in (args.base, *RULES):
        _, opt, closure = build(label, args.base, args.batch)
        step(opt, closure)  # warm-up: creates the state, lazy CUDA initialisation
        ms = time_steps(opt, closure, args.steps)
        unit = unit or ms
        syncs = host_syncs(opt, closure)
        rows.append([label, f"{ms:.2f}", f"{ms / unit:.2f}", syncs, capture(label, args.base, args.batch)])
        print(rows[-1], flush=True)
    print(markdown_table(["optimizer", "ms/step", f"× {args.base} step", "host syncs", "CUDA graph"], rows))
    return 0


if __name__ == "__main__":
    run_script(main)
