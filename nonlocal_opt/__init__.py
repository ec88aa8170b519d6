"""nonlocal-opt: non-local optimizers for PyTorch, composed from pluggy plugins.

Quick start::

    import nonlocal_opt
    opt = nonlocal_opt.compose(model.parameters(), rule="sam", base="adamw", lr=1e-3, rho=0.05)
    opt = nonlocal_opt.SAM(model.parameters(), base=torch.optim.AdamW, lr=1e-3, rho=0.05)  # the same
    opt.step(closure)      # closure(): zero grads, forward, backward, return loss
    opt.stats              # {"grad_evals": 2.0, "nonfinite": 0.0}

Rules with an ``alias`` (``SAM``, ``GSAM``, ``WSAM``, ``FriendlySAM``, ``MSAM``, ``RBO``, ``EntropySGD``
from the first-party plugins) and the ``constructors`` a rule declares (``LookSAM``, ``AESAM``) are
reachable as ``nonlocal_opt.<name>``.
"""

import importlib
from typing import Any

from nonlocal_opt.integrations import accelerate
from nonlocal_opt.optim.host_checks import register_host_check

# Exported name → the module that defines it, imported on first use, so that ``import nonlocal_opt`` (and the
# command line's start-up) does not import torch until something needs it.
_EXPORTS = {
    "first_pass": "nonlocal_opt.integrations.wrappers",
    "stats": "nonlocal_opt.integrations.wrappers",
    "unwrap": "nonlocal_opt.integrations.wrappers",
    "GradScaler": "nonlocal_opt.optim.amp",
    "ComposedOptimizer": "nonlocal_opt.optim.composed",
    "HostGradientError": "nonlocal_opt.optim.host_checks",
    "Hyperparameter": "nonlocal_opt.optim.hyperparameters",
    **dict.fromkeys(("Centre", "ConstraintManifold", "DescentRule", "GraphPoint", "ProjectionResult", "Projector"),
                    "nonlocal_opt.optim.interfaces"),
    "ClosureError": "nonlocal_opt.optim.step_context",
    "StepContext": "nonlocal_opt.optim.step_context",
    "StepResources": "nonlocal_opt.optim.step_resources",
    "compose": "nonlocal_opt.plugins.compose",
    "constructor": "nonlocal_opt.plugins.compose",
    "hookimpl": "nonlocal_opt.plugins.hookspecs",
    "hookspec": "nonlocal_opt.plugins.hookspecs",
    **dict.fromkeys(("available", "get", "registrations"), "nonlocal_opt.plugins.registry"),
}

__all__ = [
    "Centre",
    "ClosureError",
    "ComposedOptimizer",
    "ConstraintManifold",
    "DescentRule",
    "GradScaler",
    "GraphPoint",
    "HostGradientError",
    "Hyperparameter",
    "ProjectionResult",
    "Projector",
    "StepContext",
    "StepResources",
    "available",
    "compose",
    "first_pass",
    "get",
    "hookimpl",
    "hookspec",
    "registrations",
    "stats",
    "unwrap",
]

__version__ = "0.1.0"

register_host_check(accelerate.refuse_host_accumulation)


def __getattr__(name: str) -> Any:
    """The exports of ``_EXPORTS``, imported on first use; ``nonlocal_opt.SAM`` and the other constructors
    registered rules declare (``DescentRule.alias``, ``DescentRule.constructors``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name[:1].isupper():
        found = __getattr__("constructor")(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'nonlocal_opt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
