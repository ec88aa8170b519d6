"""``train(config)``: one readable training function on Accelerate, for any composed optimizer.

Layout of ``config.logdir``: ``tensorboard/`` (event files, hparams), ``metrics.csv``,
``checkpoints/epoch_N/`` (``accelerator.save_state``: model, optimizer, RNG states, progress; and
``config.json``, the run's flat config).

The pieces ``train`` calls: :mod:`~nonlocal_opt.training.logdir` (the log dir's claim and lock),
:mod:`~nonlocal_opt.training.resume`, :mod:`~nonlocal_opt.training.task` (data, model, loss),
:mod:`~nonlocal_opt.training.batches` (the batch order), :mod:`~nonlocal_opt.training.closure`,
:mod:`~nonlocal_opt.training.metrics`, :mod:`~nonlocal_opt.training.progress`,
:mod:`~nonlocal_opt.training.divergence`, :mod:`~nonlocal_opt.training.interruption` (SIGINT/SIGTERM),
:mod:`~nonlocal_opt.training.evaluation` and :mod:`~nonlocal_opt.training.checkpoints`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs, set_seed

from nonlocal_opt import unwrap
from nonlocal_opt.training.batches import ShuffledBatches
from nonlocal_opt.training.checkpoints import CheckpointWriter
from nonlocal_opt.training.closure import BatchClosure, LossScale
from nonlocal_opt.training.config import (
    ConfigError,
    TrainConfig,
    build_optimizer,
    build_radius_scheduler,
    check_run_settings,
)
from nonlocal_opt.training.divergence import DivergenceWatch
from nonlocal_opt.training.evaluation import evaluate
from nonlocal_opt.training.interruption import StopRequest
from nonlocal_opt.training.logdir import claimed_logdir
from nonlocal_opt.training.main_process import print_notes
from nonlocal_opt.training.metrics import MetricsLogger, step_metrics, tracking
from nonlocal_opt.training.progress import Progress, ProgressDisplay
from nonlocal_opt.training.resume import choose_checkpoint, restore
from nonlocal_opt.training.task import batchnorm_across_processes, build_task

# ``step(optimizer, closure, epoch)``: one optimizer step of epoch ``epoch`` (0-based) on the closure's batch.
StepFn = Callable[[Any, BatchClosure, int], Any]


def optimizer_step(optimizer, closure: BatchClosure, epoch: int) -> Any:
    """The default ``StepFn``: ``optimizer.step(closure)``."""
    return optimizer.step(closure)


@attrs.frozen
class TrainResult:
    """What :func:`train` returns: the trained model and optimizer, the epochs' metrics and the last checkpoint."""

    model: torch.nn.Module  # unwrapped
    optimizer: Any  # the ComposedOptimizer
    epochs: list[dict[str, float]]  # per epoch finished by this call: train/val loss and accuracy, times
    checkpoint: Path | None
    steps: int = 0  # optimizer steps of the whole run (a resumed run counts the checkpoint's)
    refused: int = 0  # steps the rule refused (``nonfinite`` = 1), whole run
    passes: int = 0  # forward+backward passes (the steps' ``grad_evals``), whole run
    diverged: str | None = None  # why the run counts as diverged (most steps refused, loss exploded), else None
    finished_before: bool = False  # resumed a run that had already trained --epochs epochs: nothing was done


