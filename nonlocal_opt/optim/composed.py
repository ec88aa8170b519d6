"""``ComposedOptimizer``: a ``torch.optim.Optimizer`` made of a rule, a base optimizer, a projector
and a manifold (docs/composing.md)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from nonlocal_opt.optim.host_checks import run_host_checks
from nonlocal_opt.optim.hyperparameters import Hyperparameter, boolean, check_finite, merge_specs, optional, positive, validate
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.optim.state_provenance import check_provenance, recorded
from nonlocal_opt.optim.step_context import ProjectionRecord, StepContext
from nonlocal_opt.optim.step_resources import StepResources

OPTIMIZER_HYPERPARAMETERS = {
    "freeze_bn_stats": Hyperparameter(
        True,
        "—",
        "BatchNorm running statistics are updated only by the first forward pass of a step",
        boolean,
    ),
    "device_path": Hyperparameter(
        None,
        "—",
        "no host synchronisation inside a step: scalars stay 0-d device tensors, choices use torch.where "
        "(None: on when the parameters are not on the CPU)",
        optional(boolean),
    ),
    "distributed": Hyperparameter(
        None,
        "—",
        "average the loss a pass returns over the torch.distributed processes (replicated parameters, as with DDP), "
        "one small all-reduce per pass (None: when torch.distributed is initialised with more than one process)",
        optional(boolean),
    ),
    "record_projection": Hyperparameter(
        False,
        "—",
        "keep copies of each step's projection (c_t, c̃ and the projector's result) in opt.last_projection "
        "(False: last_projection is None, and the step's vectors stay in buffers the next step reuses)",
        boolean,
    ),
    "max_grad_norm": Hyperparameter(
        None,
        "c",
        "clip the global norm of the gradient handed to the base optimizer to c (None: no clipping)",
        optional(positive),
    ),
}

BaseFactory = Callable[..., torch.optim.Optimizer]


def base_keywords(base: BaseFactory) -> set[str] | None:
    """The keyword arguments ``base(params, ...)`` accepts; ``None`` when it takes ``**kwargs`` (or has no signature).

    Args:
        base: the base optimizer class or factory.
    """
    try:
        parameters = list(inspect.signature(base).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def base_label(base: BaseFactory) -> str:
    """``module.qualname`` of ``base``, for messages.

    Args:
        base: the base optimizer class or factory.
    """
    return f"{getattr(base, '__module__', '')}.{getattr(base, '__qualname__', repr(base))}".lstrip(".")


class ComposedOptimizer(torch.optim.Optimizer):
    """A non-local optimizer: ``rule`` decides the gradient a step hands to ``base`` (any
    ``torch.optim.Optimizer`` class); rules that move a ball use ``projector`` to restore
    ``manifold``'s constraint.

    The base shares ``param_groups`` with the composed optimizer: its hyperparameters (``lr``,
    ``momentum``, ``betas``, ...) sit next to the rule's (``rho``, ...), so LR schedulers drive the
    base. Of ``hyperparameters``, those the optimizer, rule, projector and manifold declare stay here;
    the others go to ``base(param_groups, **others)``, which validates them.
    ``state_dict()`` holds the rule's and the base's state. ``stats`` describes the last step;
    ``last_projection`` holds copies of its projection (a ``ProjectionRecord``) when the optimizer was
    made with ``record_projection=True``, else ``None``.

    Args:
        params: the parameters, or parameter groups (dicts with ``"params"`` and hyperparameters).
        rule: the descent rule.
        base: the base optimizer class (or any callable ``base(param_groups, **hyperparameters)``).
        projector: the projector, for a projecting rule.
        manifold: the constraint manifold, for a projecting rule.
        **hyperparameters: the optimizer's (``OPTIMIZER_HYPERPARAMETERS``), the components' and the base's.

    Attributes:
        resources: what the optimizer hands every step's context (a ``StepResources``).
        step_context_type: the class of that context (a ``StepContext``; the contract kits set a subclass
            that refuses reads of private members).
    """

    step_context_type: type[StepContext] = StepContext

    def __init__(
        self,
        params: Iterable[Any],
        rule: DescentRule,
        base: BaseFactory,
        projector: Projector | None = None,
        manifold: ConstraintManifold | None = None,
        **hyperparameters: Any,
    ):
        self.rule, self.projector, self.manifold = rule, projector, manifold
        self.base_factory = base
        named = zip(("rule", "projector", "manifold"), (rule, projector, manifold))
        self.hyperparameter_specs: dict[str, Hyperparameter] = merge_specs(
            ("the optimizer", OPTIMIZER_HYPERPARAMETERS),
            *((f"{kind} {c.name!r}", c.hyperparameters) for kind, c in named if c is not None),
        )
        self._base_keys = base_keywords(base)
        clash = sorted(set(self.hyperparameter_specs) & (self._base_keys or set()))
        if clash:
            raise ValueError(
                f"hyperparameter {clash[0]!r} is declared by {self._owner()} and is also a keyword of the base "
                f"{base_label(base)}: the two cannot share param_groups; choose another base"
            )
        ours = {k: v for k, v in hyperparameters.items() if k in self.hyperparameter_specs}
        theirs = {k: v for k, v in hyperparameters.items() if k not in self.hyperparameter_specs}
        self._check_base_keys(theirs)
        validate(self.hyperparameter_specs, ours, self._owner())
        check_finite(hyperparameters, self._owner())
        defaults = {key: spec.default for key, spec in self.hyperparameter_specs.items()}
        defaults.update(ours)
        self._last_stats: dict[str, Any] = {}
        self.last_projection: ProjectionRecord | None = None
        self._ready = False
        super().__init__(params, defaults)
        try:
            self.base = base(self.param_groups, **theirs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid base hyperparameters for {base_label(base)}: {error}") from None
        if not isinstance(self.base, torch.optim.Optimizer):
            raise TypeError(f"base {base_label(base)} returned {type(self.base).__name__}, not a torch.optim.Optimizer")
        closure = inspect.signature(self.base.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(
                f"base {base_label(base)} needs a closure in step(): it runs its own loop and cannot take a gradient "
                "from a rule; choose a base whose step() works on the gradients in p.grad"
            )
        self.base.param_groups = self.param_groups
        self.resources = StepResources(rule, projector, manifold, self.base)
        self.defaults = {**self.base.defaults, **self.defaults}
        self._ready = True
        for group in self.param_groups:
            self._check_components(group)

    def _owner(self) -> str:
        parts = [f"rule={self.rule.name!r}"]
        parts += [f"{kind}={c.name!r}" for kind, c in (("projector", self.projector), ("manifold", self.manifold)) if c is not None]
        return f"compose({', '.join(parts)})"

    def _check_base_keys(self, values: Mapping[str, Any]) -> None:
        if self._base_keys is None:
            return
        unknown = sorted(set(values) - self._base_keys)
        if unknown:
            known = ", ".join(sorted(set(self.hyperparameter_specs) | self._base_keys))
            raise ValueError(
                f"unknown hyperparameter {unknown[0]!r} for {self._owner()} over base {base_label(self.base_factory)}; known: {known}"
            )

    def _check_components(self, group: Mapping[str, Any]) -> None:
        for component in self.resources.components:
            component.check_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, counted in ``resources.zero_grad_calls`` (see ``StepContext.loss``).
        A closure calls it once per pass, so ``set_to_none=True`` skips torch's profiler record around it.

        Args:
            set_to_none: set ``p.grad`` to ``None`` rather than to zeros.
        """
        self.resources.zero_grad_calls += 1
        if not set_to_none:
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters.

        Args:
            param_group: a dict with ``"params"`` and any hyperparameters (the others take the defaults).

        Raises:
            ValueError: an unknown, invalid or non-finite hyperparameter, or a combination a component refuses.
        """
        settings = {k: v for k, v in param_group.items() if k != "params"}
        validate(self.hyperparameter_specs, {k: v for k, v in settings.items() if k in self.hyperparameter_specs}, self._owner())
        self._check_base_keys({k: v for k, v in settings.items() if k not in self.hyperparameter_specs})
        check_finite(settings, self._owner())
        super().add_param_group(param_group)
        if self._ready:
            self._check_components(self.param_groups[-1])

    # -- state -------------------------------------------------------------------------------------
    def composition(self) -> dict[str, str | None]:
        """What made this optimizer's state: the names of the rule, projector and manifold, and the base's
        ``module.qualname`` (saved in :meth:`state_dict` and checked by :meth:`load_state_dict`)."""
        return {
            "rule": self.rule.name,
            "base": base_label(self.base_factory),
            "projector": None if self.projector is None else self.projector.name,
            "manifold": None if self.manifold is None else self.manifold.name,
        }

    def state_dict(self) -> dict[str, Any]:
        """The rule's state and ``param_groups`` (as ``torch.optim.Optimizer``), plus ``"base_state"`` and
        ``"composition"`` (:meth:`composition`, its names as byte tensors:
        :func:`~nonlocal_opt.optim.state_provenance.recorded`)."""
        state = super().state_dict()
        state["base_state"] = self.base.state_dict()["state"]
        state["composition"] = recorded(self.composition())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rule's and the base's state; the base keeps sharing ``param_groups``.

        Args:
            state_dict: what :meth:`state_dict` returned, by this composition (state saved before
                ``"composition"`` was recorded is checked by its hyperparameters instead).

        Raises:
            ValueError: the state is foreign (another rule, base, projector or manifold, a plain
                ``torch.optim`` optimizer, another group layout); nothing has been changed.
        """
        check_provenance(state_dict, self, self._base_keys)
        state_dict = dict(state_dict)
        state_dict.pop("composition", None)
        base_state = state_dict.pop("base_state", {})
        self.base.load_state_dict({"state": base_state, "param_groups": state_dict["param_groups"]})
        super().load_state_dict(state_dict)
        self.base.param_groups = self.param_groups

    # -- stepping ----------------------------------------------------------------------------------
    def step_context(self, closure: Callable[..., Any] | None = None) -> StepContext:
        """The context ``step`` hands its rule, for tools and tests that run a projector or part of a rule by hand.

        Args:
            closure: the closure its passes call (``None``: none; ``evaluate`` then raises).
        """
        return self.step_context_type(self.resources, self.param_groups, self.state, closure)

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:
        """One step. Exception-safe: when anything raises before the base optimizer steps, the parameters
        are put back at ``θ_t`` and no state has changed (rules write their state after the base step).

        Args:
            closure: zeroes grads, runs forward and backward, returns the loss (may accept ``fresh_batch``).

        Returns:
            The loss at the start of the step (``None`` for closure-free rules called without one).

        Raises:
            RuntimeError: a rule that evaluates the loss several times was called without a closure.
            ValueError: a hyperparameter in ``param_groups`` is NaN or infinite (nothing has changed).
        """
        if closure is None and self.rule.requires_closure:
            raise RuntimeError(
                f"rule {self.rule.name!r} evaluates the loss several times per step: call "
                "opt.step(closure) with a closure that zeroes grads, runs forward and backward, "
                "and returns the loss (under fp16 loss scaling, torch.amp.GradScaler.step(opt) steps without it: "
                "use nonlocal_opt.GradScaler and scaler.step(opt, closure), docs/integrations.md)"
            )
        for index, group in enumerate(self.param_groups):  # a scheduler or the caller may have set them
            check_finite({k: v for k, v in group.items() if k != "params"}, f"{self._owner()}, param_groups[{index}]")
        if self.rule.requires_closure:
            run_host_checks(self.rule.name)
        self.last_projection = None
        ctx = self.step_context(closure)
        try:
            loss = self.rule.step(ctx)
        except BaseException:  # KeyboardInterrupt, out of memory, an error in the closure: back to θ_t
            ctx.restore_start()
            raise
        if loss is not None:
            ctx.stats["loss"] = torch.as_tensor(loss).detach()
        self._last_stats = ctx.stats
        self.last_projection = ctx.projection
        return loss

    @property
    def stats(self) -> dict[str, float]:
        """Plain floats about the last step: ``loss`` (at ``θ_t``, when the step ran a closure),
        ``grad_evals``, ``nonfinite`` (1.0 when the base step was skipped), and for projecting rules
        ``proj_iters``, ``proj_residual``, ``offset_error``.

        Converted on access, so reading it is the only host synchronisation the step needs.
        """
        return {key: float(value) for key, value in self._last_stats.items()}

    def __repr__(self) -> str:
        return f"ComposedOptimizer({self._owner()[8:-1]}, base={base_label(self.base_factory)}, groups={len(self.param_groups)})"

