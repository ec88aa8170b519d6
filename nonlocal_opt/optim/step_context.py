"""Everything a rule or projector may use during one ``optimizer.step(closure)``."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import attrs
import torch

from nonlocal_opt.optim.batchnorm import BatchNormFreezer
from nonlocal_opt.optim.flat_params import FlatParams, global_norm, sharded_norm
from nonlocal_opt.optim.host_checks import HostGradientError
from nonlocal_opt.optim.points import Centre, GraphPoint, ProjectionResult, copied
from nonlocal_opt.optim.step_resources import StepResources


def process_count() -> int:
    """The number of ``torch.distributed`` processes (1 when it is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def accepts_fresh_batch(closure: Callable[..., Any] | None) -> bool:
    """Whether ``closure`` takes the keyword ``fresh_batch`` (see :meth:`StepContext.evaluate`).

    Args:
        closure: the closure of a step, or ``None`` (no closure: ``False``).
    """
    if closure is None:
        return False
    try:
        return "fresh_batch" in inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False


class ClosureError(RuntimeError):
    """A closure that breaks the closure protocol (:class:`StepContext`): it returned something other than
    the loss as a scalar, or left no gradient."""


def is_scalar_loss(loss: Any) -> bool:
    """Whether ``loss`` is what a closure must return: a one-element tensor or a real number, finite or not.

    Args:
        loss: what a closure returned.
    """
    if isinstance(loss, torch.Tensor):
        return loss.numel() == 1
    return isinstance(loss, (int, float)) and not isinstance(loss, bool)


def describe(value: Any) -> str:
    """``value`` in a few words, for messages: a tensor's shape and dtype, else its type.

    Args:
        value: anything.
    """
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    return "None" if value is None else f"a {type(value).__name__}"


@attrs.frozen
class ProjectionRecord:
    """One projection of a step: the centre ``c_t`` the rule moved from (``None`` if it gave none),
    the proposed centre ``c̃`` and the projector's result (its ``centre`` as the projector returned it,
    before the rule moves it with the parameters the base lands on).

    Args:
        centre: ``c_t``, or ``None``.
        target: ``c̃``.
        result: what the projector returned.
    """

    centre: Centre | None
    target: Centre
    result: ProjectionResult


class StepContext:
    """One step's view of the optimizer, and the whole of what a rule, projector or manifold may use
    during ``optimizer.step(closure)``: flat parameters, hyperparameters, state, closure calls, the
    projection, the base optimizer's step, stats. It does not expose the optimizer: what it needs of it
    comes from the :class:`~nonlocal_opt.optim.step_resources.StepResources` the optimizer hands over.
    ``ComposedOptimizer.step_context(closure)`` makes one as ``step()`` does.

    Closure protocol: ``closure()`` zeroes the gradients, runs forward and backward on the current
    mini-batch and returns the loss (a scalar tensor; :class:`ClosureError` otherwise, or when it left no
    gradient). Before every pass but the first the step drops the previous pass's gradients itself, so
    passes never add up, whether or not the closure zeroes. A closure may also accept ``fresh_batch=True``,
    asking it to draw the next mini-batch first (Entropy-SGD's Langevin steps can use this).

    Args:
        resources: what the optimizer lends the step (components, scratch storage, pass counting, the
            guarded base step).
        param_groups: the optimizer's parameter groups, holding every hyperparameter.
        state: the optimizer's per-parameter state (the rule's :attr:`state` is its first parameter's).
        closure: the closure of ``step(closure)``, or ``None``.

    Attributes:
        rule_name: the name of the rule taking the step.
        manifold: the composed manifold (``None`` for a point rule).
        projector: the composed projector (``None`` for a point rule).
        flat: the flat view ``θ ∈ R^d`` of the parameters (a :class:`~nonlocal_opt.optim.flat_params.FlatParams`).
        host_reads: whether plugins may read tensor values on the host (``.item()``, ``bool()``, a Python
            branch): the host path. Off (the device path) they keep scalars as 0-d tensors and decide with
            ``torch.where``, so a step never waits for the device. Set by the optimizer's ``device_path``.
        world_size: processes the loss of a pass is averaged over: under DDP each closure returns its own
            process's loss while the gradient is already averaged, so every scalar a rule computes from
            the loss would differ between replicas.
        grad_evals: closure calls so far in this step.
        centre: ``c_t``, the centre the rule moved from, as given to :meth:`project` (read by projectors
            that move the centre).
        projection: copies of the step's projection when :attr:`recording`, else ``None``.
        stats: the step's stats (``grad_evals``, ``nonfinite``, ``proj_iters``, ...; a rule may add its own).
    """

    def __init__(self, resources: StepResources, param_groups: Sequence[Mapping[str, Any]],
                 state: MutableMapping[torch.Tensor, dict[str, Any]], closure: Callable[..., Any] | None):
        self._resources, self._param_groups, self._state, self._closure = resources, param_groups, state, closure
        self._hp: dict[str, Any] = {}  # hyperparameters read this step (they do not change within a step)
        self.rule_name: str = resources.rule.name
        self.manifold = resources.manifold
        self.projector = resources.projector
        self.flat = FlatParams(param_groups, shards=True)
        if self.flat.group is not None:
            refusing = [f"{type(c).__name__} ({c.name!r})" for c in resources.components if not c.shardable]
            if refusing:
                raise NotImplementedError(
                    f"parameters sharded with FSDP2 (DTensor) need components that sum over the shards; {', '.join(refusing)} "
                    "does not declare shardable = True: train it with DDP (replicated parameters) or in one process"
                )
        device_path = self.hp("device_path")
        self.host_reads: bool = self.flat.device.type == "cpu" if device_path is None else not device_path
        distributed = self.hp("distributed")
        self.world_size = process_count() if distributed is None or distributed else 1
        self.grad_evals = 0
        self.centre: Centre | None = None
        self.projection: ProjectionRecord | None = None
        self.stats: dict[str, Any] = {"grad_evals": 0}
        self._batchnorm: BatchNormFreezer | None = None  # made by the first extra pass, kept for the step
        self._start: torch.Tensor | list[torch.Tensor] | None = None  # θ_t, to put back if the step raises
        self._applied = False

    # -- hyperparameters and state ------------------------------------------------------------------
    def hp(self, name: str) -> Any:
        """A hyperparameter shared by the whole ball.

        Args:
            name: a key of ``param_groups``.

        Raises:
            ValueError: its value differs between parameter groups.
        """
        if name in self._hp:
            return self._hp[name]
        values = {group[name] for group in self._param_groups}
        if len(values) != 1:
            raise ValueError(
                f"hyperparameter {name!r} must be the same in every parameter group for "
                f"{self.rule_name!r} (one ball for all parameters); got {sorted(values)}"
            )
        self._hp[name] = values.pop()
        return self._hp[name]

    def per_coordinate(self, name: str) -> float | torch.Tensor:
        """A hyperparameter that may differ between groups, spread over the flat coordinates.

        Args:
            name: a key of ``param_groups``.

        Returns:
            A float when every group has the same value, else a flat tensor of one value per coordinate.
        """
        return self.flat.per_coordinate([group[name] for group in self._param_groups])

    def per_tensor(self, name: str) -> list[Any]:
        """A hyperparameter that may differ between groups, one value per tensor of :attr:`params`.

        Args:
            name: a key of ``param_groups``.
        """
        return [group[name] for group, params in zip(self._param_groups, self.flat.groups) for _ in params]

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters, one tensor each, in the order of ``flat``: what this process holds of them
        (the local shards under FSDP2). Their gradients are :meth:`grads`."""
        return self.flat.tensors

    def grads(self) -> list[torch.Tensor | None]:
        """The gradients of :attr:`params` (``None`` where a parameter has none)."""
        return self.flat.grads()

    # -- sums over R^d ------------------------------------------------------------------------------
    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sums over ``R^d`` from this process's partial sums: one all-reduce over the shards under FSDP2,
        ``partial`` itself otherwise. Every dot product or norm a plugin forms over flat vectors goes
        through it (or :meth:`dot` / :meth:`norm`).

        Args:
            partial: this process's partial sums (a 0-d or small 1-d tensor).
        """
        return self.flat.sum(partial)

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``xᵀy`` over ``R^d``, as a 0-d tensor.

        Args:
            x: a flat vector (this process's part of it).
            y: a flat vector like ``x``.
        """
        return self.flat.sum(x.dot(y))

    def norm(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``‖x‖₂`` over ``R^d``, as a 0-d tensor.

        Args:
            x: a flat vector, or one tensor per parameter (this process's part of each).
        """
        if self.flat.group is None:
            return torch.linalg.vector_norm(x) if isinstance(x, torch.Tensor) else global_norm(x)
        return sharded_norm(x if isinstance(x, list) else [x], self.flat)

    def finite(self, *losses: Any) -> bool | torch.Tensor:
        """Whether every one of ``losses`` is finite: a ``bool`` on the host path, a 0-d bool tensor on the
        device path (no host read).

        Args:
            *losses: 0-d tensors or numbers.
        """
        if self.host_reads:
            return all(math.isfinite(float(loss)) for loss in losses)
        return torch.isfinite(torch.stack([torch.as_tensor(loss, device=self.flat.device) for loss in losses])).all()

    def keep_start(self, theta: torch.Tensor | list[torch.Tensor]) -> None:
        """Tell the step where it started before moving the parameters other than through :meth:`evaluate`
        (which does it by itself): :meth:`restore_start` puts it back if the step raises.

        Args:
            theta: ``θ_t``, flat or one tensor per parameter; left untouched until the base steps.
        """
        self._start = theta

    def restore_start(self) -> None:
        """Put ``θ_t`` back unless the base has stepped: what the optimizer does when the step raises."""
        if self._start is not None and not self._applied:
            with torch.no_grad():
                self.flat.write(self._start)

    def buffers(self, name: str) -> list[torch.Tensor]:
        """Scratch tensors shaped like :attr:`params`, kept by the optimizer from step to step (not in
        ``state_dict``): a rule's per-step work allocates nothing of size ``d``.

        Args:
            name: the key, shared by the rule, projector and manifold: prefix it with the component's name.
        """
        return self._resources.buffers(name, self.flat.tensors)

    def scratch(self, name: str, rows: int | None = None, dtype: torch.dtype | None = None, columns: int | None = None) -> torch.Tensor:
        """A flat scratch vector of ``R^d`` (this process's part of it), or a ``rows × d`` matrix of them,
        kept by the optimizer from step to step (not in ``state_dict``). A fresh ``R^d`` tensor per step
        costs page faults on the CPU that can exceed the arithmetic filling it. Its values do not outlive
        the step: the next step overwrites them.

        Args:
            name: the key, shared by the rule, projector and manifold: prefix it with the component's name.
            rows: the number of rows of a matrix; ``None``: one vector.
            dtype: its dtype (``None``: the parameters').
            columns: the length of each row (``None``: ``d``, this process's part of it).
        """
        columns = self.flat.numel if columns is None else columns
        shape = (columns,) if rows is None else (rows, columns)
        like = self.flat.tensors[0]
        return self._resources.flat_buffer(f"flat:{name}", shape, like if dtype is None else like.new_empty((), dtype=dtype))

    def start_grad_out(self) -> torch.Tensor:
        """Where a projecting rule gathers ``∇f(θ_t)``: the projector's own storage when it offers some
        (:meth:`Projector.start_grad_out`), else a scratch vector."""
        out = None if self.projector is None else self.projector.start_grad_out(self)
        return self.scratch("start.grad") if out is None else out

    @property
    def recording(self) -> bool:
        """Whether the step keeps copies of its projection (``record_projection``): a rule then keeps
        ``c_t`` intact for the record."""
        return self.hp("record_projection")

    @property
    def state(self) -> dict[str, Any]:
        """The rule's optimizer-wide state (kept in the first parameter's state, so ``state_dict`` saves it)."""
        return self._state[self.flat.params[0]]

    # -- closure calls ----------------------------------------------------------------------------
    @property
    def has_closure(self) -> bool:
        """Whether ``step`` was given a closure."""
        return self._closure is not None

    @property
    def accepts_fresh_batch(self) -> bool:
        """Whether the closure can draw a new mini-batch (``closure(fresh_batch=True)``)."""
        return accepts_fresh_batch(self._closure)

    def evaluate(
        self,
        theta: torch.Tensor | None = None,
        *,
        offset: torch.Tensor | None = None,
        extra: bool = True,
        fresh_batch: bool = False,
        grad_out: torch.Tensor | None = None,
        theta_out: torch.Tensor | None = None,
    ) -> GraphPoint:
        """Run the closure at ``θ`` and return ``p = (θ, f(θ), ∇f(θ))``; one pass, counted in ``grad_evals``.

        Args:
            theta: a flat ``θ`` to write into the parameters; ``None``: the current parameters.
            offset: evaluate at ``θ + offset``, written into the parameters without forming it; the
                returned point's ``theta`` is then ``None``.
            extra: a pass beyond the first of the step: BatchNorm running statistics are left alone
                unless ``freeze_bn_stats`` is off. ``False`` only for the step's first pass.
            fresh_batch: ask the closure to draw the next mini-batch first (see :attr:`accepts_fresh_batch`).
            grad_out: a flat tensor to gather ``∇f(θ)`` into (saves an allocation).
            theta_out: a flat tensor to gather the current parameters into, when ``theta`` is ``None``.
        """
        if offset is not None:
            self.flat.write_sum(theta, offset)
            theta = None
        elif theta is not None:
            self.flat.write(theta)
        else:
            theta = self.flat.gather(theta_out)
            self._start = theta if self._start is None else self._start
        loss = self.loss(extra=extra, fresh_batch=fresh_batch)
        loss = torch.as_tensor(loss).detach().to(device=self.flat.device, dtype=self.flat.dtype)
        return GraphPoint(theta=theta, loss=loss, grad=self.flat.gather_grad(grad_out))

    def loss(self, theta: torch.Tensor | None = None, *, extra: bool = True, fresh_batch: bool = False) -> Any:
        """Run the closure at ``θ``, leaving ``∇f`` in ``p.grad``; one pass, counted in ``grad_evals``.

        Args:
            theta: a flat ``θ`` to write into the parameters; ``None``: the current parameters.
            extra: as in :meth:`evaluate`.
            fresh_batch: as in :meth:`evaluate`.

        Returns:
            What the closure returns (averaged over the processes when :attr:`world_size` > 1).

        Raises:
            RuntimeError: the step has no closure.
            HostGradientError: the closure of a multi-pass rule's first pass added to gradients the host left.
            ClosureError: the closure returned anything but a scalar loss, or left no gradient.
        """
        if theta is not None:
            self.flat.write(theta)
        if self._closure is None:
            raise RuntimeError(
                f"rule {self.rule_name!r} needs a closure: call opt.step(closure) where closure() "
                "zeroes grads, runs forward and backward, and returns the loss"
            )
        # A multi-pass rule's first pass must start from zeroed gradients (a single-pass rule may
        # accumulate: its one pass is the step's gradient, as with any torch optimizer).
        held = [p.grad for p in self.flat.params] if self.grad_evals == 0 and self._resources.rule.requires_closure else []
        zeroed = self._resources.zero_grad_calls
        if self.grad_evals > 0:
            self._clear_grads()
        loss = self._call_closure(extra, fresh_batch)
        if any(old is not None and p.grad is old for p, old in zip(self.flat.params, held)) and self._resources.zero_grad_calls == zeroed:
            raise HostGradientError(
                "the closure added its gradient to gradients already in p.grad: gradient accumulation by the host "
                "(Lightning's accumulate_grad_batches, accelerator.accumulate()) is not supported by multi-pass rules; "
                "accumulate inside the closure: opt.step(nonlocal_opt.integrations.accumulation.MicroBatchClosure(model, "
                "micro_batches, loss_sum)), which zeroes the gradients and runs every micro-batch in each pass (under "
                "Lightning: manual optimization, automatic_optimization = False; docs/integrations.md, Gradient accumulation)"
            )
        self._check_pass(loss)
        if self._resources.scaled_passes is not None:
            self._resources.scaled_passes.after_pass(self.flat)
        self.grad_evals += 1
        self.stats["grad_evals"] = self.grad_evals
        if self.world_size > 1:
            loss = torch.as_tensor(loss, device=self.flat.device).detach().clone()
            torch.distributed.all_reduce(loss)  # SUM: gloo has no AVG
            loss /= self.world_size
        return loss

    def _clear_grads(self) -> None:
        """Drop the previous pass's gradients (``zero_grad(set_to_none=True)``): the rule has gathered them,
        and the next pass must not add to them, whether or not its closure zeroes."""
        for p in self.flat.params:
            p.grad = None

    def _call_closure(self, extra: bool, fresh_batch: bool) -> Any:
        self._resources.closure_pass = self.grad_evals
        try:
            with torch.enable_grad(), self._batchnorm_paused(extra):
                return self._closure(fresh_batch=True) if fresh_batch else self._closure()
        finally:
            self._resources.closure_pass = None

    def _check_pass(self, loss: Any) -> None:
        """Refuse a closure that returned anything but the loss as a scalar, or left no gradient."""
        if not is_scalar_loss(loss):
            raise ClosureError(
                f"the closure of rule {self.rule_name!r} returned {describe(loss)}; it must return the loss as a "
                "scalar tensor: def closure(): opt.zero_grad(); loss = ...; loss.backward(); return loss"
            )
        if all(p.grad is None for p in self.flat.params):
            raise ClosureError(
                f"the closure of rule {self.rule_name!r} left no gradient in p.grad: it must call loss.backward() "
                "on the loss it returns (after opt.zero_grad())"
            )

    def _batchnorm_paused(self, extra: bool) -> contextlib.AbstractContextManager:
        if not (extra and self.hp("freeze_bn_stats")):
            return contextlib.nullcontext()
        if self._batchnorm is None:
            self._batchnorm = BatchNormFreezer(self._resources.batchnorm_layers(self.flat.params))
        return self._batchnorm.paused()

    # -- projection -------------------------------------------------------------------------------
    def project(self, target: Centre, start: GraphPoint, centre: Centre | None = None) -> ProjectionResult:
        """Run the composed projector from ``start`` towards ``target`` and record its stats
        (``proj_iters``, ``proj_residual``, ``offset_error``; a copy in :attr:`projection` when :attr:`recording`).

        Args:
            target: the proposed centre ``c̃``.
            start: the contact point ``p_t`` (evaluated).
            centre: the current centre ``c_t`` the rule moved from (``c̃ = c_t + δ̃``); projectors that
                move the centre rather than project it read it as :attr:`centre`.

        Raises:
            RuntimeError: the optimizer has no projector, or the projector returned a centre while
                declaring ``uses_centre = False``.
        """
        if self.projector is None:
            raise RuntimeError(f"rule {self.rule_name!r} projects, but was composed without a projector")
        self.centre = centre
        result = self.projector.project(target, start, self)
        if result.centre is not None and not self.projector.uses_centre:
            raise RuntimeError(
                f"projector {self.projector.name!r} returned a centre to carry but declares uses_centre = False, "
                "which lets the rule overwrite c_t; declare uses_centre = True"
            )
        if self.recording:
            self.projection = ProjectionRecord(centre=copied(centre), target=copied(target), result=copied(result))
        self.stats["proj_iters"] = result.iterations
        self.stats["proj_residual"] = result.residual
        carried = result.centre
        error = torch.zeros_like(start.loss) if carried is None else self.manifold.offset_error(carried, result.point, self)
        self.stats["offset_error"] = error
        return result

    # -- the base optimizer's step ----------------------------------------------------------------
    def apply(
        self,
        direction: torch.Tensor | None = None,
        *,
        theta: torch.Tensor | list[torch.Tensor] | None = None,
        finite: torch.Tensor | bool = True,
        spare: Sequence[torch.Tensor | list[torch.Tensor]] = (),
    ) -> torch.Tensor:
        """Let the base optimizer step from ``θ`` with ``direction`` as the gradient, clipped to
        ``max_grad_norm``. The base step is skipped — parameters and base state unchanged,
        ``stats['nonfinite'] = 1`` — unless ``finite`` holds and every gradient and every parameter the
        base writes is finite.

        Args:
            direction: a flat tensor written into ``p.grad``; ``None`` keeps the gradients the closure left.
            theta: the parameters to step from (the step's start, after passes at other points), flat or
                one tensor per parameter; ``None`` keeps the current ones.
            finite: the rule's verdict on its passes (:meth:`finite`); under a ``GradScaler``, and no pass overflowed.
            spare: vectors the step no longer needs once ``θ`` and ``direction`` are written (flat, or one
                tensor per parameter; distinct storage), which the guarded step may fill with its copies of
                the parameters and base state instead of allocating them. A vector whose storage
                is one of the gradients being stepped (a closure that zeroed gradients in place reused it) is
                not used.

        Returns:
            "Step taken" as a 0-d bool tensor.
        """
        if theta is not None:
            self.flat.write(theta)
        if direction is not None:
            self.flat.write_grad(direction)
        self._applied = True
        if self._resources.scaled_passes is not None:  # an fp16 overflow in any pass skips the step
            finite = ~self._resources.scaled_passes.overflowed() & finite
        storage = [self.flat.views(v) if isinstance(v, torch.Tensor) else list(v) for v in spare]
        if storage:  # the skip's copies go there: never over a gradient
            stepped = {g.data_ptr() for g in self.flat.grads() if g is not None}
            storage = [tensors for tensors in storage if not any(t.data_ptr() in stepped for t in tensors)]
        return self._resources.base_step(self._param_groups, self.flat, finite, self.stats, self.host_reads, storage)

