"""The comparison harness's cost against a bare ``torch.optim`` loop over the same in-memory batches:
an MLP 784-256-256-10 with SGD (momentum 0.9) for ``--budget`` passes at batch 128, each measured
``--repeats`` times interleaved; prints the median times and the ratios."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, positive_int, run_script

from nonlocal_opt.comparison import ComparisonConfig, RunSpec, load_specs, train_run
from nonlocal_opt.comparison.data import BatchStream, load_splits
from nonlocal_opt.training.models import build_model

SPEC = {"name": "sgdm", "rule": "local", "base": "sgd", "fixed": {"lr": 0.03, "momentum": 0.9}}


def bare_loop(config: ComparisonConfig, splits, seed: int) -> float:
    """Seconds of ``config.budget`` plain ``torch.optim.SGD`` steps on the harness's batch stream."""
    torch.manual_seed(seed)
    model = build_model(config.model, splits.input_shape, splits.num_classes)
    opt = torch.optim.SGD(model.parameters(), **SPEC["fixed"])
    stream = BatchStream(splits.train_x, splits.train_y, config.batch_size, torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for _ in range(config.budget):
        x, y = stream.next()

        def closure(x=x, y=y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=positive_int, default=4690, help="passes (= SGD steps) per run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repetitions")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 300 passes, 1 repeat")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget, repeats = (300, 1) if args.quick else (args.budget, args.repeats)
    base = dict(budget=budget, dataset="synthetic" if args.quick else "fashion-mnist", data_dir=args.data_dir,
                val_size=256 if args.quick else 5000)
    default = ComparisonConfig(**base)
    final_only = ComparisonConfig(**base, evals=1, fractions=(1.0,))
    splits = load_splits(default, 0.0)
    (spec,) = load_specs([SPEC])
    times: dict[str, list[float]] = {"bare": [], "harness train": [], "harness wall, 1 eval": [], "harness wall, default evals": []}
    for repeat in range(repeats):
        times["bare"].append(bare_loop(default, splits, seed=repeat))
        record = train_run(final_only, RunSpec(spec, dict(SPEC["fixed"]), repeat, 0.0, "final"), splits)
        times["harness train"].append(record["train_seconds"])
        times["harness wall, 1 eval"].append(record["wall_seconds"])
        record = train_run(default, RunSpec(spec, dict(SPEC["fixed"]), repeat, 0.0, "final"), splits)
        times["harness wall, default evals"].append(record["wall_seconds"])
    print(machine())
    bare = statistics.median(times["bare"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:30s} median {median:7.2f} s  ratio to bare {median / bare:5.3f}  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    run_script(main)
