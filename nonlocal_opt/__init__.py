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

from typing import Any

from nonlocal_opt.integrations import accelerate
from nonlocal_opt.integrations.wrappers import first_pass, stats, unwrap
from nonlocal_opt.optim.amp import GradScaler
from nonlocal_opt.optim.composed import ComposedOptimizer
from nonlocal_opt.optim.host_checks import HostGradientError, register_host_check
from nonlocal_opt.optim.hyperparameters import Hyperparameter
from nonlocal_opt.optim.interfaces import Centre, ConstraintManifold, DescentRule, GraphPoint, ProjectionResult, Projector
from nonlocal_opt.optim.step_context import ClosureError, StepContext
from nonlocal_opt.optim.step_resources import StepResources
from nonlocal_opt.plugins.compose import compose, constructor
from nonlocal_opt.plugins.hookspecs import hookimpl, hookspec
from nonlocal_opt.plugins.registry import available, get, registrations

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
    """``nonlocal_opt.SAM`` and the other constructors registered rules declare (``DescentRule.alias``,
    ``DescentRule.constructors``)."""
    if name[:1].isupper():
        found = constructor(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'nonlocal_opt' has no attribute {name!r}")
