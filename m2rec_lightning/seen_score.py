"""The learned seen-item score: one scalar added to the score of every item the user already had.

It is a score, not a mask: evaluation stays the unmasked full ranking, and the model learns from the data whether users
come back to items (a positive score) or not (a negative one). Rows that use it behave like masking the user's past
items, so compare them only with baselines that use it too.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .metrics import seen_items
from .ops.chunked_softmax import chunked_cross_entropy


class SeenItemScore(nn.Module):
    """Adds `weight` (a learned scalar, zero at the start, never weight-decayed) to the scores of seen items.

    Args:
        scope: which items count as seen. "input": the items of the model's input window (up to each position in
            training). "history": also the user's items older than the window (training batches carry them as
            `history`, evaluation batches as `seen`); such a model reads more than its max_len input, so report it apart.
        detach: fit the score on detached item scores, so the encoder's loss stays the plain cross-entropy and seen
            items remain its negatives; the loss is then the sum of the two cross-entropies.
        lr: the score's own learning rate (None: the module's). Adam moves one scalar by about its learning rate per
            step, so at the model's rate it may need more steps than a fit has to reach where the data puts it.
    """

    def __init__(self, scope: Literal["input", "history"] = "input", detach: bool = False,
                 lr: float | None = None) -> None:
        super().__init__()
        if scope not in ("input", "history"):
            raise ValueError(f"seen_score scope must be 'input' or 'history', got {scope!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"seen_score lr must be > 0 (or None for the module's), got {lr}")
        self.scope = scope
        self.detach = detach
        self.lr = lr
        self.weight = nn.Parameter(torch.zeros(()))

    def seen_ids(self, input_ids: Tensor, history: Tensor | None, rows: Tensor | None = None,
                 positions: Tensor | None = None) -> Tensor:
        """The item ids each row has seen, 0-padded, repeats allowed: (R, K), never an (R, N) mask.

        input_ids (B, L) right-padded; history (B, H) 0-padded, the user's other items (needed by scope "history").
        Without `rows` R = B and the whole input counts. With rows and positions (M,) each (as from
        `mask.nonzero(as_tuple=True)`), R = M and row m counts the input of sequence rows[m] up to positions[m]."""
        if self.scope == "history" and history is None:
            raise ValueError("seen_score scope 'history' needs each sequence's earlier items: training batches carry "
                             "them as 'history' and evaluation batches as 'seen'")
        if rows is not None:
            upto = torch.arange(input_ids.size(1), device=input_ids.device) <= positions[:, None]  # (M, L)
            input_ids, history = input_ids[rows] * upto, None if history is None else history[rows]
        return torch.cat([input_ids, history], dim=1) if self.scope == "history" else input_ids

    def forward(self, scores: Tensor, seen: Tensor) -> Tensor:  # (R, N+1) scores, (R, K) seen ids -> (R, N+1)
        return scores + self.weight * seen_items(seen, scores.size(1))

    def cross_entropy(self, hidden: Tensor, table: Tensor, targets: Tensor, seen: Tensor,
                      label_smoothing: float) -> Tensor:
        """The training loss with the score, in item chunks: hidden (M, d), table (N+1, d) the whole item table (row
        0 = padding, never a candidate), targets (M,) in 0..N-1 (item id - 1), seen (M, K) item ids (0 = padding)."""
        seen = seen - 1  # candidate indices; padding becomes -1, which no chunk holds
        if not self.detach:
            return chunked_cross_entropy(hidden, table, targets, label_smoothing, seen, self.weight, first_item=1)
        # not label-smoothed: smoothing would hold the score where seen items get the smoothing floor
        return (chunked_cross_entropy(hidden, table, targets, label_smoothing, first_item=1)
                + chunked_cross_entropy(hidden.detach(), table.detach(), targets, 0.0, seen, self.weight,
                                        first_item=1))

    def param_group(self) -> dict:
        """The optimiser group of the score: no weight decay, its own learning rate when `lr` is set."""
        group = {"params": [self.weight], "weight_decay": 0.0}
        return group if self.lr is None else {**group, "lr": self.lr}
