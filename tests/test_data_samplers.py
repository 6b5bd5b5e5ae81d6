"""Evaluation samplers count every user exactly once across ranks."""

import pytest
import torch.distributed as dist
from torch.utils.data import DistributedSampler, SequentialSampler

from datamodules import samplers
from datamodules.samplers import UnpaddedDistributedSampler


@pytest.mark.parametrize("size", [0, 1, 2, 5, 7, 10, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_partition_the_indices_without_padding(size, world):
    data = list(range(size))
    parts = [list(UnpaddedDistributedSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == data  # every index once, none repeated
    for rank, part in enumerate(parts):
        assert part == data[rank::world]
        assert len(UnpaddedDistributedSampler(data, num_replicas=world, rank=rank)) == len(part)


def test_torch_default_would_double_count():
    # the failure this sampler exists to avoid: 5 users on 2 ranks -> torch pads to 6
    padded = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert len(padded[0]) + len(padded[1]) == 6


def test_eval_sampler_follows_torch_distributed(monkeypatch):
    data = list(range(9))
    assert isinstance(samplers.eval_sampler(data), SequentialSampler)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    sampler = samplers.eval_sampler(data)
    # a DistributedSampler instance, so Lightning keeps it instead of inserting its padded one
    assert isinstance(sampler, UnpaddedDistributedSampler) and isinstance(sampler, DistributedSampler)
    assert list(sampler) == [2, 6]
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert isinstance(samplers.eval_sampler(data), SequentialSampler)
