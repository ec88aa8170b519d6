"""``train(config)``: one readable training function on Accelerate, for any composed optimizer.

Layout of ``config.logdir``: ``tensorboard/`` (event files, hparams), ``metrics.csv``,
``checkpoints/epoch_N/`` (``accelerator.save_state``: model, optimizer, RNG states, progress; and
``config.json``, the run's flat config).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs, set_seed
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm.auto import tqdm

from nonlocal_opt.optim.radius_schedules import build_radius_scheduler
from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.training.checkpoints import (
    Progress,
    check_resume_config,
    checkpoint_dir,
    latest_checkpoint,
    resolve_resume,
    save_config,
)
from nonlocal_opt.training.closure import BatchClosure, LossScale, classification_correct
from nonlocal_opt.training.config import ConfigError, TrainConfig, TrainingDiverged, as_config_error, optimizer_hyperparameters
from nonlocal_opt.training.data import DatasetNotFoundError, LandscapeDataset, load_dataset, with_label_noise
from nonlocal_opt.training.metrics import MetricsLogger
from nonlocal_opt.training.models import LandscapeModel, build_model

FRESH_SEED_OFFSET = 1_000_003  # keeps the fresh-batch stream's shuffles apart from the epoch's

# ``step(optimizer, closure, epoch)``: one optimizer step of epoch ``epoch`` (0-based) on the closure's batch.
StepFn = Callable[[Any, BatchClosure, int], Any]


def optimizer_step(optimizer, closure: BatchClosure, epoch: int) -> Any:
    """The default ``StepFn``: ``optimizer.step(closure)``."""
    return optimizer.step(closure)


@attrs.frozen
class TrainResult:
    model: torch.nn.Module  # unwrapped
    optimizer: Any  # the ComposedOptimizer
    epochs: list[dict[str, float]]  # per finished epoch: train/val loss and accuracy, times
    checkpoint: Path | None


def writable_logdir(logdir: str) -> Path:
    path = Path(logdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to log dir {logdir!r} ({error.strerror}); pass --logdir DIR you can write to") from None
    return path


def build_data_and_model(config: TrainConfig):
    """(train set, val set, model, per-sample loss, correct counter) for ``config``."""
    with as_config_error(DatasetNotFoundError):
        train_set = load_dataset(config.dataset, "train", config.data_dir, config.download)
        val_set = load_dataset(config.dataset, "test", config.data_dir, config.download)
    if isinstance(train_set, LandscapeDataset):
        if config.model is not None:
            raise ConfigError(f"--model does not apply to {config.dataset!r}: the landscape is the model; drop --model")
        if config.label_noise:
            raise ConfigError("--label-noise needs a classification dataset, not an analytic landscape")
        model, per_sample, count_correct = LandscapeModel(train_set.landscape), lambda out, _: out, None
    else:
        if config.label_noise:
            train_set = with_label_noise(train_set, config.label_noise, config.seed)
        with as_config_error():
            model = build_model(config.model or "mlp", train_set.input_shape, train_set.num_classes)
        per_sample, count_correct = functools.partial(F.cross_entropy, reduction="none"), classification_correct
    if config.train_subset is not None:
        train_set = Subset(train_set, range(min(config.train_subset, len(train_set))))
    return train_set, val_set, model, per_sample, count_correct


def cycle(loader, generator: torch.Generator, seed: int) -> Iterator[Any]:
    """Endless batches of ``loader``; pass ``k`` is shuffled with seed ``seed + k``."""
    for k in range(2**62):
        generator.manual_seed(seed + k)
        yield from loader


@torch.no_grad()
def evaluate(accelerator, model, dataset, config: TrainConfig, per_sample_loss, count_correct) -> dict[str, float]:
    """Mean loss (and accuracy) over the validation set, or its first ``limit_val_batches`` batches.

    Each process takes every ``num_processes``-th sample of that range; the sums are then reduced.
    """
    size = len(dataset) if config.limit_val_batches is None else min(len(dataset), config.limit_val_batches * config.batch_size)
    shard = Subset(dataset, range(accelerator.process_index, size, accelerator.num_processes))
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for inputs, targets in DataLoader(shard, batch_size=config.batch_size):
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        outputs = model(inputs)
        totals[0] += per_sample_loss(outputs, targets).double().sum()
        totals[1] += len(targets)
        if count_correct is not None:
            totals[2] += count_correct(outputs, targets)
    model.train()
    loss_sum, count, correct = accelerator.reduce(totals, reduction="sum").tolist()
    metrics = {"val/loss": loss_sum / count}
    if count_correct is not None:
        metrics["val/acc"] = correct / count
    return metrics


def step_metrics(optimizer, closure: BatchClosure, loss_scale: LossScale, classification: bool, step_time: float):
    """The per-step scalars: first-pass loss/accuracy, lr, ρ, the optimizer's stats, time."""
    group = optimizer.param_groups[0]
    stats = getattr(optimizer, "optimizer", optimizer).stats  # AcceleratedOptimizer hides custom attributes
    values = {"train/loss": float(closure.first_loss), **{k: v for k, v in stats.items() if k != "nonfinite"}}
    values["nonfinite"] = stats.get("nonfinite", 0.0)
    if classification:
        values["train/acc"] = float(closure.first_accuracy)
    values.update({key: float(group[key]) for key in ("lr", "rho") if key in group})
    if loss_scale.enabled:
        values["loss_scale"] = loss_scale.scale
    values["step_time"] = step_time
    return values


