"""Independent math for the contract kits: a brute-force nearest point of Γ, and ``f``, ``∇f``, ``φ``,
``‖∇φ‖`` of an analytic landscape by autograd, written here without any plugin's code.

``φ(θ) = ½‖θ − θ_c‖² + ½(f(θ) − y_c)²`` is half the squared distance from ``(θ, f(θ))`` to a centre
``c = (θ_c, y_c)``; its minimiser is the nearest point of Γ to ``c``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from nonlocal_opt import Centre
from nonlocal_opt.landscapes import Landscape


@attrs.frozen
class NearestPoint:
    """Brute-force nearest point ``θ*`` of Γ to a centre, its distance ``d_Γ(c)``, and whether it is unique.

    Args:
        theta: ``θ*``.
        distance: ``d_Γ(c)``.
        unique: whether no other local minimum of the distance is within 1e-9 of it.
    """

    theta: torch.Tensor
    distance: float
    unique: bool


def _squared_distance(value: Callable, points: torch.Tensor, centre: Centre) -> torch.Tensor:
    return (points - centre.theta).square().sum(-1) + (value(points) - centre.height).square()


def _zoom(value: Callable, centre: Centre, theta: torch.Tensor, half_width: float) -> torch.Tensor:
    """Local refinement: a grid of ``k^dim`` points on ``θ ± h`` (spacing ``h/q``), recentred on its
    best point, ``h ← 2h/q``, until ``h`` is below 1e-12 (``k = 21, q = 10`` in 1-D, ``k = 9, q = 4`` in 2-D)."""
    dim = theta.numel()
    points = 21 if dim == 1 else 9
    offsets = torch.linspace(-1, 1, points, dtype=theta.dtype)
    axes = torch.stack(torch.meshgrid(*[offsets] * dim, indexing="ij"), -1).reshape(-1, dim)
    while half_width > 1e-12 * (1 + theta.abs().max().item()):
        grid = theta + half_width * axes
        theta = grid[_squared_distance(value, grid, centre).argmin()]
        half_width *= 4 / (points - 1)
    return theta


def nearest_point(value: Callable, centre: Centre, radius: float, grid: int | None = None, candidates: int = 4) -> NearestPoint:
    """``argmin_θ ‖(θ, f(θ)) − c‖`` over the box ``θ_c ± radius`` (``radius`` ≥ the distance from ``c`` to
    some point of Γ, so the box holds the answer): dense grid, its ``candidates`` best local minima
    refined by :func:`_zoom`; unique when no other local minimum is within 1e-9 of the best distance.
    1-D and 2-D only.

    Args:
        value: maps points of shape ``(..., dim)`` to ``f`` (``Landscape.value``).
        centre: the point ``c`` of ``R^{d+1}``.
        radius: half the width of the box searched, at least the distance from ``c`` to some point of Γ.
        grid: points of the grid per axis (``None``: 8001 in 1-D, 301 in 2-D).
        candidates: local minima of the grid refined.
    """
    dim = centre.theta.numel()
    n = grid or (8001 if dim == 1 else 301)
    line = torch.linspace(-radius, radius, n, dtype=centre.theta.dtype)
    points = centre.theta + torch.stack(torch.meshgrid(*[line] * dim, indexing="ij"), -1).reshape(-1, dim)
    sq = _squared_distance(value, points, centre).reshape([n] * dim)
    pool = torch.nn.functional.max_pool1d if dim == 1 else torch.nn.functional.max_pool2d
    minima = torch.nonzero((sq <= -pool(-sq[None], 3, 1, 1)[0]).reshape(-1)).flatten()
    minima = minima[sq.reshape(-1)[minima].argsort()[:candidates]]
    spacing = 2 * radius / (n - 1)
    refined = [_zoom(value, centre, points[i], 2 * spacing) for i in minima]
    dists = torch.stack([_squared_distance(value, t, centre) for t in refined]).sqrt()
    order = dists.argsort()
    best = refined[order[0]]
    rivals = [k for k in order[1:] if (refined[k] - best).norm() > 1e-5 and dists[k] - dists[order[0]] < 1e-9]
    return NearestPoint(theta=best, distance=float(dists[order[0]]), unique=not rivals)


def distance(landscape: Landscape, theta: torch.Tensor, centre: Centre) -> float:
    """``‖(θ, f(θ)) − c‖``.

    Args:
        landscape: ``f``.
        theta: ``θ``.
        centre: ``c``.
    """
    return float(_squared_distance(landscape.value, theta, centre).sqrt())


def value_and_grad(landscape: Landscape, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(θ)`` and ``∇f(θ)`` by autograd.

    Args:
        landscape: ``f``.
        theta: ``θ``.
    """
    theta = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = landscape.value(theta)
        (grad,) = torch.autograd.grad(value, theta)
    return value.detach(), grad


def phi(landscape: Landscape, theta: torch.Tensor, centre: Centre) -> float:
    """``φ(θ) = ½‖θ − θ_c‖² + ½(f(θ) − y_c)²``.

    Args:
        landscape: ``f``.
        theta: ``θ``.
        centre: ``c = (θ_c, y_c)``.
    """
    return 0.5 * float(_squared_distance(landscape.value, theta, centre))


def phi_grad_norm(landscape: Landscape, theta: torch.Tensor, centre: Centre) -> float:
    """``‖∇φ(θ)‖ = ‖(θ − θ_c) + (f(θ) − y_c) ∇f(θ)‖``.

    Args:
        landscape: ``f``.
        theta: ``θ``.
        centre: ``c = (θ_c, y_c)``.
    """
    value, grad = value_and_grad(landscape, theta)
    return float(torch.linalg.vector_norm((theta - centre.theta) + (value - centre.height) * grad))
