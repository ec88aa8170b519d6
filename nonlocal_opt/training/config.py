"""The run configuration of ``nonlocal-opt train`` and the optimizer hyperparameters it resolves to."""

from __future__ import annotations

import contextlib
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from nonlocal_opt.integrations.wrappers import unwrap
from nonlocal_opt.optim.composed import OPTIMIZER_HYPERPARAMETERS, ComposedOptimizer, base_keywords
from nonlocal_opt.optim.hyperparameters import non_negative, positive_int
from nonlocal_opt.optim.radius_schedules import SCHEDULES, RadiusScheduler, radius_scheduler, rho_final_problem
from nonlocal_opt.plugins.compose import DEFAULT_BASE, compose, rule_and_base
from nonlocal_opt.plugins.registry import available
from nonlocal_opt.training.data import LANDSCAPE_PREFIX
from nonlocal_opt.training.hyperparameter_checks import check_hyperparameters, components_of, composition_specs

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
RHO_FINAL_FRACTION = 0.1  # --rho-final not given: ρ_final = 0.1 ρ_0
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


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    """Validator: one of ``options``.

    Args:
        options: the accepted values.
    """
    return lambda value: None if value in options else f"must be one of {', '.join(options)}"


def seed_range(value: int) -> str | None:
    """Validator: a seed ``torch`` and ``numpy`` both take, ``0 <= seed < 2**32``.

    Args:
        value: the seed (an integer: the type is checked first).
    """
    return None if 0 <= value < 2**32 else "must be an integer in [0, 2**32 - 1]"


def probability(value: float) -> str | None:
    """Validator: a probability ``P ∈ [0, 1]``.

    Args:
        value: the number (the type is checked first).
    """
    return None if 0 <= value <= 1 else "must be a probability in [0, 1]"


def setting(default: Any, check: Callable[[Any], str | None] | None = None) -> Any:
    """A ``TrainConfig`` field: its ``default`` and the range ``check`` applied after the type check (a
    validator as in :mod:`nonlocal_opt.optim.hyperparameters`: ``None`` or the problem as a phrase).

    Args:
        default: the field's default.
        check: the range validator (``None``: the declared type is the whole check).
    """
    return attrs.field(default=default, metadata={"check": check})


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table of key = value"}


def type_problem(value: Any, declared: Any) -> str | None:
    """What is wrong with ``value`` for a field declared as ``declared`` (``int``, ``float | None``,
    ``dict[str, Any]``, ...), as a phrase; ``None`` when it fits. Booleans are not integers or numbers,
    integers are numbers, and ``None`` fits only an optional field.

    Args:
        value: the value given (from a flag, a ``--config`` file or Python).
        declared: the field's type.
    """
    allowed = [typing.get_origin(t) or t for t in (typing.get_args(declared) if isinstance(declared, types.UnionType) else (declared,))]
    if value is None:
        return None if type(None) in allowed else f"must be {TYPE_NAMES[allowed[0]]}"
    if isinstance(value, bool):
        fits = bool in allowed
    elif isinstance(value, int):
        fits = int in allowed or float in allowed
    else:
        fits = any(isinstance(value, t) for t in allowed if t not in (type(None), bool, int))
    if fits:
        return None
    names = [TYPE_NAMES[t] for t in allowed if t is not type(None)]
    return "must be " + " or ".join(names) + (" (or None)" if type(None) in allowed else "")


def flag(name: str) -> str:
    """The flag (and ``--config`` key) of the field ``name``: ``--batch-size`` for ``batch_size``.

    Args:
        name: a ``TrainConfig`` field.
    """
    return "--set" if name == "overrides" else "--" + name.replace("_", "-")


