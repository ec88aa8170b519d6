"""The validation metrics after each epoch, computed by all processes together."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from nonlocal_opt.training.config import TrainConfig
from nonlocal_opt.training.task import Task


@torch.no_grad()
def evaluate(accelerator, model: torch.nn.Module, task: Task, config: TrainConfig) -> dict[str, float]:
    """Mean loss ``val/loss`` (and accuracy ``val/acc``) over the validation set, or its first
    ``limit_val_batches`` batches.

    Each process takes every ``num_processes``-th sample of that range; the sums are then reduced.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The unwrapped model.
        task: The run's task (validation set, per-sample loss, correct counter).
        config: The run's config (``batch_size``, ``limit_val_batches``).
    """
    dataset = task.val_set
    size = len(dataset) if config.limit_val_batches is None else min(len(dataset), config.limit_val_batches * config.batch_size)
    shard = Subset(dataset, range(accelerator.process_index, size, accelerator.num_processes))
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for inputs, targets in DataLoader(shard, batch_size=config.batch_size):
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        outputs = model(inputs)
        totals[0] += task.per_sample_loss(outputs, targets).double().sum()
        totals[1] += len(targets)
        if task.classification:
            totals[2] += task.count_correct(outputs, targets)
    model.train()
    loss_sum, count, correct = accelerator.reduce(totals, reduction="sum").tolist()
    metrics = {"val/loss": loss_sum / count}
    if task.classification:
        metrics["val/acc"] = correct / count
    return metrics
