"""Real Lightning DDP on 2 CPU processes (gloo), automatic optimization: ``training_step`` returns the
rank-local loss, and the replicas of SAM, Entropy-SGD and RBO (Gauss–Newton) stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lightning")

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, lightning
    import nonlocal_opt

    out = sys.argv[1]
    settings = {
        "sam": dict(lr=0.1, rho=0.05, momentum=0.9),
        "entropy-sgd": dict(lr=1.0, inner_steps=3, seed=0, scale_outer_by_gamma=False),
        "rbo": dict(projector="gauss-newton", lr=2.0, rho=1.0),
        "rbo-unreduced": dict(projector="gauss-newton", lr=2.0, rho=1.0, distributed=False),
    }

    class Module(lightning.LightningModule):
        def __init__(self, rule):
            super().__init__()
            self.rule = rule
            self.model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return nonlocal_opt.compose(self.model.parameters(), self.rule.split("-unreduced")[0], **settings[self.rule])

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (256,), generator=generator)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 8 steps per rank
    for rule in settings:
        torch.manual_seed(0)
        module = Module(rule)
        torch.save(torch.nn.utils.parameters_to_vector(module.model.parameters()).detach(), f"{out}/init.pt")
        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data)
        params = torch.nn.utils.parameters_to_vector(module.model.parameters()).detach()
        torch.save(params, f"{out}/{rule}-{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_lightning_ddp_replicas_stay_identical(tmp_path):
    script = tmp_path / "lightning_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NONLOCAL_OPT_PLUGINS", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    init = torch.load(tmp_path / "init.pt")
    for rule in ("sam", "entropy-sgd", "rbo"):
        rank0, rank1 = torch.load(tmp_path / f"{rule}-0.pt"), torch.load(tmp_path / f"{rule}-1.pt")
        assert (rank0 - rank1).abs().max() <= 1e-6, rule
        assert (rank0 - init).abs().max() > 1e-3, f"{rule} did not train"
    drift = (torch.load(tmp_path / "rbo-unreduced-0.pt") - torch.load(tmp_path / "rbo-unreduced-1.pt")).abs().max()
    assert drift > 1e-4, "without the loss reduction the replicas should drift: the check above could not fail"
