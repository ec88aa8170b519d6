"""Contract kit for projector plugins (like pymanopt's diagnostics or geoopt's manifold checks).

``check_projector(name_or_instance)`` runs a projector in float64 on 1-D and 2-D analytic landscapes
and compares it with independent math (:mod:`nonlocal_opt.testing.oracles`). The proposed centre is
the rolling ball's move ``c̃ = c(p_t) − η (g, ‖g‖²)`` from the manifold's centre ``c(p_t)`` over the
contact point ``p_t``. Every single projection runs at the projector's **defaults** (plus the
caller's ``hyperparameters``), and again **to tolerance** when it declares ``max_iters``, ``tol`` or
``rtol`` (those it declares set to ``500``, ``1e-9``, ``None``):

- ``accuracy`` (defaults): ``‖θ_{t+1} − θ*‖ ≤ atol + default_rtol·‖θ_t − θ*‖``, ``θ*`` the brute-force
  nearest point of Γ to ``c̃`` (where unique; not on ``slow`` cases): the default budget removes most
  of the distance;
- ``convergence`` (to tolerance): ``‖θ_{t+1} − θ*‖ ≤ atol``;
- ``idempotence``: projecting ``c(p)`` from ``p`` returns ``p``;
- ``residual``, ``evaluated``, ``passes``: the reported ``residual`` is ``‖∇φ‖`` at the returned
  point, the returned ``f`` and ``∇f`` belong to the returned ``θ``, every closure call is counted;
- ``monotone`` (projectors declaring ``safeguarded = True``, also run on the Riemann function):
  ``φ(θ_{t+1}) ≤ φ(θ_t)``;
- ``contact``: over ``steps`` steps of the rule at the defaults, the projections leave little of the
  excess distance ``‖c̃ − p‖ − d_Γ(c̃)`` (0 at the footpoint, quadratic in the error) of the points
  they start from: ``Σ_t (‖c̃ − p_{t+1}‖ − d_Γ(c̃)) / Σ_t (‖c̃ − p_t‖ − d_Γ(c̃)) ≤ default_rtol²``
  (:func:`excess_distances`, ``d_Γ`` brute-forced).

A projector that returns a ``centre`` (it moves the centre instead of projecting it, like ``tangent``)
makes no footpoint claim: ``accuracy``, ``convergence`` and ``contact`` are skipped, and the drift of
its carried centre, ``offset`` (:func:`offset_drift`), is reported, not asserted.

The projector runs on its first manifold (or ``manifold=``) under the first registered rule, by
sorted name, that works on that manifold (or ``rule=``); ``η`` is the base's ``lr`` and ``ρ`` the
manifold's ``rho`` (when it declares one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from nonlocal_opt import Centre, ConstraintManifold, DescentRule, GraphPoint, ProjectionResult, Projector, StepContext
from nonlocal_opt.landscapes import GaussianBumps, Landscape, Quadratic, Riemann, Sine
from nonlocal_opt.optim.step_context import ProjectionRecord
from nonlocal_opt.testing.compositions import Composition
from nonlocal_opt.testing.oracles import NearestPoint, distance, nearest_point, phi, phi_grad_norm, value_and_grad
from nonlocal_opt.testing.reports import Check, Report, nan_max

TO_TOLERANCE = {"max_iters": 500, "tol": 1e-9, "rtol": None}


@attrs.frozen
class Case:
    """A landscape, the contact points ``θ_t`` to start from, the radius ``ρ`` and the step ``η``.

    Args:
        name: the case's name in reports.
        landscape: makes the landscape.
        starts: the contact points ``θ_t``.
        rho: ``ρ``.
        eta: ``η``.
        rough: Riemann's function: only for safeguarded projectors.
        slow: ``φ`` is badly conditioned: no accuracy claim at a default budget, checked to tolerance only.
    """

    name: str
    landscape: Callable[[], Landscape]
    starts: Sequence[Sequence[float]]
    rho: float
    eta: float
    rough: bool = False  # Riemann's function: only for safeguarded projectors
    slow: bool = False  # φ is badly conditioned: no accuracy claim at a default budget, checked to tolerance only


DEFAULT_CASES = (
    Case("sine-1d", lambda: Sine(dim=1), [[-2.0], [0.4], [1.3], [2.6]], rho=0.5, eta=0.3),
    Case("quadratic-1d", lambda: Quadratic(eigenvalues=[0.8], minimum=[0.5]), [[-1.5], [2.0]], rho=0.5, eta=0.5),
    Case("quadratic-2d", lambda: Quadratic(eigenvalues=[0.3, 1.0], seed=3), [[1.0, -0.5], [-0.7, 1.2]], rho=0.5, eta=0.3),
    Case("sine-2d", lambda: Sine(dim=2), [[0.3, -1.0], [2.0, 0.8]], rho=0.4, eta=0.2),
    Case("gaussian-bumps-2d", lambda: GaussianBumps(n_bumps=20, sigma=0.5, box=2.0), [[0.6, -0.4]], rho=0.1, eta=0.02),
    # The paper's 20 steps of γ = 0.1 get 20 % of the way to θ* here, Gauss–Newton needs 53 iterations to 1e-9.
    Case("gaussian-bumps-2d", lambda: GaussianBumps(n_bumps=20, sigma=0.5, box=2.0), [[-0.8, 0.3]], rho=0.1, eta=0.02, slow=True),
    # Riemann's function is rough at every scale: from most θ_t a local solver ends at a local
    # footpoint that is not the global nearest point (docs/projectors.md); these θ_t have it in reach.
    Case("riemann-1d", lambda: Riemann(terms=100), [[0.7], [0.85], [1.75], [2.65]], rho=0.002, eta=0.0002, rough=True),
)
RUN_CASES = (
    Case("sine-1d", lambda: Sine(dim=1), [[1.0]], rho=0.5, eta=0.1),
    Case("quadratic-2d", lambda: Quadratic(eigenvalues=[0.3, 1.0], seed=3), [[1.0, -0.5]], rho=0.5, eta=0.2),
)


@attrs.frozen
class _Budget:
    """The settings a projection runs with: the projector's defaults, or ``to_tolerance``."""

    hyperparameters: Mapping[str, Any]
    to_tolerance: bool = False

    @property
    def label(self) -> str:
        return "to tolerance" if self.to_tolerance else "defaults"


