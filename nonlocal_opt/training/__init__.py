"""The Accelerate trainer behind ``nonlocal-opt train``: ``train(TrainConfig(...))``."""

from nonlocal_opt.training.config import ConfigError, TrainConfig, TrainingDiverged
from nonlocal_opt.training.trainer import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingDiverged", "train"]
