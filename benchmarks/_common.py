"""Shared pieces of the result benchmarks (``accuracy.py``, ``speed.py``, ``ironing.py``).

Optimizer presets (labelled compositions run with the plugins' paper settings), ``PRESET@key=value`` specs, one
trainer run summarised from its ``metrics.csv``, 95 % t-intervals, CSV / markdown writers, the
machine description, and the one-line user-error exit every script shares.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from provenance import code_version
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nonlocal_opt.analysis.figures import MissingPlotDependency
from nonlocal_opt.cli.parsing import parse_value
from nonlocal_opt.training import ConfigError, TrainConfig, TrainingDiverged, train
from nonlocal_opt.training.data import DatasetNotFoundError
from nonlocal_opt.training.metrics import read_metrics

OUT_ROOT = Path(__file__).resolve().parent / "out"


class UserError(ValueError):
    """Bad input to a benchmark script: printed as one ``error:`` line, exit code 2."""


@attrs.frozen
class Preset:
    """A composition for ``TrainConfig``: rule, projector and the hyperparameters set on top of the
    components' ``paper`` presets (which ``train_config`` names, ``TrainConfig.preset``)."""

    rule: str
    projector: str | None = None
    overrides: dict[str, Any] = attrs.field(factory=dict)


# Labels → compositions; every hyperparameter not overridden comes from the plugins' "paper" presets
# (SGD η = 0.01; SAM ρ = 0.05; RBO ρ = 1, η = 6 and footpoint γ = 0.1 × K = 20; Entropy-SGD's γ, L and
# the reference code's settings): `nonlocal-opt plugins` lists them.
PRESETS: dict[str, Preset] = {
    "sgd": Preset("local"),
    "entropy-sgd": Preset("entropy-sgd"),
    "sam": Preset("sam"),
    "rbo": Preset("rbo", "footpoint"),
    "rbo-gn": Preset("rbo", "gauss-newton"),  # the best safeguarded projector (docs/projectors.md)
    "rbo-newton": Preset("rbo", "newton"),
    "rbo-lbfgs": Preset("rbo", "lbfgs"),
    "rbo-tangent": Preset("rbo", "tangent"),
}
PAPER_OPTIMIZERS = ("sgd", "entropy-sgd", "sam", "rbo", "rbo-gn")


def parse_optimizers(text: str) -> dict[str, Preset]:
    """``"sgd,rbo@lr=1@max_iters=40"`` → label → preset; ``@key=value`` overrides a hyperparameter."""
    out: dict[str, Preset] = {}
    for spec in (item.strip() for item in text.split(",")):
        if not spec:
            continue
        name, *assignments = spec.split("@")
        if name not in PRESETS:
            raise UserError(f"unknown optimizer {name!r} in --optimizers; choose from {', '.join(PRESETS)} "
                            "(optionally with @key=value overrides, e.g. rbo@lr=1)")
        overrides = dict(PRESETS[name].overrides)
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key:
                raise UserError(f"--optimizers: expected @key=value after {name!r}, got @{assignment!r}")
            overrides[key] = parse_value(value)
        out[spec] = attrs.evolve(PRESETS[name], overrides=overrides)
    if not out:
        raise UserError("--optimizers is empty; give a comma-separated list such as sgd,sam,rbo")
    return out


def comma_list(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated values, with a message naming ``what`` is expected."""

    def parse(text: str) -> list[Any]:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def common_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """``--quick``, ``--out``, ``--threads``, ``--data-dir``, ``--download``."""
    parser.add_argument("--quick", action="store_true", help="reduced settings: a few minutes on 2 CPU cores")
    parser.add_argument("--out", type=Path, default=OUT_ROOT / script, help=f"output directory (default benchmarks/out/{script})")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--data-dir", default=None, help="dataset directory (Fashion-MNIST IDX files, or torchvision's root)")
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST/CIFAR")


def run_script(main: Callable[[], int]) -> None:
    """Run ``main`` and exit with its code; bad input → one ``error:`` line on stderr and exit code 2; Ctrl-C →
    one line and exit code 130."""
    try:
        code = main()
    except (UserError, ConfigError, DatasetNotFoundError, MissingPlotDependency) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        code = 130
    sys.exit(code)


def prepare(args: argparse.Namespace) -> Path:
    """Set the thread count and create ``args.out``; returns it."""
    torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {args.out} ({error.strerror}); pass --out DIR") from None
    return args.out


def machine() -> str:
    """One line: CPU model, cores, torch threads, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}, code {code_version()}")


