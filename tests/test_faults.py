"""Fault injection: interrupted runs (SIGINT, SIGKILL mid-epoch and mid-checkpoint) resume bit-identically;
damaged checkpoints and data files, reused and concurrent log dirs, and resume mistakes give exit 2 and
one line; refused steps and exploding losses are reported and exit 1."""

from __future__ import annotations

import functools
import gzip
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nonlocal_opt.training.task as task_module
import nonlocal_opt.training.trainer as trainer_module
from nonlocal_opt.cli.main import main
from nonlocal_opt.training import TrainConfig, train
from nonlocal_opt.training.config import ConfigError, TrainingInterrupted
from nonlocal_opt.training.data import FASHION_MNIST_DIR, load_dataset
from nonlocal_opt.training.logdir import LOCK_FILE, LogdirLock
from nonlocal_opt.training.metrics import TIMING_COLUMNS, MetricsLogger, read_metrics, truncate_metrics

needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
TINY = dict(model="logreg", batch_size=32, train_subset=256, limit_train_batches=3, limit_val_batches=1, epochs=2)
TINY_ARGS = ["--model", "logreg", "--batch-size", "32", "--train-subset", "256", "--limit-train-batches", "3",
             "--limit-val-batches", "1", "--epochs", "2", "--progress-every", "0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cached_data(monkeypatch):
    """Read Fashion-MNIST once per session (the trainer would decode the IDX files on every run)."""
    monkeypatch.setattr(task_module, "load_dataset", _cached_load)


@functools.cache
def _cached_load(name, split, data_dir=None, download=False):
    return load_dataset(name, split, data_dir, download)


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def rows_without_timing(logdir):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_metrics(Path(logdir) / "metrics.csv")]


