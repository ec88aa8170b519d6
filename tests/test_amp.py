"""fp16 loss scaling with closures: ``nonlocal_opt.GradScaler`` unscales every pass of SAM, RBO and Entropy-SGD,
skips a step whose pass overflowed and backs the scale off; the trainer's scale and Accelerate's scaler use it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import nonlocal_opt
from nonlocal_opt.integrations.accelerate import use_closure_scaler
from nonlocal_opt.testing.device_path import NoHostReads
from nonlocal_opt.training import TrainConfig, train
from nonlocal_opt.training.closure import LossScale
from nonlocal_opt.training.data import FASHION_MNIST_DIR

RULES = {
    "sam": {"rho": 0.05},
    "rbo": {"projector": "gauss-newton", "rho": 0.5},
    "entropy-sgd": {"inner_steps": 3},
}
BLOW_UP = float("inf")  # multiplies the scaled loss of the pass that is made to overflow


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.randn(64, 8), torch.randint(0, 3, (64,))


class Run:
    """One model and optimizer; ``step`` makes a step with ``scaler.step(opt, closure)`` (or ``opt.step`` without a
    scaler), and ``overflow_pass`` makes that pass's scaled backward overflow."""

    def __init__(self, rule: str, scaler: torch.amp.GradScaler | None, **extra):
        model, self.x, self.y = model_and_batch()
        self.model, self.scaler = model, scaler
        self.opt = nonlocal_opt.compose(model.parameters(), rule, base=torch.optim.SGD, lr=0.1, momentum=0.9,
                                        **RULES[rule], **extra)
        self.passes, self.overflow_pass = 0, None

    def closure(self):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        if self.scaler is None:
            loss.backward()
        else:
            blow_up = BLOW_UP if self.passes == self.overflow_pass else 1.0
            (self.scaler.scale(loss) * blow_up).backward()
        self.passes += 1
        return loss

    def step(self, overflow_pass: int | None = None):
        self.passes, self.overflow_pass = 0, overflow_pass
        if self.scaler is None:
            return self.opt.step(self.closure)
        loss = self.scaler.step(self.opt, self.closure)
        self.scaler.update()
        return loss

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])


@pytest.mark.parametrize("rule", RULES)
def test_scaled_steps_equal_unscaled_steps(rule):
    plain, scaled = Run(rule, None), Run(rule, nonlocal_opt.GradScaler("cpu"))
    for _ in range(3):
        torch.testing.assert_close(scaled.step(), plain.step(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scaled.theta(), plain.theta(), rtol=1e-6, atol=1e-6)
    assert scaled.opt.stats["nonfinite"] == 0.0 and scaled.scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("where", ["first", "last"])
def test_an_overflow_in_any_pass_skips_the_step_and_backs_the_scale_off(rule, where):
    run, plain = Run(rule, nonlocal_opt.GradScaler("cpu")), Run(rule, None)
    run.step(), plain.step()  # the base has momentum state now
    passes = int(run.opt.stats["grad_evals"])
    theta, state = run.theta(), copy.deepcopy(run.opt.state_dict())
    run.step(overflow_pass=0 if where == "first" else passes - 1)
    assert run.opt.stats["nonfinite"] == 1.0
    assert torch.equal(run.theta(), theta)
    assert_same_state(run.opt.state_dict(), state)
    assert run.scaler.get_scale() == 2.0**15
    for _ in range(2):  # training goes on, as if the skipped step had not been
        run.step(), plain.step()
        assert run.opt.stats["nonfinite"] == 0.0
        torch.testing.assert_close(run.theta(), plain.theta(), rtol=1e-6, atol=1e-6)


def assert_same_state(now, before):
    if isinstance(now, torch.Tensor):
        assert torch.equal(now, before)
    elif isinstance(now, dict):
        assert now.keys() == before.keys()
        for key in now:
            assert_same_state(now[key], before[key])
    elif isinstance(now, (list, tuple)):
        assert len(now) == len(before)
        for a, b in zip(now, before):
            assert_same_state(a, b)
    else:
        assert now == before


@pytest.mark.parametrize("rule", RULES)
def test_the_device_path_reads_nothing_on_the_host(rule):
    run, plain = Run(rule, nonlocal_opt.GradScaler("cpu"), device_path=True), Run(rule, None, device_path=True)
    run.step(), plain.step()  # the base creates its momentum state (one read, to drop it after a skip)
    with NoHostReads():
        run.step(overflow_pass=0)
        run.step()
    plain.step()
    assert run.scaler.get_scale() == 2.0**15
    torch.testing.assert_close(run.theta(), plain.theta(), rtol=1e-6, atol=1e-6)


def test_torch_scaler_refuses_a_closure():
    """Why nonlocal_opt ships its own: torch's ``step`` asserts before the closure's first ``scale()``."""
    run = Run("sam", torch.amp.GradScaler("cpu"))
    with pytest.raises(AssertionError, match="_scale is None"):
        run.step()


def test_unscale_inside_the_closure_works():
    scaler = nonlocal_opt.GradScaler("cpu")
    run, plain = Run("sam", scaler), Run("sam", None)
    norms = []

    def closure():  # the clipping recipe of torch's AMP docs, in every pass
        run.opt.zero_grad()
        loss = F.cross_entropy(run.model(run.x), run.y)
        scaler.scale(loss).backward()
        scaler.unscale_(run.opt)
        scaler.unscale_(run.opt)  # a second call in the same pass does nothing
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters()])))
        return loss

    for _ in range(2):
        scaler.step(run.opt, closure)
        scaler.update()
        plain.step()
    torch.testing.assert_close(run.theta(), plain.theta(), rtol=1e-6, atol=1e-6)
    assert len(norms) == 4 and max(norms) < 10  # unscaled: a scaled gradient's norm is about 65536 times larger