# Two-sided 95 % quantiles t_{0.975, ν} of Student's t for ν = 1..30 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(dof: int) -> float:
    """``t_{0.975, ν}``; beyond the table the expansion ``z + (z³ + z)/(4ν)``, z = 1.95996."""
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof)


def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t-interval ``t_{0.975, n−1} s/√n``, n) of the finite values;
    the half-width is NaN for n < 2 (and the mean for n = 0)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return finite[0], math.nan, 1
    return statistics.fmean(finite), t_quantile(n - 1) * statistics.stdev(finite) / math.sqrt(n), n


def fmt_ci(mean: float, half: float, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """``"0.412 ± 0.010"`` (``"—"`` for NaN; no ± part when the half-width is NaN)."""
    if not math.isfinite(mean):
        return "—"
    text = f"{mean * scale:.{digits}f}{unit}"
    return text if not math.isfinite(half) else f"{text} ± {half * scale:.{digits}f}{unit}"


def pct(stat: dict) -> str:
    """A summary statistic ``{"mean", "sd", "n"}`` of a fraction as ``"mean ± sd"`` in % (no sd for one
    value, "—" for none)."""
    if stat["n"] == 0:
        return "—"
    sd = f" ± {100 * stat['sd']:.1f}" if stat["n"] > 1 else ""
    return f"{100 * stat['mean']:.1f}{sd}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` (dicts with the same keys) as a CSV with a header line."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


@attrs.frozen
class RunSummary:
    """One trainer run, read back from its ``metrics.csv``."""

    epochs: list[dict[str, float]]  # per finished epoch: epoch/train_loss, val/loss, val/acc, epoch_time, …
    step_times: list[float]  # s, per optimizer step
    passes: list[float]  # forward+backward passes per step (grad_evals)
    refused: list[float]  # 1.0 where the rule refused a non-finite step
    wall_s: float
    diverged: str | None  # the trainer's message when the loss became NaN/inf

    @property
    def refused_fraction(self) -> float:
        return statistics.fmean(self.refused) if self.refused else math.nan

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def floats(row: dict[str, str]) -> dict[str, float]:
    return {key: float(value) for key, value in row.items() if value not in ("", None) and key != "scope"}


def run_training(config: TrainConfig, cache: bool = True) -> RunSummary:
    """``train(config)`` into a fresh ``config.logdir`` (checkpoints deleted afterwards), summarised.

    With ``cache``, a ``summary.json`` left by an earlier run of the same config is returned instead.
    A ``TrainingDiverged`` run is kept, with the epochs it finished.
    """
    logdir = Path(config.logdir)
    cached = logdir / "summary.json"
    if cache and cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("config") == config.flat():
            return RunSummary(**saved["summary"])
    shutil.rmtree(logdir, ignore_errors=True)
    start, diverged = time.perf_counter(), None
    try:
        train(config)
    except TrainingDiverged as error:
        diverged = str(error)
    wall = time.perf_counter() - start
    rows = read_metrics(logdir / "metrics.csv") if (logdir / "metrics.csv").exists() else []
    steps = [floats(row) for row in rows if row["scope"] == "step"]
    summary = RunSummary(
        epochs=[floats(row) for row in rows if row["scope"] == "epoch"],
        step_times=[row["step_time"] for row in steps],
        passes=[row["grad_evals"] for row in steps],
        refused=[row.get("nonfinite", 0.0) for row in steps],
        wall_s=wall,
        diverged=diverged,
    )
    shutil.rmtree(logdir / "checkpoints", ignore_errors=True)
    cached.write_text(json.dumps({"config": config.flat(), "summary": summary.to_json()}))
    return summary


def train_config(preset: Preset, **fields: Any) -> TrainConfig:
    """``TrainConfig`` for ``preset`` (its rule, projector and overrides over the ``paper`` presets) and the
    other ``fields``."""
    return TrainConfig(optimizer=preset.rule, projector=preset.projector, preset="paper", overrides=dict(preset.overrides), **fields)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages: those of ``tensors`` at entry plus every op's outputs, each
    storage counted once and released when its last tracked tensor is garbage-collected."""

    def __init__(self, tensors):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer → [tracked tensors alive, bytes]
        self.current = self.peak = 0
        for tensor in tensors:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.refs:
            self.refs[key] = [0, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key][0] += 1
        weakref.finalize(tensor, self.release, key)

    def release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                self.track(leaf)
        return out
