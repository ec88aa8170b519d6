"""What a run trains: the training and validation sets, the model, the per-sample loss ``ℓ_i`` and, for
classification, the counter of correct predictions."""

from __future__ import annotations

import functools
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from nonlocal_opt.training.closure import classification_correct
from nonlocal_opt.training.config import ConfigError, TrainConfig, as_config_error
from nonlocal_opt.training.data import DatasetNotFoundError, LandscapeDataset, load_dataset, with_label_noise
from nonlocal_opt.training.main_process import warn
from nonlocal_opt.training.models import LandscapeModel, build_model
from nonlocal_opt.training.sync_batchnorm import sync_batchnorm


@attrs.frozen
class Task:
    """A run's data and model. ``per_sample_loss(outputs, targets)`` gives ``ℓ_i`` per sample;
    ``count_correct`` is ``None`` when the task is not a classification (an analytic landscape)."""

    train_set: Dataset
    val_set: Dataset
    model: torch.nn.Module
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count_correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    @property
    def classification(self) -> bool:
        return self.count_correct is not None


def build_task(config: TrainConfig) -> Task:
    """The task ``config`` describes (``--dataset``, ``--model``, ``--label-noise``, ``--train-subset``).

    Args:
        config: The run's resolved config.
    """
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
    return Task(train_set, val_set, model, per_sample, count_correct)


def batchnorm_across_processes(model: torch.nn.Module, accelerator, config: TrainConfig) -> torch.nn.Module:
    """``model`` with its BatchNorm statistics synchronised over the processes (``--sync-bn``, the default
    in a multi-process run), or with a warning that they are per process (``--no-sync-bn``).

    Args:
        model: The task's model.
        accelerator: The run's ``Accelerator``.
        config: The run's config.
    """
    if accelerator.num_processes == 1 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if config.sync_bn is False:
        warn(accelerator, f"BatchNorm statistics are computed per process ({accelerator.num_processes} processes, each with "
             f"{config.batch_size // accelerator.num_processes} samples) with --no-sync-bn: results differ from one "
             "process on the same global batches; drop --no-sync-bn to synchronise them")
        return model
    return sync_batchnorm(model, accelerator.device)
