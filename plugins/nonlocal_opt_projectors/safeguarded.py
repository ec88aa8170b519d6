"""The loop shared by the safeguarded footpoint projectors (Gauss–Newton, Newton-CG, L-BFGS).

Each outer iteration proposes a step ``Δ`` from the current point, evaluates the trial point
``θ + Δ`` (one pass) and keeps it only if ``φ`` decreases (up to rounding, see :func:`acceptable`),
so ``φ`` never increases. An accepted trial's pass already gives ``f`` and ``∇f`` at the new point:
no pass is spent twice. The Levenberg–Marquardt damping ``μ`` follows the gain ratio
(:func:`gain_ratio_damping`).

An iterate is kept as ``g = ∇f(θ)``, ``s = f(θ) − ỹ``, ``∇φ = a + s g`` and the dots ``‖∇φ‖², gᵀ∇φ, gᵀg``
(:class:`Iterate`), where ``a = θ − θ̃``. ``a`` and ``θ`` are not stored: a trial's offset ``a`` is formed in
the row that then becomes its ``∇φ`` (in place), the parameters are written as ``θ̃ + a`` directly, and
``a = ∇φ − s g`` where a formula needs it. ``φ = ½(aᵀa + s²)`` with ``aᵀa = ‖∇φ − s g‖²`` expanded, and
the Gauss–Newton step, its predicted decrease and the safeguard are scalar formulas in the dots. An
iteration costs a few sweeps over ``R^d`` (the trial offset, ``θ̃ + a`` written into the parameters,
``∇f`` gathered, ``∇φ`` in place, one Gram product). On the CPU the scalars are Python floats and
accept/reject is a Python branch; on other devices they are 0-d tensors and the choice is
``torch.where`` (no host synchronisation). Live vectors: the current iterate's and the trial's
``(∇φ, g)`` rows, nothing else.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol

import torch

from nonlocal_opt import Centre, GraphPoint, Hyperparameter, ProjectionResult, Projector
from nonlocal_opt.optim.hyperparameters import optional, positive, positive_int
from nonlocal_opt_projectors.footpoint_math import tolerance
from nonlocal_opt_projectors.scalars import Scalar, at_least, axpy_, read, sqrt, where

STOPPING_HYPERPARAMETERS = {
    "max_iters": Hyperparameter(20, "K", "outer iterations; each evaluates one trial point (one pass)", positive_int),
    "tol": Hyperparameter(None, "ε", "absolute tolerance on ‖∇φ‖ (None: off)", optional(positive)),
    "rtol": Hyperparameter(1e-6, "ε_rel", "stop when ‖∇φ‖ ≤ rtol·‖θ̃ − θ_t‖ (None: off)", optional(positive)),
}
MIN_DAMPING = 1.0  # μ after the first rejection when μ = 0 (the undamped Gauss–Newton step)


def choose(flag: torch.Tensor, new: tuple, old: tuple, on_host: bool) -> tuple:
    """``new`` where ``flag`` else ``old``, element by element of the tuples.

    On the CPU reading ``flag`` costs nothing, so it is a Python branch (no O(d) copy); on other
    devices ``torch.where`` keeps the decision on the device (no host synchronisation). Both give
    the same values, including for non-finite ``new``.

    Args:
        flag: A 0-d bool tensor.
        new: Tensors (or scalars) taken where ``flag`` holds.
        old: Their counterparts taken otherwise.
        on_host: Whether ``flag`` may be read on the host (``ctx.host_reads``).

    Returns:
        A tuple like ``new``.
    """
    if on_host:
        return new if bool(flag) else old
    return tuple(torch.where(flag, n, o) for n, o in zip(new, old))


class Iterate:
    """A point of the loop: ``f(θ)``, ``g = ∇f(θ)``, the gap ``s = f(θ) − ỹ``, ``∇φ = a + s g`` and the dots
    ``‖∇φ‖², gᵀ∇φ, gᵀg`` (scalars, see :mod:`scalars`); ``θ = θ̃ + ∇φ − s g`` is formed only on request.

    Args:
        target: The proposed centre ``c̃`` of the projection.
        loss: ``f(θ)``, a 0-d tensor.
        g: ``∇f(θ)``, a flat tensor (a row of ``rows``).
        gap: ``s = f(θ) − ỹ``, a scalar.
        grad_phi: ``∇φ``, a flat tensor (a row of ``rows``).
        vv: ``‖∇φ‖²``.
        gv: ``gᵀ∇φ``.
        gg: ``gᵀg``.
        rows: The :class:`TrialRows` its vectors live in.
    """

    __slots__ = ("g", "gap", "gg", "grad_phi", "gv", "loss", "rows", "target", "vv")

    def __init__(self, target, loss, g, gap, grad_phi, vv, gv, gg, rows):
        self.target, self.loss, self.g, self.gap, self.grad_phi, self.vv, self.gv, self.gg = target, loss, g, gap, grad_phi, vv, gv, gg
        self.rows = rows  # the TrialRows its vectors live in

    @classmethod
    def measure(cls, point: GraphPoint, target: Centre, ctx, on_host: bool, rows: TrialRows) -> Iterate:
        """The iterate at ``point`` (its ``θ`` is not read), with ``g`` in ``rows.grad`` and ``a = θ − θ̃`` already
        formed in ``rows.grad_phi``: the manifold's ``∇φ`` written over ``a`` (one sweep), the dots ``‖∇φ‖²,
        gᵀ∇φ, gᵀg`` as one 2×2 Gram product of the rows (one read of each), one host read on the CPU.

        Args:
            point: The evaluated point, ``point.grad`` in ``rows.grad``.
            target: The proposed centre ``c̃``.
            ctx: The step's context (``ctx.manifold.phi_grad``, sums over shards).
            on_host: Whether scalars are read to the host.
            rows: The iterate's storage, ``a`` in ``rows.grad_phi``.

        Returns:
            The iterate.
        """
        gap = point.loss - target.height
        grad_phi = ctx.manifold.phi_grad(point, target, ctx, out=rows.grad_phi, offset=rows.grad_phi)
        dots = (rows.pair @ rows.pair.T).reshape(-1)  # [‖∇φ‖², ∇φᵀg, gᵀ∇φ, gᵀg]
        vv, gv, _, gg, gap = read(torch.cat([ctx.sum(dots), gap.reshape(1)]), on_host)
        return cls(target, point.loss, point.grad, gap, grad_phi, vv, gv, gg, rows)

    def offset_into(self, out: torch.Tensor) -> torch.Tensor:
        """``a = θ − θ̃ = ∇φ − s g``, written into ``out``.

        Args:
            out: A flat tensor; it may be ``∇φ``'s own row (the iterate is then spent).

        Returns:
            ``out``.
        """
        if out is not self.grad_phi:
            out.copy_(self.grad_phi)
        return axpy_(out, -self.gap, self.g)

    def offset_after(self, step: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The offset of the trial ``θ + Δ``: ``a + Δ = ∇φ − s g + Δ``, written into ``out``.

        Args:
            step: The step ``Δ``.
            out: A flat tensor distinct from the iterate's vectors.

        Returns:
            ``out``.
        """
        torch.add(self.grad_phi, step, out=out)
        return axpy_(out, -self.gap, self.g)

    def point(self, out: torch.Tensor | None = None) -> GraphPoint:
        """``(θ, f(θ), g)`` with ``θ = θ̃ + a`` formed.

        Args:
            out: Where to form ``θ`` (``None``: a new tensor); ``∇φ``'s own row spends the iterate.

        Returns:
            The point.
        """
        theta = self.offset_into(torch.empty_like(self.g) if out is None else out).add_(self.target.theta)
        return GraphPoint(theta=theta, loss=self.loss, grad=self.g)

    @property
    def offset_sq(self) -> Scalar:
        """``aᵀa = ‖∇φ − s g‖² = ‖∇φ‖² − 2s gᵀ∇φ + s² gᵀg`` (no cancellation: near the footpoint ``aᵀa ≈ s² gᵀg``)."""
        gap = self.gap
        return self.vv - gap * (2 * self.gv - gap * self.gg)

    @property
    def value(self) -> Scalar:
        """``φ = ½(aᵀa + s²)``."""
        return 0.5 * (self.offset_sq + self.gap * self.gap)

    @property
    def residual(self) -> Scalar:
        """``‖∇φ‖``."""
        return sqrt(self.vv)

    def select(self, flag: torch.Tensor, other: Iterate) -> Iterate:
        """``self`` where the 0-d tensor ``flag`` is true, else ``other``, by ``torch.where`` (device path); the
        vectors are chosen in place in ``other``'s rows (no new ``R^d`` tensor).

        Args:
            flag: A 0-d bool tensor.
            other: The iterate chosen where ``flag`` is false; its rows are overwritten.

        Returns:
            The chosen iterate, in ``other``'s rows.
        """
        scalars = ("loss", "gap", "vv", "gv", "gg")
        chosen = dict(zip(scalars, choose(flag, [getattr(self, f) for f in scalars], [getattr(other, f) for f in scalars], on_host=False)))
        g = torch.where(flag, self.g, other.g, out=other.g)
        grad_phi = torch.where(flag, self.grad_phi, other.grad_phi, out=other.grad_phi)
        return Iterate(self.target, chosen["loss"], g, chosen["gap"], grad_phi, chosen["vv"], chosen["gv"], chosen["gg"], other.rows)


