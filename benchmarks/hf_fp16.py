"""On a CUDA GPU: the Hugging Face ``Trainer`` in fp16, ``NonlocalTrainer`` against the stock one. A tiny GPT-2
built from a config trains on the same batches, from a loss scale that overflows. ``NonlocalTrainer`` runs
SAM at ρ = 0 over SGD and the stock ``Trainer`` runs torch's SGD, so the two should match. It prints the
steps each run skipped, the final loss scales and learning rates, the largest parameter difference, and
the median step times. It exits 1 when they disagree. Without a GPU it says so and exits 0.

    python benchmarks/hf_fp16.py                     # on a GPU
    python benchmarks/hf_fp16.py --cpu-stand-in      # on the CPU, its accelerator given a GPU's scaler and autocast
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import UserError, machine, markdown_table, positive_int, run_script

import nonlocal_opt

INIT_SCALE = 2.0**24  # overflows fp16 gradients for the first steps, then backs off


def trainer_class(base, stand_in: bool):
    """``base`` whose accelerator, with ``stand_in``, does fp16 as a GPU one does: torch's scaler and autocast."""
    import transformers

    class Timed(base):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if stand_in or self.accelerator.scaler is not None:  # torch's scaler, from a scale that overflows
                self.accelerator.scaler = torch.amp.GradScaler("cpu" if stand_in else "cuda", init_scale=INIT_SCALE)
            if stand_in:
                self.accelerator.native_amp = True

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.seconds.append(time.perf_counter() - self.start)

    return Timed, StepTimes


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit(nonlocal_: bool, steps: int, stand_in: bool) -> dict:
    """One run: the trained parameters, the skipped steps, the final scale and learning rate, the step times."""
    import transformers

    from nonlocal_opt.integrations.transformers import NonlocalTrainer

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # SAM's two passes alike
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 32, (8 * steps, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    if nonlocal_:
        optimizer = nonlocal_opt.SAM(model.parameters(), lr=0.05, rho=0.0, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    base, times = trainer_class(NonlocalTrainer if nonlocal_ else transformers.Trainer, stand_in)
    callback = times()
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=steps, learning_rate=0.05, fp16=True,
        use_cpu=stand_in, max_grad_norm=0.0, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = base(model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[callback])
    trainer.model_accepts_loss_kwargs = False  # the stock Trainer takes the model's mean too (docs/integrations.md)
    if trainer.accelerator.scaler is None:
        raise UserError("the Trainer made no loss scaler: fp16 needs a GPU here, or --cpu-stand-in")
    trainer.train()
    skipped = [row["step"] for row in trainer.state.log_history if "grad_norm" in row and not _finite(row["grad_norm"])]
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach().float().cpu(),
            "skipped": skipped, "scale": trainer.accelerator.scaler.get_scale(),
            "lr": trainer.optimizer.param_groups[0]["lr"], "ms": 1000 * statistics.median(callback.seconds)}


def _finite(value) -> bool:
    return torch.isfinite(torch.as_tensor(float(value))).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=20, help="optimizer steps per run")
    parser.add_argument("--cpu-stand-in", action="store_true",
                        help="on the CPU, with the accelerator given a GPU's scaler and autocast")
    args = parser.parse_args(argv)
    if not args.cpu_stand_in and not torch.cuda.is_available():
        print("no CUDA device: skipped (run this script on a machine with a GPU, or pass --cpu-stand-in)")
        return 0
    device = "CPU stand-in" if args.cpu_stand_in else torch.cuda.get_device_name()
    print(f"{machine()}; {device}; tiny GPT-2, batch 8, {args.steps} steps, fp16 from loss scale {INIT_SCALE:g}")
    runs = {"NonlocalTrainer, SAM ρ=0": fit(True, args.steps, args.cpu_stand_in),
            "Trainer, SGD": fit(False, args.steps, args.cpu_stand_in)}
    ours, stock = runs.values()
    rows = [[name, ",".join(map(str, run["skipped"])) or "none", f"{run['scale']:g}", f"{run['lr']:.4g}", f"{run['ms']:.1f}"]
            for name, run in runs.items()]
    print(markdown_table(["trainer", "skipped steps (logged)", "final scale", "final lr", "ms/step"], rows))
    difference = (ours["params"] - stock["params"]).abs().max().item()
    agree = ours["skipped"] == stock["skipped"] and ours["scale"] == stock["scale"] and ours["lr"] == stock["lr"]
    agree = agree and difference < 1e-4 and bool(ours["skipped"])
    print(f"largest parameter difference {difference:.2e}; NonlocalTrainer/Trainer step time {ours['ms'] / stock['ms']:.2f}; "
          f"{'agree' if agree else 'DISAGREE'}")
    return 0 if agree else 1


if __name__ == "__main__":
    run_script(main)
