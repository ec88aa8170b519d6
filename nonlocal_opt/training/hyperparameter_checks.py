"""The one check of the hyperparameters handed to a composition from the command line (``--lr``, ``--rho``,
``--set``), a ``--config`` file's ``[set]`` table and ``nonlocal-opt compare`` specs: names the composition
takes, its components' own checks, base keywords by the type of their default, and no NaN or inf."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from nonlocal_opt.optim.composed import OPTIMIZER_HYPERPARAMETERS, base_keywords
from nonlocal_opt.optim.hyperparameters import Hyperparameter, boolean, merge_specs, validate
from nonlocal_opt.plugins.compose import DEFAULT_BASE, resolve, rule_and_base

ANY_VALUE = Hyperparameter(None, "—", "a keyword of the base optimizer, which checks its value", lambda value: None)


def finite_number(value: Any) -> str | None:
    """Validator: a finite number of any sign (the base checks its own range).

    Args:
        value: the value to check.
    """
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if finite else "must be a finite number"


def like_default(default: Any) -> Callable[[Any], str | None]:
    """The validator of a base optimizer's keyword, from its default: ``True``/``False`` for a boolean, a
    finite number for a number, a list of as many finite numbers for a tuple of numbers (``betas``);
    other defaults (``None``, tensors, strings) leave the value to the base.

    Args:
        default: the keyword's default in the base's signature.
    """
    if isinstance(default, bool):
        return boolean
    if finite_number(default) is None:
        return finite_number
    if isinstance(default, (tuple, list)) and default and all(finite_number(v) is None for v in default):
        size = len(default)

        def numbers(value: Any) -> str | None:
            fits = isinstance(value, (tuple, list)) and len(value) == size and all(finite_number(v) is None for v in value)
            return None if fits else f"must be a list of {size} finite numbers, like the default {list(default)}"

        return numbers
    return ANY_VALUE.check


def base_hyperparameters(base: Any) -> dict[str, Hyperparameter]:
    """The keywords ``base(params, ...)`` accepts, each checked by the type of its default (:func:`like_default`);
    ``{}`` when the signature is not known.

    Args:
        base: the base optimizer class or factory.
    """
    keys = base_keywords(base) or set()
    parameters = inspect.signature(base).parameters if keys else {}
    return {key: Hyperparameter(parameters[key].default, "—", "a keyword of the base optimizer", like_default(parameters[key].default))
            for key in keys}


def components_of(rule: Any, base: Any = None, projector: Any = None, manifold: Any = None) -> tuple[list[Any], Any, str]:
    """The composition's rule, manifold and projector instances (those it has), its base class and its name
    for messages (``"sam over base sgd"``); unknown or unfitting names raise ``ValueError``.

    Args:
        rule: a registered rule (or base) name.
        base: a registered base name (``None``: the one ``rule`` names, else ``sgd``).
        projector: for projecting rules (``None``: the rule's default).
        manifold: for projecting rules (``None``: the rule's default).
    """
    rule, base_name = rule_and_base(rule, base)
    rule_obj, base_cls, projector_obj, manifold_obj = resolve(rule, base_name, projector, manifold)
    components = [c for c in (rule_obj, manifold_obj, projector_obj) if c is not None]
    return components, base_cls, f"{' + '.join(c.name for c in components)} over base {base_name or DEFAULT_BASE}"


def composition_specs(components: list[Any]) -> dict[str, Hyperparameter]:
    """The hyperparameters the optimizer and its components declare (``OPTIMIZER_HYPERPARAMETERS`` and each
    component's), merged; ``ValueError`` when two declare one name differently.

    Args:
        components: the rule, manifold and projector instances (:func:`components_of`).
    """
    return merge_specs(("the optimizer", OPTIMIZER_HYPERPARAMETERS), *((repr(c), c.hyperparameters) for c in components))


def check_hyperparameters(components: list[Any], base: Any, owner: str, values: dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming the key, the value and what it must be) hyperparameters the composition
    does not take, values its components' checks refuse, base keywords whose type differs from their
    default's, and any NaN or infinite number. The one check of ``--lr``, ``--rho``, ``--set``, ``[set]``
    tables and compare specs.

    Args:
        components: the rule, manifold and projector instances (:func:`components_of`).
        base: the base optimizer class or factory.
        owner: the composition, for the message.
        values: the hyperparameters given.
    """
    for key, value in values.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"invalid hyperparameter {key}={value!r} for {owner}: must be finite (NaN or infinite values "
                             "make every step non-finite)")
    open_keys = dict.fromkeys(values, ANY_VALUE) if base_keywords(base) is None else {}
    validate({**open_keys, **base_hyperparameters(base), **composition_specs(components)}, values, owner)
