"""What every sequence encoder offers the LightningModule, plus the two pieces the encoders share.

An encoder maps right-padded item ids (B, L) to one hidden vector per position (B, L, d) and owns the output-side
item table (N+1, d); the module scores with `hidden @ item_embeddings().T`. It is trained with the next-item loss at
every position, so position t must depend on items 0..t only (strict causality, tested in tests/test_causality.py).
Encoders are constructed as `encoder(num_items, text_dim, **options)`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SequenceEncoder(nn.Module):
    """Base class of the encoders. Subclasses set `hidden_size` and implement `forward` and `item_embeddings`.

    An encoder that reads item text registers a buffer `text_table` of shape (N+1, text_dim); `set_text_table` fills
    it (the module calls it with the datamodule's frozen table before training).
    """

    hidden_size: int

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, L) right-padded item ids, 0 = padding -> (B, L, hidden_size), strictly causal."""
        raise NotImplementedError

    def forward_last(self, input_ids: Tensor) -> Tensor:
        """(B, L) right-padded ids -> (B, hidden_size): the hidden state at each row's last real position (position 0
        for a row of padding only), equal to forward(input_ids) there. Ranking needs only this; encoders override it
        to skip the work that only the other positions need."""
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        return self(input_ids)[rows, last_positions(input_ids)]

    def item_embeddings(self) -> Tensor:
        """The output-side item table (N+1, hidden_size); row 0 is the padding id and is never a candidate."""
        raise NotImplementedError

    @property
    def uses_text(self) -> bool:
        """Whether this encoder reads the item-text table (and so needs `set_text_table`)."""
        return getattr(self, "text_table", None) is not None

    @torch.no_grad()
    def set_text_table(self, table: Tensor) -> None:
        """Copy the frozen item-text table (N+1, text_dim) into the `text_table` buffer; row 0 (padding) must be 0."""
        if not self.uses_text:
            raise ValueError(
                f"{type(self).__name__} does not read item text (text_dim=0 or its semantic stream is off); "
                "it has no text_table to fill"
            )
        expected = tuple(self.text_table.shape)
        if tuple(table.shape) != expected:
            raise ValueError(
                f"text table has shape {tuple(table.shape)}, expected {expected} = (num_items + 1, text_dim) "
                "with row 0 for the padding id"
            )
        if not torch.isfinite(table).all():
            bad = (~torch.isfinite(table)).any(dim=1).nonzero().flatten()[:5].tolist()
            raise ValueError(f"text table has non-finite values in rows {bad} (first 5 shown)")
        if table[0].abs().sum() != 0:
            raise ValueError("text table row 0 belongs to the padding id and must be all zeros")
        self.text_table.copy_(table)

    # Serving: a recurrent state per user (models/state.py). Eval mode only: dropout would make the state differ from
    # what forward computes.

    def init_state(self, batch_size: int) -> Any:
        """The state of batch_size users with no history yet (a tree of tensors with the batch in dim 0)."""
        raise NotImplementedError

    def step(self, state: Any, item_ids: Tensor) -> tuple[Any, Tensor]:
        """Append one item per user: state, item_ids (B,) in [1, N] -> (new state, (B, hidden_size) hidden state at
        the new item), equal to forward on each user's whole sequence at its last position. The old state is left
        unchanged."""
        raise NotImplementedError

    def encode_state(self, input_ids: Tensor) -> tuple[Any, Tensor]:
        """Prefill: (B, L) right-padded histories, each with at least one item -> (state after each row's items,
        (B, hidden_size) hidden state at its last item), as many `step`s from `init_state` would give."""
        raise NotImplementedError


def check_serving(encoder: nn.Module) -> None:
    """Raise unless the encoder is in eval mode, which step and encode_state need."""
    if encoder.training:
        raise RuntimeError(f"{type(encoder).__name__}.step / encode_state run in eval mode only (with dropout the state "
                           "would not be the forward's): call encoder.eval() first")


def check_step_ids(item_ids: Tensor, num_items: int) -> None:
    """Raise a ValueError unless item_ids is (B,) with real ids in [1, num_items] (no padding)."""
    if item_ids.dim() != 1 or item_ids.dtype.is_floating_point:
        raise ValueError(f"item_ids must be (batch,) integers, got shape {tuple(item_ids.shape)} {item_ids.dtype}")
    if item_ids.numel():
        low, high = torch.stack(torch.aminmax(item_ids)).tolist()
        if low < 1 or high > num_items:
            raise ValueError(f"step item ids must lie in [1, {num_items}] (no padding), got ids in [{low}, {high}]")


def history_lengths(input_ids: Tensor) -> Tensor:
    """(B, L) right-padded histories -> (B,) their lengths; raise unless every row is right-padded and non-empty."""
    real = input_ids > 0
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("encode_state needs right-padded histories (items first, then 0s); got an item after padding")
    lengths = real.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("encode_state got a history with no item; use init_state for users without history")
    return lengths


def last_positions(input_ids: Tensor) -> Tensor:
    """(B, L) right-padded ids -> (B,) index of each row's last real item (0 for a row of padding only)."""
    return (input_ids > 0).sum(dim=1).clamp(min=1) - 1


def lookup(embedding: nn.Embedding, ids: Tensor) -> Tensor:
    """embedding(ids), with a sparse gradient: its B·L rows are added in place into the (N+1, d) gradient that the
    loss gives the same (tied) item table, instead of making a second (N+1, d) tensor of mostly zeros (256 MB at 10^6
    items, d=64). Not nn.Embedding(sparse=True): DDP would then expect the parameter's whole gradient to be sparse."""
    return F.embedding(ids, embedding.weight, embedding.padding_idx, sparse=True)


def check_ids(input_ids: Tensor, num_items: int, max_len: int | None = None) -> None:
    """Raise a ValueError unless input_ids is (B, L) with ids in [0, num_items] and, if given, L <= max_len."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_len is not None and input_ids.size(1) > max_len:
        raise ValueError(f"input length {input_ids.size(1)} exceeds the encoder's max_len={max_len}")
    if input_ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync
    if low < 0 or high > num_items:
        raise ValueError(f"item ids must lie in [0, {num_items}] (0 = padding), got ids in [{low}, {high}]")


class Dropout(nn.Dropout):
    """nn.Dropout with its CPU mask drawn as uniform >= p: the same law (each element kept independently with
    probability 1 - p, up to float32 rounding of p), about twice as fast. On CPUs other than Intel's, ATen's
    bernoulli_ skips MKL and draws each element on its own (~10 ns per element on the AMD EPYC of
    benchmarks/results/throughput.md, against ~3.3 for uniform_); forward and backward together, 4.5 against 10 ns.
    Other devices use nn.Dropout (a fused kernel there)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p in (0, 1) or x.device.type != "cpu":
            return super().forward(x)
        # float32 uniforms whatever x's dtype: a bfloat16 uniform has 8 bits, too coarse for p
        keep = torch.rand(x.shape, device=x.device).ge_(self.p).div_(1 - self.p).to(x.dtype)  # 0 or 1/(1-p)
        if x.requires_grad and torch.is_grad_enabled():
            return x * keep  # autograd keeps the mask for backward
        return keep.mul_(x)  # e.g. the frozen text vectors: the result in the mask's memory, no new tensor


class FeedForward(nn.Module):
    """Position-wise FFN with residual and post-LayerNorm: LN(x + Dropout(W2 · [Dropout] GELU(W1 x))).

    Args:
        hidden_size: model width d.
        inner_size: width of the hidden layer.
        dropout: dropout on the FFN output (and after the activation when `inner_dropout`).
        layer_norm_eps: LayerNorm epsilon.
        inner_dropout: also drop after the activation, as Mamba4Rec's FFN does (RecBole's SASRec FFN does not).
    """

    def __init__(
        self, hidden_size: int, inner_size: int, dropout: float, layer_norm_eps: float = 1e-12, inner_dropout: bool = True
    ) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.act = nn.GELU()  # exact (erf) GELU, as RecBole's "gelu"
        self.dropout = nn.Dropout(dropout)
        self.inner_dropout = inner_dropout
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        y = self.act(self.w_1(x))  # (B, L, inner)
        if self.inner_dropout:
            y = self.dropout(y)
        y = self.dropout(self.w_2(y))  # (B, L, d)
        return self.norm(x + y)


@torch.no_grad()
def init_recbole_(module: nn.Module, std: float, skip: tuple[type[nn.Module], ...] = ()) -> None:
    """RecBole/Mamba4Rec initialisation, in place: Linear and Embedding weights ~ N(0, std), Linear biases 0,
    LayerNorm weight 1 and bias 0. Does not descend into modules of a `skip` type (they keep their own init)."""
    if isinstance(module, skip):
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    for child in module.children():
        init_recbole_(child, std, skip)
