"""Cost table: step time, passes, peak memory, ratio to SGD, and time-to-target, in one process.

For each model and optimizer/projector: one trainer run (``nonlocal_opt.training.train``, seed 0,
batch 128) of ``--epochs`` × ``--eval-every`` steps, validated after every ``--eval-every`` steps. From
its ``metrics.csv``: the median step time (first step excluded), the mean forward+backward passes per
step (``grad_evals``) and the training time (sum of step times) until the validation accuracy first
reaches the target — the highest accuracy that every optimizer of that model reaches, among those that
take most of their steps (< 50 % refused); only for models run with at least 2 validations. Finished
runs are reused when rerun with the same settings (``--no-cache`` to remeasure). Peak memory is
measured separately on one step of a plain ``compose`` loop (CUDA: ``max_memory_allocated``; CPU: the
peak of live tensor storages, tracked by a dispatch mode, since PyTorch keeps no CPU allocator stats).

    python benchmarks/speed.py --quick --json speed.json     # a few minutes on 2 CPU cores
    python benchmarks/speed.py                               # full mode: 10 × 50 steps per optimizer and model

Writes ``speed.csv``, ``speed.md`` (and ``--json FILE``: rows with keys ``optimizer``, ``projector``,
``model``, ``step_time_s``, ``passes_per_step``, ``peak_mem_mb``, ``ratio_to_sgd``) and
``time_to_target.csv`` under ``--out`` (default ``benchmarks/out/speed``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import step_cost
import torch
import torch.nn.functional as F
from _common import (
    PRESETS,
    PeakMemory,
    RunSummary,
    UserError,
    comma_list,
    common_arguments,
    machine,
    markdown_table,
    parse_optimizers,
    positive_int,
    prepare,
    run_script,
    run_training,
    train_config,
    write_csv,
)

from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.training.config import TrainConfig, optimizer_hyperparameters
from nonlocal_opt.training.data import load_dataset
from nonlocal_opt.training.models import build_model

JSON_KEYS = ("optimizer", "projector", "model", "step_time_s", "passes_per_step", "peak_mem_mb", "ratio_to_sgd")
MAX_REFUSED = 0.5
FULL = {"epochs": [10], "eval_every": [50], "limit_val_batches": None}
QUICK = {"epochs": [2, 1], "eval_every": [10, 3], "limit_val_batches": 5}


def peak_step_memory_mb(config: TrainConfig, batch, device: torch.device) -> float:
    """Peak memory (MiB) of one optimizer step after a warm-up step (which creates the optimizer state)."""
    torch.manual_seed(0)
    inputs, targets = (t.to(device) for t in batch)
    model = build_model(config.model, inputs.shape[1:], 10).to(device)
    opt = compose(model.parameters(), config.optimizer, base=config.base, projector=config.projector,
                  **optimizer_hyperparameters(config))

    def closure(fresh_batch: bool = False):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    opt.step(closure)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        opt.step(closure)
        return torch.cuda.max_memory_allocated() / 2**20
    held = [inputs, targets, *model.parameters(), *model.buffers()]
    held += [p.grad for p in model.parameters() if p.grad is not None]
    held += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    with PeakMemory(held) as tracker:
        opt.step(closure)
    return tracker.peak / 2**20


def time_to_target(runs: dict[str, RunSummary], eval_every: int) -> tuple[float, dict[str, float]]:
    """Target = min of the best validation accuracies of the optimizers that take most of their steps
    (< ``MAX_REFUSED`` refused as non-finite; one that refuses nearly all would set the target at chance);
    per optimizer the training time (sum of step times) until its first validation at or above it."""
    best = {label: max(e["val/acc"] for e in run.epochs) for label, run in runs.items()
            if run.epochs and run.refused_fraction < MAX_REFUSED}
    target = min(best.values(), default=math.nan)
    times = {}
    for label, run in runs.items():
        cumulative = list(itertools.accumulate(run.step_times))
        first = next((i for i, e in enumerate(run.epochs) if e["val/acc"] >= target), None)
        times[label] = math.nan if first is None else cumulative[min((first + 1) * eval_every, len(cumulative)) - 1]
    return target, times


def per_model(values: list[int], models: list[str], flag: str) -> dict[str, int]:
    if len(values) == 1:
        values = values * len(models)
    if len(values) < len(models):
        raise UserError(f"{flag} needs one value, or one per model ({len(models)}: {', '.join(models)}), got {values}")
    return dict(zip(models, values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "speed")
    parser.add_argument("--models", type=comma_list(str, "model names"), default=["mlp", "resnet6"])
    parser.add_argument("--optimizers", default=",".join(PRESETS), help=f"presets: {', '.join(PRESETS)} (@key=value overrides)")
    parser.add_argument("--epochs", type=comma_list(positive_int, "integers >= 1"), default=None,
                        help="validations per run, one value or one per model (full 10; quick 2,1)")
    parser.add_argument("--eval-every", type=comma_list(positive_int, "integers >= 1"), default=None,
                        help="steps between validations, one value or one per model (full 50; quick 10,3)")
    parser.add_argument("--limit-val-batches", type=positive_int, default=None, help="validation batches (full: all; quick 5)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--no-cache", action="store_true", help="remeasure runs that already have a summary")
    parser.add_argument("--json", type=Path, default=None, help="also write the cost rows to this JSON file")
    parser.add_argument("--no-peers", action="store_true", help="skip the side-by-side step cost against peer SAM implementations")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    presets = parse_optimizers(args.optimizers)
    if "sgd" not in presets:
        raise UserError("--optimizers must include sgd: the ratios are to SGD's step time")
    epochs = per_model(args.epochs, args.models, "--epochs")
    eval_every = per_model(args.eval_every, args.models, "--eval-every")
    out = prepare(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# speed: {', '.join(args.models)} × {len(presets)} optimizers\n# {machine()}", flush=True)
    start = time.perf_counter()
    sample = load_dataset(args.dataset, "train", args.data_dir, args.download)
    batch = (sample.images[: args.batch_size].clone(), sample.labels[: args.batch_size].clone())  # not views of the set
    rows, target_rows = [], []
    for model in args.models:
        runs: dict[str, RunSummary] = {}
        for label, preset in presets.items():
            config = train_config(preset, dataset=args.dataset, model=model, epochs=epochs[model],
                                  limit_train_batches=eval_every[model], limit_val_batches=args.limit_val_batches,
                                  batch_size=args.batch_size, logdir=str(out / "runs" / model / label),
                                  data_dir=args.data_dir, download=args.download)
            runs[label] = run = run_training(config, cache=not args.no_cache)
            timed = run.step_times[1:] or run.step_times
            probe = compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, base=config.base, projector=config.projector)
            rows.append({"optimizer": label, "projector": probe.projector.name if probe.projector else "none", "model": model,
                         "step_time_s": statistics.median(timed), "passes_per_step": statistics.fmean(run.passes),
                         "peak_mem_mb": peak_step_memory_mb(config, batch, device),
                         "ratio_to_sgd": math.nan, "steps_timed": len(timed),
                         "refused_frac": run.refused_fraction})
            print(f"{model} {label}: {rows[-1]['step_time_s'] * 1e3:.1f} ms/step, {rows[-1]['passes_per_step']:.1f} passes, "
                  f"{rows[-1]['peak_mem_mb']:.1f} MiB", flush=True)
        sgd_time = next(r["step_time_s"] for r in rows if r["model"] == model and r["optimizer"] == "sgd")
        for row in rows:
            if row["model"] == model:
                row["ratio_to_sgd"] = row["step_time_s"] / sgd_time
        if epochs[model] < 2:  # one validation per run: every optimizer "reaches" the target at once
            continue
        target, times = time_to_target(runs, eval_every[model])
        for label, run in runs.items():
            target_rows.append({"model": model, "optimizer": label, "target_acc": target,
                                "best_val_acc": max((e["val/acc"] for e in run.epochs), default=math.nan),
                                "time_to_target_s": times[label], "steps": len(run.step_times),
                                "refused_frac": run.refused_fraction})
    peers = "" if args.no_peers else step_cost.report("mlp-0.27M", 128, "sgd", rounds=5 if args.quick else 15, steps=3)
    wall = time.perf_counter() - start
    cost = markdown_table(
        ("model", "optimizer", "projector", "median step", "passes / step", "peak memory", "× SGD step", "steps refused"),
        [(r["model"], r["optimizer"], r["projector"], f"{r['step_time_s'] * 1e3:.1f} ms", f"{r['passes_per_step']:.1f}",
          f"{r['peak_mem_mb']:.1f} MiB", f"{r['ratio_to_sgd']:.1f}", f"{100 * r['refused_frac']:.0f} %") for r in rows])
    ttt = markdown_table(
        ("model", "optimizer", "target val acc", "best val acc", "training time to target", "steps run", "steps refused"),
        [(r["model"], r["optimizer"], f"{100 * r['target_acc']:.1f} %", f"{100 * r['best_val_acc']:.1f} %",
          "not reached" if math.isnan(r["time_to_target_s"]) else f"{r['time_to_target_s']:.1f} s", r["steps"],
          f"{100 * r['refused_frac']:.0f} %") for r in target_rows])
    settings = ", ".join(f"{m}: {epochs[m]} validations every {eval_every[m]} steps" for m in args.models)
    report = (f"<!-- produced by `{command}` in {wall:.0f} s on {machine()} -->\n\n"
              f"Batch {args.batch_size}, seed 0, {settings}; validation on {args.limit_val_batches or 'all'} batches.\n\n"
              f"{cost}\n\nTime to target:\n\n{ttt}\n")
    if peers:
        report += f"\nSide by side, one process (benchmarks/step_cost.py):\n\n{peers}\n"
    written = [write_csv(out / "speed.csv", rows), write_csv(out / "time_to_target.csv", target_rows)]
    (out / "speed.md").write_text(report)
    written.append(out / "speed.md")
    if args.json is not None:
        args.json.write_text(json.dumps([{key: row[key] for key in JSON_KEYS} for row in rows], indent=1))
        written.append(args.json)
    print("\n" + report)
    for path in written:
        print(f"wrote {path}")
    print(f"total {wall:.0f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