@attrs.frozen
class TrainConfig:
    """Everything one run depends on (logged flat as TensorBoard hparams): the one source of the run
    settings' defaults (the CLI's flags take theirs from here) and of their checks (:meth:`check`).

    The composition's settings mean what they mean from Python: ``optimizer``, ``base`` and ``projector`` go
    to ``compose``, every hyperparameter not given keeps its component's (and base's) own default, and
    ``preset`` names settings to apply on top (``"none"``: none).

    The schema: each field is declared ``name: TYPE = setting(DEFAULT, RANGE_CHECK)``. :meth:`check` applies
    the declared type (:func:`type_problem`), then the range check, to every source alike (flags,
    ``--config`` files, Python); a new field needs nothing else, e.g.
    ``grad_accum: int = setting(1, positive_int)`` (and its flag in ``nonlocal_opt.cli``).
    """

    dataset: str = setting("fashion-mnist")
    model: str | None = setting(None)  # None: "mlp" for images; a landscape dataset is its own model
    optimizer: str = setting("adamw")  # a registered rule, or a base run as it is (chosen at equal passes: docs/trainer.md)
    projector: str | None = setting(None)  # None: the rule's default_projector
    base: str | None = setting(None)  # a registered base optimizer, stepping from θ_t with the rule's direction (None: sgd)
    preset: str = setting(NO_PRESET)  # a name in the components' ``presets``, or NO_PRESET
    lr: float | None = setting(None, non_negative)  # None: the preset's, else the base's own default
    rho: float | None = setting(None, non_negative)  # None: the preset's, else the component's own default
    epochs: int = setting(1, positive_int)
    batch_size: int = setting(128, positive_int)  # the global micro-batch: an optimizer step takes grad_accum of them
    grad_accum: int = setting(1, positive_int)  # micro-batches per optimizer step, all seen by every pass of the rule
    seed: int = setting(0, seed_range)
    logdir: str = setting("runs/default")
    overrides: dict[str, Any] = attrs.field(factory=dict)  # --set key=value; each value checked by check_hyperparameters
    limit_train_batches: int | None = setting(None, positive_int)
    limit_val_batches: int | None = setting(None, positive_int)
    mixed_precision: str = setting("no", one_of(MIXED_PRECISION))
    train_subset: int | None = setting(None, positive_int)  # train on the first N samples only
    data_dir: str | None = setting(None)
    download: bool = setting(False)
    label_noise: float = setting(0.0, probability)
    resume: str | None = setting(None)  # "latest" or a checkpoint directory
    rho_schedule: str = setting("none", one_of(("none", *SCHEDULES)))  # a name in radius_schedules.SCHEDULES
    rho_final: float | None = setting(None, non_negative)  # None: RHO_FINAL_FRACTION × the initial ρ
    couple_lr: bool = setting(False)
    overwrite: bool = setting(False)  # replace the run already in logdir
    device: str = setting("auto", one_of(DEVICES))  # "auto" (CUDA when present), "cpu" or "cuda"
    compile: bool = setting(False)  # torch.compile the model's forward
    sync_bn: bool | None = setting(None)  # BatchNorm statistics over all processes (None: on in multi-process runs)
    progress_every: float = setting(10.0, non_negative)  # seconds between progress lines off a terminal (0: every step)

    @classmethod
    def from_namespace(cls, args: Any) -> TrainConfig:
        """The config from parsed CLI arguments: every field ``args`` has (``--set`` pairs as a dict).

        Args:
            args: the parsed arguments (a ``--config`` file's values among them).
        """
        fields = {field.name: getattr(args, field.name) for field in attrs.fields(cls) if hasattr(args, field.name)}
        fields["overrides"] = dict(fields.get("overrides", ()))
        return cls(**fields)

    def check(self) -> None:
        """Raise ``ConfigError`` for values no run can use: a field's declared type, then its range (one line
        naming the flag, the value and what it must be), then the flags that only work together."""
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            problem = type_problem(value, field.type)
            check = field.metadata.get("check")
            if problem is None and value is not None and check is not None:
                problem = check(value)
            if problem is not None:
                raise ConfigError(f"{flag(field.name)} {problem}, got {value!r}")
        schedule_flags_check(self)
        if self.compile and self.dataset.startswith(LANDSCAPE_PREFIX):
            raise ConfigError(f"--compile does not apply to {self.dataset!r}: an analytic landscape has no network to compile; "
                              "drop --compile")

    def resolved(self) -> TrainConfig:
        """The config, checked (:meth:`check`), with a base's name given as ``optimizer`` read as the rule that
        runs a bare base over that base (``--optimizer adamw``: ``local`` over ``adamw``), and ``base`` filled
        in. A contradiction (``--optimizer sgd --base adamw``) or an unknown name raises ``ConfigError``."""
        self.check()
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


