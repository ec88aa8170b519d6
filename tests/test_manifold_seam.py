"""The manifold seam: a manifold written by a third party against ``ConstraintManifold`` alone works with the
first-party footpoint and safeguarded projectors, and their results match independent math.

Two manifolds are written here from their formulas, not from any plugin: the offset manifold ``S(Γ, ρ)``
again (named ``offset``, so every projector that declares ``offset`` accepts it), and the offset surface in
a scaled metric ``‖(Δθ, Δy)‖² = ‖Δθ‖² + λ²Δy²`` (its own name, for the footpoint projector only: the
safeguarded solvers' formulas assume the Euclidean ``φ``, and they say so by not listing it).
"""

from __future__ import annotations

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import Centre, ConstraintManifold, Hyperparameter
from nonlocal_opt.landscapes import Quadratic, Sine
from nonlocal_opt.optim.hyperparameters import positive
from nonlocal_opt.testing import DEFAULT_CASES, RUN_CASES, check_device_path, check_projector, nearest_point

from conftest import make_closure

FOOTPOINT_SOLVERS = ["footpoint", "gauss-newton", "newton", "lbfgs"]
RHO, ETA = 0.5, 0.2


def rho_hyperparameter() -> dict[str, Hyperparameter]:
    return {"rho": Hyperparameter(1.0, "ρ", "radius of the ball", positive)}


class OffsetFromScratch(ConstraintManifold):
    """``S(Γ, ρ)``: ``c(p) = p + ρ(−g, 1)/sqrt(1 + ‖g‖²)``, ``φ = ½‖(θ, f(θ)) − c̃‖²``, ``∇φ = (θ − θ̃) + (f − ỹ) g``.
    It ignores ``work`` and allocates freely: the interface allows both."""

    name = "offset"
    hyperparameters = rho_hyperparameter()

    def centre(self, point, ctx):
        normal = torch.cat([-point.grad, point.grad.new_ones(1)]) / torch.sqrt(1 + point.grad @ point.grad)
        lifted = torch.cat([point.theta, point.loss.reshape(1)]) + ctx.hp("rho") * normal
        return Centre(theta=lifted[:-1], height=lifted[-1])

    def phi(self, point, target, ctx):
        return 0.5 * ((point.theta - target.theta) @ (point.theta - target.theta) + (point.loss - target.height) ** 2)

    def phi_grad(self, point, target, ctx, *, out=None, offset=None, work=None):
        across = point.theta - target.theta if offset is None else offset.clone()
        grad = across + (point.loss - target.height) * point.grad
        return grad if out is None else out.copy_(grad)

    def offset_error(self, centre, point, ctx):
        distance = torch.sqrt((centre.theta - point.theta) @ (centre.theta - point.theta) + (centre.height - point.loss) ** 2)
        return (distance - ctx.hp("rho")).abs() / ctx.hp("rho")


class ScaledOffset(ConstraintManifold):
    """Centres at distance ρ from Γ in the metric ``‖Δθ‖² + λ²Δy²``: ``c(p) = (θ − ρλg/N, f + ρ/(λN))``,
    ``N = sqrt(1 + λ²‖g‖²)``; ``φ = ½‖θ − θ̃‖² + ½λ²(f(θ) − ỹ)²``, ``∇φ = (θ − θ̃) + λ²(f − ỹ) g``."""

    name = "scaled-offset"
    hyperparameters = {**rho_hyperparameter(), "height_scale": Hyperparameter(1.0, "λ", "scale of heights in the metric", positive)}

    def centre(self, point, ctx):
        rho, scale = ctx.hp("rho"), ctx.hp("height_scale")
        norm = torch.sqrt(1 + scale**2 * (point.grad @ point.grad))
        return Centre(theta=point.theta - rho * scale * point.grad / norm, height=point.loss + rho / (scale * norm))

    def phi(self, point, target, ctx):
        scale = ctx.hp("height_scale")
        return 0.5 * ((point.theta - target.theta) @ (point.theta - target.theta) + scale**2 * (point.loss - target.height) ** 2)

    def phi_grad(self, point, target, ctx, *, out=None, offset=None, work=None):
        across = point.theta - target.theta if offset is None else offset
        return torch.add(across, point.grad, alpha=float(ctx.hp("height_scale") ** 2 * (point.loss - target.height)), out=out)

    def offset_error(self, centre, point, ctx):
        scale = ctx.hp("height_scale")
        distance = torch.sqrt((centre.theta - point.theta) @ (centre.theta - point.theta) + scale**2 * (centre.height - point.loss) ** 2)
        return (distance - ctx.hp("rho")).abs() / ctx.hp("rho")


