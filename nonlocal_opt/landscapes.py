"""Analytic loss landscapes from the papers, and the brute-force offset function ``f_ρ``.

Each landscape is a tiny ``torch.nn.Module`` whose parameter ``theta`` is ``θ`` and whose forward
returns ``f(θ)``; ``value(points)`` evaluates ``f`` on a batch of points of shape ``(..., dim)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


class Landscape(nn.Module):
    """``f: R^dim → R`` with trainable ``θ`` (``self.theta``), started at ``theta0`` (finite; ``None``: 0).

    Args:
        theta0: ``θ_0``, a number or ``dim`` numbers.
    """

    dim: int = 1

    def __init__(self, theta0: Sequence[float] | float | torch.Tensor | None = None):
        super().__init__()
        start = torch.zeros(self.dim) if theta0 is None else torch.as_tensor(theta0, dtype=torch.get_default_dtype())
        if not bool(torch.isfinite(start).all()):
            raise ValueError(f"the starting point theta0 must be finite, got {theta0!r}")
        self.theta = nn.Parameter(start.reshape(self.dim).clone())

    def value(self, points: torch.Tensor) -> torch.Tensor:
        """``f`` at each point of ``points`` (shape ``(..., dim)``), result of shape ``(...)``."""
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        return self.value(self.theta)


class Riemann(Landscape):
    """Riemann's function, partial sum: ``f(θ) = Σ_{k=1}^{n} sin(k² θ)/k²`` (RBO paper, n = 100)."""

    def __init__(self, theta0=None, terms: int = 100):
        super().__init__(theta0)
        self.register_buffer("k", torch.arange(1, terms + 1, dtype=torch.get_default_dtype()), persistent=False)

    def value(self, points):
        k = self.k.to(points.dtype)
        return (torch.sin(points[..., :1] * k**2) / k**2).sum(-1)


class Sine(Landscape):
    """``f(θ) = Σ_i a sin(ω θ_i)`` (the preprint's Δ(ρ) experiment uses a = ω = 1 on [−3π, 3π])."""

    def __init__(self, theta0=None, dim: int = 1, amplitude: float = 1.0, frequency: float = 1.0):
        self.dim = dim
        super().__init__(theta0)
        self.amplitude, self.frequency = amplitude, frequency

    def value(self, points):
        return (self.amplitude * torch.sin(self.frequency * points)).sum(-1)


class Quadratic(Landscape):
    """``f(θ) = ½ (θ − θ*)ᵀ H (θ − θ*)`` with ``H = Q diag(λ) Qᵀ``, ``Q`` a seeded random rotation."""

    def __init__(self, theta0=None, eigenvalues: Sequence[float] = (1.0,), minimum=None, seed: int = 0):
        self.dim = len(eigenvalues)
        super().__init__(theta0)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen, dtype=torch.float64))
        hessian = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T
        self.register_buffer("hessian", hessian.to(torch.get_default_dtype()))
        centre = torch.zeros(self.dim) if minimum is None else torch.as_tensor(minimum).reshape(self.dim)
        self.register_buffer("minimum", centre.to(torch.get_default_dtype()))

    def value(self, points):
        delta = points - self.minimum.to(points.dtype)
        return 0.5 * (delta @ self.hessian.to(points.dtype) * delta).sum(-1)


class GaussianBumps(Landscape):
    """Preprint eq. 14: ``f(θ) = ‖θ‖² − Σ_{k=1}^{n} exp(−‖θ − θ_k‖²/σ²)``, ``θ_k ~ U([−b, b]²)``.

    The preprint does not state σ; we use σ = 0.3 by default (narrow wells, a clear global basin).
    """

    dim = 2

    def __init__(self, theta0=None, n_bumps: int = 1000, sigma: float = 0.3, box: float = 3.0, seed: int = 0):
        super().__init__(theta0)
        gen = torch.Generator().manual_seed(seed)
        centres = (torch.rand(n_bumps, 2, generator=gen, dtype=torch.float64) * 2 - 1) * box
        self.register_buffer("centres", centres.to(torch.get_default_dtype()))
        self.sigma = sigma

    def value(self, points):
        centres = self.centres.to(points.dtype)
        sq_dist = ((points.unsqueeze(-2) - centres) ** 2).sum(-1)
        return (points**2).sum(-1) - torch.exp(-sq_dist / self.sigma**2).sum(-1)


class SinusoidalMixture(Landscape):
    """No-wrong-turns eq. 9: ``SM(w) = ‖w‖² + c Σ_i sin(a_i w_i)²``, ``a_i ~ N(0, 1)``, c = 100."""

    def __init__(self, theta0=None, dim: int = 2, scale: float = 100.0, seed: int = 0):
        self.dim = dim
        super().__init__(theta0)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(dim, generator=gen, dtype=torch.float64).to(torch.get_default_dtype()))
        self.scale = scale

    def value(self, points):
        return (points**2).sum(-1) + self.scale * (torch.sin(self.a.to(points.dtype) * points) ** 2).sum(-1)


class AsymmetricLinearModel(Landscape):
    """No-wrong-turns eq. 9: ``ALM(w) = Σ_i max(0, wᵀx_i − y_i)²`` with ``x_i, y_i ~ N(0, 1)``."""

    def __init__(self, theta0=None, dim: int = 2, samples: int = 100, seed: int = 0):
        self.dim = dim
        super().__init__(theta0)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("x", torch.randn(samples, dim, generator=gen, dtype=torch.float64).to(torch.get_default_dtype()))
        self.register_buffer("y", torch.randn(samples, generator=gen, dtype=torch.float64).to(torch.get_default_dtype()))

    def value(self, points):
        residual = points @ self.x.T.to(points.dtype) - self.y.to(points.dtype)
        return (torch.clamp(residual, min=0) ** 2).sum(-1)


LANDSCAPES: dict[str, type[Landscape]] = {
    "riemann": Riemann,
    "sine": Sine,
    "quadratic": Quadratic,
    "gaussian-bumps": GaussianBumps,
    "sm": SinusoidalMixture,
    "alm": AsymmetricLinearModel,
}


def offset_function(
    f: Callable[[torch.Tensor], torch.Tensor],
    rho: float,
    grid: torch.Tensor,
    queries: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Brute-force ``f_ρ(θ) = sup_{‖s‖ ≤ ρ} [ f(θ + s) + sqrt(ρ² − ‖s‖²) ]`` (docs/math.md §6).

    The sup runs over the points ``θ + s`` of ``grid`` (shape ``(n,)`` in 1-D or ``(n, dim)``), so its
    accuracy is that of the grid. ``queries`` (default: the grid) are the ``θ`` to evaluate at.
    ``f`` maps ``(m, dim)`` points to ``(m,)`` values, e.g. ``Landscape.value``.
    """
    points = grid.reshape(grid.shape[0], -1)
    targets = points if queries is None else queries.reshape(queries.shape[0], -1)
    values = f(points)
    out = []
    for start in range(0, targets.shape[0], chunk):
        dist_sq = torch.cdist(targets[start : start + chunk], points).square()
        cap = torch.sqrt(torch.clamp(rho**2 - dist_sq, min=0.0))
        candidates = torch.where(dist_sq <= rho**2, values + cap, torch.full_like(cap, -math.inf))
        out.append(candidates.max(dim=1).values)
    return torch.cat(out)
