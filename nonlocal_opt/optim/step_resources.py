"""What a ``ComposedOptimizer`` lends the :class:`~nonlocal_opt.optim.step_context.StepContext` of each of
its steps: its components, scratch storage kept from step to step, pass counting, the BatchNorm layers
to pause, and the guarded base step. It holds no reference to the optimizer itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from nonlocal_opt.optim.batchnorm import compiled_code_ran, layers_of
from nonlocal_opt.optim.flat_params import FlatParams
from nonlocal_opt.optim.guarded_step import guarded_base_step
from nonlocal_opt.optim.interfaces import ConstraintManifold, DescentRule, Projector

if TYPE_CHECKING:
    from nonlocal_opt.optim.amp import ScaledPasses


class StepResources:
    """The optimizer-owned part of every step, handed to each step's context.

    Args:
        rule: the descent rule.
        projector: the projector (``None`` for a point rule).
        manifold: the constraint manifold (``None`` for a point rule).
        base: the base optimizer, sharing the composed optimizer's ``param_groups``.

    Attributes:
        rule: the descent rule.
        projector: the projector, or ``None``.
        manifold: the constraint manifold, or ``None``.
        base: the base optimizer the guarded step drives.
        components: ``rule``, ``projector`` and ``manifold``, those that are not ``None``.
        zero_grad_calls: how often ``zero_grad`` was called (the optimizer counts): a step tells from it a
            closure that zeroes the gradients from one that adds to those the host left.
        closure_pass: the pass of the step whose closure call runs now (0: the first), ``None`` outside
            closure calls (``nonlocal_opt.first_pass`` reads it).
        scaled_passes: the fp16 loss scale's per-pass unscaling while a ``GradScaler`` steps the optimizer
            (a :class:`~nonlocal_opt.optim.amp.ScaledPasses`), else ``None``.
    """

    def __init__(self, rule: DescentRule, projector: Projector | None, manifold: ConstraintManifold | None,
                 base: torch.optim.Optimizer) -> None:
        self.rule, self.projector, self.manifold, self.base = rule, projector, manifold, base
        self.components = tuple(c for c in (rule, projector, manifold) if c is not None)
        self.zero_grad_calls = 0
        self.closure_pass: int | None = None
        self.scaled_passes: ScaledPasses | None = None
        self._scratch: dict[str, list[torch.Tensor]] = {}
        self._batchnorm: tuple[tuple[int, ...], list] = ((), [])

    def buffers(self, name: str, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors like ``params`` kept under ``name``, made anew when the parameters changed shape or dtype.

        Args:
            name: the key, shared by every component of the optimizer.
            params: the tensors to shape them like.
        """
        kept = self._scratch.get(name)
        if kept is None or [t.shape for t in kept] != [p.shape for p in params] or kept[0].dtype != params[0].dtype:
            kept = self._scratch[name] = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        return kept

    def flat_buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """One tensor kept under ``name``, made anew when its shape, dtype or device change.

        Args:
            name: the key, shared by every component of the optimizer.
            shape: its shape.
            like: a tensor of the dtype and device it takes.
        """
        kept = self._scratch.get(name)
        if kept is None or kept[0].shape != shape or kept[0].dtype != like.dtype or kept[0].device != like.device:
            kept = self._scratch[name] = [like.new_empty(shape)]
        return kept[0]

    def scratch_tensors(self) -> list[torch.Tensor]:
        """Every tensor kept by :meth:`buffers` and :meth:`flat_buffer` (for memory accounting)."""
        return [t for kept in self._scratch.values() for t in kept]

    def batchnorm_layers(self, params: Sequence[torch.Tensor]) -> list:
        """The BatchNorm layers of ``params`` (:func:`~nonlocal_opt.optim.batchnorm.layers_of`), looked up
        again only when the parameters change or compiled code has run since.

        Args:
            params: the parameters the step optimizes.
        """
        key = (*(id(p) for p in params), compiled_code_ran())
        if self._batchnorm[0] != key:
            self._batchnorm = (key, layers_of(params))
        return self._batchnorm[1]

    def base_step(self, param_groups: Sequence[Mapping[str, Any]], flat: FlatParams, finite: torch.Tensor | bool,
                  stats: dict[str, Any], host_reads: bool, spare: Sequence[list[torch.Tensor]] = ()) -> torch.Tensor:
        """The base optimizer's step, guarded: :func:`~nonlocal_opt.optim.guarded_step.guarded_base_step`
        on :attr:`base`.

        Args:
            param_groups: the groups holding ``max_grad_norm``.
            flat: the flat view of the parameters.
            finite: the rule's verdict on its passes.
            stats: the step's stats (``nonfinite`` is set).
            host_reads: whether verdicts may be read on the host.
            spare: lists of one tensor per parameter the step no longer needs.

        Returns:
            "Step taken" as a 0-d bool tensor.
        """
        return guarded_base_step(self.base, param_groups, flat, finite, stats, host_reads, [*spare, *self._copy_buffers(flat, len(spare))])

    def _copy_buffers(self, flat: FlatParams, offered: int) -> list[list[torch.Tensor]]:
        """Buffers kept from step to step for the guarded step's copies (the parameters and each base state
        entry) that the rule's ``offered`` spare vectors do not cover: a fresh copy per step would cost
        page faults on the CPU."""
        entries = {k for p in flat.params for k, v in self.base.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.dim()}
        return [self.buffers(f"guarded.copy{i}", flat.tensors) for i in range(max(0, 1 + len(entries) - offered))]
