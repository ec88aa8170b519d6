"""``ComposedOptimizer``: a ``torch.optim.Optimizer`` made of a rule, a base optimizer, a projector
and a manifold (docs/composing.md)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from nonlocal_opt.optim.batchnorm import compiled_code_ran, layers_of
from nonlocal_opt.optim.flat_params import FlatParams, global_norm, local, sharded_norm
from nonlocal_opt.optim.hyperparameters import Hyperparameter, boolean, merge_specs, optional, positive, validate
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector
from nonlocal_opt.optim.step_context import ProjectionRecord, StepContext, refuse_host_accumulation

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
TRUE, FALSE = torch.tensor(True), torch.tensor(False)  # the host path's verdicts (never written to)


def base_keywords(base: BaseFactory) -> set[str] | None:
    """The keyword arguments ``base(params, ...)`` accepts; ``None`` when it takes ``**kwargs``."""
    try:
        parameters = list(inspect.signature(base).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def all_finite(tensors: list[torch.Tensor], norm: torch.Tensor | None, host_reads: bool, flat: FlatParams) -> torch.Tensor:
    """Whether every entry of ``tensors`` is finite, in every process's shard. On the host path from their
    total 2-norm ``norm`` (one fused sweep): a finite norm settles it, an infinite one may be an overflow of
    large finite entries, so then the entries are checked. On the device path with ``aminmax`` (one sweep;
    it propagates NaN), no host read."""
    if host_reads:
        if math.isfinite(norm.item()):
            return TRUE
        here = all(bool(torch.isfinite(t).all()) for t in tensors)
        return TRUE if bool(flat.sum(torch.tensor(float(not here), device=flat.device)) == 0) else FALSE
    extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors])
    here = torch.isfinite(extremes).all()
    return here if flat.group is None else flat.sum((~here).to(flat.dtype)) == 0


def saved_copies(tensors: list[torch.Tensor], params: list[torch.Tensor], state: Mapping[Any, dict], spare: list[list[torch.Tensor]]
                 ) -> tuple[list[torch.Tensor], dict[Any, dict[str, torch.Tensor]]]:
    """Copies of ``tensors`` and of every tensor in the base ``state`` of ``params``, for the device path's
    restore. Each of the ``spare`` lists (one tensor per parameter, shaped like ``tensors``) holds the
    copy of the parameters, or of one state entry that every parameter has in their shape (momentum,
    Adam's moments); the rest are cloned."""
    spare = list(spare)
    if spare:
        saved_params = spare.pop(0)
        torch._foreach_copy_(saved_params, tensors)
    else:
        saved_params = [t.clone() for t in tensors]
    saved_state: dict[Any, dict[str, torch.Tensor]] = {p: {} for p in params if p in state}
    entries = {k for p in saved_state for k, v in state[p].items() if isinstance(v, torch.Tensor)}
    for key in sorted(entries):
        now = [local(state[p][key]) if p in saved_state and isinstance(state[p].get(key), torch.Tensor) else None for p in params]
        if spare and all(v is not None and v.shape == t.shape and v.dtype == t.dtype for v, t in zip(now, tensors)):
            kept = spare.pop(0)
            torch._foreach_copy_(kept, now)
        else:
            kept = [None if v is None else v.clone() for v in now]
        for p, v in zip(params, kept):
            if v is not None:
                saved_state[p][key] = v
    return saved_params, saved_state


def base_label(base: BaseFactory) -> str:
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
    """

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
        components = [c for c in (rule, projector, manifold) if c is not None]
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
        defaults = {key: spec.default for key, spec in self.hyperparameter_specs.items()}
        defaults.update(ours)
        self._last_stats: dict[str, Any] = {}
        self._scratch: dict[str, list[torch.Tensor]] = {}
        self._batchnorm: tuple[tuple[int, ...], list] = ((), [])
        self._zero_grad_calls = 0  # how a step tells a closure that zeroes gradients from one that accumulates
        self._closure_pass: int | None = None  # the pass whose closure call runs now (0: the first); see first_pass()
        self.last_projection: ProjectionRecord | None = None
        self._components = components
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
        for component in self._components:
            component.check_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, counted (see ``StepContext.loss``). A closure calls it once per
        pass, so ``set_to_none=True`` skips torch's profiler record around it."""
        self._zero_grad_calls += 1
        if not set_to_none:
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters (unknown or invalid ones raise ``ValueError``)."""
        settings = {k: v for k, v in param_group.items() if k != "params"}
        validate(self.hyperparameter_specs, {k: v for k, v in settings.items() if k in self.hyperparameter_specs}, self._owner())
        self._check_base_keys({k: v for k, v in settings.items() if k not in self.hyperparameter_specs})
        super().add_param_group(param_group)
        if self._ready:
            self._check_components(self.param_groups[-1])

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rule's state and ``param_groups`` (as ``torch.optim.Optimizer``), plus ``"base_state"``."""
        state = super().state_dict()
        state["base_state"] = self.base.state_dict()["state"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rule's and the base's state; the base keeps sharing ``param_groups``."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_state", {})
        self.base.load_state_dict({"state": base_state, "param_groups": state_dict["param_groups"]})
        super().load_state_dict(state_dict)
        self.base.param_groups = self.param_groups

    # -- stepping ----------------------------------------------------------------------------------
    def _batchnorm_layers(self, params: list[torch.Tensor]) -> list:
        """The BatchNorm layers of ``params`` (:func:`~nonlocal_opt.optim.batchnorm.layers_of`), looked up
        again only when the parameters change."""
        key = (*(id(p) for p in params), compiled_code_ran())  # looked up again once compiled code runs
        if self._batchnorm[0] != key:
            self._batchnorm = (key, layers_of(params))
        return self._batchnorm[1]

    def _buffers(self, name: str, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors like ``params`` kept under ``name``, made anew when the parameters changed shape."""
        kept = self._scratch.get(name)
        if kept is None or [t.shape for t in kept] != [p.shape for p in params] or kept[0].dtype != params[0].dtype:
            kept = self._scratch[name] = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        return kept

    def _flat_buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """One tensor of ``shape`` (dtype and device of ``like``) kept under ``name``, made anew when they change."""
        kept = self._scratch.get(name)
        if kept is None or kept[0].shape != shape or kept[0].dtype != like.dtype or kept[0].device != like.device:
            kept = self._scratch[name] = [like.new_empty(shape)]
        return kept[0]

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:
        """One step. ``closure()`` zeroes grads, runs forward and backward, returns the loss.

        Returns the loss at the start of the step (``None`` for closure-free rules called without one).
        Exception-safe: when anything raises before the base optimizer steps, the parameters are put back
        at ``θ_t`` and no state has changed (rules write their state after the base step).
        """
        if closure is None and self.rule.requires_closure:
            raise RuntimeError(
                f"rule {self.rule.name!r} evaluates the loss several times per step: call "
                "opt.step(closure) with a closure that zeroes grads, runs forward and backward, "
                "and returns the loss"
            )
        if self.rule.requires_closure:
            refuse_host_accumulation(self.rule.name)
        self.last_projection = None
        ctx = StepContext(self, closure)
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

    def _base_step(
        self, flat: FlatParams, finite: torch.Tensor | bool, stats: dict[str, Any], host_reads: bool, spare: Sequence[list[torch.Tensor]] = ()
    ) -> torch.Tensor:
        """``base.step()`` with the gradients in ``p.grad``, skipped unless ``finite`` and every gradient is;
        returns the 0-d bool tensor "step taken".

        On the host path the verdict is read and the step skipped (as ``GradScaler`` does). On the
        device path (no host synchronisation) the step runs and ``torch.where`` puts back the
        parameters and base state, from copies made in ``spare`` (per-parameter tensors the step no
        longer needs) as far as it goes; only a step that creates base state (a first step) reads the
        verdict, to drop that state again. Norms and verdicts cover every shard (``flat.sum``).
        """
        stepped = [(i, p, t, g) for i, (p, t, g) in enumerate(zip(flat.params, flat.tensors, flat.grads())) if g is not None]
        if not stepped:
            stats["nonfinite"] = 0.0
            return TRUE
        max_norms = {group["max_grad_norm"] for group in self.param_groups}
        if len(max_norms) != 1:
            raise ValueError(f"max_grad_norm clips one global norm and must be the same in every parameter group; got {max_norms}")
        max_norm = max_norms.pop()
        indices, params, tensors, grads = (list(column) for column in zip(*stepped))
        norm = None
        if host_reads or max_norm is not None:
            norm = global_norm(grads) if flat.group is None else sharded_norm(grads, flat)
        if max_norm is not None:  # torch.nn.utils.clip_grads_with_norm_, on this process's part of each gradient
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        if host_reads:
            taken = bool(all_finite(grads, norm, host_reads, flat)) and bool(finite)  # every shard takes part in the test
            if taken:
                self.base.step()
            stats["nonfinite"] = float(not taken)
            return TRUE if taken else FALSE
        finite = all_finite(grads, norm, host_reads, flat) & finite
        state = self.base.state
        keys = {p: set(state[p]) if p in state else set() for p in params}
        saved_params, saved_state = saved_copies(tensors, params, state, [[s[i] for i in indices] for s in spare])
        self.base.step()
        created = [p for p in params if p in state and set(state[p]) - keys[p]]
        if created and not bool(finite):
            for p in created:
                for key in set(state[p]) - keys[p]:
                    del state[p][key]
        for t, old in zip(tensors, saved_params):
            torch.where(finite, t, old, out=t)
        for p, kept in saved_state.items():
            for key, old in kept.items():
                now = local(state[p][key])
                torch.where(finite, now, old, out=now)
        stats["nonfinite"] = ~finite
        return finite

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


def unwrap(optimizer: Any) -> ComposedOptimizer:
    """The ``ComposedOptimizer`` inside host wrappers that keep it as ``.optimizer`` (Accelerate's
    ``AcceleratedOptimizer``) or ``._optimizer`` (Lightning's ``LightningOptimizer``), at any depth."""
    seen = optimizer
    for _ in range(16):
        if isinstance(seen, ComposedOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if seen is None:
            break
    raise TypeError(
        f"{type(optimizer).__name__} is not a nonlocal-opt optimizer and wraps none (looked through .optimizer and ._optimizer)"
    )


def first_pass(optimizer: Any) -> bool:
    """Whether code running now runs once per step of ``optimizer`` (or of the composed optimizer it wraps,
    see :func:`unwrap`): ``False`` only inside the second and later closure calls of a step. Guard the side
    effects of a closure with it, e.g. ``self.log`` in a Lightning ``training_step`` under automatic
    optimization, which runs once per pass; the first pass is at ``θ_t``."""
    return unwrap(optimizer)._closure_pass in (None, 0)


def stats(optimizer: Any) -> dict[str, float]:
    """``ComposedOptimizer.stats`` of ``optimizer`` or of the composed optimizer it wraps (see :func:`unwrap`)."""
    return unwrap(optimizer).stats

