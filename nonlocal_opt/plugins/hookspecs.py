"""Pluggy hook specifications: how a plugin registers descent rules, projectors and manifolds.

A plugin is a module (or object) with ``@nonlocal_opt.hookimpl`` functions, declared under the
entry-point group ``nonlocal_opt``::

    [project.entry-points.nonlocal_opt]
    my_plugin = "my_package.plugin"

Each hook receives ``register``; ``register(cls)`` registers ``cls`` under ``cls.name``
(``register(cls, name=...)`` for a base optimizer, which has no ``name`` attribute).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("nonlocal_opt")
hookimpl = pluggy.HookimplMarker("nonlocal_opt")

Register = Callable[..., None]


@hookspec
def nonlocal_opt_register_descent_rules(register: Register) -> None:
    """Register ``DescentRule`` subclasses: call ``register(cls)`` once per class.

    Args:
        register: ``register(cls)`` registers ``cls`` under ``cls.name``.
    """


@hookspec
def nonlocal_opt_register_projectors(register: Register) -> None:
    """Register ``Projector`` subclasses: call ``register(cls)`` once per class.

    Args:
        register: ``register(cls)`` registers ``cls`` under ``cls.name``.
    """


@hookspec
def nonlocal_opt_register_manifolds(register: Register) -> None:
    """Register ``ConstraintManifold`` subclasses: call ``register(cls)`` once per class.

    Args:
        register: ``register(cls)`` registers ``cls`` under ``cls.name``.
    """


@hookspec
def nonlocal_opt_register_bases(register: Register) -> None:
    """Register base optimizers (``torch.optim.Optimizer`` subclasses): call ``register(cls, name="...")``.

    Args:
        register: ``register(cls, name="...")`` registers ``cls`` under ``name``.
    """
