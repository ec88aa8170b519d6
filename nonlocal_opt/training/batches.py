"""The order of a run's training batches, reproducible from ``--seed`` and the run's progress alone, so a
resumed run sees exactly the batches the interrupted one would have."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from nonlocal_opt.training.config import ConfigError

FRESH_SEED_OFFSET = 1_000_003  # keeps the fresh-batch stream's shuffles apart from the epoch's


class ShuffledBatches:
    """Two loaders over the training set, each shuffled by its own generator: ``loaders[0]`` gives epoch
    ``e``'s batches (shuffled with seed ``s + e``), ``loaders[1]`` the fresh batches a rule draws with
    ``closure(fresh_batch=True)``. Pass the loaders as ``accelerator.prepare`` returns them to
    :meth:`epoch` and :meth:`fresh`.

    Args:
        train_set: The training set.
        batch_size: The global micro-batch size ``--batch-size``.
        seed: The run's ``--seed``.
        grad_accum: Micro-batches per optimizer step (``--grad-accum``): each batch holds
            ``grad_accum × batch_size`` samples (incomplete last batches are dropped).
    """

    def __init__(self, train_set: Dataset, batch_size: int, seed: int, grad_accum: int = 1):
        self.seed = seed
        step_size = batch_size * grad_accum
        self.shuffle, self.fresh_shuffle = torch.Generator(), torch.Generator()
        self.loaders = [
            DataLoader(train_set, step_size, sampler=RandomSampler(train_set, generator=generator), drop_last=True)
            for generator in (self.shuffle, self.fresh_shuffle)
        ]
        if len(self.loaders[0]) == 0:
            given = f"--batch-size {batch_size}" + (f" x --grad-accum {grad_accum} = {step_size}" if grad_accum > 1 else "")
            raise ConfigError(f"{given} is larger than the {len(train_set)} training samples")

    def epoch(self, loader, epoch: int, start: int, stop: int, rng_state: torch.Tensor | None = None) -> Iterator[Any]:
        """Batches ``start, …, stop - 1`` of epoch ``epoch`` (0-based) from ``loader``.

        Args:
            loader: ``loaders[0]``, prepared.
            epoch: The epoch.
            start: Batches the run already took in this epoch (a resumed run skips them).
            stop: Batches in an epoch.
            rng_state: Set as the CPU RNG state before batch ``start > 0``, as if the batches skipped had
                been drawn before the checkpoint was saved.
        """
        self.shuffle.manual_seed(self.seed + epoch)
        return _slice(loader, start, stop, rng_state)

    def fresh(self, loader, epoch: int, skip: int) -> Iterator[Any]:
        """Endless fresh batches for epoch ``epoch``: pass ``k`` over ``loader`` (``loaders[1]``, prepared) is
        shuffled with seed ``s + FRESH_SEED_OFFSET·(epoch + 1) + k``; the first ``skip`` batches (drawn
        before a checkpoint) are left out."""
        seed = self.seed + FRESH_SEED_OFFSET * (epoch + 1)
        first, rest = divmod(skip, len(loader))
        for k in range(first, 2**62):
            self.fresh_shuffle.manual_seed(seed + k)
            for index, batch in enumerate(loader):
                if k == first and index < rest:
                    continue
                yield batch


def _slice(loader, start: int, stop: int, rng_state: torch.Tensor | None) -> Iterator[Any]:
    for index, batch in enumerate(loader):
        if index < start:
            continue
        if index == stop:
            break
        if start and index == start and rng_state is not None:
            torch.set_rng_state(rng_state)
        yield batch
