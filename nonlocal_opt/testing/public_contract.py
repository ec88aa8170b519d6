"""A step context that holds plugins to its public contract: reading one of its private members (a name
with a leading underscore, or ``__dict__``) from code outside ``nonlocal_opt.optim`` raises an
``AssertionError`` naming the code and the member. The contract kits compose every optimizer with it."""

from __future__ import annotations

import functools
import sys
from typing import Any

from nonlocal_opt.optim.composed import ComposedOptimizer
from nonlocal_opt.optim.flat_params import FlatParams
from nonlocal_opt.optim.step_context import StepContext

CORE = "nonlocal_opt.optim"


class PrivateMemberError(AssertionError):
    """Code outside the core read a private member of the step context or of what it hands out."""


def _check(owner: type, name: str) -> None:
    """Raise unless the code reading ``owner``'s member ``name`` (two frames up) may: public names, and
    any name from the core, are fine."""
    if not name.startswith("_") or (name.startswith("__") and name != "__dict__"):
        return
    caller = sys._getframe(2)
    module = caller.f_globals.get("__name__", "")
    if module == CORE or module.startswith(f"{CORE}."):
        return
    raise PrivateMemberError(
        f"{module}.{caller.f_code.co_qualname} reads {owner.__name__}.{name}, a private member of the step context: "
        "a plugin may use only the public contract of StepContext (docs/plugins.md, 'The step context'), "
        "which it may rely on across releases"
    )


@functools.cache
def guarded(cls: type) -> type:
    """A subclass of ``cls`` whose instances refuse reads of their private members from outside the core.

    Args:
        cls: a class whose instances keep their members in ``__dict__`` (no ``__slots__``).
    """

    def __getattribute__(self: Any, name: str) -> Any:
        _check(cls, name)
        return cls.__getattribute__(self, name)

    return type(f"Guarded{cls.__name__}", (cls,), {"__getattribute__": __getattribute__, "__module__": __name__})


class GuardedStepContext(guarded(StepContext)):
    """A :class:`~nonlocal_opt.optim.step_context.StepContext` that refuses reads of its private members,
    and of those of its flat view ``flat``, from outside the core.

    Args:
        *args: as for ``StepContext``.
        **kwargs: as for ``StepContext``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flat.__class__ = guarded(FlatParams)


def hold_to_contract(optimizer: ComposedOptimizer) -> ComposedOptimizer:
    """Make every step of ``optimizer`` (and its ``step_context``) use a :class:`GuardedStepContext`.

    Args:
        optimizer: the composed optimizer under test.

    Returns:
        ``optimizer``.
    """
    optimizer.step_context_type = GuardedStepContext
    return optimizer
