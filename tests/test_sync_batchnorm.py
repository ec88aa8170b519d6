"""``CPUSyncBatchNorm`` (the trainer's ``--sync-bn`` on CPU). On 2 gloo processes (torchrun, torch DDP), each
with half of every batch, SAM and RBO with a float64 BatchNorm model end where one process on the whole
batches does — parameters and running statistics, with the running statistics updated once per step (the
optimizer finds the converted layers and pauses them in its extra passes); without the conversion they do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nonlocal_opt.cli.main import build_parser
from nonlocal_opt.training import TrainConfig
from nonlocal_opt.training.sync_batchnorm import CPUSyncBatchNorm, sync_batchnorm

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import torch.nn.functional as F
    import nonlocal_opt
    from nonlocal_opt.training.sync_batchnorm import sync_batchnorm

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]
    runs = {"sam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9),
            "rbo": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=0.5)}
    STEPS = 6

    def build():
        torch.manual_seed(0)
        nn = torch.nn
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(64, 8), nn.BatchNorm1d(8, momentum=None), nn.Tanh(), nn.Linear(8, 3)).double()

    def batches():
        data = torch.Generator().manual_seed(1)  # the same global batches on every rank
        for _ in range(STEPS):
            yield torch.randn(32, 2, 4, 4, generator=data, dtype=torch.float64), torch.randint(0, 3, (32,), generator=data)

    def train(settings, forward, model, part, **more):
        settings = {**settings, **more}
        opt = nonlocal_opt.compose(model.parameters(), settings.pop("rule"), **settings)
        for x, y in batches():
            x, y = part(x), part(y)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(forward(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
                "buffers": {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}}

    half = lambda t: t[16 * rank:16 * (rank + 1)]  # noqa: E731
    for name, settings in runs.items():
        for sync in (True, False):
            model = build()
            if sync:
                model = sync_batchnorm(model, torch.device("cpu"))
            ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages the gradient over the halves
            result = train(settings, ddp, model, half)
            torch.save(result, f"{out}/{name}-{'sync' if sync else 'plain'}-{rank}.pt")
        if rank == 0:
            model = build()
            # one process's run: distributed=False, or the optimizer would average each loss with rank 1's
            torch.save(train(settings, model, model, lambda t: t, distributed=False), f"{out}/{name}-whole.pt")
    dist.barrier()
    os._exit(0)  # gloo with live DDP reducers can abort in interpreter teardown; every file is written
    """
)


@pytest.mark.slow
def test_two_processes_with_synced_batchnorm_equal_one_process_on_whole_batches(tmp_path):
    script = tmp_path / "sync_bn.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NONLOCAL_OPT_PLUGINS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("sam", "rbo"):
        whole = torch.load(tmp_path / f"{name}-whole.pt")
        assert whole["buffers"]["1.num_batches_tracked"] == whole["buffers"]["5.num_batches_tracked"] == 6
        for rank in (0, 1):
            synced = torch.load(tmp_path / f"{name}-sync-{rank}.pt")
            torch.testing.assert_close(synced["params"], whole["params"], rtol=0, atol=1e-6, msg=f"{name} rank {rank}")
            torch.testing.assert_close(synced["buffers"], whole["buffers"], rtol=0, atol=1e-6, msg=f"{name} rank {rank}")
        plain = torch.load(tmp_path / f"{name}-plain-0.pt")
        assert (plain["params"] - whole["params"]).abs().max() > 1e-3, f"{name}: per-process BatchNorm should differ"


def test_conversion_keeps_the_layers_tensors_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False)))
    model[2][0].eval()
    tensors = [*model[1].parameters(), *model[1].buffers(), *model[2][0].buffers()]
    keys = list(model.state_dict())
    converted = sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CPUSyncBatchNorm) and isinstance(converted[2][0], CPUSyncBatchNorm)
    assert [*converted[1].parameters(), *converted[1].buffers(), *converted[2][0].buffers()] == tensors
    assert list(converted.state_dict()) == keys
    assert converted[1].training and not converted[2][0].training


def test_in_one_process_it_is_batchnorm():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(3, momentum=None).double()
    converted = sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=None).double()), torch.device("cpu"))[0]
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(converted, mode)()
        assert torch.equal(reference(x), converted(x))
    assert torch.equal(reference.running_var, converted.running_var)


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--sync-bn"], True), (["--no-sync-bn"], False)])
def test_sync_bn_flags_reach_the_train_config(flags, expected):
    args = build_parser().parse_args(["train", *flags])
    assert TrainConfig.from_namespace(args).sync_bn is expected
