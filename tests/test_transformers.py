"""``NonlocalTrainer``: the Hugging Face ``Trainer`` running composed optimizers, on CPU, without the network.

SAM at ρ = 0 over SGD equals the stock ``Trainer`` with ``torch.optim.SGD`` (float64, clipping active), and
under fp16 as on a GPU, overflows included;
per-device batch 4 × ``gradient_accumulation_steps`` 2 equals batch 8; RBO and Entropy-SGD train a module
returning a loss and a tiny GPT-2 built from a config; a save/resume round trip is bit-identical; on two
gloo processes (torchrun) the replicas stay equal and equal one process on the same global batches.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nonlocal_opt  # noqa: E402
from nonlocal_opt.integrations.transformers import NonlocalTrainer  # noqa: E402


class Regression(torch.nn.Module):
    """A float64 MLP returning ``{"loss": MSE}``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, dtype: torch.dtype = torch.float64):
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        self.y = self.x.sum(dim=1).sin() + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
        self.x, self.y = self.x.to(dtype), self.y.to(dtype)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


def _args(tmp_path, **kwargs) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=0.1,
                    max_grad_norm=0.5, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                    disable_tqdm=True, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**settings, **kwargs})


def _losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _fit(trainer_class, tmp_path, make_optimizer, model=None, data=None, **kwargs):
    model = model or Regression()
    trainer = trainer_class(model=model, args=_args(tmp_path, **kwargs), train_dataset=data or Samples(),
                            optimizers=(make_optimizer(model.parameters()), None))
    trainer.train()
    return trainer


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def test_sam_at_rho_0_over_sgd_equals_the_stock_trainer_with_sgd(tmp_path):
    ours = _fit(NonlocalTrainer, tmp_path / "ours", lambda p: nonlocal_opt.SAM(p, lr=0.1, rho=0.0, momentum=0.9))
    stock = _fit(transformers.Trainer, tmp_path / "stock", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    _assert_same(ours.model, stock.model, 1e-10)
    assert _losses(ours) == pytest.approx(_losses(stock), abs=1e-10) and len(_losses(ours)) == 4
    assert nonlocal_opt.stats(ours.optimizer)["grad_evals"] == 2.0
    assert ours.optimizer.param_groups[0]["max_grad_norm"] == 0.5
    assert ours.optimizer.param_groups[0]["lr"] == stock.optimizer.param_groups[0]["lr"] == 0.0  # linear decay, once per step
    unclipped = _fit(transformers.Trainer, tmp_path / "unclipped", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                     max_grad_norm=0.0)
    assert (torch.nn.utils.parameters_to_vector(unclipped.model.parameters())
            - torch.nn.utils.parameters_to_vector(ours.model.parameters())).abs().max() > 1e-4  # clipping was active


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state: an fp16 Trainer's would refuse later runs without mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def on_gpu(trainer_class, init_scale: float):
    """``trainer_class`` whose accelerator does fp16 as on a GPU: a ``torch.amp.GradScaler`` and autocast
    (on the CPU Accelerate makes neither)."""

    class OnGpu(trainer_class):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
            self.accelerator.native_amp = True

    return OnGpu


def test_fp16_steps_and_skips_overflows_like_the_stock_trainer(tmp_path, fresh_accelerator_state):
    """fp16 as on a GPU, from a loss scale that overflows: SAM at ρ = 0 over SGD equals the stock Trainer with
    SGD under torch's scaler. The same steps are skipped, the scale backs off alike, the LR schedule stands
    still on a skipped step, and the logged gradient norms agree (the Trainer's unscale after the step
    leaves the step's unscaled gradients as they are)."""
    settings = dict(model=Regression().float(), data=Samples(dtype=torch.float32), fp16=True, max_steps=8,
                    max_grad_norm=0.0)  # unclipped: the norm the Trainer logs after the step is the step's
    ours = _fit(on_gpu(NonlocalTrainer, 2.0**18), tmp_path / "ours",
                lambda p: nonlocal_opt.SAM(p, lr=0.1, rho=0.0, momentum=0.9), **settings)
    settings["model"] = Regression().float()
    stock = _fit(on_gpu(transformers.Trainer, 2.0**18), tmp_path / "stock",
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), **settings)
    assert isinstance(ours.accelerator.scaler, nonlocal_opt.GradScaler)
    assert type(stock.accelerator.scaler) is torch.amp.GradScaler
    assert ours.accelerator.scaler.get_scale() == stock.accelerator.scaler.get_scale() < 2.0**18  # it backed off
    _assert_same(ours.model, stock.model, 1e-6)
    assert not torch.equal(ours.model.net[0].weight, Regression().float().net[0].weight)
    lr = [trainer.optimizer.param_groups[0]["lr"] for trainer in (ours, stock)]
    assert lr[0] == pytest.approx(lr[1], abs=1e-12) and lr[0] > 0  # skipped steps left the linear decay unfinished
    norms = [[row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row] for trainer in (ours, stock)]
    assert len(norms[0]) == len(norms[1]) == 8
    finite = [(a, b) for a, b in zip(*norms) if math.isfinite(b)]
    assert finite and all(a == pytest.approx(b, rel=1e-5) for a, b in finite)


