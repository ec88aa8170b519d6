"""Data parallel on 2 CPU processes (torchrun, gloo) equals 1 process on the same global batches.

The script below trains with RBO, SAM and Entropy-SGD (fresh batches on) for a few steps and saves
every rank's parameters. On 2 processes each rank sees half of every global batch; the closure's
all-reduce of (gradient, loss sum, count) must make the inner passes identical to the 1-process run.
With a BatchNorm model (resnet6) the trainer synchronises the batch statistics by default (``--sync-bn``),
so SAM still equals one process; with ``--no-sync-bn`` it does not. (RBO is checked with synchronised
BatchNorm in float64 in tests/test_sync_batchnorm.py: in the trainer's float32 its projector's iterations
amplify rounding differences of the reduction order to ~1e-3 within 3 steps, as large as the effect.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nonlocal_opt.training.data import FASHION_MNIST_DIR

RUNS = {
    "rbo": {"lr": 0.5, "rho": 0.5, "overrides": {"max_iters": 3}},
    "sam": {"lr": 0.1, "rho": 0.05, "overrides": {"momentum": 0.9}},
    "entropy-sgd": {"lr": 1.0, "overrides": {"gamma": 0.5, "inner_steps": 3, "fresh_batches": True, "seed": 0}},
    "sam-bn": {"optimizer": "sam", "model": "resnet6", "lr": 0.02, "rho": 0.05, "overrides": {"momentum": 0.9}},
}
UNSYNCED = {"sam-bn-unsynced": {**RUNS["sam-bn"], "sync_bn": False}}  # BatchNorm statistics per process

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from accelerate.utils import set_seed
    from nonlocal_opt.training.models import build_model
    from nonlocal_opt.training import TrainConfig, train

    out, runs = sys.argv[1], eval(sys.argv[2])
    for model in ("mlp", "resnet6"):
        set_seed(0)  # the trainer's initialisation (seed 0), for checking that training moved the parameters
        torch.save(torch.nn.utils.parameters_to_vector(build_model(model, (1, 28, 28), 10).parameters()).detach(),
                   f"{out}/init-{model}.pt")
    for name, kwargs in runs.items():
        kwargs = {"optimizer": name, "model": "mlp", **kwargs}
        result = train(TrainConfig(dataset="fashion-mnist", batch_size=32, limit_train_batches=3, limit_val_batches=1, epochs=1,
                                   logdir=f"{out}/{name}-world{os.environ.get('WORLD_SIZE', '1')}", **kwargs))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        params = torch.nn.utils.parameters_to_vector(result.model.parameters()).detach()
        torch.save({"params": params, "val": result.epochs[0]}, f"{out}/{name}-world{world}-rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # PyTorch's shutdown: without it gloo can abort the finished process
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_two_cpu_processes_match_one_process(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launches = [
        [sys.executable, str(script)],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
    ]
    for command in launches:
        done = subprocess.run([*command, str(tmp_path), repr({**RUNS, **UNSYNCED})], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "BatchNorm statistics are computed per process" in done.stderr  # the --no-sync-bn run says so

    for name in RUNS:
        single = torch.load(tmp_path / f"{name}-world1-rank0.pt")
        rank0 = torch.load(tmp_path / f"{name}-world2-rank0.pt")
        rank1 = torch.load(tmp_path / f"{name}-world2-rank1.pt")
        assert torch.equal(rank0["params"], rank1["params"]), f"{name}: ranks disagree"
        init = torch.load(tmp_path / f"init-{RUNS[name].get('model', 'mlp')}.pt")
        assert (single["params"] - init).abs().max() > 1e-3, f"{name}: did not train"
        torch.testing.assert_close(rank0["params"], single["params"], rtol=1e-4, atol=1e-5, msg=f"{name}: 2 vs 1 process")
        assert rank0["val"]["val/acc"] == pytest.approx(single["val"]["val/acc"], abs=1 / 32)
    unsynced, single = torch.load(tmp_path / "sam-bn-unsynced-world2-rank0.pt"), torch.load(tmp_path / "sam-bn-world1-rank0.pt")
    synced = torch.load(tmp_path / "sam-bn-world2-rank0.pt")
    effect, rounding = ((run["params"] - single["params"]).abs().max() for run in (unsynced, synced))
    assert effect > 1e-4 and effect > 30 * rounding, f"without --sync-bn two processes should differ ({effect} vs {rounding})"


CLAIM_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from nonlocal_opt.cli.main import main

    logdir = sys.argv[1] + "/run"
    if os.environ["RANK"] == "0":
        time.sleep(3)  # rank 1 is started by now, and waits for rank 0 wherever the run makes it wait
        print("before the claim:", sorted(os.listdir(logdir)) if os.path.isdir(logdir) else "no log dir")
    code = main(["train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "2",
                 "--logdir", logdir])
    print("exit code:", code)
    """
)


@pytest.mark.slow
def test_only_the_main_process_creates_and_claims_the_log_dir(tmp_path):
    """Another process's files in the log dir (a write probe) made the main process refuse it as not empty,
    and a directory made by another process is not the run's to remove when its start fails."""
    script = tmp_path / "claim.py"
    script.write_text(CLAIM_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before the claim: no log dir" in done.stdout
    assert done.stdout.count("exit code: 0") == 2 and (tmp_path / "run" / "metrics.csv").is_file()
