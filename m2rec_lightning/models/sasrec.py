"""SASRec, the Transformer baseline, computing the same function as RecBole's SASRec.

    h = Dropout(LayerNorm(E_item[x] + E_pos[0..L-1]))
    per layer:  h = LN(h + Dropout(W_o · MHA(h)))            causal; padding keys masked
                h = LN(h + Dropout(W_2 · GELU(W_1 h)))
    item table = E_item (tied)

Masking follows RecBole: key j is visible to query i iff j <= i and x_j != 0, applied as an additive -10000 (not
-inf), so a query with no visible key (a sequence that starts with padding) averages uniformly instead of producing
NaN. Attention runs in torch's scaled_dot_product_attention.

Serving (`init_state`, `step`, `encode_state`): a key/value cache per layer, so a new item attends to the cached
positions instead of re-encoding them (O(t) per step, not O(1): attention reads every cached key). The cache holds
real items only, so no key is ever masked as padding. The position table has max_len rows, so SASRec reads at most
the last max_len items: once a user's cache holds max_len items, each step re-encodes the window of the last max_len
items (the new one included) from scratch, O(max_len²), and its hidden state is forward's on that window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import (
    Dropout,
    FeedForward,
    SequenceEncoder,
    check_ids,
    check_serving,
    check_step_ids,
    history_lengths,
    init_recbole_,
    last_positions,
    lookup,
)
from .state import SASRecState, map_state


def attention_bias(input_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """RecBole's additive attention mask: 0 where key j <= query i and x_j != 0, else -10000. (B, L) -> (B, 1, L, L)."""
    length = input_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
    visible = causal & (input_ids != 0)[:, None, None, :]  # (B, 1, L, L)
    return torch.zeros(visible.shape, dtype=dtype, device=input_ids.device).masked_fill(~visible, -10000.0)