def test_unscale_after_a_closure_step_leaves_its_unscaled_gradients():
    """A host that reads the gradient norm after the step (the Hugging Face Trainer) calls ``unscale_`` again:
    the last pass's gradients are unscaled already and stay as they are, and the next step runs. The
    gradients of a new scaled backward are unscaled as usual."""
    scaler = nonlocal_opt.GradScaler("cpu")
    run, plain = Run("sam", scaler), Run("sam", None)
    run.step()
    plain.step()
    left = [p.grad.clone() for p in run.model.parameters()]
    torch.testing.assert_close(left, [p.grad for p in plain.model.parameters()], rtol=1e-6, atol=1e-6)
    scaler.unscale_(run.opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(run.model.parameters(), left))
    run.step()  # no "unscale_(opt) was called before scaler.step(opt, closure)"
    plain.step()
    torch.testing.assert_close(run.theta(), plain.theta(), rtol=1e-6, atol=1e-6)
    for model, opt, scale in ((run.model, run.opt, scaler.scale), (plain.model, plain.opt, lambda loss: loss)):
        opt.zero_grad()
        scale(F.cross_entropy(model(run.x), run.y)).backward()
    scaler.unscale_(run.opt)
    torch.testing.assert_close([p.grad for p in run.model.parameters()], [p.grad for p in plain.model.parameters()],
                               rtol=1e-6, atol=1e-6)


def test_mistakes_get_clear_errors():
    scaler = nonlocal_opt.GradScaler("cpu")
    run = Run("sam", scaler)
    scaler.step(run.opt, run.closure)
    with pytest.raises(RuntimeError, match="already been called since the last update"):
        scaler.step(run.opt, run.closure)
    scaler.update()
    scaler.scale(F.cross_entropy(run.model(run.x), run.y)).backward()
    scaler.unscale_(run.opt)
    with pytest.raises(RuntimeError, match="unscale inside the closure"):
        scaler.step(run.opt, run.closure)
    model, x, y = model_and_batch()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="ComposedOptimizer"):
        scaler.step(sgd, lambda: F.cross_entropy(model(x), y))


def test_without_a_closure_it_is_torchs_scaler():
    model, x, y = model_and_batch()
    reference = copy.deepcopy(model)
    opt = nonlocal_opt.compose(model.parameters(), "local", base=torch.optim.SGD, lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for m, o, scaler in ((model, opt, nonlocal_opt.GradScaler("cpu")), (reference, sgd, torch.amp.GradScaler("cpu"))):
        scaler.scale(F.cross_entropy(m(x), y)).backward()
        scaler.step(o)
        scaler.update()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bf16_autocast_keeps_working():
    run, plain = Run("sam", None), Run("sam", None)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(run.step()))
        plain.step()
        assert run.opt.stats["nonfinite"] == 0.0
    assert losses[-1] < losses[0]
    torch.testing.assert_close(run.theta(), plain.theta(), rtol=0.05, atol=1e-2)