def weights(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def assert_same_run(a_model, a_dir, b_model, b_dir):
    assert all(torch.equal(p, q) for p, q in zip(weights(a_model), weights(b_model)))
    assert rows_without_timing(a_dir) == rows_without_timing(b_dir)


def interrupt_at(step_number: int, signum=signal.SIGINT):
    """A ``StepFn`` that sends ``signum`` to this process during optimizer step ``step_number`` (1-based)."""
    calls = [0]

    def step(optimizer, closure, epoch):
        calls[0] += 1
        if calls[0] == step_number:
            signal.raise_signal(signum)
        return optimizer.step(closure)

    return step


CASES = {
    "sgd": dict(optimizer="local", overrides={"momentum": 0.9}),
    "sam": dict(optimizer="sam"),
    "entropy-sgd": dict(optimizer="entropy-sgd", overrides={"inner_steps": 3, "fresh_batches": True}),
    "rbo": dict(optimizer="rbo", projector="footpoint", lr=1.0, overrides={"max_iters": 3}),
    "sam-schedule": dict(optimizer="sam", rho_schedule="cosine"),
    "rbo-schedule": dict(optimizer="rbo", projector="footpoint", lr=1.0, overrides={"max_iters": 3}, rho_schedule="linear"),
}


@needs_fashion
@pytest.mark.parametrize("case", list(CASES))
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, capsys, case):
    """Ctrl-C during step 5 (epoch 2 of 2 × 3 steps) finishes the step, saves ``epoch_1_step_5`` and stops;
    ``--resume`` then ends with the weights and metrics rows (but timings) of the uninterrupted run."""
    config = TrainConfig(**TINY, **CASES[case])
    straight = train(config.__class__(**{**_fields(config), "logdir": str(tmp_path / "straight")}))
    split = str(tmp_path / "split")
    with pytest.raises(TrainingInterrupted, match="saved checkpoint") as info:
        train(TrainConfig(**{**_fields(config), "logdir": split}), step=interrupt_at(5))
    assert info.value.checkpoint.name == "epoch_1_step_5" and info.value.signum == signal.SIGINT
    resumed = train(TrainConfig(**{**_fields(config), "logdir": split, "resume": "latest"}))
    assert_same_run(straight.model, tmp_path / "straight", resumed.model, split)
    assert "resuming from" in capsys.readouterr().out
    assert sorted(p.name for p in (Path(split) / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]


def _fields(config):
    import attrs

    return attrs.asdict(config, recurse=False)


@needs_fashion
def test_sigint_before_the_first_checkpoint_and_a_finished_resume(tmp_path, capsys):
    config = dict(TINY, optimizer="local", logdir=str(tmp_path / "split"))
    straight = train(TrainConfig(**{**config, "logdir": str(tmp_path / "straight")}))
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig(**config), step=interrupt_at(1))
    resumed = train(TrainConfig(**config, resume="latest"))
    assert_same_run(straight.model, tmp_path / "straight", resumed.model, tmp_path / "split")
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "train", *TINY_ARGS, "--optimizer", "local", "--logdir", tmp_path / "split", "--resume")
    assert code == 0 and "already finished" in out and "pass a larger --epochs" in out


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def _kill_run(logdir, patch: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess whose ``patch`` SIGKILLs it at some point."""
    code = f"""
        import os, signal, sys
        import nonlocal_opt.training.checkpoints as t
        from nonlocal_opt.training.closure import BatchClosure
        {patch}
        from nonlocal_opt.cli.main import main
        sys.exit(main({["train", *TINY_ARGS, "--optimizer", "sam", "--logdir", str(logdir)]!r}))
    """
    return subprocess.run(_script(code), capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_fashion
@pytest.mark.parametrize(
    "where",
    ["mid-epoch", "mid-checkpoint"],
)
def test_sigkill_then_resume_falls_back_and_is_bit_identical(tmp_path, capsys, where):
    """SIGKILL in step 5, or while the epoch-2 checkpoint is written (``.epoch_2.partial`` left behind):
    ``--resume`` takes ``epoch_1``, drops the metrics rows after it, and ends as the uninterrupted run."""
    patches = {
        "mid-epoch": """
            start = BatchClosure.start
            calls = [0]
            def killing_start(self, batch):
                calls[0] += 1
                if calls[0] == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return start(self, batch)
            BatchClosure.start = killing_start
        """,
        "mid-checkpoint": """
            finish = t.finish_checkpoint
            def killing_finish(partial, final, config, progress):
                if final.name == "epoch_2":
                    os.kill(os.getpid(), signal.SIGKILL)
                return finish(partial, final, config, progress)
            t.finish_checkpoint = killing_finish
        """,
    }
    logdir = tmp_path / "split"
    done = _kill_run(logdir, textwrap.indent(textwrap.dedent(patches[where]), " " * 8).strip())
    assert done.returncode == -signal.SIGKILL, done.stderr
    if where == "mid-checkpoint":
        assert (logdir / "checkpoints" / ".epoch_2.partial").is_dir() and not (logdir / "checkpoints" / "epoch_2").exists()
    straight = train(TrainConfig(**TINY, optimizer="sam", logdir=str(tmp_path / "straight"), progress_every=0))
    capsys.readouterr()
    resumed = train(TrainConfig(**TINY, optimizer="sam", logdir=str(logdir), resume="latest", progress_every=0))
    out = capsys.readouterr().out
    assert "resuming from" in out and "epoch_1" in out and "metrics.csv: removed" in out
    assert_same_run(straight.model, tmp_path / "straight", resumed.model, logdir)
    assert not (logdir / "checkpoints" / ".epoch_2.partial").exists()


@needs_fashion
def test_ctrl_c_on_the_command_line_prints_the_resume_command_and_exits_130(tmp_path, capsys):
    """A real SIGINT to a ``nonlocal-opt train`` process: exit 130, no traceback, the exact resume command,
    which then finishes the run with every step logged once."""
    logdir = tmp_path / "run"
    argv = ["train", "--dataset", "landscape:quadratic", "--optimizer", "local", "--lr", "0.001", "--batch-size", "8",
            "--epochs", "400", "--progress-every", "0", "--logdir", str(logdir)]
    process = subprocess.Popen([sys.executable, "-m", "nonlocal_opt", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:  # progress lines (stdout is a pipe, not a terminal)
        if line.startswith("epoch 1/400 step 5/"):
            break
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "saved checkpoint" in err
    command = err.strip().splitlines()[-1].strip()
    assert command == shlex.join(["nonlocal-opt", *argv, "--resume"])
    code, _, _ = run_cli(capsys, *shlex.split(command)[1:3], *shlex.split(command)[3:-3], "--epochs", "2", "--logdir",
                         logdir, "--resume")
    assert code == 0
    steps = [int(row["step"]) for row in read_metrics(logdir / "metrics.csv") if row["scope"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * 128


@needs_fashion
def test_damaged_checkpoints_are_skipped_or_refused(tmp_path, capsys):
    logdir = tmp_path / "run"
    args = ["train", *TINY_ARGS, "--optimizer", "local", "--logdir", logdir]
    assert run_cli(capsys, *args)[0] == 0
    epoch_2 = logdir / "checkpoints" / "epoch_2"
    model = epoch_2 / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x10  # one bit of a weight
    model.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, *args, "--resume", epoch_2)
    assert code == 2 and err.count("\n") == 1 and "model.safetensors does not match its checksum" in err
    code, out, err = run_cli(capsys, *args, "--epochs", "3", "--resume")
    assert code == 0 and "skipping checkpoint" in out and "resuming from " + str(logdir / "checkpoints" / "epoch_1") in out
    assert (logdir / "checkpoints" / "superseded" / "epoch_2").is_dir()
    # a partial directory (no manifest) and nothing else: refused with one line
    for path in (logdir / "checkpoints").glob("epoch_*"):
        (path / "manifest.json").unlink()
    code, _, err = run_cli(capsys, *args, "--epochs", "4", "--resume")
    assert code == 2 and err.count("\n") == 1 and "no complete checkpoint" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, *args, "--resume", logdir)
    assert code == 2 and err.count("\n") == 1 and "that is a log dir, not a checkpoint" in err


@needs_fashion
def test_resume_refusals_and_warnings(tmp_path, capsys):
    logdir = tmp_path / "run"
    base = ["train", *TINY_ARGS, "--epochs", "1", "--logdir", logdir]
    assert run_cli(capsys, *base, "--optimizer", "sam", "--rho-schedule", "cosine")[0] == 0
    for extra, message in [
        (["--optimizer", "local"], "written with --optimizer sam, this run has --optimizer local"),
        (["--optimizer", "sam", "--model", "mlp"], "written with --model logreg"),
        (["--optimizer", "sam", "--dataset", "mnist"], "written with --dataset fashion-mnist"),
        (["--optimizer", "sam"], "written with --rho-schedule cosine"),
        (["--optimizer", "sam", "--rho-schedule", "linear"], "written with --rho-schedule cosine"),
    ]:
        code, _, err = run_cli(capsys, *base, "--epochs", "2", "--resume", *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    code, _out, err = run_cli(capsys, *base, "--epochs", "2", "--resume", "--optimizer", "sam", "--rho-schedule", "cosine",
                             "--lr", "0.5", "--set", "adaptive=true")
    assert code == 0
    assert "warning: not used on resume: --lr 0.5, --set adaptive=True" in err
    assert "the radius schedule keeps the horizon it started with (3 steps" in err


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process; let a test switch it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@needs_fashion
def test_fp16_checkpoint_resumed_without_mixed_precision_does_not_scale(tmp_path, capsys, fresh_accelerator_state):
    from accelerate.state import AcceleratorState

    logdir = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY_ARGS, "--epochs", "1", "--optimizer", "local", "--mixed-precision", "fp16",
                   "--logdir", logdir)[0] == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    before = torch.load(logdir / "checkpoints" / "epoch_1" / "custom_checkpoint_1.pkl", weights_only=False)
    assert before["scale"] == 2.0**16
    result = train(TrainConfig(**TINY, optimizer="local", logdir=str(logdir), resume="latest"))
    assert "does not scale the loss" in capsys.readouterr().err
    reference = train(TrainConfig(**TINY, optimizer="local", logdir=str(tmp_path / "plain")))
    # epoch 2 moved the weights as an unscaled run does (the bug: a 65536× smaller step)
    moved = [(p - q).norm() for p, q in zip(weights(result.model), weights(reference.model))]
    assert max(float(m) for m in moved) < 1e-3


@needs_fashion
def test_reused_and_concurrent_log_dirs(tmp_path, capsys):
    logdir = tmp_path / "run"
    args = ["train", *TINY_ARGS, "--epochs", "1", "--logdir", logdir]
    assert run_cli(capsys, *args, "--optimizer", "entropy-sgd", "--set", "inner_steps=2")[0] == 0
    code, _, err = run_cli(capsys, *args, "--optimizer", "local")
    assert code == 2 and err.count("\n") == 1 and "is not empty" in err and "--resume" in err and "--overwrite" in err
    assert run_cli(capsys, *args, "--optimizer", "local", "--overwrite")[0] == 0
    rows = read_metrics(logdir / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["scope"] == "step"] == [1, 2, 3] and "gamma" not in rows[0]
    lock = LogdirLock(logdir)  # another process's run
    try:
        code, _, err = run_cli(capsys, *args, "--optimizer", "local", "--resume")
        assert code == 2 and f"is in use by another run (pid {os.getpid()})" in err
    finally:
        lock.release()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--logdir", tmp_path / "other", "--overwrite")
    assert code == 2 and "pass another --logdir" in err and (tmp_path / "other" / "notes.txt").is_file()


def test_metrics_columns_survive_a_schema_change_and_truncation(tmp_path):
    class Quiet:
        is_main_process = True

        def log(self, values, step):
            pass

    path = tmp_path / "metrics.csv"
    logger = MetricsLogger(Quiet(), path)
    logger.log("step", {"train/loss": 1.0}, 1, 1)
    logger.log("step", {"train/loss": 0.5, "gamma": 0.1}, 1, 2)
    logger.log("epoch", {"val/loss": 0.4}, 1, 2)
    logger.log("step", {"train/loss": 0.3, "gamma": 0.2}, 2, 3)
    rows = read_metrics(path)
    assert [r["gamma"] for r in rows] == ["", "0.1", "", "0.2"] and rows[0]["train/loss"] == "1.0"
    with path.open("a") as handle:
        handle.write("step,2,4,0.2")  # a half-written row (SIGKILL)
    assert truncate_metrics(path, epoch=1, step=2) == 2
    assert [(r["scope"], r["step"]) for r in read_metrics(path)] == [("step", "1"), ("step", "2"), ("epoch", "2")]


def _idx(path: Path, array: list, shape: tuple[int, ...], gz: bool = True) -> None:
    payload = struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + bytes(array)
    (gzip.open if gz else open)(path, "wb").write(payload)


def _fake_fashion(directory: Path, images: int = 64, labels: int = 64, label_value: int = 3) -> Path:
    directory.mkdir()
    for prefix in ("train", "t10k"):
        _idx(directory / f"{prefix}-images-idx3-ubyte.gz", [0] * images * 28 * 28, (images, 28, 28))
        _idx(directory / f"{prefix}-labels-idx1-ubyte.gz", [label_value] * labels, (labels,))
    return directory


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated-gz", "train-images-idx3-ubyte.gz is damaged"),
        ("zero-byte", "train-images-idx3-ubyte is empty or truncated (0 bytes)"),
        ("count-mismatch", "has 50 labels for the 64 images"),
        ("label-range", "has label 10, outside the 10 classes 0..9"),
    ],
)
def test_bad_data_files_exit_2_naming_the_file(tmp_path, capsys, damage, message):
    data = _fake_fashion(tmp_path / "data", labels=50 if damage == "count-mismatch" else 64,
                         label_value=10 if damage == "label-range" else 3)
    images = data / "train-images-idx3-ubyte.gz"
    if damage == "truncated-gz":
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "zero-byte":
        images.unlink()
        (data / "train-images-idx3-ubyte").write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--optimizer", "local", "--data-dir", data, "--logdir", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and message in err and str(data) in err and "replace it" in err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_exits_2(tmp_path, capsys, seed):
    code, _, err = run_cli(capsys, "train", "--dataset", "landscape:sine", "--optimizer", "local", "--seed", seed,
                           "--logdir", tmp_path)
    assert code == 2 and "--seed must be an integer in [0, 2**32 - 1]" in err


def test_refused_steps_are_reported_and_exit_1(tmp_path, capsys):
    """Every step refused (SAM whose closure always overflows): a warning after 10 steps, exit 1, a summary."""
    original = trainer_module.BatchClosure._reduce

    def overflowing(self, local_sum, count, correct):
        loss = original(self, local_sum, count, correct)
        return loss * float("inf") if self.calls > 1 else loss  # the perturbed pass is non-finite: refused

    trainer_module.BatchClosure._reduce = overflowing
    try:
        code, out, err = run_cli(capsys, "train", "--dataset", "landscape:quadratic", "--optimizer", "sam", "--batch-size", "64",
                                 "--limit-train-batches", "12", "--logdir", tmp_path)
    finally:
        trainer_module.BatchClosure._reduce = original
    assert code == 1
    assert "warning: 10 of 10 steps so far were refused" in err and "the run diverged: 12 of 12 steps were refused" in err
    assert "diverged (12 of 12 steps were refused): 12 steps (12 refused)" in out


def test_exploding_loss_is_reported_and_exits_1(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "landscape:alm", "--optimizer", "local", "--lr", "0.1",
                           "--batch-size", "64", "--limit-train-batches", "16", "--logdir", tmp_path)
    assert code == 1 and "warning: the loss exploded" in err and "the run diverged: the loss exploded" in err


def test_radius_schedule_default_never_raises_rho(tmp_path, capsys):
    result = train(TrainConfig(dataset="landscape:quadratic", optimizer="sam", rho_schedule="linear", batch_size=256,
                               limit_train_batches=4, logdir=str(tmp_path / "a")))
    rhos = [float(r["rho"]) for r in read_metrics(tmp_path / "a" / "metrics.csv") if r["scope"] == "step"]
    assert rhos[0] == 0.05 and rhos == sorted(rhos, reverse=True) and result.optimizer.param_groups[0]["rho"] == pytest.approx(0.005)
    with pytest.raises(ConfigError, match=r"--rho-final 0\.1 is larger than the initial radius 0\.05"):
        train(TrainConfig(dataset="landscape:quadratic", optimizer="sam", rho_schedule="linear", rho_final=0.1,
                          logdir=str(tmp_path / "b")))


def test_config_file_with_flags_overriding_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('dataset = "landscape:quadratic"\noptimizer = "local"\nbatch-size = 256\nlimit_train_batches = 2\n'
                      'epochs = 3\n[set]\nmomentum = 0.9\n')
    code, out, _ = run_cli(capsys, "train", "--config", config, "--epochs", "1", "--logdir", tmp_path / "run")
    assert code == 0 and "finished: 2 steps (0 refused)" in out
    saved = (tmp_path / "run" / "checkpoints" / "epoch_1" / "config.json").read_text()
    assert '"epochs": 1' in saved and '"set.momentum": 0.9' in saved and '"batch_size": 256' in saved
    config.write_text("epochz = 3\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--logdir", tmp_path / "x")
    assert code == 2 and "unknown key 'epochz'" in err and err.count("\n") == 1
    config.write_text("epochs = \n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--logdir", tmp_path / "x")
    assert code == 2 and "is not valid TOML" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "missing.toml", "--logdir", tmp_path / "x")
    assert code == 2 and "cannot read --config" in err


def test_device_refusal(tmp_path, capsys):
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "train", "--dataset", "landscape:sine", "--optimizer", "local", "--device", "cuda",
                               "--logdir", tmp_path / "a")
        assert code == 2 and "--device cuda: no CUDA device" in err
    code, out, _ = run_cli(capsys, "train", "--dataset", "landscape:sine", "--optimizer", "local", "--device", "cpu",
                           "--batch-size", "512", "--logdir", tmp_path / "c")
    assert code == 0 and "finished: 2 steps" in out


def test_partial_checkpoint_dirs_are_cleaned_and_resume_from_a_copy_elsewhere(tmp_path, capsys):
    common = ["train", "--dataset", "landscape:quadratic", "--optimizer", "local", "--batch-size", "512"]
    assert run_cli(capsys, *common, "--logdir", tmp_path / "a")[0] == 0
    shutil.copytree(tmp_path / "a" / "checkpoints" / "epoch_1", tmp_path / "saved")
    partial = tmp_path / "a" / "checkpoints" / ".epoch_2.partial"
    partial.mkdir()
    code, out, _ = run_cli(capsys, *common, "--epochs", "2", "--logdir", tmp_path / "a", "--resume")
    assert code == 0 and f"removed {partial}" in out and not partial.exists()
    code, out, _ = run_cli(capsys, *common, "--epochs", "2", "--logdir", tmp_path / "b", "--resume", tmp_path / "saved")
    assert code == 0 and "finished: 4 steps" in out
    code, _, err = run_cli(capsys, *common, "--logdir", tmp_path / "c", "--resume", "--overwrite")
    assert code == 2 and "exclude each other" in err


def _tree(root: Path) -> dict[str, object]:
    """Names, bytes and mtimes under ``root``; the lock file, whose owner's pid every claim writes, aside."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p.name != LOCK_FILE}


def test_lr_1e30_stops_at_the_first_non_finite_loss(tmp_path, capsys):
    args = ["train", "--dataset", "landscape:alm", "--optimizer", "local", "--batch-size", "64", "--lr", "1e30"]
    code, _, err = run_cli(capsys, *args, "--logdir", tmp_path)
    assert code == 1 and "training stopped: the loss became inf" in err and not (tmp_path / "checkpoints").exists()


def test_non_finite_weights_count_as_diverged_and_are_not_resumed(tmp_path, capsys):
    """A last step that leaves NaN weights (every step loss finite): the run counts as diverged and its
    checkpoint is marked, instead of a finished run with a NaN checkpoint; ``--resume`` refuses it with one
    line (exit 2), by itself or named, without touching the log dir."""

    def poisoning_step(optimizer, closure, epoch):
        loss = optimizer.step(closure)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.data.fill_(float("nan"))
        return loss

    common = ["--dataset", "landscape:quadratic", "--optimizer", "local", "--batch-size", "1024", "--logdir", tmp_path]
    result = train(TrainConfig(dataset="landscape:quadratic", optimizer="local", batch_size=1024, logdir=str(tmp_path)),
                   step=poisoning_step)
    assert result.diverged.startswith("the weights are not finite")
    assert json.loads((result.checkpoint / "manifest.json").read_text())["diverged"] == result.diverged
    assert "is marked diverged, so --resume will not continue it" in capsys.readouterr().err
    before = _tree(tmp_path)
    for resume in (["--resume"], ["--resume", result.checkpoint]):
        code, _, err = run_cli(capsys, "train", *common, "--epochs", "2", *resume)
        assert code == 2 and err.count("\n") == 1 and "the run diverged there (the weights are not finite" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(("damage", "message"), [("empty", "holds no images"), ("shape", "holds images of shape 1×14×14")])
def test_empty_or_misshapen_splits_exit_2_before_training(tmp_path, capsys, damage, message):
    data = _fake_fashion(tmp_path / "data")
    images = data / "t10k-images-idx3-ubyte.gz"
    if damage == "empty":
        _idx(data / "train-images-idx3-ubyte.gz", [], (0, 28, 28))
        _idx(data / "train-labels-idx1-ubyte.gz", [], (0,))
        images = data / "train-images-idx3-ubyte.gz"
    else:
        _idx(images, [0] * 64 * 14 * 14, (64, 14, 14))
    code, _, err = run_cli(capsys, "train", "--optimizer", "local", "--model", "logreg", "--data-dir", data,
                           "--logdir", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and message in err and str(images) in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("blocked", ["metrics.csv", "checkpoints"])
def test_unwritable_run_files_are_refused_before_resuming(tmp_path, capsys, blocked):
    """``metrics.csv`` that is a directory, ``checkpoints`` that is a file (what root cannot write either):
    exit 2 naming it, before the run changes anything."""
    logdir = tmp_path / "run"
    args = ["train", "--dataset", "landscape:quadratic", "--optimizer", "local", "--batch-size", "512", "--logdir", logdir]
    assert run_cli(capsys, *args)[0] == 0
    target = logdir / blocked
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.mkdir() if blocked == "metrics.csv" else target.write_text("not a directory")
    before = _tree(logdir)
    code, _, err = run_cli(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2 and err.count("\n") == 1 and f"cannot write {target}" in err and "--logdir" in err
    assert _tree(logdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_metrics_are_refused_before_resuming(tmp_path, capsys):
    logdir = tmp_path / "run"
    args = ["train", "--dataset", "landscape:quadratic", "--optimizer", "local", "--batch-size", "512", "--logdir", logdir]
    assert run_cli(capsys, *args)[0] == 0
    (logdir / "metrics.csv").chmod(0o444)
    code, _, err = run_cli(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2 and "metrics.csv (permission denied)" in err