class SelfAttention(nn.Module):
    """Multi-head self-attention with residual and post-LayerNorm: LN(x + Dropout(W_o · softmax(QK^T/√h + bias) V)).

    Args:
        hidden_size: model width d.
        n_heads: number of heads (must divide d).
        dropout: dropout on the output projection.
        attn_dropout: dropout on the attention probabilities.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, attn_dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = attn_dropout
        self.dropout = Dropout(dropout)  # the CPU-fast dropout M2Rec uses: a fair comparison
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def split_heads(self, proj: nn.Linear, x: Tensor) -> Tensor:  # (B, L, d) -> (B, n_heads, L, d / n_heads)
        return proj(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, queries: Tensor | None = None) -> Tensor:
        """x (B, L, d) attends to itself, bias (B, 1, L, L) -> (B, L, d); or, with `queries` (B, Lq, d) (a subset of
        x's positions) and bias (B, 1, Lq, L), only those queries attend -> (B, Lq, d)."""
        queries = x if queries is None else queries
        q = self.split_heads(self.query, queries)
        k, v = self.split_heads(self.key, x), self.split_heads(self.value, x)
        p = self.attn_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)  # (B, H, Lq, d/H)
        context = context.transpose(1, 2).flatten(2)  # (B, Lq, d)
        return self.norm(queries + self.dropout(self.out(context)))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new position per row against a key/value cache: x (B, d) the layer input at position[i] of row i,
        keys and values (B, n_heads, capacity, d / n_heads) holding positions 0..position[i]-1 -> (keys and values
        with position[i] written, copies; (B, d) the output there). Slots after position[i] are masked."""
        rows = torch.arange(x.size(0), device=x.device)
        keys, values = keys.clone(), values.clone()  # the caller's state stays valid
        keys[rows, :, position] = self.key(x).unflatten(-1, (self.n_heads, -1))  # (B, n_heads, d / n_heads)
        values[rows, :, position] = self.value(x).unflatten(-1, (self.n_heads, -1))
        q = self.split_heads(self.query, x[:, None])  # (B, n_heads, 1, d / n_heads)
        slots = torch.arange(keys.size(2), device=x.device)
        bias = torch.zeros(x.size(0), 1, 1, keys.size(2), dtype=q.dtype, device=x.device)
        bias = bias.masked_fill((slots > position[:, None])[:, None, None, :], -10000.0)  # RecBole's value
        context = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)  # (B, n_heads, 1, d / n_heads)
        return keys, values, self.norm(x + self.out(context.transpose(1, 2).flatten(1)))


class SASRecEncoder(SequenceEncoder):
    """SASRec (Kang & McAuley 2018) as RecBole implements it: (B, L) right-padded ids -> (B, L, d), causal.

    Args:
        num_items: number of items N (ids 1..N; 0 = padding).
        text_dim: accepted so every encoder is built the same way; SASRec uses item ids only.
        hidden_size: model width d.
        n_layers: number of Transformer layers.
        n_heads: attention heads per layer.
        inner_size: FFN hidden width.
        dropout: dropout on embeddings, attention output and FFN output (RecBole's hidden_dropout_prob).
        attn_dropout: dropout on attention probabilities (RecBole's attn_dropout_prob).
        max_len: number of learned positions, the longest input accepted.
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the normal init of embeddings and Linear layers.
    """

    def __init__(
        self,
        num_items: int,
        text_dim: int = 0,
        hidden_size: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        inner_size: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        max_len: int = 50,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)  # the CPU-fast dropout M2Rec uses: a fair comparison
        self.attention = nn.ModuleList(
            SelfAttention(hidden_size, n_heads, dropout, attn_dropout, layer_norm_eps) for _ in range(n_layers)
        )
        self.ffn = nn.ModuleList(
            FeedForward(hidden_size, inner_size, dropout, layer_norm_eps, inner_dropout=False) for _ in range(n_layers)
        )
        init_recbole_(self, initializer_range)

    def forward(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, L, d)
        h, bias = self._embed(input_ids)
        for attention, ffn in zip(self.attention, self.ffn):
            h = ffn(attention(h, bias))
        return h

    def forward_last(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, d)
        """The hidden state at each row's last real position; the last layer attends and runs its FFN for that query
        alone (see SequenceEncoder.forward_last)."""
        h, bias = self._embed(input_ids)
        for attention, ffn in zip(self.attention[:-1], self.ffn[:-1]):
            h = ffn(attention(h, bias))
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        index = last_positions(input_ids)  # (B,)
        query = h[rows, index][:, None]  # (B, 1, d)
        # bias[rows, :, index]: each row's bias row for its query, (B, 1, L) -> (B, 1, 1, L)
        return self.ffn[-1](self.attention[-1](h, bias[rows, :, index][:, :, None], queries=query))[:, 0]

    def _embed(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Input states (B, L, d) and the attention bias (B, 1, L, L)."""
        check_ids(input_ids, self.num_items, self.max_len)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (L,)
        h = lookup(self.item_embedding, input_ids) + self.position_embedding(positions)  # (B, L, d)
        h = self.dropout(self.norm(h))
        return h, attention_bias(input_ids, h.dtype)

    def item_embeddings(self) -> Tensor:  # (N+1, d)
        return self.item_embedding.weight

    def init_state(self, batch_size: int) -> SASRecState:
        w = self.item_embedding.weight
        heads = self.attention[0].n_heads
        cache = [w.new_zeros(batch_size, heads, self.max_len, self.hidden_size // heads) for _ in self.attention]
        return SASRecState(
            items=torch.zeros(batch_size, self.max_len, dtype=torch.long, device=w.device),
            length=torch.zeros(batch_size, dtype=torch.long, device=w.device),
            keys=cache, values=[c.clone() for c in cache],
        )

    @torch.no_grad()
    def step(self, state: SASRecState, item_ids: Tensor) -> tuple[SASRecState, Tensor]:
        """Append one item per user: (B,) -> (new state, (B, d)). Below max_len items the new position attends to the
        cache, equal to forward on the whole sequence; at max_len the user's window of the last max_len items is
        re-encoded (encode_state), equal to forward on that window (see the module docstring)."""
        check_serving(self)
        check_step_ids(item_ids, self.num_items)
        rows = torch.arange(item_ids.size(0), device=item_ids.device)
        full = state.length == self.max_len  # (B,) users whose position table is used up
        position = state.length.clamp(max=self.max_len - 1)  # full rows are recomputed below; stay in bounds
        h = self.norm(self.item_embedding(item_ids) + self.position_embedding(position))  # (B, d); no dropout in eval
        keys, values = [], []
        for attention, ffn, k, v in zip(self.attention, self.ffn, state.keys, state.values):
            k, v, h = attention.step(h, k, v, position)
            h = ffn(h)
            keys.append(k)
            values.append(v)
        items = state.items.clone()
        items[rows, position] = item_ids
        new = SASRecState(items=items, length=position + 1, keys=keys, values=values)
        if full.any():
            refill = full.nonzero().flatten()  # (R,)
            window = torch.cat([state.items[refill, 1:], item_ids[refill, None]], dim=1)  # (R, max_len)
            window_state, window_hidden = self.encode_state(window)
            new = map_state(lambda t, w: t.index_copy(0, refill, w), new, window_state)
            h = h.index_copy(0, refill, window_hidden)
        return new, h

    @torch.no_grad()
    def encode_state(self, input_ids: Tensor) -> tuple[SASRecState, Tensor]:
        """Prefill from (B, L <= max_len) right-padded histories -> (state, (B, d)): forward, keeping every layer's
        keys and values (SASRec cannot read more than max_len items; longer histories raise)."""
        check_serving(self)
        h, bias = self._embed(input_ids)  # checks the ids and L <= max_len
        lengths = history_lengths(input_ids)
        pad = self.max_len - input_ids.size(1)
        keys, values = [], []
        for attention, ffn in zip(self.attention, self.ffn):
            keys.append(F.pad(attention.split_heads(attention.key, h), (0, 0, 0, pad)))  # (B, n_heads, max_len, ·)
            values.append(F.pad(attention.split_heads(attention.value, h), (0, 0, 0, pad)))
            h = ffn(attention(h, bias))
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        state = SASRecState(items=F.pad(input_ids, (0, pad)), length=lengths, keys=keys, values=values)
        return state, h[rows, lengths - 1]
