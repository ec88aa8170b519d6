"""Under DDP (2 CPU processes, gloo, launched by torchrun; the model wrapped by torch or by Accelerate) with
the closure users write — it returns the rank-local loss —
the replicas of every multi-pass rule stay identical: the optimizer averages the loss of each pass
itself. With that switched off (``distributed=False``) RBO's replicas drift apart, so the test can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

RUNS = """runs = {
    "sam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9),
    "entropy-sgd": dict(rule="entropy-sgd", lr=1.0, inner_steps=3, seed=0, scale_outer_by_gamma=False),
    "rbo": dict(rule="rbo", projector="gauss-newton", lr=2.0, rho=1.0),
    "rbo-unreduced": dict(rule="rbo", projector="gauss-newton", lr=2.0, rho=1.0, distributed=False),
}"""

ACCELERATE = textwrap.dedent(
    """
    import os, sys, torch
    from accelerate import Accelerator
    import nonlocal_opt

    accelerator = Accelerator(cpu=True)
    rank, out = accelerator.process_index, sys.argv[1]
    RUNS
    for name, settings in runs.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        settings = dict(settings)
        opt = nonlocal_opt.compose(model.parameters(), settings.pop("rule"), **settings)
        prepared, opt = accelerator.prepare(model, opt)
        data = torch.Generator().manual_seed(1 + rank)
        for _ in range(8):
            x = torch.randn(16, 6, generator=data, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=data)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(prepared(x), y)
                accelerator.backward(loss)
                return loss

            opt.step(closure)
        torch.save(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), f"{out}/{name}-{rank}.pt")
    accelerator.wait_for_everyone()
    os._exit(0)
    """
)

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import nonlocal_opt

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]
    RUNS
    for name, settings in runs.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        settings = dict(settings)
        opt = nonlocal_opt.compose(model.parameters(), settings.pop("rule"), **settings)
        data = torch.Generator().manual_seed(1 + rank)  # each rank its own half of the batch
        for _ in range(8):
            x = torch.randn(16, 6, generator=data, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=data)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(ddp(x), y)  # this rank's loss only
                loss.backward()  # DDP averages the gradient
                return loss

            opt.step(closure)
        torch.save(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), f"{out}/{name}-{rank}.pt")
    dist.barrier()
    os._exit(0)  # gloo with live DDP reducers can abort in interpreter teardown; every file is written
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["torch DDP", "Accelerate"])
def test_ddp_replicas_stay_identical_with_rank_local_losses(tmp_path, host):
    script = tmp_path / "ddp_script.py"
    script.write_text((SCRIPT if host == "torch DDP" else ACCELERATE).replace("RUNS\n", RUNS + "\n", 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NONLOCAL_OPT_PLUGINS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("sam", "entropy-sgd", "rbo"):
        rank0, rank1 = torch.load(tmp_path / f"{name}-0.pt"), torch.load(tmp_path / f"{name}-1.pt")
        assert (rank0 - rank1).abs().max() <= 1e-6, name
    drift = (torch.load(tmp_path / "rbo-unreduced-0.pt") - torch.load(tmp_path / "rbo-unreduced-1.pt")).abs().max()
    assert drift > 1e-4, "without the reduction the replicas should drift: the check above could not fail"
