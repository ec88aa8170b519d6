"""Exact gradient accumulation: ``MicroBatchClosure`` (plain loops, DDP) and the trainer's ``--grad-accum``.

The closure over micro-batches returns the whole batch's mean loss and leaves its gradient (a ragged last
micro-batch included), also on 2 DDP processes holding different numbers of samples; the trainer with
``--grad-accum 2 --batch-size 64`` ends where ``--batch-size 128`` does, for every rule, on 1 and 2 processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.integrations.accumulation import MicroBatchClosure, sample_count, split_batch
from nonlocal_opt.plugins.registry import available
from nonlocal_opt.training import TrainConfig, train
from nonlocal_opt.training.config import ConfigError
from nonlocal_opt.training.data import FASHION_MNIST_DIR

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data(n: int = 11):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def _sum(model):
    return lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def _whole_batch_steps(model, opt, x, y, steps: int) -> None:
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def test_split_batch_cuts_every_tensor_alike_and_keeps_the_rest():
    x, y = _data()
    parts = split_batch({"x": x, "pair": (y, "tag")}, 3)
    assert [sample_count(part) for part in parts] == [4, 4, 3]
    assert torch.equal(torch.cat([part["pair"][0] for part in parts]), y) and parts[2]["pair"][1] == "tag"
    with pytest.raises(TypeError, match="count="):
        sample_count({"name": "no tensor"})


def test_closure_equals_the_whole_batch_with_a_ragged_last_micro_batch():
    model = _model()
    x, y = _data(11)
    whole = torch.nn.functional.cross_entropy(model(x), y)
    expected = torch.autograd.grad(whole, list(model.parameters()))
    micro_batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4 + 4 + 3
    loss = MicroBatchClosure(model, micro_batches, _sum(model))()
    torch.testing.assert_close(loss, whole.detach(), rtol=0, atol=1e-14)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)
    mean_of_means = sum(torch.nn.functional.cross_entropy(model(a), b) for a, b in micro_batches) / 3
    assert abs(float(mean_of_means.detach()) - float(whole.detach())) > 1e-4  # the ragged batch tells the two apart


@pytest.mark.parametrize("rule", ["sam", "rbo", "entropy-sgd"])
def test_sam_rbo_and_entropy_sgd_steps_on_micro_batches_equal_whole_batch_steps(rule):
    settings = {"rbo": dict(projector="gauss-newton", lr=0.5, rho=0.5), "entropy-sgd": dict(lr=0.5, seed=0)}.get(rule, dict(lr=0.1))
    models = [_model(), _model()]
    opts = [nonlocal_opt.compose(m.parameters(), rule, **settings) for m in models]
    x, y = _data(12)
    for _ in range(3):
        opts[0].step(MicroBatchClosure(models[0], split_batch((x, y), 3), _sum(models[0])))
    _whole_batch_steps(models[1], opts[1], x, y, 3)
    assert nonlocal_opt.stats(opts[0])["grad_evals"] == nonlocal_opt.stats(opts[1])["grad_evals"] > 1
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(models[0][0].weight, _model()[0].weight)


def test_the_accelerate_recipe_equals_whole_batch_steps():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    models = [_model(), _model()]
    x, y = _data(10)
    prepared, opt = accelerator.prepare(models[0], nonlocal_opt.compose(models[0].parameters(), "sam", lr=0.1, rho=0.05))
    for _ in range(3):
        opt.step(MicroBatchClosure(prepared, split_batch((x, y), 3), _sum(prepared), backward=accelerator.backward))
    _whole_batch_steps(models[1], nonlocal_opt.compose(models[1].parameters(), "sam", lr=0.1, rho=0.05), x, y, 3)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import nonlocal_opt
    from nonlocal_opt.integrations.accumulation import MicroBatchClosure

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double())
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (13,), generator=generator)
    mine = [(x[:4], y[:4]), (x[4:6], y[4:6])] if rank == 0 else [(x[6:10], y[6:10]), (x[10:], y[10:])]  # 6 and 7 samples
    calls = []
    real_backward = torch.Tensor.backward

    def backward(loss):
        calls.append(model.require_backward_grad_sync)
        real_backward(loss)

    opt = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1, rho=0.05)
    loss_sum = lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")
    closure = MicroBatchClosure(model, mine, loss_sum, backward=backward)
    loss = closure()
    grads = [p.grad.clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(MicroBatchClosure(model, mine, loss_sum, backward=backward))
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"loss": loss, "grads": grads, "params": params, "syncs": calls}, sys.argv[1] + f"/rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # PyTorch's shutdown: without it gloo can abort the finished process
    """
)