def _budgets(projector: Projector, hyperparameters: Mapping[str, Any]) -> list[_Budget]:
    """The defaults (plus ``hyperparameters``), and to tolerance if the projector declares a stopping rule."""
    declared = {k: v for k, v in TO_TOLERANCE.items() if k in projector.hyperparameters}
    defaults = _Budget(dict(hyperparameters))
    return [defaults, _Budget({**declared, **hyperparameters}, to_tolerance=True)] if declared else [defaults]


class _Run:
    """A float64 landscape at ``start`` with its optimizer and a closure that counts its own calls."""

    def __init__(self, composition: Composition, case: Case, start: Sequence[float], hyperparameters: Mapping[str, Any]):
        self.landscape = case.landscape().double()
        with torch.no_grad():
            self.landscape.theta.copy_(torch.as_tensor(start, dtype=torch.float64))
        self.opt = composition.compose(self.landscape.parameters(), lr=case.eta, **composition.radius(case.rho), **hyperparameters)
        self.calls = 0

    def closure(self) -> torch.Tensor:
        self.calls += 1
        self.opt.zero_grad()
        loss = self.landscape()
        loss.backward()
        return loss

    def context(self) -> StepContext:
        """A step context of the run's optimizer with its counting closure."""
        return self.opt.step_context(self.closure)


def rolling_move(centre: Centre, point: GraphPoint, eta: float) -> Centre:
    """``c̃ = c − η τ(p)``, ``τ(p) = (g, ‖g‖²)``: the ball's centre rolled down the graph.

    Args:
        centre: ``c``.
        point: ``p``, evaluated (``g = point.grad``).
        eta: the step ``η``.
    """
    grad = point.grad
    return Centre(theta=centre.theta - eta * grad, height=centre.height - eta * grad.dot(grad))


def _invariants(run: _Run, ctx: StepContext, start: GraphPoint, target: Centre, result: ProjectionResult, label: str) -> list[Check]:
    theta = result.point.theta
    reference = result.centre if result.centre is not None else target
    expected = phi_grad_norm(run.landscape, theta, reference)
    limit = 1e-9 + 1e-6 * expected
    checks = [Check.at_most("residual", label, abs(float(result.residual) - expected), limit, "|reported − ‖∇φ‖|")]
    f_true, g_true = value_and_grad(run.landscape, theta)
    mismatch = float(torch.linalg.vector_norm(torch.cat([(result.point.loss - f_true).reshape(1), result.point.grad - g_true])))
    checks.append(Check.at_most("evaluated", label, mismatch, 1e-10, "(f, ∇f) of the returned θ"))
    uncounted = float(run.calls - ctx.stats["grad_evals"])
    checks.append(Check.at_most("passes", label, uncounted, 0.0, "closure calls not counted in grad_evals"))
    if getattr(run.opt.projector, "safeguarded", False):
        rise = phi(run.landscape, theta, target) - phi(run.landscape, start.theta, target)
        checks.append(Check.at_most("monotone", label, rise, 1e-12, "φ(θ_{t+1}) − φ(θ_t)"))
    return checks


