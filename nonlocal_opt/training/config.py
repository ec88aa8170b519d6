"""The run configuration of ``nonlocal-opt train`` and the optimizer hyperparameters it resolves to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.optim.radius_schedules import SCHEDULES

MIXED_PRECISION = ("no", "bf16", "fp16")

# The RBO paper's settings (Sec. 4.1), used for every hyperparameter the user does not set. Only the
# keys the composed optimizer declares are passed on (e.g. a projector other than footpoint). The
# paper gives Entropy-SGD's γ and L only; it adapted the steph1793/Entropy-SGD code, whose defaults fill
# in the rest: outer lr 1 on x − μ (no γ factor), scoping 1e-3, a fresh mini-batch per Langevin step.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01},
    "rbo": {"lr": 6.0, "rho": 1.0},
    "sam": {"lr": 0.01, "rho": 0.05},
    "entropy-sgd": {"lr": 1.0, "gamma": 3e-3, "inner_steps": 20, "scale_outer_by_gamma": False, "scoping": 1e-3,
                    "fresh_batches": True},
}
# Per projector: the paper's solver (20 gradient steps of size 0.1); other projectors keep their own
# defaults (e.g. `newton`'s max_iters counts Newton iterations of 1 + cg_iters passes each).
PAPER_PROJECTOR_SETTINGS: dict[str, dict[str, Any]] = {"footpoint": {"max_iters": 20, "step_size": 0.1}}


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


@attrs.frozen
class TrainConfig:
    """Everything one run depends on (logged flat as TensorBoard hparams)."""

    dataset: str = "fashion-mnist"
    model: str | None = None  # None: "mlp" for images; a landscape dataset is its own model
    optimizer: str = "rbo"
    projector: str | None = None
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
    data_dir: str | None = None
    download: bool = False
    label_noise: float = 0.0
    resume: str | None = None  # "latest" or a checkpoint directory
    rho_schedule: str = "none"  # "none" or a name in nonlocal_opt.optim.radius_schedules.SCHEDULES
    rho_final: float = 0.1
    couple_lr: bool = False

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
        for name in ("epochs", "batch_size", "limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.rho_schedule not in ("none", *SCHEDULES):
            raise ConfigError(f"--rho-schedule must be one of none, {', '.join(SCHEDULES)}; got {self.rho_schedule!r}")
        if not 0 <= self.label_noise <= 1:
            raise ConfigError(f"--label-noise must be a probability in [0, 1], got {self.label_noise}")

    def flat(self) -> dict[str, Any]:
        """The config as flat scalars (``None`` as the string ``"None"``), for hparams and checkpoints."""
        out = {key: value for key, value in attrs.asdict(self).items() if key != "overrides"}
        out.update({f"set.{key}": value for key, value in self.overrides.items()})
        return {key: "None" if value is None else value for key, value in out.items()}


def optimizer_hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The hyperparameters passed to ``compose``: the paper's settings for ``config.optimizer`` and its
    projector (only those the composed optimizer declares), then ``--lr`` / ``--rho``, then ``--set``.

    Unknown rule/projector names and unknown or invalid hyperparameters raise ``ValueError``.
    """
    probe = compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, projector=config.projector)
    known = probe.hyperparameter_specs
    paper = {**PAPER_SETTINGS.get(config.optimizer, {}), **PAPER_PROJECTOR_SETTINGS.get(probe.projector.name, {})}
    values = {key: value for key, value in paper.items() if key in known}
    values.update({key: value for key, value in (("lr", config.lr), ("rho", config.rho)) if value is not None})
    values.update(config.overrides)
    compose([torch.nn.Parameter(torch.zeros(1))], config.optimizer, projector=config.projector, **values)  # validate
    return values
