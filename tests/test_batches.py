"""The batch order a resumed run depends on: skipping the batches already taken leaves the same stream."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import TensorDataset

from nonlocal_opt.training.batches import ShuffledBatches
from nonlocal_opt.training.config import ConfigError

DATA = TensorDataset(torch.arange(10.0))  # 5 batches of 2


def labels(batches) -> list[list[float]]:
    return [batch[0].tolist() for batch in batches]


def test_an_epoch_resumed_at_a_batch_sees_the_rest_of_the_same_epoch():
    batches = ShuffledBatches(DATA, 2, seed=3)
    whole = labels(batches.epoch(batches.loaders[0], epoch=1, start=0, stop=5))
    assert sorted(x for batch in whole for x in batch) == [float(i) for i in range(10)]
    assert labels(batches.epoch(batches.loaders[0], epoch=1, start=2, stop=4)) == whole[2:4]
    assert labels(batches.epoch(batches.loaders[0], epoch=2, start=0, stop=5)) != whole  # another epoch, another order


def test_a_resumed_fresh_stream_continues_where_it_stopped_also_across_passes():
    batches = ShuffledBatches(DATA, 2, seed=3)
    stream = labels(itertools.islice(batches.fresh(batches.loaders[1], epoch=0, skip=0), 12))
    assert labels(itertools.islice(batches.fresh(batches.loaders[1], epoch=0, skip=7), 5)) == stream[7:12]
    assert stream[:5] != stream[5:10]  # pass k is shuffled with its own seed


def test_the_rng_state_is_restored_before_the_first_batch_after_the_skipped_ones():
    batches = ShuffledBatches(DATA, 2, seed=3)
    saved = torch.get_rng_state()
    stream = batches.epoch(batches.loaders[0], epoch=0, start=2, stop=5, rng_state=saved)
    next(stream)
    assert torch.equal(torch.get_rng_state(), saved)


def test_a_batch_larger_than_the_training_set_is_a_config_error():
    with pytest.raises(ConfigError, match="--batch-size 11 is larger than the 10 training samples"):
        ShuffledBatches(DATA, 11, seed=0)
