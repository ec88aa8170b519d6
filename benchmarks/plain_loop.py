"""The equal-compute baselines, reproduced by a plain PyTorch loop.

Reads the picks of the local baselines (``sgd-m``, ``adamw``) from a published results file, trains the
784-256-256-10 MLP with ``torch.optim.SGD`` / ``torch.optim.AdamW`` on Fashion-MNIST read straight from its
IDX files, for the part's budget (one pass per update), batch and validation hold-out, on the part's final
seeds, and prints the final test accuracy next to the harness's, seed by seed. Nothing of nonlocal_opt runs
in the loop: the data, the split, the label noise, the seeding, the model and the loop are written here from
their definitions in docs/results.md (protocol of the equal-compute comparison), so a match says that a
published baseline is a plain PyTorch run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, machine, markdown_table, run_script

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"sgd-m": "sgd", "adamw": "adamw"}
SETTINGS = {"sgd": {"lr", "momentum"}, "adamw": {"lr", "weight_decay"}}  # what the plain loop passes on
NOISE_SEED_OFFSET = 7919  # the label noise of a part with split seed s is drawn with seed s + 7919


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip): big-endian dimensions after a 4-byte magic whose last byte is the rank."""
    data = gzip.decompress(path.read_bytes())
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return torch.frombuffer(bytearray(data[4 + 4 * rank :]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(directory: Path) -> tuple[torch.Tensor, ...]:
    """Training and test images (pixels / 255, standardised by the training images' mean and sd rounded to
    four digits) and labels."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UserError(f"Fashion-MNIST files missing in {directory} ({', '.join(missing)}); "
                        "apt-get install dataset-fashion-mnist, or pass --data-dir DIR")
    x_train, y_train, x_test, y_test = (read_idx(directory / n) for n in names)
    x_train, x_test = x_train.float().div(255).flatten(1), x_test.float().div(255).flatten(1)
    mean, sd = round(x_train.mean().item(), 4), round(x_train.std().item(), 4)
    return (x_train - mean) / sd, y_train.long(), (x_test - mean) / sd, y_test.long()


def noisy(labels: torch.Tensor, fraction: float, seed: int, classes: int = 10) -> torch.Tensor:
    """Symmetric label noise: with probability ``fraction`` a label becomes one of the other classes."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=gen) < fraction
    other = (labels + torch.randint(1, classes, labels.shape, generator=gen)) % classes
    return torch.where(flip, other, labels)


def training_index(size: int, val_size: int, seed: int) -> torch.Tensor:
    """The images left for training once ``val_size`` of a seeded permutation are held out for validation."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[val_size:].sort().values


def train_plain(hp: dict, base: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> nn.Module:
    """``steps`` updates of ``base`` at ``hp`` on shuffled batches: the model initialised after
    ``torch.manual_seed(seed)``, a new permutation each epoch from a generator seeded with ``seed`` (the
    harness's definition of a run's seed), the last partial batch of an epoch dropped."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if base == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.0))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.01))
    order, position = None, len(y)
    for _ in range(steps):
        if position + batch > len(y):
            order, position = torch.randperm(len(y), generator=generator), 0
        index = order[position : position + batch]
        position += batch
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).sum().item() / len(y)


def harness_final(part: dict, name: str, noise: str) -> dict[int, float]:
    """The harness's final test accuracy of ``name`` at ``noise`` per final seed."""
    return {run["seed"]: run["curve"]["test_acc"][-1] for run in part["runs"].values()
            if run["name"] == name and run["phase"] == "final" and repr(float(run["noise"])) == noise}


def pct(values: list[float]) -> str:
    sd = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.1f}{sd}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "equal_compute.json",
                        help="a results file written by equal_compute.py")
    parser.add_argument("--part", default="mlp_noise0", help="the MLP part whose baselines to reproduce")
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"), help="Fashion-MNIST IDX files")
    parser.add_argument("--budget", type=int, default=None, help="updates per run (default: the part's budget)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        parts = json.loads(args.results.read_text())["parts"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"cannot read results file {args.results} ({error}); pass --results FILE written by equal_compute.py") from None
    if args.part not in parts:
        raise UserError(f"{args.results} has no part {args.part!r}; choose from {', '.join(sorted(parts))}")
    part = parts[args.part]
    settings = part["settings"]
    if settings["model"] != "mlp" or settings["dataset"] != "fashion-mnist" or settings.get("augment", "none") != "none":
        raise UserError(f"part {args.part} is not the Fashion-MNIST MLP without augmentation; pass an mlp part")
    steps = args.budget or settings["budget"]
    x_train, y_train, x_test, y_test = fashion_mnist(args.data_dir)
    kept = training_index(len(y_train), settings["val_size"], settings["split_seed"])
    print(machine())
    print(f"{args.part}: {steps} updates at batch {settings['batch_size']}, {len(kept)} training images, "
          f"{len(y_test)} test images, results {args.results}")
    rows = []
    for noise, level in part["picks"].items():
        labels = noisy(y_train, float(noise), settings["split_seed"] + NOISE_SEED_OFFSET)
        for name, base in BASELINES.items():
            if name not in level:
                continue
            hp, accs, start = level[name]["hp"], {}, time.perf_counter()
            unknown = sorted(set(hp) - SETTINGS[base])
            if unknown:
                raise UserError(f"{name}'s pick sets {', '.join(unknown)}, which the plain loop does not pass to "
                                f"torch.optim; it reproduces picks of {', '.join(sorted(SETTINGS[base]))} only")
            for seed in settings["final_seeds"]:
                model = train_plain(hp, base, x_train[kept], labels[kept], steps, settings["batch_size"], seed)
                accs[seed] = accuracy(model, x_test, y_test)
            harness = harness_final(part, name, noise)
            gap = max((abs(accs[s] - harness[s]) for s in accs if s in harness), default=None)
            rows.append([name, f"{float(noise):g}", ", ".join(f"{k}={v:g}" for k, v in hp.items()), pct(list(accs.values())),
                         pct(list(harness.values())) if harness else "—", "—" if gap is None else f"{100 * gap:.2f}",
                         f"{time.perf_counter() - start:.0f}"])
    print(markdown_table(["baseline", "noise", "hp", "plain loop: final test %", "harness: final test %",
                          "largest |difference| of a seed, points", "seconds"], rows))
    return 0


if __name__ == "__main__":
    run_script(main)