class TrialRows:
    """Storage ``(a → ∇φ, g)`` of one iterate, a ``2 × d`` matrix, so the loop allocates nothing per
    iteration: a new ``R^d`` tensor on the CPU can cost as much as the arithmetic that fills it. The first
    row holds the trial's offset ``a`` until :meth:`Iterate.measure` turns it into ``∇φ``.

    Args:
        pair: A ``2 × d`` tensor: the ``a → ∇φ`` row, then the ``g`` row.
    """

    def __init__(self, pair: torch.Tensor):
        self.pair = pair
        self.grad_phi, self.grad = pair.unbind()


class RowPool:
    """The rows of two iterates, the current point's and the trial's: a rejected trial's rows, or the
    rows an accepted trial replaces (on the device path the selected iterate keeps the current rows),
    come back for the next trial.

    Args:
        free: The rows not held by an iterate.
    """

    def __init__(self, free: list[TrialRows]):
        self.free = free

    def take(self) -> TrialRows:
        """Rows for the next trial.

        Returns:
            Free rows.
        """
        return self.free.pop()

    def give(self, iterate: Iterate) -> None:
        """Take back the rows of an iterate no longer needed.

        Args:
            iterate: The rejected trial, or the iterate an accepted trial replaces.
        """
        self.free.append(iterate.rows)


