"""First-party plugin: the ``local`` rule, the gradient at the current point handed to the base as it is.

``compose(params, "local", base=base)`` is the base optimizer itself (``torch.optim.SGD`` bit for bit over
``sgd``), plus the framework's non-finite skip, clipping and stats. It declares ``runs_bare_base``: a base's
name given as the rule (``compose(params, "adamw")``, ``nonlocal-opt train --optimizer adamw``) means it. Registered through the
``nonlocal_opt`` entry-point group like any third party.
"""

from __future__ import annotations

from nonlocal_opt import DescentRule, hookimpl


class LocalRule(DescentRule):
    """``g = ∇f(θ)``: one pass (or the gradients already in ``p.grad`` when called without a closure)."""

    name = "local"
    requires_closure = False
    runs_bare_base = True
    shardable = True
    presets = {"paper": {"lr": 0.01}}
    comparison_specs = (
        {"name": "sgd-m", "base": "sgd", "fixed": {"momentum": 0.9}, "sweep": {"lr": [0.03, 0.1]}},
        {"name": "adamw", "base": "adamw", "fixed": {"weight_decay": 0.01}, "sweep": {"lr": [1e-3, 3e-3]}},
    )

    def step(self, ctx):
        """One pass (when there is a closure), then the base's step with the gradients it left.

        Args:
            ctx: The step's context.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if ctx.has_closure:
            loss = ctx.loss(extra=False)
        finite = True if loss is None else ctx.finite(loss)
        ctx.apply(finite=finite)
        return loss


@hookimpl
def nonlocal_opt_register_descent_rules(register):
    """Register the ``local`` rule.

    Args:
        register: The registry's callback.
    """
    register(LocalRule)