def test_trainer_loss_scale_checkpoints_keep_their_format():
    scale = LossScale(True, scale=2.0**15)
    model, x, y = model_and_batch()
    opt = nonlocal_opt.compose(model.parameters(), "sam", rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scale.scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        scale.scaler.step(opt, closure)
        scale.scaler.update()
    saved = scale.state_dict()
    assert saved == {"scale": 2.0**15, "good_steps": 3, "enabled": True}
    resumed = LossScale(True)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved and not resumed.restored_from_other
    legacy = LossScale(True)
    legacy.load_state_dict({"scale": 1024.0, "good_steps": 7})  # saved before "enabled" was kept
    assert legacy.state_dict() == {"scale": 1024.0, "good_steps": 7, "enabled": True}
    plain = LossScale(False)
    plain.load_state_dict(saved)
    assert plain.restored_from_other and plain.scale == 1.0


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("rule", ["sam", "entropy-sgd"])
def test_trainer_fp16_unscales_every_pass(rule, tmp_path, fresh_accelerator_state):
    """On the CPU Accelerate trains fp16 in float32, so only the loss scale differs from a plain run."""
    from accelerate.state import AcceleratorState

    common = dict(model="logreg", batch_size=32, train_subset=256, limit_train_batches=3,
                  limit_val_batches=1, epochs=1, optimizer=rule, progress_every=0)
    fp16 = train(TrainConfig(**common, mixed_precision="fp16", logdir=str(tmp_path / "fp16")))
    AcceleratorState._reset_state(reset_partial_state=True)
    plain = train(TrainConfig(**common, logdir=str(tmp_path / "plain")))
    assert fp16.refused == 0 and fp16.steps == 3
    for p, q in zip(fp16.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    saved = torch.load(tmp_path / "fp16" / "checkpoints" / "epoch_1" / "custom_checkpoint_1.pkl", weights_only=False)
    assert saved == {"scale": 2.0**16, "good_steps": 3, "enabled": True}


def accelerated_run(accelerator, rule: str):
    model, x, y = model_and_batch()
    opt = nonlocal_opt.compose(model.parameters(), rule, base=torch.optim.SGD, lr=0.1, momentum=0.9, **RULES[rule])
    model, opt = accelerator.prepare(model, opt)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        return loss

    return model, opt, closure


@pytest.mark.parametrize("rule", RULES)
def test_accelerate_fp16_steps_closures(rule, fresh_accelerator_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None  # Accelerate makes no scaler on the CPU: fp16 closures step as in fp32
    use_closure_scaler(accelerator)
    # what it makes on a GPU, where its optimizer's step(closure) is scaler.step(opt, closure): simulated here
    accelerator.scaler = torch.amp.GradScaler("cpu")
    use_closure_scaler(accelerator)
    assert isinstance(accelerator.scaler, nonlocal_opt.GradScaler)
    model, opt, closure = accelerated_run(accelerator, rule)
    plain = Run(rule, None)
    for _ in range(3):
        opt.step(closure)
        plain.step()
        assert nonlocal_opt.stats(opt)["nonfinite"] == 0.0
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]), plain.theta(),
                               rtol=1e-6, atol=1e-6)
    assert accelerator.scaler.get_scale() == 2.0**16


def test_accelerate_scaler_replaced_after_prepare(fresh_accelerator_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, opt, closure = accelerated_run(accelerator, "sam")
    use_closure_scaler(accelerator)
    assert opt.scaler is accelerator.scaler and accelerator.scaler.get_scale() == 2.0**10
    opt.step(closure)
    assert nonlocal_opt.stats(opt)["nonfinite"] == 0.0 and nonlocal_opt.stats(opt)["grad_evals"] == 2.0


FSDP2_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import nonlocal_opt

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))


    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


    def train(model, part, steps, scaler=None, distributed=None):
        opt = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1, rho=0.05, momentum=0.9, distributed=distributed)
        nonfinite = []
        for step in steps:
            passes = []

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
                (loss if scaler is None else scaler.scale(loss)).backward()
                if step == "overflow in rank 0's shard of the second pass" and rank == 0 and len(passes) == 1:
                    next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
                passes.append(loss)
                return loss

            if scaler is None:
                opt.step(closure)
            else:
                scaler.step(opt, closure)
                scaler.update()
            nonfinite.append(opt.stats["nonfinite"])
        return nonfinite


    reference = build()
    train(reference, slice(None), range(3), distributed=False)
    model = build()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    scaler = nonlocal_opt.GradScaler("cpu")
    nonfinite = train(model, slice(8 * rank, 8 * rank + 8), [0, "overflow in rank 0's shard of the second pass", 1, 2], scaler)
    whole = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    expected = torch.nn.utils.parameters_to_vector(reference.parameters()).detach()
    with open(f"{sys.argv[1]}/results-{rank}.json", "w") as handle:
        json.dump({"difference": (whole - expected).abs().max().item(), "nonfinite": nonfinite,
                   "scale": scaler.get_scale()}, handle)
    dist.barrier()
    os._exit(0)  # gloo can abort in interpreter teardown ("terminate called without an active exception"); every file is written
    """
)


@pytest.mark.slow
def test_fsdp2_an_overflow_in_one_shard_skips_the_step_in_every_process(tmp_path):
    script = tmp_path / "amp_fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"results-{rank}.json").read_text())
        assert result["nonfinite"] == [0.0, 1.0, 0.0, 0.0] and result["scale"] == 2.0**15, result
        assert result["difference"] <= 1e-6, result  # = three unscaled steps in one process
