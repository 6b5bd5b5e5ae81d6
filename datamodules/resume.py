"""Training data order that survives a kill: shuffles that depend only on (seed, epoch), and a loader that
remembers how far into the epoch it got.

Lightning restores model, optimiser, schedulers and loop counters from a checkpoint, but a plain map-style
DataLoader restarts a resumed epoch from its first batch (Lightning then stops early, so the run trains on the
epoch's first batches twice and never on its last ones), and a loader shuffled by one long-lived generator draws
epoch 0's order again in a fresh process. These two classes close both gaps for single-process training; under DDP
Lightning swaps the sampler for a DistributedSampler, whose order is also a function of (seed, epoch).
"""

from __future__ import annotations

from typing import Any, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws: a hash of the pair, so run seeds s and s + 1 do not share their epoch orders
    (with ``seed + epoch``, seed 43's epoch e was seed 42's epoch e + 1)."""
    # SeedSequence takes only non-negative entropy; torch.manual_seed accepts negative seeds, so map them into 64 bits
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0] >> 1)


class EpochRandomSampler(RandomSampler):
    """A random permutation per epoch drawn from ``epoch_seed(seed, epoch)``, so a resumed process draws the same
    order.

    Being a RandomSampler, Lightning still treats the loader as shuffled (and replaces it under DDP).

    Args:
        data_source: the dataset.
        seed: base seed.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch's first batch is drawn."""
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))


class ResumableDataLoader(DataLoader):
    """A DataLoader that saves how many batches of the current epoch it has served (Lightning's stateful-loader
    protocol) and, after ``load_state_dict``, skips that many at the start of the next iteration.

    Lightning checkpoints ``state_dict()`` with the loop state and calls ``load_state_dict`` only when it restarts
    an unfinished epoch. Exact only with a sized loader (Lightning then does not prefetch, so served = trained)
    and a sampler whose order is reproducible for the epoch (see ``EpochRandomSampler``).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"batches_served": getattr(self, "_served", 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skip = int(state_dict["batches_served"])

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        skip, self._skip, self._served = getattr(self, "_skip", 0), 0, 0
        # skipped batches are drawn (so the sampler's order is consumed exactly as before) but not returned
        for _ in range(min(skip, len(self))):
            next(iterator)
            self._served += 1
        for batch in iterator:
            self._served += 1
            yield batch
