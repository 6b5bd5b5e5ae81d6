"""Full-ranking metrics computed from the target's rank, keeping only sums (exact and cheap under DDP).

torchmetrics' retrieval metrics keep every score and are far too slow for full ranking over all items, so the rank is
computed here directly and a `torchmetrics.Metric` only accumulates per-K sums and the user count; its `sync` sums them
over processes, so with a sampler that gives every user to exactly one rank the result is exact.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def seen_items(ids: Tensor, num_ids: int) -> Tensor:
    """(B, K) item ids, 0-padded -> (B, num_ids) bool, True at every id in the row (padding column 0 included)."""
    return torch.zeros(ids.size(0), num_ids, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


def mask_scores(scores: Tensor, target: Tensor | None = None, seen: Tensor | None = None) -> Tensor:
    """Return a copy of `scores` with the padding column and (optionally) seen items set to -inf.

    Args:
        scores: (B, N+1) scores over all item ids; column 0 is the padding id and is never ranked.
        target: (B,) target ids. A target that also occurs in `seen` (a repeated purchase) keeps its score, otherwise
            excluding history would make the true answer unrankable.
        seen: (B, H) right-padded ids of items the user interacted with before the target, or None.
    """
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    if seen is not None:
        keep = scores.gather(1, target[:, None]) if target is not None else None
        scores.scatter_(1, seen, float("-inf"))
        scores[:, 0] = float("-inf")  # seen is 0-padded
        if target is not None:
            scores.scatter_(1, target[:, None], keep)
    return scores


def pessimistic_rank(scores: Tensor, target: Tensor) -> Tensor:
    """0-based rank of each target: the number of OTHER items whose score is >= the target's score, or NaN.

    Ties count against the target, so a model that gives every item the same score ranks every target last (its
    metrics are ~0, not 1). Items masked to -inf never beat a finite target score. A NaN score of another item counts
    as beating the target: NaN compares false with everything, so a plain `>=` would quietly rank a broken item below
    the target and inflate the metrics. A non-finite target score raises (a model producing NaN/inf is broken).

    Args:
        scores: (B, N+1) scores with column 0 (padding) already masked to -inf (see `mask_scores`).
        target: (B,) target item ids in 1..N.
    Returns:
        (B,) int64 ranks in 0..N-1.
    """
    if not torch.isfinite(scores.gather(1, target[:, None])).all():
        raise FloatingPointError("non-finite score for a target item: the model produced NaN/inf scores")
    target_score = scores.gather(1, target[:, None])  # (B, 1)
    # `not <` is `>=` except that NaN counts too (against the target); the target itself is counted, hence - 1
    return (~(scores < target_score)).sum(dim=1) - 1


class RankingMetrics(Metric):
    """HR@K, NDCG@K and MRR@K over full rankings, from pessimistic ranks.

    Args:
        ks: cut-offs K.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (5, 10, 20)) -> None:
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        n = len(self.ks)
        self.add_state("hr", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mrr", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        """Args: ranks: (B,) 0-based pessimistic ranks (see `pessimistic_rank`)."""
        ranks = ranks.to(torch.float64)
        ks = torch.tensor(self.ks, dtype=torch.float64, device=ranks.device)[:, None]  # (K, 1)
        hit = ranks[None, :] < ks  # (K, B)
        self.hr += hit.sum(dim=1)
        self.ndcg += torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).sum(dim=1)
        self.mrr += torch.where(hit, 1.0 / (ranks + 1.0), 0.0).sum(dim=1)
        self.count += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise RuntimeError("RankingMetrics.compute() called before any user was scored")
        out = {}
        for i, k in enumerate(self.ks):
            out[f"HR@{k}"] = (self.hr[i] / self.count).float()
            out[f"NDCG@{k}"] = (self.ndcg[i] / self.count).float()
            out[f"MRR@{k}"] = (self.mrr[i] / self.count).float()
        return out