attrs.resolve_types(TrainConfig)  # the declared types as types, for check()

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
    Checked without building an optimizer (:func:`check_hyperparameters`): unknown rule/base/projector/preset
    names and unknown or invalid hyperparameters raise ``ValueError``.

    Args:
        config: the run's settings.
    """
    config = config.resolved()
    components, base, owner = components_of(config.optimizer, config.base, config.projector)
    accepted = {name for c in components for name in c.hyperparameters} | set(OPTIMIZER_HYPERPARAMETERS)
    base_keys = base_keywords(base)
    values = preset_hyperparameters(components, None if base_keys is None else base_keys | accepted, config.preset)
    values.update({key: value for key, value in (("lr", config.lr), ("rho", config.rho)) if value is not None})
    values.update(config.overrides)
    check_hyperparameters(components, base, owner, values)
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


def schedule_flags_check(config: TrainConfig) -> None:
    """``--rho-final`` and ``--couple-lr`` set a radius schedule: without ``--rho-schedule`` they raise
    ``ConfigError`` (rather than being ignored).

    Args:
        config: the run's settings.
    """
    if config.rho_schedule == "none":
        for name, given in (("--couple-lr", config.couple_lr), ("--rho-final", config.rho_final is not None)):
            if given:
                raise ConfigError(f"{name} needs a radius schedule: add --rho-schedule {'|'.join(SCHEDULES)}")


def build_radius_scheduler(config: TrainConfig, optimizer, total_steps: int) -> RadiusScheduler | None:
    """The radius schedule ``config`` asks for (``--rho-schedule``, ``--rho-final``, ``--couple-lr``) over
    ``total_steps``, ``None`` for ``"none"``; ``ρ_final`` defaults to ``RHO_FINAL_FRACTION ρ_0``. Bad
    combinations raise ``ConfigError`` naming the flags (the rule for ``ρ_final``: ``rho_final_problem``).

    Args:
        config: the run's settings.
        optimizer: the run's optimizer (a host wrapper, e.g. Accelerate's, is seen through).
        total_steps: the optimizer steps of the whole run.
    """
    schedule_flags_check(config)
    if config.rho_schedule == "none":
        return None
    inner = unwrap(optimizer)
    rho_final = schedule_target(config, inner, inner.rule.name)
    with as_config_error():
        return radius_scheduler(config.rho_schedule, inner, total_steps, rho_final, config.couple_lr)


def schedule_target(config: TrainConfig, optimizer: Any, rule: str) -> float:
    """``ρ_final`` of the schedule ``config`` asks for over ``optimizer``'s param groups (``--rho-final``, else
    ``RHO_FINAL_FRACTION ρ_0``); ``ConfigError`` naming the flags when the groups have no ``rho`` or
    ``rho_final_problem`` refuses it.

    Args:
        config: the run's settings, with a ``--rho-schedule``.
        optimizer: the optimizer, or anything with its ``param_groups`` and ``hyperparameter_specs``.
        rule: the rule's name, for the message.
    """
    if any("rho" not in group for group in optimizer.param_groups):
        raise ConfigError(f"--rho-schedule {config.rho_schedule}: rule {rule!r} has no radius rho to schedule; "
                          "choose a rule with a radius or drop --rho-schedule")
    rho_final = config.rho_final
    if rho_final is None:
        rho_final = RHO_FINAL_FRACTION * min(float(group["rho"]) for group in optimizer.param_groups)
    problem = rho_final_problem(optimizer, rho_final, geometric=SCHEDULES[config.rho_schedule].geometric)
    if problem is not None:
        given = f"{rho_final:g}" if isinstance(rho_final, (int, float)) else repr(rho_final)
        default = f" (the default is {RHO_FINAL_FRACTION:g} x the initial radius)" if config.rho_final is not None else ""
        raise ConfigError(f"--rho-final {given} {problem}{default}")
    return rho_final


def check_run_settings(config: TrainConfig) -> None:
    """Every check of ``config`` that needs no data, no model and no log dir, so that a bad setting fails
    before anything is written: the fields (:meth:`TrainConfig.check`), the composition and its
    hyperparameters (:func:`optimizer_hyperparameters`), and ``ρ_final`` of a radius schedule against the
    initial ``ρ`` those give (:func:`schedule_target`). Raises ``ConfigError``.

    Args:
        config: the run's settings.
    """
    config = config.resolved()
    with as_config_error():
        values = optimizer_hyperparameters(config)
        components, _, _ = components_of(config.optimizer, config.base, config.projector)
    schedule_flags_check(config)
    if config.rho_schedule != "none":
        specs = composition_specs(components)
        group = {**{key: spec.default for key, spec in specs.items()}, **values}
        schedule_target(config, types.SimpleNamespace(param_groups=[group], hyperparameter_specs=specs), components[0].name)