def train(config: TrainConfig, step: StepFn = optimizer_step) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` with the composed optimizer; see the module doc.

    ``step(optimizer, closure, epoch)`` makes each optimizer step (e.g. ``PathTracker.step``, which
    records the path while stepping); the default is ``optimizer.step(closure)``.
    """
    config.check()
    with as_config_error():
        hyperparameters = optimizer_hyperparameters(config)
    logdir = writable_logdir(config.logdir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(logdir),
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # --batch-size is the global batch
        kwargs_handlers=[GradScalerKwargs(enabled=False)],  # fp16 loss scaling happens in the closure
    )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the {accelerator.num_processes} processes")
    set_seed(config.seed)
    train_set, val_set, model, per_sample_loss, count_correct = build_data_and_model(config)
    optimizer = compose(model.parameters(), config.optimizer, base=config.base, projector=config.projector, **hyperparameters)

    shuffle, fresh_shuffle = torch.Generator(), torch.Generator()
    loaders = [
        DataLoader(train_set, config.batch_size, sampler=RandomSampler(train_set, generator=gen), drop_last=True)
        for gen in (shuffle, fresh_shuffle)
    ]
    if len(loaders[0]) == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training samples")
    model, optimizer, train_loader, fresh_loader = accelerator.prepare(model, optimizer, *loaders)
    progress, loss_scale = Progress(), LossScale(enabled=config.mixed_precision == "fp16")
    steps_per_epoch = min(len(train_loader), config.limit_train_batches or len(train_loader))
    with as_config_error():
        radius = build_radius_scheduler(config, optimizer, steps_per_epoch * config.epochs)
    accelerator.register_for_checkpointing(progress, loss_scale, *([radius] if radius else []))
    if config.resume is not None:
        resume_from = resolve_resume(logdir, config.resume)
        check_resume_config(resume_from, config.flat())
        accelerator.load_state(str(resume_from))
    hparams = {f"hp.{key}": _scalar(value) for key, value in optimizer.param_groups[0].items() if key != "params"}
    accelerator.init_trackers("tensorboard", config={**config.flat(), **hparams})
    logger = MetricsLogger(accelerator, logdir / "metrics.csv")
    classification = count_correct is not None
    history: list[dict[str, float]] = []
    last_checkpoint = latest_checkpoint(logdir)

    try:
        for epoch in range(progress.epoch, config.epochs):
            epoch_start = time.perf_counter()
            shuffle.manual_seed(config.seed + epoch)
            fresh = cycle(fresh_loader, fresh_shuffle, config.seed + FRESH_SEED_OFFSET * (epoch + 1))
            closure = BatchClosure(accelerator, model, per_sample_loss, count_correct, fresh, loss_scale)
            sums = torch.zeros(2, dtype=torch.float64)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=None if accelerator.is_local_main_process else True, leave=False)
            for index, batch in enumerate(train_loader):
                if index == steps_per_epoch:
                    break
                step_start = time.perf_counter()
                closure.start(batch)
                step(optimizer, closure, epoch)
                if not math.isfinite(float(closure.first_loss)):
                    raise TrainingDiverged(
                        f"training stopped: the loss became {float(closure.first_loss)} at epoch {epoch + 1}, step "
                        f"{progress.step + 1}; last good checkpoint: {last_checkpoint or 'none (no epoch finished)'}; "
                        "try a smaller --lr"
                    )
                loss_scale.update(bool(closure.overflow))
                values = step_metrics(optimizer, closure, loss_scale, classification, time.perf_counter() - step_start)
                progress.step += 1
                logger.log("step", values, epoch + 1, progress.step)
                if radius is not None:
                    radius.step()  # after logging: the logged ρ is the one this step used
                sums += torch.tensor([values["train/loss"], values.get("train/acc", 0.0)], dtype=torch.float64)
                bar.update()
                bar.set_postfix({key.split("/")[1]: f"{values[key]:.4f}" for key in ("train/loss", "train/acc") if key in values})
            bar.close()
            epoch_values = {"epoch/train_loss": float(sums[0]) / steps_per_epoch}
            if classification:
                epoch_values["epoch/train_acc"] = float(sums[1]) / steps_per_epoch
            epoch_values.update(evaluate(accelerator, accelerator.unwrap_model(model), val_set, config, per_sample_loss, count_correct))
            epoch_values["epoch_time"] = time.perf_counter() - epoch_start
            progress.epoch = epoch + 1
            logger.log("epoch", epoch_values, progress.epoch, progress.step)
            history.append(epoch_values)
            accelerator.print(f"epoch {progress.epoch}/{config.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in epoch_values.items()))
            last_checkpoint = checkpoint_dir(logdir, progress.epoch)
            accelerator.save_state(str(last_checkpoint))
            if accelerator.is_main_process:
                save_config(last_checkpoint, config.flat())
    finally:
        for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
            tracker.finish()
    return TrainResult(accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer), history, last_checkpoint)


def _scalar(value: Any) -> Any:
    """TensorBoard hparams take bool/int/float/str only."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)

