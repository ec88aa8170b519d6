"""Radius schedules: decay the ball's radius ``ρ`` (the ``rho`` of every param group) over training.

"Explore early, exploit later" (RBO preprint Sec. 5.2): a large ``ρ`` crosses small valleys, a small
``ρ`` converges. With ``couple_lr=True`` the learning rate follows the radius, ``η_t = η_0 ρ_t/ρ_0``
(the RBO paper's Fig. 5 sweeps ``η ∝ ρ``); do not combine that with an LR scheduler, which would
fight over ``lr``. Used like a torch LR scheduler::

    sched = CosineRadius(opt, total_steps=1000, rho_final=0.1)   # writes ρ(0) = ρ_0
    for batch in loader:
        opt.step(closure)
        sched.step()                                             # writes ρ(t + 1)

``ρ`` stays at ``ρ_final`` after ``total_steps``. Any schedule works on any optimizer whose param
groups carry ``rho`` (``rbo``, ``sam``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nonlocal_opt.optim.hyperparameters import positive_int


def rho_final_problem(optimizer: torch.optim.Optimizer, rho_final: Any, geometric: bool = False) -> str | None:
    """What is wrong with ``ρ_final`` for a schedule over ``optimizer``'s param groups, as a phrase that
    follows the value (``None``: nothing): a finite number ``>= 0`` that the composition accepts as a ``ρ``,
    at most every group's initial ``ρ_0`` (a schedule decays ``ρ``), and ``> 0`` for a ``geometric`` one.
    The one rule for ``ρ_final``: schedules, ``nonlocal-opt train`` and ``nonlocal-opt compare`` all ask it.

    Args:
        optimizer: an optimizer whose param groups carry ``rho`` (``ρ_0``).
        rho_final: the proposed ``ρ_final``.
        geometric: the schedule decays geometrically (``ρ_t = ρ_0 (ρ_final/ρ_0)^s``).
    """
    if isinstance(rho_final, bool) or not isinstance(rho_final, (int, float)) or not math.isfinite(rho_final) or rho_final < 0:
        return "must be a finite number >= 0"
    specs = getattr(optimizer, "hyperparameter_specs", {})
    problem = specs["rho"].check(rho_final) if "rho" in specs else None
    if problem is not None:
        return problem
    rhos = [float(group["rho"]) for group in optimizer.param_groups if "rho" in group]
    if rhos and rho_final > min(rhos):
        return (f"is larger than the initial radius {min(rhos):g}: a radius schedule decays rho; "
                f"choose a rho_final of at most {min(rhos):g}")
    if geometric and (rho_final == 0 or any(rho <= 0 for rho in rhos)):
        return "cannot be reached geometrically: the step schedule needs rho > 0 and rho_final > 0"
    return None


class RadiusScheduler:
    """Writes ``group['rho'] = ρ_t`` (and ``group['lr'] = η_0 ρ_t/ρ_0`` when ``couple_lr``) at step ``t``.

    Subclasses implement :meth:`radius`: ``ρ_t`` from ``ρ_0`` (the group's value at construction),
    ``ρ_final`` and the progress ``t``; ``geometric`` ones need ``ρ_0, ρ_final > 0``.

    Args:
        optimizer: an optimizer whose param groups carry ``rho``.
        total_steps: ``T``, the steps (or passes) over which ``ρ`` decays.
        rho_final: ``ρ_final``, see :func:`rho_final_problem`.
        couple_lr: also write ``η_t = η_0 ρ_t/ρ_0``.
    """

    geometric: bool = False

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, rho_final: float, couple_lr: bool = False):
        if positive_int(total_steps) is not None:
            raise ValueError(f"total_steps must be an integer >= 1 (the number of optimizer steps), got {total_steps!r}")
        groups = optimizer.param_groups
        if any("rho" not in group for group in groups):
            raise ValueError("the optimizer has no 'rho' in its param groups: radius schedules need a radius (rbo or sam)")
        if couple_lr and any("lr" not in group for group in groups):
            raise ValueError("couple_lr=True needs an 'lr' in every param group")
        problem = rho_final_problem(optimizer, rho_final, geometric=self.geometric)
        if problem is not None:
            raise ValueError(f"rho_final={rho_final!r} {problem}")
        self.optimizer = optimizer
        self.total_steps, self.rho_final, self.couple_lr = total_steps, float(rho_final), couple_lr
        self.base_rhos = [float(group["rho"]) for group in groups]
        self.base_lrs = [float(group["lr"]) for group in groups] if couple_lr else []
        if couple_lr and 0.0 in self.base_rhos:
            raise ValueError("couple_lr=True needs an initial rho > 0 (η_t = η_0 ρ_t/ρ_0)")
        self.last_step = 0
        self._apply()

    def progress(self, step: int) -> float:
        """``s = min(t/T, 1)``.

        Args:
            step: ``t``, the units of ``T`` taken so far.
        """
        return min(step / self.total_steps, 1.0)

    def radius(self, rho0: float, step: int) -> float:
        """``ρ_t``, which each schedule defines.

        Args:
            rho0: ``ρ_0``, the group's radius when the schedule was made.
            step: ``t``.
        """
        raise NotImplementedError

    def _apply(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            rho0 = self.base_rhos[index]
            group["rho"] = self.radius(rho0, self.last_step)
            if self.couple_lr:
                group["lr"] = self.base_lrs[index] * group["rho"] / rho0

    def step(self, steps: int = 1) -> None:
        """Advance ``steps`` units of ``T`` (one optimizer step by default; a budget counted in passes advances
        by a step's passes) and write the new ``ρ`` (call after ``optimizer.step()``).

        Args:
            steps: the units of ``T`` to advance.
        """
        self.last_step += steps
        self._apply()

    def get_last_rho(self) -> list[float]:
        return [group["rho"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (like ``torch.optim.lr_scheduler``)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and write its current ``ρ`` (and coupled ``lr``) into the param groups.

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.__dict__.update(state)
        self._apply()


class CosineRadius(RadiusScheduler):
    """``ρ_t = ρ_f + (ρ_0 − ρ_f)(1 + cos(π s))/2``, ``s = min(t/T, 1)``."""

    def radius(self, rho0, step):
        return self.rho_final + (rho0 - self.rho_final) * (1 + math.cos(math.pi * self.progress(step))) / 2


class LinearRadius(RadiusScheduler):
    """``ρ_t = ρ_0 + (ρ_f − ρ_0) s``, ``s = min(t/T, 1)``."""

    def radius(self, rho0, step):
        return rho0 + (self.rho_final - rho0) * self.progress(step)


class StepRadius(RadiusScheduler):
    """Geometric steps: ``ρ_t = ρ_0 (ρ_f/ρ_0)^{k/n}``, ``k = min(⌊(n + 1) t/T⌋, n)``: ``n = drops``
    equal drops at ``t = T/(n+1), …, nT/(n+1)`` (needs ``ρ_0, ρ_f > 0``).

    Args:
        optimizer: an optimizer whose param groups carry ``rho``.
        total_steps: ``T``.
        rho_final: ``ρ_f``.
        couple_lr: scale each group's ``lr`` with ``ρ_t/ρ_0``.
        drops: ``n``, the number of drops.
    """

    geometric = True

    def __init__(self, optimizer, total_steps, rho_final, couple_lr=False, drops: int = 3):
        if positive_int(drops) is not None:
            raise ValueError(f"drops must be an integer >= 1, got {drops!r}")
        self.drops = drops
        super().__init__(optimizer, total_steps, rho_final, couple_lr)

    def radius(self, rho0, step):
        k = min((self.drops + 1) * min(step, self.total_steps) // self.total_steps, self.drops)
        return rho0 * (self.rho_final / rho0) ** (k / self.drops)


SCHEDULES: dict[str, type[RadiusScheduler]] = {"cosine": CosineRadius, "linear": LinearRadius, "step": StepRadius}


def radius_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, rho_final: float, couple_lr: bool = False
) -> RadiusScheduler:
    """The schedule ``name`` in ``SCHEDULES``; unknown names raise ``ValueError`` listing them.

    Args:
        name: ``"cosine"``, ``"linear"`` or ``"step"``.
        optimizer: an optimizer whose param groups carry ``rho``.
        total_steps: ``T``.
        rho_final: ``ρ_final``.
        couple_lr: also write ``η_t = η_0 ρ_t/ρ_0``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown radius schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](optimizer, total_steps, rho_final, couple_lr)
