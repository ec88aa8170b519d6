"""Contract kit for descent-rule plugins.

``check_rule(name_or_instance)`` composes the rule (a projecting rule with its default projector and
manifold, or ``projector=`` / ``manifold=``) over each base of ``BASES`` (``sgd``, ``sgd`` with
momentum, ``adam``), and checks it against independent math on the float64 convex quadratic
:func:`quadratic` and the BatchNorm MLP :func:`batchnorm_mlp`. Per base:

- ``passes``: every closure call of every step is counted in ``stats["grad_evals"]``;
- ``nonfinite``: a step on a poisoned batch (every pass returns a NaN loss and NaN gradients) is
  skipped: parameters and the base's state bit-identical, ``stats["nonfinite"] == 1``; the next finite
  step is bit-identical to the step of a run that never saw the poisoned batch;
- ``state_dict``: saved after 2 steps, through ``torch.save``/``torch.load(weights_only=True)`` into a
  fresh optimizer, the run continues bit-identically;
- ``scheduler``: with ``StepLR(γ = ½)`` on the composed optimizer, the base sees ``lr₀ 2^{−t}`` in its
  ``param_groups`` when it steps at step ``t``;
- ``finite`` and ``descent``: ``descent_steps`` steps from ``θ_0`` keep every loss and parameter finite
  and end with ``f(θ_N) ≤ descent·f(θ_0)``.

Over the first base only, ``batchnorm``: with ``freeze_bn_stats`` on, the BatchNorm running statistics
after each step equal a twin's after one forward pass at the step's start ``θ_t`` (for a rule whose pass
runs elsewhere, ``first_pass_at_start = False``: one update of the statistics per step).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nonlocal_opt import ComposedOptimizer, ConstraintManifold, DescentRule, Projector
from nonlocal_opt.landscapes import Quadratic
from nonlocal_opt.testing.compositions import Composition
from nonlocal_opt.testing.reports import Check, Report

Base = tuple[str | type[torch.optim.Optimizer], Mapping[str, Any]]  # a registered name or a class, and its hyperparameters
BASES: dict[str, Base] = {
    "sgd": ("sgd", {"lr": 0.5}),
    "sgd+momentum": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.1}),
}
Problem = tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]  # a model and its loss on a fixed batch


def quadratic() -> Problem:
    """``f(θ) = ½(θ − θ*)ᵀH(θ − θ*)``, ``H``'s eigenvalues ¼ and ½ (so Γ's radius of curvature is ≥ 2, more
    than the default ball), ``θ* = (0.2, 0.4)``, from ``θ_0 = (1.5, −1)``; the model is the landscape."""
    landscape = Quadratic([1.5, -1.0], eigenvalues=[0.25, 0.5], minimum=[0.2, 0.4], seed=1).double()
    return landscape, lambda model: model()


def batchnorm_mlp() -> Problem:
    """A seeded float64 MLP with a BatchNorm layer, and its mean-squared error on a fixed batch."""
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(16, n, generator=generator, dtype=torch.float64) for n in (4, 1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    return model, lambda net: torch.nn.functional.mse_loss(net(x), y)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _identical(a: Any, b: Any) -> bool:
    """Bit-identical nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


class _Run:
    """A model, its optimizer and a closure that counts its calls; ``poisoned`` makes every pass NaN."""

    def __init__(self, problem: Problem, opt: ComposedOptimizer):
        (self.model, self.loss), self.opt = problem, opt
        self.calls, self.uncounted, self.poisoned = 0, 0.0, False

    def closure(self, fresh_batch: bool = False) -> torch.Tensor:
        """Accepts ``fresh_batch`` for rules that ask for one; the batch is fixed, so it is the same."""
        self.calls += 1
        self.opt.zero_grad()
        loss = self.loss(self.model)
        if self.poisoned:
            loss = loss * math.nan
        loss.backward()
        return loss

    def step(self) -> Any:
        before = self.calls
        loss = self.opt.step(self.closure)
        self.uncounted = max(self.uncounted, abs(self.calls - before - self.opt.stats["grad_evals"]))
        return loss

    def value(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.model))


class _Bench:
    """Fresh runs of one composition over one base, each seeded alike; remembers them for ``passes``."""

    def __init__(self, composition: Composition, base: str | type[torch.optim.Optimizer], hyperparameters: Mapping[str, Any]):
        self.composition, self.base, self.hyperparameters = composition, base, hyperparameters
        self.runs: list[_Run] = []

    def run(self, problem: Callable[[], Problem] = quadratic) -> _Run:
        torch.manual_seed(0)
        model, loss = problem()
        self.runs.append(_Run((model, loss), self.composition.compose(model.parameters(), self.base, **self.hyperparameters)))
        return self.runs[-1]


def _nonfinite(bench: _Bench, label: str) -> list[Check]:
    """Two steps, a poisoned one, a finite one; against a run of three finite steps."""
    run = bench.run()
    for _ in range(2):
        run.step()
    theta, base_state = _flat(run.model), copy.deepcopy(run.opt.base.state_dict()["state"])
    run.poisoned = True
    run.step()
    run.poisoned = False
    checks = [
        Check.holds("nonfinite", label, run.opt.stats["nonfinite"] == 1.0, "stats['nonfinite'] == 1 on the poisoned step"),
        Check.holds("nonfinite", label, torch.equal(_flat(run.model), theta), "parameters unchanged by the poisoned step"),
        Check.holds("nonfinite", label, _identical(run.opt.base.state_dict()["state"], base_state), "base state unchanged"),
    ]
    run.step()
    twin = bench.run()  # made after the run: its steps draw from the global RNG as the run's did
    for _ in range(3):
        twin.step()
    resumed = run.opt.stats["nonfinite"] == 0.0 and torch.equal(_flat(run.model), _flat(twin.model))
    return [*checks, Check.holds("nonfinite", label, resumed, "the next step = that of a run without the poisoned batch")]