def _accuracy(budget: _Budget, label: str, start: GraphPoint, result: ProjectionResult, oracle: NearestPoint, atol: float,
              default_rtol: float) -> Check:
    """``convergence`` to tolerance (absolute), or ``accuracy`` at the defaults (relative to ``‖θ_t − θ*‖``)."""
    error = float(torch.linalg.vector_norm(result.point.theta - oracle.theta))
    if budget.to_tolerance:
        name, limit = "convergence", atol
    else:
        name, limit = "accuracy", atol + default_rtol * float(torch.linalg.vector_norm(start.theta - oracle.theta))
    detail = f"‖θ − θ*‖ after {result.iterations} iterations" + ("" if oracle.unique else " (θ* not unique: skipped)")
    return Check(name, label, error <= limit or not oracle.unique, error, limit, detail)


def _idempotence(composition: Composition, case: Case, start: Sequence[float], budget: _Budget, label: str) -> Check:
    """Projecting ``c(p)`` from ``p`` returns ``p``."""
    run = _Run(composition, case, start, budget.hyperparameters)
    ctx = run.context()
    point = ctx.evaluate(extra=False)
    centre = ctx.manifold.centre(point, ctx)
    moved = float(torch.linalg.vector_norm(ctx.project(centre, point, centre=centre).point.theta - point.theta))
    return Check.at_most("idempotence", label, moved, 1e-8, "‖proj(c(p)) − p‖")


def _project_from(composition: Composition, case: Case, start: Sequence[float], runs: Sequence[_Budget], atol: float,
                  default_rtol: float) -> tuple[list[Check], bool]:
    """Every single-projection check from one contact point ``θ_t``, at each budget; also whether
    the projector carried its own centre."""
    checks: list[Check] = []
    oracle, carried = None, False
    for budget in runs:
        label = f"{case.name} θ_t={list(start)} {budget.label}"
        run = _Run(composition, case, start, budget.hyperparameters)
        ctx = run.context()
        point = ctx.evaluate(extra=False)
        centre = ctx.manifold.centre(point, ctx)
        target = rolling_move(centre, point, case.eta)
        result = ctx.project(target, point, centre=centre)
        checks += _invariants(run, ctx, point, target, result, label)
        carried = result.centre is not None
        if not carried and (budget.to_tolerance or not case.slow):
            oracle = oracle or nearest_point(run.landscape.value, target, 1.01 * distance(run.landscape, point.theta, target))
            checks.append(_accuracy(budget, label, point, result, oracle, atol, default_rtol))
        checks.append(_idempotence(composition, case, start, budget, label))
    return checks, carried


def _records(composition: Composition, case: Case, hyperparameters: Mapping[str, Any], steps: int
             ) -> Iterator[tuple[Landscape, torch.Tensor, ProjectionRecord]]:
    """``steps`` steps of the rule from the case's first start; per step the landscape, ``θ_t`` and the step's projection."""
    run = _Run(composition, case, case.starts[0], {**hyperparameters, "record_projection": True})
    for _ in range(steps):
        theta = run.landscape.theta.detach().clone()
        run.opt.step(run.closure)
        yield run.landscape, theta, run.opt.last_projection


def _brute_distance(landscape: Landscape, centre: Centre, theta: torch.Tensor) -> float:
    """``d_Γ(c)``, searched within ``1.01 ‖c − p‖`` of ``c`` (``p = (θ, f(θ))``)."""
    grid = 1001 if centre.theta.numel() == 1 else 81
    return nearest_point(landscape.value, centre, 1.01 * distance(landscape, theta, centre), grid=grid, candidates=2).distance


def excess_distances(
    case: Case,
    projector: str | Projector,
    *,
    rule: str | DescentRule | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    steps: int = 200,
) -> list[tuple[float, float]]:
    """Per step of ``steps``: ``(‖c̃ − p_t‖ − d_Γ(c̃), ‖c̃ − p_{t+1}‖ − d_Γ(c̃))``, how much farther the
    proposed centre ``c̃`` is from the contact point the projection started from, and from the one it
    returned, than from Γ (``d_Γ`` brute-forced). The second is 0 at the footpoint, quadratic in the error.

    Args:
        case: the landscape, run from its first start.
        projector: a registered projector name or a ``Projector``.
        rule: the rule to run it under (``None``: the first registered rule, by sorted name, on the manifold).
        manifold: the manifold (``None``: the projector's first).
        hyperparameters: added to every run.
        steps: the steps of the rule.
    """
    composition = Composition.for_projector(projector, rule, manifold)
    excess = []
    for landscape, theta, record in _records(composition, case, hyperparameters or {}, steps):
        nearest = _brute_distance(landscape, record.target, theta)
        reached = distance(landscape, record.result.point.theta, record.target)
        excess.append((distance(landscape, theta, record.target) - nearest, reached - nearest))
    return excess


