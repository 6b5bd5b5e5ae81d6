"""A distributed sampler for evaluation that never pads, so every user is counted exactly once."""

from __future__ import annotations

from typing import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler, SequentialSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r of W takes indices r, r+W, r+2W, ... in order; no shuffling, no padding, no dropping.

    torch's DistributedSampler (and Lightning's replacement for a plain sampler) pads the index list to a multiple
    of W by repeating users, which double-counts them in evaluation metrics. Ranks may get one sample more or less
    than each other; metrics must therefore be summed (not averaged per rank) across ranks.
    Being a DistributedSampler instance, Lightning leaves it in place.

    Args:
        dataset: the dataset to split.
        num_replicas: world size W (default: from torch.distributed).
        rank: this process's rank (default: from torch.distributed).
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Sized) -> Sampler:
    """UnpaddedDistributedSampler when torch.distributed runs with world size > 1, else sequential."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(dataset)
    return SequentialSampler(dataset)
