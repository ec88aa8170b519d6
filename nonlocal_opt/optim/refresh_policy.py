"""The refresh policy of a rule whose update is the gradient ``g`` plus a non-local correction: the full step
runs only at refreshes; a step between them costs one pass, and the base gets ``g`` (periodic SAM) or
``g + w (‖g‖/‖g_v‖) g_v`` with the part ``g_v`` of the last refresh's direction ``d`` vertical to its ``g``
(LookSAM). AE-SAM's policy refreshes when ``‖g‖²`` rises above its running mean (docs/optimizers.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from nonlocal_opt.optim.hyperparameters import Hyperparameter, non_negative, optional, positive_int
from nonlocal_opt.optim.points import GraphPoint

Tensors = list[torch.Tensor]


def choice(*options: str):
    """A validator accepting one of ``options``.

    Args:
        *options: the allowed strings.
    """

    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(map(repr, options))}"

    return check


def below_one(value: Any) -> str | None:
    """Validator: a number in ``[0, 1)``.

    Args:
        value: the value to check.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return "must be a number in [0, 1)"
    return None


def number_pair(value: Any) -> str | None:
    """Validator: a pair ``(first, last)`` of finite numbers.

    Args:
        value: the value to check.
    """
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    if not pair or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        return "must be a pair (first, last) of finite numbers"
    return None


REFRESH_HYPERPARAMETERS = {
    "refresh_every": Hyperparameter(1, "k", "the full non-local step runs when t mod k = 0 (1: every step)", positive_int),
    "reuse": Hyperparameter(
        "vertical",
        "—",
        "a step between refreshes: 'vertical' (LookSAM, g + w (‖g‖/‖g_v‖) g_v) or 'none' (g; None too, as --set reuse=none reads)",
        optional(choice("vertical", "none")),
    ),
    "reuse_weight": Hyperparameter(0.7, "w", "weight of the kept vertical part g_v in a 'vertical' reuse step", non_negative),
    "refresh": Hyperparameter(
        "every", "—", "'every': by refresh_every; 'gradient-norm' (AE-SAM): when ‖g‖² ≥ μ + c σ", choice("every", "gradient-norm")
    ),
    "refresh_ema": Hyperparameter(0.9, "δ", "EMA factor of μ and σ², the mean and variance of ‖g‖² ('gradient-norm')", below_one),
    "refresh_c": Hyperparameter((-1.0, 1.0), "c", "(first, last) threshold factor c of μ + c σ ('gradient-norm')", number_pair),
    "refresh_horizon": Hyperparameter(
        None, "H", "steps over which c moves linearly from first to last (None: c stays at first)", optional(positive_int)
    ),
}
"""The policy's hyperparameters; a rule that follows it declares them next to its own."""

_NORM_ONLY = ("refresh_ema", "refresh_c", "refresh_horizon")


def check_refresh_group(group: Mapping[str, Any]) -> None:
    """Refuse combinations of the policy's hyperparameters that cannot be meant.

    Args:
        group: one parameter group, defaults filled in; a list ``refresh_c`` becomes a tuple.

    Raises:
        ValueError: ``gradient-norm`` with ``refresh_every`` > 1, AE-SAM's settings without
            ``refresh='gradient-norm'``, or ``reuse_weight`` with ``reuse='none'``.
    """
    specs = REFRESH_HYPERPARAMETERS
    if group["refresh"] == "gradient-norm" and group["refresh_every"] != 1:
        raise ValueError(
            f"refresh='gradient-norm' decides every step from ‖g‖², and refresh_every={group['refresh_every']!r} would "
            "decide by the step count too: set one of them (refresh_every=1 with 'gradient-norm')"
        )
    if isinstance(group["refresh_c"], list):  # one value per group must be hashable (ctx.hp)
        group["refresh_c"] = tuple(group["refresh_c"])
    if group["refresh"] == "every":
        for key in _NORM_ONLY:
            if group[key] != specs[key].default:
                raise ValueError(f"{key}={group[key]!r} sets AE-SAM's gradient-norm policy: add refresh='gradient-norm'")
    if group["reuse"] in ("none", None) and group["reuse_weight"] != specs["reuse_weight"].default:
        raise ValueError(f"reuse_weight={group['reuse_weight']!r} weights g_v in 'vertical' reuse steps: set reuse='vertical'")


