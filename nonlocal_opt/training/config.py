"""The run configuration of ``nonlocal-opt train`` and the optimizer hyperparameters it resolves to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs

from nonlocal_opt.integrations.wrappers import unwrap
from nonlocal_opt.optim.composed import OPTIMIZER_HYPERPARAMETERS, ComposedOptimizer, base_keywords
from nonlocal_opt.optim.hyperparameters import Hyperparameter, merge_specs, validate
from nonlocal_opt.optim.radius_schedules import SCHEDULES, RadiusScheduler, radius_scheduler, rho_final_problem
from nonlocal_opt.plugins.compose import DEFAULT_BASE, compose, resolve, rule_and_base
from nonlocal_opt.plugins.registry import available

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
RHO_FINAL_FRACTION = 0.1  # --rho-final not given: ρ_final = 0.1 ρ_0
ANY_VALUE = Hyperparameter(None, "—", "a keyword of the base optimizer, which checks its value", lambda value: None)
NO_PRESET = "none"  # every hyperparameter at its component's (and base's) own default, as from Python


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
    """Everything one run depends on (logged flat as TensorBoard hparams): the one source of the run
    settings' defaults (the CLI's flags take theirs from here) and of their checks (:meth:`check`).

    The composition's settings mean what they mean from Python: ``optimizer``, ``base`` and ``projector`` go
    to ``compose``, every hyperparameter not given keeps its component's (and base's) own default, and
    ``preset`` names settings to apply on top (``"none"``: none).
    """

    dataset: str = "fashion-mnist"
    model: str | None = None  # None: "mlp" for images; a landscape dataset is its own model
    optimizer: str = "adamw"  # a registered rule, or a base run as it is (chosen at equal passes: docs/trainer.md)
    projector: str | None = None  # None: the rule's default_projector
    base: str | None = None  # a registered base optimizer, stepping from θ_t with the rule's direction (None: sgd)
    preset: str = NO_PRESET  # a name in the components' ``presets``, or NO_PRESET
    lr: float | None = None  # None: the preset's, else the base's own default
    rho: float | None = None  # None: the preset's, else the component's own default
    epochs: int = 1
    batch_size: int = 128  # the global micro-batch: an optimizer step takes grad_accum of them
    grad_accum: int = 1  # micro-batches per optimizer step, all seen by every pass of the rule
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
        for name in ("epochs", "batch_size", "grad_accum", "train_subset", "limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.rho_schedule not in ("none", *SCHEDULES):
            raise ConfigError(f"--rho-schedule must be one of none, {', '.join(SCHEDULES)}; got {self.rho_schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.progress_every, (int, float)) or self.progress_every < 0:
            raise ConfigError(f"--progress-every must be a number of seconds >= 0, got {self.progress_every!r}")
        if not 0 <= self.label_noise <= 1:
            raise ConfigError(f"--label-noise must be a probability in [0, 1], got {self.label_noise}")

    def resolved(self) -> TrainConfig:
        """The config with a base's name given as ``optimizer`` read as the rule that runs a bare base over
        that base (``--optimizer adamw``: ``local`` over ``adamw``), and ``base`` filled in. A contradiction
        (``--optimizer sgd --base adamw``) or an unknown name raises ``ConfigError``."""
        bases = available("base")
        if self.optimizer in bases and self.base in bases and self.base != self.optimizer:
            raise ConfigError(f"--optimizer {self.optimizer} runs the base optimizer {self.optimizer} as it is, and --base "
                              f"{self.base} names another: pass --optimizer {self.base} alone, or a rule with --base {self.base} "
                              f"(e.g. --optimizer sam --base {self.base}); the default --optimizer is {TrainConfig().optimizer}")
        with as_config_error():
            rule, base = rule_and_base(self.optimizer, self.base)
        return attrs.evolve(self, optimizer=rule, base=base or DEFAULT_BASE)

    def flat(self) -> dict[str, Any]:
        """The config as flat scalars (``None`` as the string ``"None"``), for hparams and checkpoints."""
        out = {key: value for key, value in attrs.asdict(self).items() if key != "overrides"}
        out.update({f"set.{key}": value for key, value in self.overrides.items()})
        return {key: "None" if value is None else value for key, value in out.items()}


def preset_hyperparameters(components: list[Any], accepted: set[str] | None, preset: str) -> dict[str, Any]:
    """The preset ``preset`` of the composition's rule, manifold and projector merged in that order
    (e.g. ``"paper"``: RBO's η and ρ, then the footpoint solver's K and γ), restricted to the keys the
    composition accepts; ``{}`` for ``"none"``. A name no component defines raises ``ValueError``.

    Args:
        components: the rule, manifold and projector instances (those the composition has).
        accepted: the hyperparameter names the composition accepts (``None``: any).
        preset: a preset name, or ``NO_PRESET``.
    """
    if preset == NO_PRESET:
        return {}
    if not any(preset in c.presets for c in components):
        names = sorted({name for c in components for name in c.presets} | {NO_PRESET})
        raise ValueError(f"unknown preset {preset!r} for {' + '.join(c.name for c in components)}; available: {', '.join(names)}")
    values = {key: value for c in components for key, value in c.presets.get(preset, {}).items()}
    return {key: value for key, value in values.items() if accepted is None or key in accepted}


def optimizer_hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The hyperparameters passed to ``compose``: ``config.preset`` of the rule and its projector (only keys
    the composition accepts), then ``--lr`` / ``--rho``, then ``--set``; none of them for the defaults.
    Checked without building an optimizer: unknown rule/base/projector/preset names and unknown or invalid
    hyperparameters raise ``ValueError`` (the base checks its own values when the optimizer is built).

    Args:
        config: the run's settings.
    """
    config = config.resolved()
    rule, base, projector, manifold = resolve(config.optimizer, config.base, config.projector)
    components = [c for c in (rule, manifold, projector) if c is not None]
    specs = merge_specs(("the optimizer", OPTIMIZER_HYPERPARAMETERS), *((repr(c), c.hyperparameters) for c in components))
    base_keys = base_keywords(base)
    values = preset_hyperparameters(components, None if base_keys is None else base_keys | set(specs), config.preset)
    values.update({key: value for key, value in (("lr", config.lr), ("rho", config.rho)) if value is not None})
    values.update(config.overrides)
    owner = f"{' + '.join(c.name for c in components)} over base {config.base}"
    base_specs = dict.fromkeys(values if base_keys is None else base_keys, ANY_VALUE)
    validate({**base_specs, **specs}, values, owner)
    return values


