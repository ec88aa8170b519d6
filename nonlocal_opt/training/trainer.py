"""``train(config)``: one readable training function on Accelerate, for any composed optimizer.

Layout of ``config.logdir``: ``tensorboard/`` (event files, hparams), ``metrics.csv``,
``checkpoints/epoch_N/`` (``accelerator.save_state``: model, optimizer, RNG states, progress; and
``config.json``, the run's flat config).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm.auto import tqdm

from nonlocal_opt.training.checkpoints import (
    Progress,
    check_resume_config,
    checkpoint_dir,
    claim_logdir,
    finish_checkpoint,
    partial_dir,
    remove_interrupt_checkpoints,
    select_checkpoint,
    supersede_newer,
)
from nonlocal_opt.training.closure import BatchClosure, LossScale, classification_correct
from nonlocal_opt.training.config import (
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    as_config_error,
    build_optimizer,
    build_radius_scheduler,
    optimizer_hyperparameters,
)
from nonlocal_opt.training.data import DatasetNotFoundError, LandscapeDataset, load_dataset, with_label_noise
from nonlocal_opt.training.metrics import MetricsLogger, truncate_metrics
from nonlocal_opt.training.models import LandscapeModel, build_model
from nonlocal_opt.training.sync_batchnorm import sync_batchnorm

FRESH_SEED_OFFSET = 1_000_003  # keeps the fresh-batch stream's shuffles apart from the epoch's
REFUSED_FRACTION = 0.5  # more than this fraction of steps refused: a warning, and the run counts as diverged
REFUSED_MIN_STEPS = 10  # ... the warning only after this many steps
EXPLODE_FACTOR = 1e3  # a step loss above this × max(|first loss|, 1): the loss exploded

# ``step(optimizer, closure, epoch)``: one optimizer step of epoch ``epoch`` (0-based) on the closure's batch.
StepFn = Callable[[Any, BatchClosure, int], Any]


def optimizer_step(optimizer, closure: BatchClosure, epoch: int) -> Any:
    """The default ``StepFn``: ``optimizer.step(closure)``."""
    return optimizer.step(closure)


@attrs.frozen
class TrainResult:
    model: torch.nn.Module  # unwrapped
    optimizer: Any  # the ComposedOptimizer
    epochs: list[dict[str, float]]  # per epoch finished by this call: train/val loss and accuracy, times
    checkpoint: Path | None
    steps: int = 0  # optimizer steps of the whole run (a resumed run counts the checkpoint's)
    refused: int = 0  # steps the rule refused (``nonfinite`` = 1), whole run
    passes: int = 0  # forward+backward passes (the steps' ``grad_evals``), whole run
    diverged: str | None = None  # why the run counts as diverged (most steps refused, loss exploded), else None
    finished_before: bool = False  # resumed a run that had already trained --epochs epochs: nothing was done


def writable_logdir(logdir: str) -> Path:
    path = Path(logdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: several processes probe at once
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


def cycle(loader, generator: torch.Generator, seed: int, skip: int = 0) -> Iterator[Any]:
    """Endless batches of ``loader``; pass ``k`` is shuffled with seed ``seed + k``; the first ``skip``
    batches are left out (a resumed run continues the stream where it stopped)."""
    first, rest = divmod(skip, len(loader))
    for k in range(first, 2**62):
        generator.manual_seed(seed + k)
        for index, batch in enumerate(loader):
            if k == first and index < rest:
                continue
            yield batch


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


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the run to stop at the next step boundary (after a
    checkpoint); a second one raises ``KeyboardInterrupt`` at once (no checkpoint)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once without one)", file=sys.stderr, flush=True)


def _on_main(accelerator, function: Callable[[], Any]) -> Any:
    """``function()`` on the main process only; its result (or its ``ConfigError``) reaches every process."""
    if accelerator.num_processes == 1:
        return function()
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            payload = [("ok", function())]
        except ConfigError as error:
            payload = [("error", str(error))]
    payload = broadcast_object_list(payload)
    kind, value = payload[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def train(config: TrainConfig, step: StepFn = optimizer_step) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` with the composed optimizer; see the module doc.

    ``step(optimizer, closure, epoch)`` makes each optimizer step (e.g. ``PathTracker.step``, which
    records the path while stepping); the default is ``optimizer.step(closure)``.
    """
    started = time.perf_counter()
    config = config.resolved()
    config.check()
    with as_config_error():
        optimizer_hyperparameters(config)  # bad names and hyperparameters fail before the log dir is claimed
    logdir = writable_logdir(config.logdir)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; pass --device cpu (or auto)")
    accelerator = Accelerator(
        cpu=config.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(logdir),
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # --batch-size is the global batch
        kwargs_handlers=[GradScalerKwargs(enabled=False)],  # fp16 loss scaling happens in the closure
    )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the {accelerator.num_processes} processes")
    held: list[Any] = []  # the log dir's lock, main process only (never sent to the other processes)

    def claim() -> list[str]:
        lock, notes = claim_logdir(logdir, config.resume is not None, config.overwrite)
        held.append(lock)
        return notes

    notes = _on_main(accelerator, claim)
    try:
        return _train(config, step, accelerator, logdir, notes, started)
    finally:
        for lock in held:
            lock.release()


