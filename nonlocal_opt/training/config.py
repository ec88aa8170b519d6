"""The run configuration of ``nonlocal-opt train`` and the optimizer hyperparameters it resolves to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from nonlocal_opt.optim.composed import ComposedOptimizer, base_keywords
from nonlocal_opt.optim.radius_schedules import SCHEDULES
from nonlocal_opt.plugins.compose import DEFAULT_BASE, compose
from nonlocal_opt.plugins.registry import available, get

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
RHO_FINAL_FRACTION = 0.1  # --rho-final not given: ρ_final = 0.1 ρ_0
DEFAULT_PRESET = "paper"  # the settings of the paper that defines each component
NO_PRESET = "none"  # every hyperparameter at its component's (and base's) own default


class ConfigError(ValueError):
    """Bad user input found while setting up a run (the CLI exits with code 2)."""


@contextlib.contextmanager
def as_config_error(*errors: type[Exception]) -> Iterator[None]:
    """Re-raise ``ValueError`` (and ``errors``) inside the block as ``ConfigError`` with the same message."""
    try:
        yield
    except (ValueError, *errors) as error:
        raise ConfigError(str(error)) from None


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run at a step boundary after saving ``checkpoint`` (resume with
    ``resume="latest"`` / ``--resume``); ``signum`` is the signal."""

    def __init__(self, message: str, checkpoint, signum: int):
        super().__init__(message)
        self.checkpoint, self.signum = checkpoint, signum


@attrs.frozen
class TrainConfig:
    """Everything one run depends on (logged flat as TensorBoard hparams)."""

    dataset: str = "fashion-mnist"
    model: str | None = None  # None: "mlp" for images; a landscape dataset is its own model
    optimizer: str = "entropy-sgd"
    projector: str | None = None
    base: str = DEFAULT_BASE  # a registered base optimizer, stepping from θ_t with the rule's direction
    preset: str = DEFAULT_PRESET  # a name in the components' ``presets``, or NO_PRESET
    lr: float | None = None
    rho: float | None = None
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    logdir: str = "runs/default"
    overrides: dict[str, Any] = attrs.field(factory=dict)  # --set key=value
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    mixed_precision: str = "no"
    train_subset: int | None = None  # train on the first N samples only
    data_dir: str | None = None
    download: bool = False
    label_noise: float = 0.0
    resume: str | None = None  # "latest" or a checkpoint directory
    rho_schedule: str = "none"  # "none" or a name in nonlocal_opt.optim.radius_schedules.SCHEDULES
    rho_final: float | None = None  # None: RHO_FINAL_FRACTION × the initial ρ
    couple_lr: bool = False
    overwrite: bool = False  # replace the run already in logdir
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    compile: bool = False  # torch.compile the model's forward
    sync_bn: bool | None = None  # BatchNorm statistics over all processes (None: on in multi-process runs)
    progress_every: float = 10.0  # seconds between progress lines when stdout is not a terminal (0: every step)

    @classmethod
    def from_namespace(cls, args: Any) -> TrainConfig:
        """The config from parsed CLI arguments: every field ``args`` has (``--set`` pairs as a dict)."""
        fields = {field.name: getattr(args, field.name) for field in attrs.fields(cls) if hasattr(args, field.name)}
        fields["overrides"] = dict(fields.get("overrides", ()))
        return cls(**fields)

    def check(self) -> None:
        """Raise ``ConfigError`` for values no run can use."""
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        for name in ("epochs", "batch_size", "train_subset", "limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.rho_schedule not in ("none", *SCHEDULES):
            raise ConfigError(f"--rho-schedule must be one of none, {', '.join(SCHEDULES)}; got {self.rho_schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.rho_final is not None and not (isinstance(self.rho_final, (int, float)) and 0 <= self.rho_final < float("inf")):
            raise ConfigError(f"--rho-final must be a finite number >= 0, got {self.rho_final!r}")
        if not isinstance(self.progress_every, (int, float)) or self.progress_every < 0:
            raise ConfigError(f"--progress-every must be a number of seconds >= 0, got {self.progress_every!r}")
        if not 0 <= self.label_noise <= 1:
            raise ConfigError(f"--label-noise must be a probability in [0, 1], got {self.label_noise}")

    def resolved(self) -> TrainConfig:
        """The config with the trainer's default projector filled in: the rule's ``training_projector``."""
        if self.projector is None and self.optimizer in available("rule"):
            projector = get("rule", self.optimizer).training_projector
            if projector is not None:
                return attrs.evolve(self, projector=projector)
        return self

    def flat(self) -> dict[str, Any]:
        """The config as flat scalars (``None`` as the string ``"None"``), for hparams and checkpoints."""
        out = {key: value for key, value in attrs.asdict(self).items() if key != "overrides"}
        out.update({f"set.{key}": value for key, value in self.overrides.items()})
        return {key: "None" if value is None else value for key, value in out.items()}


def preset_hyperparameters(probe: ComposedOptimizer, preset: str) -> dict[str, Any]:
    """The preset ``preset`` of the composition's rule, manifold and projector merged in that order
    (e.g. ``"paper"``: RBO's η and ρ, then the footpoint solver's K and γ), restricted to the keys the
    composition accepts; ``{}`` for ``"none"``. A name no component defines raises ``ValueError``."""
    if preset == NO_PRESET:
        return {}
    components = [c for c in (probe.rule, probe.manifold, probe.projector) if c is not None]
    if not any(preset in c.presets for c in components):
        names = sorted({name for c in components for name in c.presets} | {NO_PRESET})
        raise ValueError(f"unknown preset {preset!r} for {' + '.join(c.name for c in components)}; available: {', '.join(names)}")
    values = {key: value for c in components for key, value in c.presets.get(preset, {}).items()}
    base_keys = base_keywords(probe.base_factory)
    return {key: value for key, value in values.items() if base_keys is None or key in base_keys or key in probe.hyperparameter_specs}


def optimizer_hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The hyperparameters passed to ``compose``: ``config.preset`` of the rule and its projector (only keys
    the composition accepts), then ``--lr`` / ``--rho``, then ``--set``.

    Unknown rule/base/projector/preset names and unknown or invalid hyperparameters raise ``ValueError``.
    """
    config = config.resolved()
    slots = {"base": config.base, "projector": config.projector}
    probe = compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, **slots)
    values = preset_hyperparameters(probe, config.preset)
    values.update({key: value for key, value in (("lr", config.lr), ("rho", config.rho)) if value is not None})
    values.update(config.overrides)
    compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, **slots, **values)  # validate
    return values
