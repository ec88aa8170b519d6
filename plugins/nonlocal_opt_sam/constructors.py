"""Constructors that read like the papers for ``sam`` under the refresh policy: ``LookSAM`` (Liu et al.,
CVPR 2022) and ``AESAM`` (Jiang et al., ICLR 2023), reachable as ``nonlocal_opt.LookSAM`` / ``AESAM``."""

from __future__ import annotations

from typing import Any

from nonlocal_opt import ComposedOptimizer
from nonlocal_opt.plugins.compose import resolve


class LookSAM(ComposedOptimizer):
    """LookSAM: ``compose(params, "sam", base=base, rho=rho, refresh_every=k, reuse="vertical",
    reuse_weight=alpha, ...)``: SAM's two passes every ``k`` steps, one pass between them with
    ``g + α (‖g‖/‖g_v‖) g_v``.

    Args:
        params: The parameters or parameter groups.
        base: The base optimizer (``None``: ``"sgd"``).
        rho: ``ρ``.
        k: Steps from one refresh to the next (``refresh_every``).
        alpha: ``α``, the weight of ``g_v`` (``reuse_weight``).
        **hyperparameters: The base's and the rule's others.
    """

    def __init__(self, params: Any, *, base: Any = None, rho: float = 0.05, k: int = 5, alpha: float = 0.7, **hyperparameters: Any):
        settings = dict(rho=rho, refresh_every=k, reuse="vertical", reuse_weight=alpha)
        super().__init__(params, *resolve("sam", base, None, None), **settings, **hyperparameters)


class AESAM(ComposedOptimizer):
    """AE-SAM: ``compose(params, "sam", base=base, rho=rho, refresh="gradient-norm", reuse="none", ...)``: SAM
    when ``‖g‖² ≥ μ + c σ``, else the base on ``g`` (the paper's SGD step); ``refresh_ema`` ``δ``,
    ``refresh_c`` ``(λ₁, λ₂)`` and ``refresh_horizon`` as in :mod:`nonlocal_opt.optim.refresh_policy`.

    Args:
        params: The parameters or parameter groups.
        base: The base optimizer (``None``: ``"sgd"``).
        rho: ``ρ``.
        reuse: The step between refreshes (``"none"``, the paper's; or ``"vertical"``).
        **hyperparameters: The base's and the rule's others.
    """

    def __init__(self, params: Any, *, base: Any = None, rho: float = 0.05, reuse: str = "none", **hyperparameters: Any):
        settings = dict(rho=rho, refresh="gradient-norm", reuse=reuse)
        super().__init__(params, *resolve("sam", base, None, None), **settings, **hyperparameters)


LookSAM.__module__ = AESAM.__module__ = "nonlocal_opt"