def _train(config: TrainConfig, step: StepFn, accelerator, logdir: Path, notes: list[str], started: float):
    say = accelerator.print

    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(f"nonlocal-opt: warning: {message}", file=sys.stderr, flush=True)

    resume_from = None
    if config.resume is not None:
        def choose():
            path, skipped = select_checkpoint(logdir, config.resume)
            return path, skipped + check_resume_config(path, config.flat())
        resume_from, more = _on_main(accelerator, choose)
        notes = notes + more
    for note in notes:
        (warn(note[len("warning: "):]) if note.startswith("warning: ") else say(note))

    set_seed(config.seed)
    train_set, val_set, model, per_sample_loss, count_correct = build_data_and_model(config)
    if accelerator.num_processes > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if config.sync_bn is False:
            warn(f"BatchNorm statistics are computed per process ({accelerator.num_processes} processes, each with "
                 f"{config.batch_size // accelerator.num_processes} samples) with --no-sync-bn: results differ from one "
                 "process on the same global batches; drop --no-sync-bn to synchronise them")
        else:
            model = sync_batchnorm(model, accelerator.device)
    optimizer = build_optimizer(config, model.parameters())

    shuffle, fresh_shuffle = torch.Generator(), torch.Generator()
    loaders = [
        DataLoader(train_set, config.batch_size, sampler=RandomSampler(train_set, generator=gen), drop_last=True)
        for gen in (shuffle, fresh_shuffle)
    ]
    if len(loaders[0]) == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training samples")
    model, optimizer, train_loader, fresh_loader = accelerator.prepare(model, optimizer, *loaders)
    forward = torch.compile(model) if config.compile else None
    progress, loss_scale = Progress(), LossScale(enabled=config.mixed_precision == "fp16")
    steps_per_epoch = min(len(train_loader), config.limit_train_batches or len(train_loader))
    radius = build_radius_scheduler(config, optimizer, steps_per_epoch * config.epochs)
    accelerator.register_for_checkpointing(progress, loss_scale, *([radius] if radius else []))
    tracker_kwargs = {}
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except Exception as error:  # a damaged or foreign checkpoint: one line, the file and the fix
            raise ConfigError(f"cannot load checkpoint {resume_from} ({_one_line(error)}); it does not match this run: "
                              "resume an earlier checkpoint with --resume DIR, or start over with --overwrite") from None
        rng_after_load = torch.get_rng_state()
        say(f"resuming from {resume_from} (epoch {progress.epoch}, step {progress.step})")
        if loss_scale.restored_from_other:
            warn("the checkpoint's fp16 loss scale is not used: " + (
                f"this run starts loss scaling at {loss_scale.scale:g}" if loss_scale.enabled
                else "this run (--mixed-precision " + config.mixed_precision + ") does not scale the loss"))
        if radius is not None and radius.total_steps != steps_per_epoch * config.epochs:
            warn(f"the radius schedule keeps the horizon it started with ({radius.total_steps} steps; rho stays at "
                 f"{radius.rho_final:g} after it), not the {steps_per_epoch * config.epochs} steps of --epochs {config.epochs}; "
                 "start a new run for a schedule over the longer horizon")
        if accelerator.is_main_process:
            in_logdir = resume_from.resolve().parent == (logdir / "checkpoints").resolve()
            for note in supersede_newer(logdir, resume_from) if in_logdir else []:
                say(note)
            removed = truncate_metrics(logdir / "metrics.csv", progress.epoch, progress.step)
            if removed:
                say(f"metrics.csv: removed {removed} rows written after the checkpoint")
        tracker_kwargs = {"tensorboard": {"purge_step": progress.step + 1}}
        if progress.epoch >= config.epochs:
            say(f"the run in {logdir} is already finished: {resume_from.name} has {progress.epoch} epochs, --epochs is "
                f"{config.epochs}; pass a larger --epochs to train further")
            return TrainResult(accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer), [], resume_from,
                               steps=progress.step, refused=progress.refused, finished_before=True)
    hparams = {f"hp.{key}": _scalar(value) for key, value in optimizer.param_groups[0].items() if key != "params"}
    accelerator.init_trackers("tensorboard", config={**config.flat(), **hparams}, init_kwargs=tracker_kwargs)
    logger = MetricsLogger(accelerator, logdir / "metrics.csv")
    classification = count_correct is not None
    history: list[dict[str, float]] = []
    last_checkpoint = resume_from
    report = not sys.stdout.isatty() and accelerator.is_main_process
    last_report = time.monotonic()

    def save(name_step: int | None) -> Path:
        final = checkpoint_dir(logdir, progress.epoch, name_step)
        partial = partial_dir(logdir, final.name)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(partial, final, config.flat(), progress)
            remove_interrupt_checkpoints(logdir, final)
        accelerator.wait_for_everyone()
        return final

    def stop_requested(stop: StopRequest) -> bool:
        flag = stop.signum is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0)
            stop.signum = stop.signum or signal.SIGINT if flag else stop.signum
        return flag

    def interrupted(stop: StopRequest, checkpoint: Path):
        return TrainingInterrupted(f"interrupted at epoch {progress.epoch + (progress.batch > 0)}, step {progress.step}; "
                                   f"saved checkpoint {checkpoint}", checkpoint, stop.signum or signal.SIGINT)

    def explosion_threshold() -> float:
        return EXPLODE_FACTOR * max(abs(progress.first_loss), 1.0)

    try:
        with StopRequest() as stop:
            for epoch in range(progress.epoch, config.epochs):
                epoch_start = time.perf_counter()
                shuffle.manual_seed(config.seed + epoch)
                fresh = cycle(fresh_loader, fresh_shuffle, config.seed + FRESH_SEED_OFFSET * (epoch + 1), skip=progress.fresh_drawn)
                closure = BatchClosure(accelerator, model, per_sample_loss, count_correct, fresh, loss_scale, forward=forward)
                closure.fresh_drawn = progress.fresh_drawn
                bar = tqdm(total=steps_per_epoch, initial=progress.batch, desc=f"epoch {epoch + 1}/{config.epochs}",
                           disable=None if accelerator.is_local_main_process else True, leave=False)
                skip = progress.batch
                for index, batch in enumerate(train_loader):
                    if index < skip:
                        continue
                    if index == steps_per_epoch:
                        break
                    if skip and index == skip and resume_from is not None:
                        torch.set_rng_state(rng_after_load)  # as if the batches skipped had been drawn before the save
                    step_start = time.perf_counter()
                    closure.start(batch)
                    step(optimizer, closure, epoch)
                    loss = float(closure.first_loss)
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"training stopped: the loss became {loss} at epoch {epoch + 1}, step "
                            f"{progress.step + 1}; last good checkpoint: {last_checkpoint or 'none (no epoch finished)'}; "
                            "try a smaller --lr"
                        )
                    loss_scale.update(bool(closure.overflow))
                    values = step_metrics(optimizer, closure, loss_scale, classification, time.perf_counter() - step_start)
                    if progress.step == 0:
                        progress.first_loss = loss
                    progress.step += 1
                    progress.batch += 1
                    progress.fresh_drawn = closure.fresh_drawn
                    refused = float(values["nonfinite"]) > 0
                    progress.refused += refused
                    progress.passes += int(values.get("grad_evals", 1))
                    progress.sums = [progress.sums[0] + values["train/loss"], progress.sums[1] + values.get("train/acc", 0.0),
                                     progress.sums[2] + refused]
                    logger.log("step", values, epoch + 1, progress.step)
                    if radius is not None:
                        radius.step()  # after logging: the logged ρ is the one this step used
                    if (not progress.refused_warned and progress.step >= REFUSED_MIN_STEPS
                            and progress.refused > REFUSED_FRACTION * progress.step):
                        progress.refused_warned = True
                        warn(f"{progress.refused} of {progress.step} steps so far were refused by the rule (non-finite "
                             "trial point or projection): the model is not training; try another --projector or a smaller --lr")
                    if not progress.exploded_warned and loss > explosion_threshold():
                        progress.exploded_warned = True
                        warn(f"the loss exploded to {loss:.4g} at step {progress.step} (started at {progress.first_loss:.4g}); "
                             "try a smaller --lr")
                    bar.update()
                    bar.set_postfix({key.split("/")[1]: f"{values[key]:.4f}" for key in ("train/loss", "train/acc") if key in values})
                    if report and (time.monotonic() - last_report >= config.progress_every or progress.batch == steps_per_epoch):
                        last_report = time.monotonic()
                        acc = f", acc {values['train/acc']:.4f}" if "train/acc" in values else ""
                        print(f"epoch {epoch + 1}/{config.epochs} step {progress.batch}/{steps_per_epoch}: loss {loss:.4g}{acc}, "
                              f"refused {int(progress.sums[2])}, {time.perf_counter() - started:.1f} s", flush=True)
                    if stop_requested(stop) and progress.batch < steps_per_epoch:
                        bar.close()
                        last_checkpoint = save(progress.step)
                        raise interrupted(stop, last_checkpoint)
                bar.close()
                done = max(progress.batch, 1)
                epoch_values = {"epoch/train_loss": progress.sums[0] / done}
                if classification:
                    epoch_values["epoch/train_acc"] = progress.sums[1] / done
                epoch_values.update(evaluate(accelerator, accelerator.unwrap_model(model), val_set, config, per_sample_loss, count_correct))
                epoch_values["epoch_time"] = time.perf_counter() - epoch_start
                epoch_refused = int(progress.sums[2])
                progress.epoch, progress.batch, progress.fresh_drawn, progress.sums = epoch + 1, 0, 0, [0.0, 0.0, 0.0]
                logger.log("epoch", epoch_values, progress.epoch, progress.step)
                history.append(epoch_values)
                say(f"epoch {progress.epoch}/{config.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in epoch_values.items())
                    + f", refused steps {epoch_refused}")
                last_checkpoint = save(None)
                if stop_requested(stop) and progress.epoch < config.epochs:
                    raise interrupted(stop, last_checkpoint)
    finally:
        for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
            tracker.finish()
    final = history[-1] if history else {}
    diverged = None
    if progress.refused > REFUSED_FRACTION * progress.step:
        diverged = f"{progress.refused} of {progress.step} steps were refused"
    elif final and final["epoch/train_loss"] > explosion_threshold():
        diverged = f"the loss exploded (epoch mean {final['epoch/train_loss']:.4g}, first step {progress.first_loss:.4g})"
    result = TrainResult(accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer), history, last_checkpoint,
                         steps=progress.step, refused=progress.refused, passes=progress.passes, diverged=diverged)
    say(summary_line(result, time.perf_counter() - started))
    return result


def summary_line(result: TrainResult, seconds: float) -> str:
    """``finished: …`` or ``diverged (reason): …``: steps, passes, refused steps, final metrics, time, checkpoint."""
    head = f"diverged ({result.diverged})" if result.diverged else "finished"
    final = result.epochs[-1] if result.epochs else {}
    metrics = ", ".join(f"{key} {final[key]:.4g}" for key in ("epoch/train_loss", "val/loss", "val/acc") if key in final)
    return (f"{head}: {result.steps} steps ({result.refused} refused), {result.passes} passes, {metrics}; {seconds:.1f} s; "
            f"checkpoint {result.checkpoint}")


def _scalar(value: Any) -> Any:
    """TensorBoard hparams take bool/int/float/str only."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)

