"""Contract kit for projector plugins (like pymanopt's diagnostics or geoopt's manifold checks).

``check_projector(name_or_instance)`` runs a projector on 1-D and 2-D analytic landscapes in
float64 and compares it with a brute-force oracle written here, independently of any projector:

- ``accuracy``: the returned ``θ_{t+1}`` is the nearest point of Γ to ``c̃`` (dense grid + zooming
  local refinement) within ``atol``, wherever that nearest point is unique;
- ``idempotence``: projecting ``c(p) = p + ρν(p)`` from ``p`` returns ``p``;
- invariants: the reported ``residual`` is ``‖∇φ‖`` at the returned point, the returned ``f`` and
  ``∇f`` belong to the returned ``θ``, every closure call is counted in ``grad_evals``, ``φ`` did not
  increase (projectors declaring ``safeguarded = True``), ``opt.stats`` is filled;
- ``offset``: over ``steps`` RBO steps, run with the projector's default budget (plus the caller's
  ``hyperparameters``), the centre stays on ``S(Γ, ρ)``: ``|d_Γ(c_t) − ρ| ≤ drift_limit·ρ`` with
  ``d_Γ`` brute-forced.

A projector that returns a ``centre`` (it moves the centre instead of projecting it, like
``tangent``) makes no footpoint claim: accuracy is skipped and its offset drift is reported, not
asserted. Projectors declaring ``safeguarded = True`` are also run on the Riemann function.
For the single projections they are run "to tolerance" with ``max_iters``/``tol``/``rtol`` overrides
(only those they declare) plus the caller's ``hyperparameters``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from nonlocal_opt.analysis.landscapes import GaussianBumps, Landscape, Quadratic, Riemann, Sine
from nonlocal_opt.plugins.compose import compose
from nonlocal_opt.optim.host_reads import as_if_on_device
from nonlocal_opt.optim.interfaces import Centre, Projector
from nonlocal_opt.optim.step_context import StepContext
from nonlocal_opt.plugins.registry import instantiate

TO_TOLERANCE = {"max_iters": 500, "tol": 1e-9, "rtol": None}


@attrs.frozen
class Case:
    """A landscape, the contact points ``θ_t`` to start from, and the RBO ``ρ`` and ``η``."""

    name: str
    landscape: Callable[[], Landscape]
    starts: Sequence[Sequence[float]]
    rho: float
    eta: float
    rough: bool = False  # only for safeguarded projectors


DEFAULT_CASES = (
    Case("sine-1d", lambda: Sine(dim=1), [[-2.0], [0.4], [1.3], [2.6]], rho=0.5, eta=0.3),
    Case("quadratic-1d", lambda: Quadratic(eigenvalues=[0.8], minimum=[0.5]), [[-1.5], [2.0]], rho=0.5, eta=0.5),
    Case("quadratic-2d", lambda: Quadratic(eigenvalues=[0.3, 1.0], seed=3), [[1.0, -0.5], [-0.7, 1.2]], rho=0.5, eta=0.3),
    Case("sine-2d", lambda: Sine(dim=2), [[0.3, -1.0], [2.0, 0.8]], rho=0.4, eta=0.2),
    Case("gaussian-bumps-2d", lambda: GaussianBumps(n_bumps=20, sigma=0.5, box=2.0), [[0.6, -0.4], [-0.8, 0.3]], rho=0.1, eta=0.02),
    # Riemann's function is rough at every scale: from most θ_t a local solver ends at a local
    # footpoint that is not the global nearest point (docs/projectors.md); these θ_t have it in reach.
    Case("riemann-1d", lambda: Riemann(terms=100), [[0.7], [0.85], [1.75], [2.65]], rho=0.002, eta=0.0002, rough=True),
)
OFFSET_CASES = (
    Case("sine-1d", lambda: Sine(dim=1), [[1.0]], rho=0.5, eta=0.1),
    Case("quadratic-2d", lambda: Quadratic(eigenvalues=[0.3, 1.0], seed=3), [[1.0, -0.5]], rho=0.5, eta=0.2),
)


def _nan_max(values: Sequence[float]) -> float:
    """The largest value, a NaN counting as larger than any number."""
    return max(values, key=lambda v: math.inf if math.isnan(v) else v)


@attrs.frozen
class Check:
    """One check on one case: ``value`` (an error) against ``limit`` (``None``: reported only)."""

    name: str
    case: str
    passed: bool
    value: float
    limit: float | None
    detail: str = ""


@attrs.frozen
class ProjectorReport:
    """Every check run on ``projector``; ``failures`` lists those that did not pass."""

    projector: str
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def worst(self, name: str) -> float:
        """The largest ``value`` among checks called ``name`` (NaN counts as largest)."""
        values = [c.value for c in self.checks if c.name == name]
        return _nan_max(values) if values else math.nan

    def __str__(self) -> str:
        lines = [f"projector {self.projector!r}: {len(self.checks) - len(self.failures)}/{len(self.checks)} checks passed"]
        for c in self.checks:
            limit = "report" if c.limit is None else f"<= {c.limit:.1e}"
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<12} {c.case:<26} {c.value:.3e} ({limit}) {c.detail}")
        return "\n".join(lines)


@attrs.frozen
class NearestPoint:
    """Brute-force nearest point ``θ*`` of Γ to a centre, its distance, and whether it is unique."""

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
    refined by :func:`_zoom`; unique when no other local minimum is within 1e-9 of the best distance."""
    dim = centre.theta.numel()
    n = grid or (8001 if dim == 1 else 301)
    line = torch.linspace(-radius, radius, n, dtype=centre.theta.dtype)
    points = centre.theta + torch.stack(torch.meshgrid(*[line] * dim, indexing="ij"), -1).reshape(-1, dim)
    sq = _squared_distance(value, points, centre).reshape([n] * dim)
    pooled = -torch.nn.functional.max_pool1d(-sq[None], 3, 1, 1)[0] if dim == 1 else -torch.nn.functional.max_pool2d(-sq[None], 3, 1, 1)[0]
    minima = torch.nonzero((sq <= pooled).reshape(-1)).flatten()
    minima = minima[sq.reshape(-1)[minima].argsort()[:candidates]]
    spacing = 2 * radius / (n - 1)
    refined = [_zoom(value, centre, points[i], 2 * spacing) for i in minima]
    dists = torch.stack([_squared_distance(value, t, centre) for t in refined]).sqrt()
    order = dists.argsort()
    best = refined[order[0]]
    rivals = [k for k in order[1:] if (refined[k] - best).norm() > 1e-5 and dists[k] - dists[order[0]] < 1e-9]
    return NearestPoint(theta=best, distance=float(dists[order[0]]), unique=not rivals)