def acceptable(trial: Iterate, current: Iterate) -> bool | torch.Tensor:
    """Take the trial iff ``φ`` decreases, or stays equal up to rounding while ``‖∇φ‖`` decreases
    (near the solution float ``φ`` cannot resolve the decrease). False for a non-finite trial.

    Args:
        trial: The evaluated trial.
        current: The iterate it was proposed from.

    Returns:
        A ``bool`` on the host path, a 0-d bool tensor otherwise.
    """
    value = current.value
    rounding = 8 * torch.finfo(current.g.dtype).eps * abs(value)
    flat = (trial.value <= value + rounding) & (trial.residual < current.residual)
    return (trial.value < value) | flat


def gain_ratio_damping(accept, actual, predicted, damping, factor) -> tuple[Scalar, Scalar]:
    """Nielsen's update of ``(μ, ν)`` from the gain ratio ``ϱ = (φ(θ) − φ(θ + Δ)) / (predicted decrease)``.

    Accepted: ``μ ← μ · max(1/3, 1 − (2ϱ − 1)³)``, ``ν ← 2``. Rejected: ``μ ← max(ν μ, 1)``, ``ν ← 2ν``
    (the floor 1 lets ``μ = 0``, the undamped first step, grow). A non-positive prediction counts as ``ϱ = 0``.

    Args:
        accept: Whether the trial was accepted.
        actual: ``φ(θ) − φ(θ + Δ)``.
        predicted: The decrease the step's model predicted.
        damping: ``μ``.
        factor: ``ν``.

    Returns:
        The new ``(μ, ν)``.
    """
    positive_prediction = predicted > 0
    ratio = where(positive_prediction, actual / where(positive_prediction, predicted, 1.0), 0.0)
    shrink = at_least(1 - (2 * ratio - 1) ** 3, 1 / 3)
    damping = where(accept, damping * shrink, at_least(factor * damping, MIN_DAMPING))
    factor = where(accept, 2.0, 2 * factor)
    return damping, factor


class TrialMemory(Protocol):
    """What a solver learns from its trials within one projection (L-BFGS: its ``(s, y)`` pairs)."""

    def observe(self, current: Iterate, trial: Iterate, ctx) -> None:
        """Record a trial, accepted or not, against the point it was proposed from.

        Args:
            current: The iterate the trial was proposed from.
            trial: The evaluated trial.
            ctx: The step's context.
        """


