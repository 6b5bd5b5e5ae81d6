"""Projection of frozen LLM item-text embeddings into the model space."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Dropout


class SemanticProjection(nn.Module):
    """Frozen text vector -> parametric whitening -> small MLP -> width d.

    Sentence-embedding spaces are anisotropic (a common offset, a few dominant directions), so, as in UniSRec, the
    vectors are first centred by a learned offset and linearly re-mapped, z = (x - b) W, then passed through a
    GELU MLP: out = W_2 · Dropout(GELU(z)) + b_2.

    Args:
        text_dim: width of the text vectors.
        hidden_size: model width d.
        dropout: dropout on the text vectors (before whitening) and inside the MLP.
    """

    def __init__(self, text_dim: int, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        if text_dim < 1:
            raise ValueError(f"text_dim must be >= 1, got {text_dim}")
        self.offset = nn.Parameter(torch.zeros(text_dim))  # b of the whitening
        self.offset._no_weight_decay = True  # a bias
        self.whiten = nn.Linear(text_dim, hidden_size, bias=False)  # W of the whitening
        self.act = nn.GELU()
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (..., text_dim) -> (..., d)
        # (x - b) W = x W - b W: the text vectors are frozen, so backward skips the (..., text_dim) gradient of the
        # matmul's input that only b's gradient would need; b's goes through the one vector b W, the matmul's bias
        z = F.linear(self.dropout(x), self.whiten.weight, -self.whiten(self.offset))
        return self.out(self.dropout(self.act(z)))