def _value_and_grad(landscape: Landscape, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = landscape.value(theta)
        (grad,) = torch.autograd.grad(value, theta)
    return value.detach(), grad


def _centre_on_manifold(landscape: Landscape, theta: torch.Tensor, rho: float) -> Centre:
    """``c(p) = p + ρν(p)`` computed here with autograd, ``ν = (−g, 1)/sqrt(1 + ‖g‖²)``."""
    value, grad = _value_and_grad(landscape, theta)
    norm = torch.sqrt(1 + grad @ grad)
    return Centre(theta=theta - rho * grad / norm, height=value + rho / norm)


class _Counted:
    """A landscape with an optimizer and a closure that counts its own calls."""

    def __init__(self, case: Case, projector: Projector, start: Sequence[float], hyperparameters: Mapping[str, Any]):
        self.landscape = case.landscape().double()
        with torch.no_grad():
            self.landscape.theta.copy_(torch.as_tensor(start, dtype=torch.float64))
        self.opt = compose(self.landscape.parameters(), "rbo", projector=projector, rho=case.rho, lr=case.eta, **hyperparameters)
        self.calls = 0

    def closure(self) -> torch.Tensor:
        self.calls += 1
        self.opt.zero_grad()
        loss = self.landscape()
        loss.backward()
        return loss

    def context(self) -> StepContext:
        return StepContext(self.opt, self.closure)


def _to_tolerance(projector: Projector, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    declared = {k: v for k, v in TO_TOLERANCE.items() if k in projector.hyperparameters}
    return {**declared, **hyperparameters}


def _phi(landscape: Landscape, theta: torch.Tensor, centre: Centre) -> float:
    """``φ(θ) = ½‖θ − θ_c‖² + ½(f(θ) − y_c)²``."""
    gap = landscape.value(theta).detach() - centre.height
    return 0.5 * float((theta - centre.theta).square().sum() + gap * gap)


def _phi_grad_norm(landscape: Landscape, theta: torch.Tensor, centre: Centre) -> float:
    value, grad = _value_and_grad(landscape, theta)
    return float(torch.linalg.vector_norm((theta - centre.theta) + (value - centre.height) * grad))


def _project_once(case: Case, projector: Projector, start: Sequence[float], hp: Mapping[str, Any], atol: float) -> tuple[list[Check], bool]:
    """Accuracy, idempotence and the per-call invariants at one contact point; also whether the
    projector carried its own centre."""
    run = _Counted(case, projector, start, hp)
    ctx = run.context()
    point = ctx.evaluate(extra=False)
    centre = _centre_on_manifold(run.landscape, point.theta, case.rho)
    _, grad = _value_and_grad(run.landscape, point.theta)
    target = Centre(theta=centre.theta - case.eta * grad, height=centre.height - case.eta * (grad @ grad))
    result = ctx.project(target, point, centre=centre)
    theta = result.point.theta
    label = f"{case.name} θ_t={list(start)}"
    checks = []
    reference = result.centre if result.centre is not None else target
    expected = _phi_grad_norm(run.landscape, theta, reference)
    gap = abs(float(result.residual) - expected)
    checks.append(Check("residual", label, gap <= 1e-9 + 1e-6 * expected, gap, 1e-9 + 1e-6 * expected, "|reported − ‖∇φ‖|"))
    f_true, g_true = _value_and_grad(run.landscape, theta)
    mismatch = float(torch.linalg.vector_norm(torch.cat([(result.point.loss - f_true).reshape(1), result.point.grad - g_true])))
    checks.append(Check("evaluated", label, mismatch <= 1e-10, mismatch, 1e-10, "(f, ∇f) of the returned θ"))
    uncounted = float(run.calls - ctx.grad_evals)
    checks.append(Check("passes", label, uncounted == 0, uncounted, 0.0, "closure calls not counted in grad_evals"))
    if getattr(projector, "safeguarded", False):
        rise = _phi(run.landscape, theta, target) - _phi(run.landscape, point.theta, target)
        checks.append(Check("monotone", label, rise <= 1e-12, rise, 1e-12, "φ(θ_{t+1}) − φ(θ_t)"))
    if result.centre is None:
        radius = float(torch.sqrt((target.theta - point.theta).square().sum() + (target.height - point.loss) ** 2)) * 1.01
        oracle = nearest_point(run.landscape.value, target, radius)
        error = float(torch.linalg.vector_norm(theta - oracle.theta))
        detail = f"‖θ − θ*‖ after {result.iterations} iterations" + ("" if oracle.unique else " (θ* not unique: skipped)")
        checks.append(Check("accuracy", label, error <= atol or not oracle.unique, error, atol, detail))
    # idempotence: c(p) projected from p returns p
    run2 = _Counted(case, projector, start, hp)
    ctx2 = run2.context()
    point2 = ctx2.evaluate(extra=False)
    again = ctx2.project(centre, point2, centre=centre).point.theta
    moved = float(torch.linalg.vector_norm(again - point2.theta))
    checks.append(Check("idempotence", label, moved <= 1e-8, moved, 1e-8, "‖proj(c(p)) − p‖"))
    return checks, result.centre is not None


def carried_centre(opt) -> Centre | None:
    """The centre the ``rbo`` rule carries to its next step (``ProjectionResult.centre``), if any."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = opt.state[params[0]]
    if "centre_height" not in state:
        return None
    theta = torch.cat([opt.state[p]["centre_theta"].reshape(-1) for p in params])
    return Centre(theta=theta, height=state["centre_height"])


def offset_drift(case: Case, projector: Projector | str, hyperparameters: Mapping[str, Any], steps: int) -> list[float]:
    """``|d_Γ(c_t) − ρ|/ρ`` after each of ``steps`` RBO steps (``d_Γ`` brute-forced), ``c_t`` being the
    carried centre or ``p_t + ρν(p_t)``."""
    projector = instantiate("projector", projector)
    run = _Counted(case, projector, case.starts[0], hyperparameters)
    drifts = []
    for _ in range(steps):
        run.opt.step(run.closure)
        theta = run.landscape.theta.detach().clone()
        centre = carried_centre(run.opt) or _centre_on_manifold(run.landscape, theta, case.rho)
        value = run.landscape.value(theta).detach()
        radius = float(torch.sqrt((centre.theta - theta).square().sum() + (centre.height - value) ** 2)) * 1.01
        distance = nearest_point(run.landscape.value, centre, radius, grid=1001 if theta.numel() == 1 else 81, candidates=2).distance
        drifts.append(abs(distance - case.rho) / case.rho)
    return drifts


def check_projector(
    name_or_instance: str | Projector,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    cases: Sequence[Case] = DEFAULT_CASES,
    offset_cases: Sequence[Case] = OFFSET_CASES,
    steps: int = 200,
    atol: float = 1e-6,
    drift_limit: float = 1e-4,
    raise_on_failure: bool = True,
) -> ProjectorReport:
    """Run the contract checks on a registered projector name or a ``Projector`` instance.

    ``hyperparameters`` are added to the "run to tolerance" settings (e.g. a convergent
    ``step_size``). Returns a :class:`ProjectorReport`; raises ``AssertionError`` with the report when
    a check fails and ``raise_on_failure`` is true.
    """
    projector = instantiate("projector", name_or_instance)
    hp = _to_tolerance(projector, hyperparameters or {})
    safeguarded = getattr(projector, "safeguarded", False)
    checks: list[Check] = []
    carries = False
    with torch.no_grad():
        for case in cases:
            if case.rough and not safeguarded:
                continue
            for start in case.starts:
                found, carried = _project_once(case, projector, start, hp, atol)
                checks.extend(found)
                carries = carries or carried
        for case in offset_cases:
            drift = _nan_max(offset_drift(case, projector, hyperparameters or {}, steps))
            limit = None if carries else drift_limit
            passed = carries or drift <= drift_limit
            label = f"{case.name} ρ={case.rho} η={case.eta}"
            checks.append(Check("offset", label, passed, drift, limit, f"max |d_Γ(c) − ρ|/ρ over {steps} steps"))
        run = _Counted(cases[0], projector, cases[0].starts[0], hp)
        run.opt.step(run.closure)
        missing = {"grad_evals", "proj_iters", "proj_residual", "offset_error"} - set(run.opt.stats)
        detail = f"missing: {sorted(missing)}" if missing else ""
        checks.append(Check("stats", cases[0].name, not missing, float(len(missing)), 0.0, detail))
    report = ProjectorReport(projector=projector.name, checks=tuple(checks))
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what would synchronise with a device


@contextlib.contextmanager
def host_reads_raise() -> Iterator[None]:
    """Within this block reading a tensor's value on the host (``.item()``, ``bool()``, …) raises ``AssertionError``."""

    def forbidden(name: str) -> Callable:
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a value on the host: on a GPU this synchronises every call")

        return read

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def check_device_path(name_or_instance: str | Projector, *, hyperparameters: Mapping[str, Any] | None = None, steps: int = 5) -> float:
    """Run ``steps`` RBO steps on a small BatchNorm MLP (float64) twice: on the CPU path, and on the path
    a GPU takes (:func:`nonlocal_opt.optim.host_reads.as_if_on_device`) with every host read raising. Returns
    the largest difference of the parameters, relative to their change; raises ``AssertionError`` on a
    host read. In float64 the two paths agree to rounding (the CPU path's scalars are Python floats, so
    in float32 near-ties of accept/reject can go either way and the runs drift apart).

    Early stopping is off in both runs (``tol``/``rtol`` set to ``None`` where declared): it needs host reads.
    """
    projector = instantiate("projector", name_or_instance)
    hp = {key: None for key in ("tol", "rtol") if key in projector.hyperparameters} | dict(hyperparameters or {})
    start, on_cpu = _mlp_steps(projector, hp, 0), _mlp_steps(projector, hp, steps)
    on_device = _mlp_steps(projector, hp, steps, device_path=True)
    return float((on_cpu - on_device).abs().max() / (on_cpu - start).abs().max())


def _mlp_steps(projector: Projector, hp: Mapping[str, Any], steps: int, device_path: bool = False) -> torch.Tensor:
    """The parameters of a seeded float64 BatchNorm MLP after ``steps`` RBO steps on a fixed batch, the
    steps run on the device path with host reads raising when ``device_path``."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (32,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()
    opt = compose(model.parameters(), "rbo", projector=projector, lr=0.5, rho=0.5, **hp)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with contextlib.ExitStack() as guards:
        if device_path:
            guards.enter_context(as_if_on_device())
            guards.enter_context(host_reads_raise())
        for _ in range(steps):
            opt.step(closure)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


__all__ = [
    "DEFAULT_CASES",
    "OFFSET_CASES",
    "Case",
    "Check",
    "NearestPoint",
    "ProjectorReport",
    "carried_centre",
    "check_device_path",
    "check_projector",
    "host_reads_raise",
    "nearest_point",
    "offset_drift",
]