def train(config: TrainConfig, step: StepFn = optimizer_step) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` with the composed optimizer; see the module doc.

    Args:
        config: The run's settings (the ``nonlocal-opt train`` flags).
        step: Makes each optimizer step, ``step(optimizer, closure, epoch)`` (e.g. ``PathTracker.step``,
            which records the path while stepping); the default is ``optimizer.step(closure)``.
    """
    started = time.perf_counter()
    config = config.resolved()
    check_run_settings(config)  # bad settings fail before the log dir is claimed
    accelerator = build_accelerator(config, Path(config.logdir))
    with claimed_logdir(accelerator, config.logdir, config.resume is not None, config.overwrite) as (logdir, notes):
        checkpoint, resume_notes = choose_checkpoint(accelerator, logdir, config)
        print_notes(accelerator, notes + resume_notes)
        set_seed(config.seed)
        task = build_task(config)
        model = batchnorm_across_processes(task.model, accelerator, config)
        optimizer = build_optimizer(config, model.parameters())
        batches = ShuffledBatches(task.train_set, config.batch_size, config.seed, config.grad_accum)
        model, optimizer, train_loader, fresh_loader = accelerator.prepare(model, optimizer, *batches.loaders)
        forward = torch.compile(model) if config.compile else None
        progress, loss_scale = Progress(), LossScale(config.mixed_precision == "fp16", accelerator.device)
        steps_per_epoch = min(len(train_loader), config.limit_train_batches or len(train_loader))
        radius = build_radius_scheduler(config, optimizer, steps_per_epoch * config.epochs)
        accelerator.register_for_checkpointing(progress, loss_scale, *([radius] if radius else []))
        rng_state = None
        if checkpoint is not None:
            rng_state = restore(accelerator, checkpoint, logdir, config, progress=progress, loss_scale=loss_scale,
                                radius=radius, total_steps=steps_per_epoch * config.epochs)
            if progress.epoch >= config.epochs:
                accelerator.print(f"the run in {logdir} is already finished: {checkpoint.name} has {progress.epoch} epochs, "
                                  f"--epochs is {config.epochs}; pass a larger --epochs to train further")
                return TrainResult(accelerator.unwrap_model(model), unwrap(optimizer), [], checkpoint,
                                   steps=progress.step, refused=progress.refused, passes=progress.passes,
                                   finished_before=True)
        resumed_step = progress.step if checkpoint is not None else None
        with tracking(accelerator, config.flat(), optimizer, resumed_step), StopRequest() as stop:
            logger = MetricsLogger(accelerator, logdir / "metrics.csv")
            checkpoints = CheckpointWriter(accelerator, logdir, config.flat(), progress, last=checkpoint)
            watch = DivergenceWatch(accelerator, progress)
            display = ProgressDisplay(accelerator, config.epochs, steps_per_epoch, config.progress_every, started)
            history: list[dict[str, float]] = []
            for epoch in range(progress.epoch, config.epochs):
                epoch_start = time.perf_counter()
                fresh = batches.fresh(fresh_loader, epoch, skip=progress.fresh_drawn)
                closure = BatchClosure(accelerator, model, task.per_sample_loss, task.count_correct, fresh, loss_scale,
                                       forward=forward, micro_batches=config.grad_accum)
                closure.fresh_drawn = progress.fresh_drawn
                display.start_epoch(epoch, progress.batch)
                for batch in batches.epoch(train_loader, epoch, progress.batch, steps_per_epoch, rng_state):
                    step_start = time.perf_counter()
                    closure.start(batch)
                    with loss_scale.scaler.scaled_step(unwrap(optimizer)):
                        step(optimizer, closure, epoch)
                    watch.stop_if_not_finite(float(closure.first_loss), epoch, checkpoints.last)
                    loss_scale.scaler.update()
                    values = step_metrics(optimizer, closure, loss_scale, task.classification, time.perf_counter() - step_start)
                    progress.record_step(values, closure.fresh_drawn)
                    logger.log("step", values, epoch + 1, progress.step)
                    if radius is not None:
                        radius.step()  # after logging: the logged ρ is the one this step used
                    watch.warn_after_step(values["train/loss"])
                    display.step(values, progress)
                    if stop.requested(accelerator) and progress.batch < steps_per_epoch:
                        display.close()
                        raise stop.interruption(progress, checkpoints.save(progress.step))
                display.close()
                epoch_values = {**progress.epoch_means(task.classification),
                                **evaluate(accelerator, accelerator.unwrap_model(model), task, config),
                                "epoch_time": time.perf_counter() - epoch_start}
                refused = progress.finish_epoch()
                logger.log("epoch", epoch_values, progress.epoch, progress.step)
                history.append(epoch_values)
                display.epoch_line(progress, epoch_values, refused)
                checkpoints.save()
                if stop.requested(accelerator) and progress.epoch < config.epochs:
                    raise stop.interruption(progress, checkpoints.last)
        broken = watch.not_finite(history[-1] if history else {}, accelerator.unwrap_model(model))
        if broken:
            checkpoints.mark_diverged(broken)
        diverged = broken or watch.verdict(history[-1] if history else {})
        result = TrainResult(accelerator.unwrap_model(model), unwrap(optimizer), history, checkpoints.last, steps=progress.step,
                             refused=progress.refused, passes=progress.passes, diverged=diverged)
        accelerator.print(summary_line(result, time.perf_counter() - started))
        return result


def build_accelerator(config: TrainConfig, logdir: Path) -> Accelerator:
    """The run's ``Accelerator``: CUDA when present (unless ``--device cpu``), TensorBoard logging into
    ``logdir``, ``--batch-size`` as the global (micro-)batch split over the processes.

    Args:
        config: The run's config.
        logdir: The run's log dir.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; pass --device cpu (or auto)")
    accelerator = Accelerator(
        cpu=config.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(logdir),
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # --batch-size is the global batch
        kwargs_handlers=[GradScalerKwargs(enabled=False)],  # fp16: the run's nonlocal_opt.GradScaler (LossScale), on CPU too
    )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the {accelerator.num_processes} processes")
    return accelerator


def summary_line(result: TrainResult, seconds: float) -> str:
    """``finished: …`` or ``diverged (reason): …``: steps, passes, refused steps, final metrics, time, checkpoint."""
    head = f"diverged ({result.diverged})" if result.diverged else "finished"
    final = result.epochs[-1] if result.epochs else {}
    metrics = ", ".join(f"{key} {final[key]:.4g}" for key in ("epoch/train_loss", "val/loss", "val/acc") if key in final)
    return (f"{head}: {result.steps} steps ({result.refused} refused), {result.passes} passes, {metrics}; {seconds:.1f} s; "
            f"checkpoint {result.checkpoint}")
