"""nonlocal-opt: non-local optimizers for PyTorch, composed from pluggy plugins.

Quick start::

    import nonlocal_opt
    opt = nonlocal_opt.compose(model.parameters(), rule="rbo", projector="footpoint", lr=6.0, rho=1.0)
    opt.step(closure)      # closure(): zero grads, forward, backward, return loss
    opt.stats              # {"grad_evals": 21.0, "proj_iters": 20.0, ...}
"""

from nonlocal_opt.optim.composed import ComposedOptimizer, compose
from nonlocal_opt.optim.hyperparameters import Hyperparameter
from nonlocal_opt.optim.interfaces import Centre, ConstraintManifold, DescentRule, GraphPoint, ProjectionResult, Projector
from nonlocal_opt.plugins.hookspecs import hookimpl, hookspec
from nonlocal_opt.plugins.registry import available, get, registrations

__all__ = [
    "Centre",
    "ComposedOptimizer",
    "ConstraintManifold",
    "DescentRule",
    "GraphPoint",
    "Hyperparameter",
    "ProjectionResult",
    "Projector",
    "available",
    "compose",
    "get",
    "hookimpl",
    "hookspec",
    "registrations",
]

__version__ = "0.1.0"
