"""Sampled softmax: an approximate training loss for catalogues where the exact one costs too much time.

The exact loss (`chunked_cross_entropy`) scores every position against all N items: its memory is O(N·d), but its time
grows as B·L·N (about 47 s per step at 10^6 items on one CPU thread). This one scores every position against the
batch's own targets plus `negatives` items drawn per step, so its time grows with B·L·(B·L + negatives). It is a
different objective, an approximation of the full cross-entropy; evaluation and prediction stay the exact full ranking
over all items.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .ops.chunked_softmax import sampled_softmax_loss


class SampledSoftmax(nn.Module):
    """Softmax over in-batch targets and sampled negatives, with the logQ correction.

    Args:
        negatives: items drawn per training step, shared by all positions of the batch.
        proposal: where the negatives come from. "popularity": in proportion to each item's count in the training
            sequences plus one (so every item can be drawn), with log q subtracted from every candidate's logit; the
            in-batch targets arrive at about that rate too, so the correction fits them as well. "uniform": every item
            alike, no correction needed for the draws.
    """

    def __init__(self, negatives: int = 1000, proposal: Literal["popularity", "uniform"] = "popularity") -> None:
        super().__init__()
        if negatives < 1:
            raise ValueError(f"sampled_softmax negatives must be >= 1, got {negatives}")
        if proposal not in ("popularity", "uniform"):
            raise ValueError(f"sampled_softmax proposal must be 'popularity' or 'uniform', got {proposal!r}")
        self.negatives = negatives
        self.proposal = proposal
        # recomputed from the data in every run (the module's setup), so not part of a checkpoint
        self.register_buffer("log_q", None, persistent=False)

    def set_item_counts(self, counts: Tensor) -> None:
        """counts (N+1,): each item id's number of training interactions (index 0, the padding id, is ignored)."""
        if counts.dim() != 1 or counts.numel() < 2 or (counts < 0).any():
            raise ValueError(f"item counts must be (N+1,) non-negative numbers, got shape {tuple(counts.shape)}")
        self.log_q = (counts[1:].double() + 1).log().float()  # (N,): add-one, so no item has probability 0

    def forward(self, hidden: Tensor, table: Tensor, targets: Tensor) -> Tensor:
        """hidden (M, d), table (N+1, d) the whole item table (row 0 = padding, never a candidate), targets (M,) in
        0..N-1 (item id - 1) -> 0-dim mean loss."""
        log_q = None
        if self.proposal == "popularity":
            if self.log_q is None:
                raise RuntimeError("SampledSoftmax(proposal='popularity') has no item counts: the module sets them "
                                   "from the datamodule in setup; outside a Trainer call set_item_counts(counts)")
            if self.log_q.numel() != table.size(0) - 1:
                raise ValueError(f"SampledSoftmax has counts for {self.log_q.numel()} items, the table has "
                                 f"{table.size(0) - 1}")
            log_q = self.log_q.to(hidden.device)
        return sampled_softmax_loss(hidden, table, targets, self.negatives, log_q, first_item=1)
