"""Wall-clock time of one comparison trained one run at a time and ``--jobs`` runs at a time: the plan of
``nonlocal-opt compare --quick`` (every registered rule's specs at the quick settings), each into a fresh
results file. Prints both times, the speed-up, the runs' summed training seconds at each (their growth is
the contention between runs), and whether the two files agree but for timings."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, positive_int, run_script

from nonlocal_opt.comparison import ComparisonConfig, run_comparison
from nonlocal_opt.comparison.quick import QUICK_SETTINGS, quick_specs

TIMINGS = ("seconds", "train_seconds", "wall_seconds")


def without_timings(value):
    """``value`` (a results file's JSON) with every wall-clock field removed."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def timed(config: ComparisonConfig, path: Path, jobs: int) -> tuple[float, dict]:
    """Seconds of the whole comparison into ``path`` at ``jobs``, and the file it wrote."""
    start = time.perf_counter()
    run_comparison(config, quick_specs(), path, progress=False, jobs=jobs, threads=1)
    return time.perf_counter() - start, json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at a time in the second comparison")
    parser.add_argument("--quick", action="store_true", help="synthetic data and 60 passes per run")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {**QUICK_SETTINGS, "final_seeds": tuple(QUICK_SETTINGS["final_seeds"])}
    if args.quick:
        settings |= {"budget": 60, "train_subset": 512, "val_size": 128, "test_subset": 256}
    config = ComparisonConfig(**settings, dataset="synthetic" if args.quick else "fashion-mnist", data_dir=args.data_dir)
    print(machine())
    with tempfile.TemporaryDirectory() as directory:
        results = {jobs: timed(config, Path(directory) / f"jobs{jobs}.json", jobs) for jobs in (1, args.jobs)}
    (one, first), (many, second) = results[1], results[args.jobs]
    train = {jobs: sum(run["train_seconds"] for run in data["runs"].values()) for jobs, (_, data) in results.items()}
    same = without_timings(first) == without_timings(second)
    print(f"{len(first['runs'])} runs of {config.budget} passes: jobs 1 {one:.1f} s, jobs {args.jobs} {many:.1f} s, "
          f"speed-up {one / many:.2f}")
    print(f"summed training seconds of the runs: jobs 1 {train[1]:.1f} s, jobs {args.jobs} {train[args.jobs]:.1f} s "
          f"(ratio {train[args.jobs] / train[1]:.2f})")
    print(f"records equal but for timings: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    run_script(main)