def offset_drift(
    case: Case,
    projector: str | Projector,
    *,
    rule: str | DescentRule | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    steps: int = 200,
) -> list[float]:
    """``|d_Γ(c_{t+1}) − r| / r`` after each of ``steps`` steps for a projector that carries its centre
    (``ProjectionResult.centre``; ``d_Γ`` brute-forced), ``r = ‖c_0 − p_0‖`` the radius of the first ball.

    Args:
        case: as in :func:`excess_distances`.
        projector: a registered projector name or a ``Projector`` that returns the centre to carry.
        rule: as in :func:`excess_distances`.
        manifold: as in :func:`excess_distances`.
        hyperparameters: as in :func:`excess_distances`.
        steps: as in :func:`excess_distances`.

    Raises:
        ValueError: the projector carries no centre.
    """
    composition = Composition.for_projector(projector, rule, manifold)
    drifts, radius = [], None
    for landscape, theta, record in _records(composition, case, hyperparameters or {}, steps):
        radius = radius or distance(landscape, theta, record.centre)
        centre = record.result.centre
        if centre is None:
            raise ValueError(f"projector {composition.projector.name!r} carries no centre: measure it with excess_distances")
        drifts.append(abs(_brute_distance(landscape, centre, record.result.point.theta) - radius) / radius)
    return drifts


def _run_check(composition: Composition, case: Case, hyperparameters: Mapping[str, Any], steps: int, carries: bool,
               default_rtol: float) -> Check:
    """``offset`` (reported) for a projector that carries its centre, else ``contact``."""
    label = f"{case.name} ρ={case.rho} η={case.eta}"
    where = dict(rule=composition.rule, manifold=composition.manifold, hyperparameters=hyperparameters, steps=steps)
    if carries:
        drift = nan_max(offset_drift(case, composition.projector, **where))
        return Check("offset", label, True, drift, None, f"max |d_Γ(c) − r|/r of the carried centre over {steps} steps")
    excess = excess_distances(case, composition.projector, **where)
    left = sum(after for _, after in excess) / sum(before for before, _ in excess)
    detail = f"Σ(‖c̃ − p_{{t+1}}‖ − d_Γ(c̃)) / Σ(‖c̃ − p_t‖ − d_Γ(c̃)) over {steps} steps"
    return Check.at_most("contact", label, left, default_rtol**2, detail)


def check_projector(
    name_or_instance: str | Projector,
    *,
    rule: str | DescentRule | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    cases: Sequence[Case] = DEFAULT_CASES,
    run_cases: Sequence[Case] = RUN_CASES,
    steps: int = 200,
    atol: float = 1e-6,
    default_rtol: float = 0.4,
    raise_on_failure: bool = True,
) -> Report:
    """Run the contract checks (module docstring) on a projector, under the guarded step context
    (:mod:`~nonlocal_opt.testing.public_contract`).

    Args:
        name_or_instance: a registered projector name or a ``Projector``.
        rule: the rule to run it under (``None``: the first registered rule, by sorted name, on the manifold).
        manifold: the manifold (``None``: the projector's first).
        hyperparameters: added to every run (the defaults and to tolerance), e.g. a convergent ``step_size``.
        cases: the single-projection cases.
        run_cases: the cases of the ``contact`` / ``offset`` runs.
        steps: the steps of those runs.
        atol: the absolute tolerance of ``convergence`` and ``accuracy``.
        default_rtol: the fraction of the distance to ``θ*`` a projection at the defaults may leave.
        raise_on_failure: raise when a check fails.

    Returns:
        The :class:`~nonlocal_opt.testing.reports.Report`.

    Raises:
        AssertionError: with the report, when a check fails and ``raise_on_failure`` is true.
        PrivateMemberError: the projector read a private member of the step context (whatever ``raise_on_failure``).
    """
    composition = Composition.for_projector(name_or_instance, rule, manifold)
    projector, hyperparameters = composition.projector, dict(hyperparameters or {})
    runs = _budgets(projector, hyperparameters)
    safeguarded = getattr(projector, "safeguarded", False)
    checks: list[Check] = []
    carries = False
    with torch.no_grad():
        for case in cases:
            for start in case.starts if safeguarded or not case.rough else ():
                found, carried = _project_from(composition, case, start, runs, atol, default_rtol)
                checks += found
                carries = carries or carried
        checks += [_run_check(composition, case, hyperparameters, steps, carries, default_rtol) for case in run_cases]
    subject = f"projector {projector.name!r} under rule {composition.rule.name!r} on manifold {composition.manifold.name!r}"
    report = Report(subject, tuple(checks))
    return report.raise_on_failure() if raise_on_failure else report