def dot(x: Tensors, y: Tensors, ctx) -> torch.Tensor:
    """``⟨x, y⟩`` over all tensors together (``ctx.sum``, so over every shard), as a 0-d tensor.

    Args:
        x: one tensor per parameter.
        y: tensors shaped like ``x``.
        ctx: the step's context.
    """
    return ctx.sum(torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(x, y)]).sum())


class RefreshPolicy:
    """One step's decision: a refresh (the rule's full step) or a reuse step (one pass), and the state the
    policy keeps in ``ctx.state``: ``t`` (steps so far, refused ones included), ``g_v`` per parameter
    (``'vertical'``), ``μ`` and ``σ²`` (``'gradient-norm'``). ``g_v``, ``μ`` and ``σ²`` move only when the
    base step is taken. With the defaults (``refresh_every=1``, ``refresh='every'``) every step refreshes
    and nothing is kept.

    The gradient-norm decision chooses which passes run, so on the device path it is read on the host: one
    read per step, the only one.

    Args:
        ctx: the step's context.
        declared: whether the rule declares the policy's hyperparameters (``False``: every step refreshes).

    Attributes:
        active: whether any step may be a reuse step.
        refreshing: whether this step runs the rule's full step.
    """

    def __init__(self, ctx, declared: bool = True):
        self.ctx = ctx
        self.every = ctx.hp("refresh_every") if declared else 1
        self.by_norm = declared and ctx.hp("refresh") == "gradient-norm"
        self.active = self.every > 1 or self.by_norm
        self.vertical = self.active and ctx.hp("reuse") == "vertical"
        self.t = ctx.state.get("refresh_t", 0) if self.active else 0
        self._loss: Any = None
        self._passed = False
        self._moments: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kept: Tensors | None = None
        self.refreshing = self._norm_spiked() if self.by_norm else self.t % self.every == 0

    def _norm_spiked(self) -> bool:
        """``s = ‖g‖²``, ``μ ← δμ + (1 − δ)s``, ``σ² ← δσ² + (1 − δ)(s − μ)²``; whether ``s ≥ μ + c σ``."""
        ctx = self.ctx
        self.first_pass()
        grads = [g for g in ctx.grads() if g is not None]
        s = ctx.norm(grads).square()
        zero = torch.zeros_like(s)
        mu, var = ctx.state.get("refresh_mu", zero), ctx.state.get("refresh_var", zero)
        delta = ctx.hp("refresh_ema")
        mu = delta * mu + (1 - delta) * s
        var = delta * var + (1 - delta) * (s - mu).square()
        self._moments = (mu, var)
        first, last = ctx.hp("refresh_c")
        horizon = ctx.hp("refresh_horizon")
        c = first if horizon is None else first + (last - first) * min(self.t / horizon, 1.0)
        return bool(s >= mu + c * var.sqrt())  # chooses the passes: a host read on either path

    # -- the pass at w ----------------------------------------------------------------------------
    def first_pass(self) -> Any:
        """The step's first pass at ``w`` (``ctx.loss(extra=False)``), run once: the policy may have run it.

        Returns:
            What the closure returned.
        """
        if not self._passed:
            self._loss, self._passed = self.ctx.loss(extra=False), True
        return self._loss

    def start_point(self, theta_out: torch.Tensor, grad_out: torch.Tensor) -> GraphPoint:
        """``p_t = (θ_t, f(θ_t), g)`` gathered flat, as ``ctx.evaluate(extra=False)``, with the first pass run once.

        Args:
            theta_out: the flat tensor to gather ``θ_t`` into.
            grad_out: the flat tensor to gather ``g`` into.
        """
        ctx = self.ctx
        if not self._passed:
            self._passed = True
            point = ctx.evaluate(extra=False, theta_out=theta_out, grad_out=grad_out)
            self._loss = point.loss
            return point
        theta = ctx.flat.gather(theta_out)
        ctx.keep_start(theta)
        loss = torch.as_tensor(self._loss).detach().to(device=ctx.flat.device, dtype=ctx.flat.dtype)
        return GraphPoint(theta=theta, loss=loss, grad=ctx.flat.gather_grad(grad_out))

    def keep_gradient(self, g: torch.Tensor | list[torch.Tensor | None]) -> None:
        """At a ``'vertical'`` refresh, copy ``g`` (flat, or per parameter with ``None`` for none) aside for ``g_v``.

        Args:
            g: the gradient at ``w``.
        """
        if not (self.vertical and self.refreshing):
            return
        kept = self.ctx.buffers("refresh.g")
        pieces = self.ctx.flat.views(g) if isinstance(g, torch.Tensor) else g
        for out, piece in zip(kept, pieces):
            out.copy_(piece) if piece is not None else out.zero_()
        self._kept = kept

    # -- the base step ----------------------------------------------------------------------------
    def apply(self, direction: torch.Tensor | None = None, *, theta=None, finite=True, spare=()) -> torch.Tensor:
        """A refresh's ``ctx.apply``; at a ``'vertical'`` one, ``g_v = d − (⟨d, g⟩/‖g‖²) g`` is formed first from
        ``d`` (``direction``, or what is in ``p.grad``) over the kept ``g``, and kept if the step is taken.

        Args:
            direction: as in ``ctx.apply``.
            theta: as in ``ctx.apply``.
            finite: as in ``ctx.apply``.
            spare: as in ``ctx.apply``.

        Returns:
            "Step taken", as ``ctx.apply``.
        """
        ctx = self.ctx
        vertical = self._kept
        if vertical is not None:
            d = ctx.flat.views(direction) if direction is not None else ctx.grads()
            index = [i for i, piece in enumerate(d) if piece is not None]
            d, g = [d[i] for i in index], [vertical[i] for i in index]
            squared = dot(g, g, ctx)
            projection = torch.where(squared > 0, dot(d, g, ctx) / squared, torch.zeros_like(squared))
            torch._foreach_mul_(g, -projection)
            torch._foreach_add_(g, d)  # g_v = d − (⟨d, g⟩/‖g‖²) g, over the kept g
            for i in set(range(len(vertical))) - set(index):
                vertical[i].zero_()
        taken = ctx.apply(direction, theta=theta, finite=finite, spare=spare)
        self._finish(taken, vertical)
        return taken

    def reuse_step(self) -> torch.Tensor:
        """A step between refreshes: one pass at ``w``; the base gets ``g`` (``'none'``) or
        ``g + w (‖g‖/‖g_v‖) g_v`` (``'vertical'``; ``g`` while ``g_v = 0``).

        Returns:
            The loss at ``w``.
        """
        ctx = self.ctx
        loss = torch.as_tensor(self.first_pass()).detach()
        spare = []
        kept = ctx.state.get("refresh_g_v")
        if self.vertical and kept is not None:
            grads = ctx.grads()
            index = [i for i, g in enumerate(grads) if g is not None]
            g, g_v = [grads[i] for i in index], [kept[i] for i in index]
            scaled = [ctx.buffers("refresh.g")[i] for i in index]  # the refreshes' buffer, free between them
            norm_v = ctx.norm(g_v)
            factor = torch.where(norm_v > 0, ctx.hp("reuse_weight") * ctx.norm(g) / norm_v, torch.zeros_like(norm_v))
            torch._foreach_copy_(scaled, g_v)
            torch._foreach_mul_(scaled, factor)  # a 0-d tensor factor: no host read
            torch._foreach_add_(g, scaled)
            spare = [scaled]
        taken = ctx.apply(finite=ctx.finite(loss), spare=spare)
        self._finish(taken, None)
        return loss

    def _finish(self, taken: torch.Tensor, vertical: Tensors | None) -> None:
        ctx = self.ctx
        ctx.stats["refreshed"] = float(self.refreshing)
        if not self.active:
            return
        ctx.state["refresh_t"] = self.t + 1
        kept = [] if self._moments is None else [("refresh_mu", self._moments[0]), ("refresh_var", self._moments[1])]
        for key, new in kept:
            old = ctx.state.get(key, torch.zeros_like(new))
            ctx.state[key] = torch.where(taken, new, old)
        if vertical is None:
            return
        if "refresh_g_v" not in ctx.state:
            ctx.state["refresh_g_v"] = [torch.zeros_like(v) for v in vertical]
        for old, new in zip(ctx.state["refresh_g_v"], vertical):
            torch.where(taken, new, old, out=old)