@pytest.mark.parametrize("rule", ["sam", "rbo"])
def test_batch_4_with_2_accumulation_steps_equals_batch_8(tmp_path, rule):
    make = {"sam": lambda p: nonlocal_opt.SAM(p, lr=0.1, rho=0.05),
            "rbo": lambda p: nonlocal_opt.RBO(p, projector="gauss-newton", lr=0.5, rho=0.5)}[rule]
    accumulated = _fit(NonlocalTrainer, tmp_path / "accumulated", make, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2)
    whole = _fit(NonlocalTrainer, tmp_path / "whole", make)
    _assert_same(accumulated.model, whole.model, 1e-10)
    assert _losses(accumulated) == pytest.approx(_losses(whole), abs=1e-10)
    assert nonlocal_opt.stats(accumulated.optimizer)["grad_evals"] == nonlocal_opt.stats(whole.optimizer)["grad_evals"]
    assert not torch.equal(whole.model.net[0].weight, Regression().net[0].weight)


def test_rbo_and_entropy_sgd_train_a_tiny_gpt2_built_from_a_config(tmp_path):
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 8, (16, 8), generator=generator)  # a small vocabulary in use: learnable
    data = [{"input_ids": row, "labels": row} for row in tokens]
    for name, make in {"rbo": lambda p: nonlocal_opt.RBO(p, projector="gauss-newton", lr=0.5, rho=0.5),
                       "entropy-sgd": lambda p: nonlocal_opt.compose(p, "entropy-sgd", lr=0.5, inner_steps=2, seed=0)}.items():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        trainer = _fit(NonlocalTrainer, tmp_path / name, make, model=model, data=data, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, max_steps=6, learning_rate=0.5, max_grad_norm=0.0,
                       lr_scheduler_type="constant")
        losses = _losses(trainer)
        assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
        assert losses[-1] < losses[0], f"{name}: {losses}"
        assert nonlocal_opt.stats(trainer.optimizer)["grad_evals"] >= 2


def test_save_and_resume_is_bit_identical(tmp_path):
    make = lambda p: nonlocal_opt.compose(p, "entropy-sgd", lr=0.5, momentum=0.9, inner_steps=2, seed=0)  # noqa: E731
    whole = _fit(NonlocalTrainer, tmp_path / "whole", make, max_steps=6)
    model = Regression()
    first = NonlocalTrainer(model=model, args=_args(tmp_path / "parts", max_steps=6, save_strategy="steps", save_steps=3),
                            train_dataset=Samples(), optimizers=(make(model.parameters()), None))
    first.train()
    model = Regression()
    resumed = NonlocalTrainer(model=model, args=_args(tmp_path / "parts", max_steps=6), train_dataset=Samples(),
                              optimizers=(make(model.parameters()), None))
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-3"))
    assert resumed.state.global_step == whole.state.global_step == 6
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)
    expected, got = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert "noise_seed" in expected["state"][0] and expected["base_state"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _losses(resumed)[-3:] == _losses(whole)[-3:]


def test_what_cannot_work_is_refused(tmp_path, fresh_accelerator_state):
    model = Regression()

    def build(optimizer, args):
        return NonlocalTrainer(model=model, args=args, train_dataset=Samples(), optimizers=(optimizer, None))

    with pytest.raises(TypeError, match=r"got SGD.*use transformers.Trainer"):
        build(torch.optim.SGD(model.parameters(), lr=0.1), _args(tmp_path))
    with pytest.raises(TypeError, match="got NoneType"):  # the Trainer would build a torch optimizer
        build(None, _args(tmp_path))
    clipping = nonlocal_opt.SAM(model.parameters(), lr=0.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"max_grad_norm=2.0\) and the optimizer's max_grad_norm=\[1.0\] differ"):
        build(clipping, _args(tmp_path, max_grad_norm=2.0))
    build(clipping, _args(tmp_path, max_grad_norm=1.0))  # the same norm twice is fine

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class ShardedScaler(NonlocalTrainer):  # FSDP1's scaler: no step(opt, closure) to put in its place
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.scaler = ShardedGradScaler("cpu")

    with pytest.raises(ValueError, match=r"^NonlocalTrainer: Accelerate's scaler is a ShardedGradScaler.*bf16$"):
        ShardedScaler(model=model, args=_args(tmp_path, fp16=True), train_dataset=Samples(), optimizers=(clipping, None))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    import nonlocal_opt
    sys.path.insert(0, sys.argv[2])
    from test_transformers import Regression, Samples, _args
    from nonlocal_opt.integrations.transformers import NonlocalTrainer

    model = Regression()
    trainer = NonlocalTrainer(model=model, args=_args(sys.argv[1], per_device_train_batch_size=int(sys.argv[3])),
                              train_dataset=Samples(), optimizers=(nonlocal_opt.RBO(model.parameters(), projector="gauss-newton",
                                                                                    lr=0.5, rho=0.5), None))
    trainer.train()
    rank = trainer.args.process_index
    torch.save({"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "world": trainer.args.world_size},
               f"{sys.argv[1]}/world{trainer.args.world_size}-rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # PyTorch's shutdown: without it gloo can abort the finished process
    """
)


@pytest.mark.slow
def test_two_ddp_processes_keep_equal_replicas_and_equal_one_process(tmp_path):
    script = tmp_path / "hf_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    tests = os.path.dirname(__file__)
    for command, batch in (([sys.executable, str(script)], "8"),
                           ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)], "4")):
        done = subprocess.run([*command, str(tmp_path), tests, batch], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(tmp_path / "world1-rank0.pt")
    rank0, rank1 = (torch.load(tmp_path / f"world2-rank{rank}.pt") for rank in (0, 1))
    assert rank0["world"] == 2 and torch.equal(rank0["params"], rank1["params"])
    torch.testing.assert_close(rank0["params"], single["params"], rtol=0, atol=1e-10)
    assert (single["params"] - torch.nn.utils.parameters_to_vector(Regression().parameters()).detach()).abs().max() > 1e-3