@pytest.mark.slow
def test_ddp_micro_batches_equal_the_whole_batch_and_only_the_last_synchronises(tmp_path):
    script = tmp_path / "ddp_accumulation.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    model = _model()
    x, y = _data(13)
    whole = torch.nn.functional.cross_entropy(model(x), y)
    expected = torch.autograd.grad(whole, list(model.parameters()))
    _whole_batch_steps(model, nonlocal_opt.compose(model.parameters(), "sam", lr=0.1, rho=0.05), x, y, 3)
    for got in ranks:
        torch.testing.assert_close(got["loss"], whole.detach(), rtol=0, atol=1e-14)
        for g, e in zip(got["grads"], expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-14)
        for p, q in zip(got["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-12)
        assert got["syncs"] == [False, True] * 7  # no_sync around all but the last micro-batch of each pass


def _run(tmp_path, name: str, **kwargs):
    settings = dict(dataset="fashion-mnist", model="logreg", limit_train_batches=3, limit_val_batches=1, epochs=1,
                    logdir=str(tmp_path / name), **kwargs)
    return train(TrainConfig(**settings))


def _rule_settings(rule: str) -> dict:
    return {"entropy-sgd": {"overrides": {"inner_steps": 2, "seed": 0, "fresh_batches": True}},
            "rbo": {"overrides": {"max_iters": 3}}}.get(rule, {})


@needs_fashion_mnist
@pytest.mark.parametrize("rule", available("rule"))
def test_trainer_grad_accum_2_with_batch_64_equals_batch_128(tmp_path, rule):
    accumulated = _run(tmp_path, "accum", optimizer=rule, batch_size=64, grad_accum=2, **_rule_settings(rule))
    whole = _run(tmp_path, "whole", optimizer=rule, batch_size=128, **_rule_settings(rule))
    assert accumulated.steps == whole.steps == 3 and accumulated.passes == whole.passes
    for p, q in zip(accumulated.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key in ("epoch/train_loss", "epoch/train_acc"):
        assert accumulated.epochs[0][key] == pytest.approx(whole.epochs[0][key], rel=1e-5)


@needs_fashion_mnist
def test_trainer_grad_accum_resumes_mid_epoch_bit_for_bit(tmp_path):
    common = dict(optimizer="sam", batch_size=32, grad_accum=2, limit_train_batches=4, limit_val_batches=1,
                  dataset="fashion-mnist", model="logreg")
    whole = train(TrainConfig(epochs=2, logdir=str(tmp_path / "whole"), **common))
    train(TrainConfig(epochs=1, logdir=str(tmp_path / "parts"), **common))
    resumed = train(TrainConfig(epochs=2, logdir=str(tmp_path / "parts"), resume="latest", **common))
    assert resumed.steps == whole.steps == 8 and resumed.passes == whole.passes == 16
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)


def test_grad_accum_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ConfigError, match="--grad-accum must be an integer >= 1"):
        train(TrainConfig(dataset="landscape:quadratic", optimizer="sam", grad_accum=0, logdir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"--batch-size 512 x --grad-accum 4 = 2048 is larger than the 1024"):
        train(TrainConfig(dataset="landscape:quadratic", optimizer="sam", batch_size=512, grad_accum=4, logdir=str(tmp_path)))


TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from nonlocal_opt.training import TrainConfig, train

    out, runs = sys.argv[1], eval(sys.argv[2])
    world = os.environ.get("WORLD_SIZE", "1")
    rank = os.environ.get("RANK", "0")
    for rule, settings in runs.items():
        for name, batches in {"accum": dict(batch_size=64, grad_accum=2), "whole": dict(batch_size=128)}.items():
            result = train(TrainConfig(dataset="fashion-mnist", model="logreg", optimizer=rule, limit_train_batches=2,
                                       limit_val_batches=1, logdir=f"{out}/{rule}-{name}-world{world}", **batches, **settings))
            params = torch.nn.utils.parameters_to_vector(result.model.parameters()).detach()
            torch.save({"params": params, "passes": result.passes}, f"{out}/{rule}-{name}-world{world}-rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # PyTorch's shutdown: without it gloo can abort the finished process
    """
)


@pytest.mark.slow
@needs_fashion_mnist
def test_trainer_grad_accum_on_two_processes_equals_one(tmp_path):
    script = tmp_path / "train_accum.py"
    script.write_text(TRAIN_SCRIPT)
    runs = {rule: _rule_settings(rule) for rule in available("rule")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for command in ([sys.executable, str(script)],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]):
        done = subprocess.run([*command, str(tmp_path), repr(runs)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for rule in runs:
        single = torch.load(tmp_path / f"{rule}-whole-world1-rank0.pt")
        for name in ("accum", "whole"):
            for rank in (0, 1):
                got = torch.load(tmp_path / f"{rule}-{name}-world2-rank{rank}.pt")
                assert got["passes"] == single["passes"]
                torch.testing.assert_close(got["params"], single["params"], rtol=1e-4, atol=1e-5, msg=f"{rule} {name} rank {rank}")