class ScaledRBO(nonlocal_opt.get("rule", "rbo")):
    name = "scaled-rbo"
    manifolds = ("scaled-offset",)


class ScaledFootpoint(nonlocal_opt.get("projector", "footpoint")):
    name = "scaled-footpoint"
    manifolds = ("scaled-offset",)


def value_and_grad(landscape, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta = theta.detach().clone().requires_grad_(True)
    value = landscape.value(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return value.detach(), grad


def rolled_target(landscape, scale: float = 1.0) -> Centre:
    """``c̃ = c(p_t) − η(g, ‖g‖²)`` with ``c(p) = (θ − ρλg/N, f + ρ/(λN))``, ``N = sqrt(1 + λ²‖g‖²)``."""
    theta = landscape.theta.detach().clone()
    value, g = value_and_grad(landscape, theta)
    norm = torch.sqrt(1 + scale**2 * (g @ g))
    return Centre(theta=theta - RHO * scale * g / norm - ETA * g, height=value + RHO / (scale * norm) - ETA * (g @ g))


@pytest.mark.parametrize("projector", FOOTPOINT_SOLVERS)
def test_projectors_reach_the_footpoint_on_a_manifold_written_against_the_interface(projector):
    landscape = Sine([0.9, -0.4], dim=2).double()
    target = rolled_target(landscape)
    absolute = {"rtol": None} if "rtol" in nonlocal_opt.get("projector", projector).hyperparameters else {}
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector=projector, manifold=OffsetFromScratch(),
                               lr=ETA, rho=RHO, max_iters=500, tol=1e-12, **absolute)
    assert isinstance(opt.manifold, OffsetFromScratch)
    opt.step(make_closure(opt, landscape))
    expected = nearest_point(landscape.value, target, radius=1.0)
    assert expected.unique
    torch.testing.assert_close(landscape.theta.detach(), expected.theta, rtol=0, atol=1e-8)
    assert opt.stats["proj_residual"] <= 1e-10 and opt.stats["nonfinite"] == 0.0


@pytest.mark.parametrize("projector", FOOTPOINT_SOLVERS)
def test_contract_kits_pass_on_a_manifold_written_against_the_interface(projector):
    """The kits' brute-force oracles and the device path (no host read) with the manifold written here."""
    report = check_projector(projector, manifold=OffsetFromScratch(), cases=DEFAULT_CASES[:2], run_cases=RUN_CASES[:1], steps=50)
    assert report.ok and report.worst("convergence") <= 1e-6
    assert check_device_path(projector, manifold=OffsetFromScratch()) <= 1e-9


def test_footpoint_projects_in_the_manifold_metric():
    """The footpoint of ``c̃`` in the metric ``‖Δθ‖² + λ²Δy²`` is the Euclidean footpoint of ``(θ̃, λỹ)`` on the
    graph of ``λf``: brute force on that graph."""
    scale = 2.0
    landscape = Quadratic([0.6, -0.3], eigenvalues=[0.5, 1.5], seed=2).double()
    target = rolled_target(landscape, scale)
    opt = nonlocal_opt.compose(landscape.parameters(), ScaledRBO(), projector=ScaledFootpoint(), manifold=ScaledOffset(),
                               lr=ETA, rho=RHO, height_scale=scale, max_iters=2000, tol=1e-12)
    opt.step(make_closure(opt, landscape))
    expected = nearest_point(lambda t: scale * landscape.value(t), Centre(theta=target.theta, height=scale * target.height), radius=1.5)
    assert expected.unique
    torch.testing.assert_close(landscape.theta.detach(), expected.theta, rtol=0, atol=1e-8)
    euclidean = nearest_point(landscape.value, target, radius=1.5)
    assert (euclidean.theta - expected.theta).norm() > 1e-2  # the metric, not only the centre, decided the step
    with pytest.raises(ValueError, match="cannot project onto manifold 'scaled-offset'"):
        nonlocal_opt.compose(landscape.parameters(), ScaledRBO(), projector="gauss-newton", manifold=ScaledOffset())


def test_a_manifold_whose_methods_do_not_take_the_interface_arguments_is_refused_when_defined():
    interface = r"define phi_grad\(self, point, target, ctx, \*, out=None, offset=None, work=None\)"
    with pytest.raises(TypeError, match=r"OldSignature\.phi_grad\(self, point, target, out=None\).*" + interface):

        class OldSignature(OffsetFromScratch):
            def phi_grad(self, point, target, out=None):
                return super().phi_grad(point, target, None, out=out)

    with pytest.raises(TypeError, match=r"NoContext\.centre\(self, point\).*define centre\(self, point, ctx\)"):

        class NoContext(OffsetFromScratch):
            def centre(self, point):
                return Centre(theta=point.theta, height=point.loss)