class SafeguardedFootpointProjector(Projector):
    """Monotone descent on ``φ`` from ``θ_t`` with an LM safeguard; a solver chooses the step ``Δ`` in
    :meth:`trial_offset`, its one override point (and :meth:`new_memory` when it learns from its trials).

    The first step uses ``start.grad`` (the gradient the rule already computed), so ``K`` iterations
    cost ``K`` passes plus any passes :meth:`trial_offset` spends (Hessian-vector products). On CPU the
    loop stops as soon as ``‖∇φ‖ ≤ max(tol, rtol·‖θ̃ − θ_t‖)``; on CUDA it always runs ``K`` iterations.

    The manifold is used through ``phi_grad`` only; the loop's scalar formulas (``φ``, the safeguard)
    assume its ``φ`` is ``½‖θ − θ̃‖² + ½(f(θ) − ỹ)²``, i.e. ``∇φ = a + s g``: ``manifolds`` names such manifolds.

    Hyperparameters: ``max_iters`` (``K``), ``tol`` (``ε``), ``rtol`` (``ε_rel``).
    """

    hyperparameters = STOPPING_HYPERPARAMETERS
    manifolds = ("offset",)  # the step formulas use φ's structure ∇φ = a + s g, G = I + g gᵀ
    shardable = True
    uses_centre = False
    safeguarded = True  # φ never increases: nonlocal_opt.testing also checks these on the Riemann function

    def new_memory(self, start: GraphPoint, ctx) -> TrialMemory | None:
        """Per-projection state that observes every trial; ``None`` (the default): the solver keeps none.

        Args:
            start: The contact point ``p_t`` the projection starts from.
            ctx: The step's context.

        Returns:
            A :class:`TrialMemory`, or ``None``.
        """
        return None

    @abstractmethod
    def trial_offset(self, current: Iterate, damping: Scalar, memory: TrialMemory | None, ctx, out: torch.Tensor) -> Scalar:
        """The solver's step ``Δ`` from ``current``: write the trial's offset ``a + Δ = θ + Δ − θ̃`` into ``out``.

        Args:
            current: The current iterate (``g``, ``s``, ``∇φ`` and their dots).
            damping: The Levenberg–Marquardt damping ``μ ≥ 0`` (0 for the first trial).
            memory: What :meth:`new_memory` returned for this projection.
            ctx: The step's context (``ctx.evaluate`` for Hessian-vector products, sums over shards).
            out: A flat tensor for ``a + Δ``, distinct from ``current``'s vectors.

        Returns:
            The decrease of ``φ`` the step's model predicts (for the gain ratio), a scalar.
        """

    def _rows(self, ctx) -> tuple[TrialRows, TrialRows]:
        """The two iterates' storage, kept by the optimizer from step to step."""
        rows = ctx.scratch(f"{self.name}.rows", rows=4)
        return TrialRows(rows[:2]), TrialRows(rows[2:])

    def start_grad_out(self, ctx):
        """The first iterate's ``g`` row: ``∇f(θ_t)`` is not copied, and its storage is reused once the loop moved.

        Args:
            ctx: The step's context.

        Returns:
            A row of the projector's scratch storage.
        """
        return self._rows(ctx)[0].grad

    def project(self, target, start, ctx):
        """Run the safeguarded loop from ``p_t`` towards the footpoint of ``c̃``.

        Args:
            target: The proposed centre ``c̃``.
            start: The contact point ``p_t``; ``start.grad`` is required.
            ctx: The step's context.

        Returns:
            The last accepted iterate (evaluated; ``p_t`` itself when no trial was accepted), no centre,
            the iterations run and ``‖∇φ‖`` there.

        Raises:
            ValueError: ``start.grad`` is missing.
        """
        if start.grad is None:
            raise ValueError(f"projector {self.name!r} needs start.grad, the gradient at θ_t")
        on_host = ctx.host_reads
        max_iters = ctx.hp("max_iters")
        memory = self.new_memory(start, ctx)
        first, second = self._rows(ctx)
        if start.grad.data_ptr() != first.grad.data_ptr():
            first.grad.copy_(start.grad)
        origin = GraphPoint(theta=start.theta, loss=start.loss, grad=first.grad)
        torch.sub(start.theta, target.theta, out=first.grad_phi)
        current = Iterate.measure(origin, target, ctx, on_host, first)
        threshold = tolerance(ctx.hp, current.offset_sq) if on_host else None  # ‖θ_t − θ̃‖² from the dots
        damping, factor = (0.0, 2.0) if on_host else (torch.zeros_like(start.loss), torch.full_like(start.loss, 2.0))
        pool = RowPool([second])
        moved = False
        for iteration in range(max_iters + 1):
            if iteration == max_iters or (threshold is not None and current.residual <= threshold):
                break
            rows = pool.take()
            predicted = self.trial_offset(current, damping, memory, ctx, out=rows.grad_phi)
            point = ctx.evaluate(target.theta, offset=rows.grad_phi, grad_out=rows.grad)
            trial = Iterate.measure(point, target, ctx, on_host, rows)
            if memory is not None:
                memory.observe(current, trial, ctx)
            accept = acceptable(trial, current)
            damping, factor = gain_ratio_damping(accept, current.value - trial.value, predicted, damping, factor)
            if on_host:
                pool.give(current if accept else trial)
                current = trial if accept else current
                moved = moved or bool(accept)
            else:
                pool.give(trial)
                current = trial.select(accept, current)
                moved = True
        residual = torch.as_tensor(current.residual, dtype=start.theta.dtype, device=start.theta.device)
        point = current.point(out=current.grad_phi) if moved else start  # θ over ∇φ, no longer needed
        return ProjectionResult(point=point, centre=None, iterations=iteration, residual=residual)