def build_optimizer(config: TrainConfig, params) -> ComposedOptimizer:
    """``compose(params, config.optimizer, base=…, projector=…, **optimizer_hyperparameters(config))``:
    the run's one optimizer. Unknown names and unknown or invalid hyperparameters raise ``ConfigError``.

    Args:
        config: the run's settings (resolved or not).
        params: the model's parameters.
    """
    config = config.resolved()
    with as_config_error():
        return compose(params, config.optimizer, base=config.base, projector=config.projector, **optimizer_hyperparameters(config))


def build_radius_scheduler(config: TrainConfig, optimizer, total_steps: int) -> RadiusScheduler | None:
    """The radius schedule ``config`` asks for (``--rho-schedule``, ``--rho-final``, ``--couple-lr``) over
    ``total_steps``, ``None`` for ``"none"``; ``ρ_final`` defaults to ``RHO_FINAL_FRACTION ρ_0``. Bad
    combinations raise ``ConfigError`` naming the flags (the rule for ``ρ_final``: ``rho_final_problem``).

    Args:
        config: the run's settings.
        optimizer: the run's optimizer (a host wrapper, e.g. Accelerate's, is seen through).
        total_steps: the optimizer steps of the whole run.
    """
    if config.rho_schedule == "none":
        if config.couple_lr:
            raise ConfigError("--couple-lr needs a radius schedule: add --rho-schedule cosine|linear|step")
        return None
    inner = unwrap(optimizer)
    if any("rho" not in group for group in inner.param_groups):
        raise ConfigError(f"--rho-schedule {config.rho_schedule}: rule {inner.rule.name!r} has no radius rho to schedule; "
                          "choose a rule with a radius or drop --rho-schedule")
    rho_final = config.rho_final
    if rho_final is None:
        rho_final = RHO_FINAL_FRACTION * min(float(group["rho"]) for group in inner.param_groups)
    problem = rho_final_problem(inner, rho_final, geometric=SCHEDULES[config.rho_schedule].geometric)
    if problem is not None:
        given = f"{rho_final:g}" if isinstance(rho_final, (int, float)) else repr(rho_final)
        default = f" (the default is {RHO_FINAL_FRACTION:g} x the initial radius)" if config.rho_final is not None else ""
        raise ConfigError(f"--rho-final {given} {problem}{default}")
    with as_config_error():
        return radius_scheduler(config.rho_schedule, inner, total_steps, rho_final, config.couple_lr)
