"""Under DDP (2 CPU processes, gloo, launched by torchrun; the model wrapped by torch or by Accelerate) with
the closure users write — it returns the rank-local loss — the replicas of every multi-pass rule stay
identical (every SAM variant too, and with a ``perturb=False`` group): the optimizer averages the loss of
each pass itself. With that switched off (``distributed=False``) RBO's replicas drift apart, so the test
can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

RUNS = {
    "sam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9),
    "asam-eta": dict(rule="sam", lr=0.1, rho=0.5, momentum=0.9, adaptive=True, eta=0.01),
    "sam-biases-unperturbed": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, unperturbed="bias"),
    "gsam": dict(rule="gsam", lr=0.1, rho=0.05, alpha=0.4, momentum=0.9),
    "gsam-biases-unperturbed": dict(rule="gsam", base="adamw", lr=1e-2, rho=0.1, unperturbed="bias"),
    "wsam-decoupled": dict(rule="wsam", base="adamw", lr=1e-2, rho=0.1, decoupled=True),
    "wsam-coupled": dict(rule="wsam", lr=0.1, rho=0.05, momentum=0.9, decoupled=False),
    "friendly-sam": dict(rule="friendly-sam", lr=0.1, rho=0.05, momentum=0.9),
    "looksam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, refresh_every=3),
    "ae-sam": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, refresh="gradient-norm"),
    "msam": dict(rule="msam", lr=0.1, rho=0.05, momentum=0.9),
    "rbo-refresh-every-2": dict(rule="rbo", projector="gauss-newton", lr=2.0, rho=1.0, refresh_every=2),
    "entropy-sgd": dict(rule="entropy-sgd", lr=1.0, inner_steps=3, seed=0, scale_outer_by_gamma=False),
    "rbo": dict(rule="rbo", projector="gauss-newton", lr=2.0, rho=1.0),
    "rbo-unreduced": dict(rule="rbo", projector="gauss-newton", lr=2.0, rho=1.0, distributed=False),
}
# The runs, and the parameters of a run: all, or those named *unperturbed in a second group with perturb=False.
PRELUDE = f"""runs = {RUNS!r}


def groups(model, unperturbed):
    if unperturbed is None:
        return model.parameters()
    named = list(model.named_parameters())
    return [{{"params": [p for n, p in named if not n.endswith(unperturbed)]}},
            {{"params": [p for n, p in named if n.endswith(unperturbed)], "perturb": False}}]


"""

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
        params = groups(model, settings.pop("unperturbed", None))
        opt = nonlocal_opt.compose(params, settings.pop("rule"), **settings)
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
        params = groups(model, settings.pop("unperturbed", None))
        opt = nonlocal_opt.compose(params, settings.pop("rule"), **settings)
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
    script.write_text((SCRIPT if host == "torch DDP" else ACCELERATE).replace("RUNS\n", PRELUDE, 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NONLOCAL_OPT_PLUGINS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (n for n in RUNS if n != "rbo-unreduced"):
        rank0, rank1 = torch.load(tmp_path / f"{name}-0.pt"), torch.load(tmp_path / f"{name}-1.pt")
        assert (rank0 - rank1).abs().max() <= 1e-6, name
    drift = (torch.load(tmp_path / "rbo-unreduced-0.pt") - torch.load(tmp_path / "rbo-unreduced-1.pt")).abs().max()
    assert drift > 1e-4, "without the reduction the replicas should drift: the check above could not fail"