def _state_dict(bench: _Bench, label: str) -> Check:
    """Four steps straight, against two steps, a checkpoint loaded into a fresh optimizer, two steps."""
    run = bench.run()
    for _ in range(2):
        run.step()
    saved = io.BytesIO()
    torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict()}, saved)
    saved.seek(0)
    for _ in range(2):
        run.step()
    checkpoint = torch.load(saved, weights_only=True)
    resumed = bench.run()
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.opt.load_state_dict(checkpoint["opt"])
    for _ in range(2):
        resumed.step()
    return Check.holds("state_dict", label, torch.equal(_flat(resumed.model), _flat(run.model)), "resumed run = uninterrupted run")


def _scheduler(bench: _Bench, label: str, steps: int = 3) -> Check:
    """The ``lr`` in the base's ``param_groups`` each time it steps, under ``StepLR(γ = ½)``."""
    run = bench.run()
    scheduler = torch.optim.lr_scheduler.StepLR(run.opt, step_size=1, gamma=0.5)
    lr, seen = run.opt.param_groups[0]["lr"], []
    base_step = run.opt.base.step

    def spy(*args, **kwargs):
        seen.append(run.opt.base.param_groups[0]["lr"])
        return base_step(*args, **kwargs)

    run.opt.base.step = spy
    for _ in range(steps):
        run.step()
        scheduler.step()
    expected = [lr * 0.5**t for t in range(steps)]
    return Check.holds("scheduler", label, seen == expected, f"lr seen by the base {seen}, scheduled {expected}")


def _descent(bench: _Bench, label: str, steps: int, descent: float) -> list[Check]:
    run = bench.run()
    start = run.value()
    losses = [run.step() for _ in range(steps)]
    finite = all(loss is None or bool(torch.isfinite(torch.as_tensor(loss))) for loss in losses) and bool(_flat(run.model).isfinite().all())
    return [
        Check.holds("finite", label, finite, f"every loss and parameter over {steps} steps"),
        Check.at_most("descent", label, run.value() / start, descent, f"f(θ_N)/f(θ_0) after {steps} steps"),
    ]


def _batchnorm(bench: _Bench, label: str, steps: int = 3) -> Check:
    """The model's BatchNorm buffers after each step, against a twin run forward once at the step's ``θ_t``."""
    run = bench.run(batchnorm_mlp)
    twin = copy.deepcopy(run.model)
    same = True
    for _ in range(steps):
        with torch.no_grad():
            for mine, theirs in zip(twin.parameters(), run.model.parameters()):
                mine.copy_(theirs)
            run.loss(twin)
        run.step()
        same = same and _identical(dict(run.model.named_buffers()), dict(twin.named_buffers()))
    tracked = [int(b) for name, b in run.model.named_buffers() if name.endswith("num_batches_tracked")]
    at_start = bench.composition.rule.first_pass_at_start
    detail = f"running statistics of one pass per step{' at θ_t' if at_start else ''}; num_batches_tracked {tracked} after {steps} steps"
    return Check.holds("batchnorm", label, (same or not at_start) and tracked == [steps], detail)


def check_rule(
    name_or_instance: str | DescentRule,
    *,
    projector: str | Projector | None = None,
    manifold: str | ConstraintManifold | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    bases: Mapping[str, Base] = BASES,
    descent_steps: int = 30,
    descent: float = 0.5,
    raise_on_failure: bool = True,
) -> Report:
    """Run the contract checks (module docstring) on a rule, under the guarded step context
    (:mod:`~nonlocal_opt.testing.public_contract`). The caller's global RNG state is left as it was.

    Args:
        name_or_instance: a registered rule name or a ``DescentRule``.
        projector: the projector of a projecting rule (``None``: its default).
        manifold: the manifold of a projecting rule (``None``: its default).
        hyperparameters: for every composition, on top of the base's own in ``bases``.
        bases: label → (registered name or class, hyperparameters); ``BASES``: ``lr`` 0.5; ``lr`` 0.1 and
            ``momentum`` 0.9; ``lr`` 0.1.
        descent_steps: the steps of the ``descent`` run.
        descent: the largest ``f(θ_N)/f(θ_0)`` allowed.
        raise_on_failure: raise when a check fails.

    Returns:
        The :class:`~nonlocal_opt.testing.reports.Report`.

    Raises:
        AssertionError: with the report, when a check fails and ``raise_on_failure`` is true.
        PrivateMemberError: the rule read a private member of the step context (whatever ``raise_on_failure``).
    """
    composition = Composition.for_rule(name_or_instance, projector, manifold)
    checks: list[Check] = []
    with torch.random.fork_rng(devices=[]):
        for index, (name, (base, base_hyperparameters)) in enumerate(bases.items()):
            bench = _Bench(composition, base, {**base_hyperparameters, **(hyperparameters or {})})
            label = f"base {name}"
            checks += [*_nonfinite(bench, label), _state_dict(bench, label), _scheduler(bench, label)]
            checks += _descent(bench, label, descent_steps, descent)
            if index == 0:
                checks.append(_batchnorm(bench, label))
            uncounted = float(max(run.uncounted for run in bench.runs))
            checks.append(Check.at_most("passes", label, uncounted, 0.0, "closure calls not counted in stats['grad_evals']"))
    report = Report(str(composition), tuple(checks))
    return report.raise_on_failure() if raise_on_failure else report
