"""The M2Rec encoder: multi-scale Mamba, causal Fourier filter and LLM item text, fused per position by a gate.

    e = LayerNorm(Dropout(E_id[x]))                          x: (B, L) right-padded ids, 0 = padding
    P = SemanticProjection(E_text)                           E_text: frozen (N+1, text_dim) buffer, row 0 zeros
    S = P[x]                                                 (B, L, d)
    h = e; per block:
        T = sum_s w_s · Up_s(Mamba_s(Pool_s(h)))             multiscale.py
        F = CausalFourierFilter(h)                           fourier.py
        h = LayerNorm(h + Dropout(gate([T, F, S])))          gate.py (residual="gated": see M2RecBlock)
        h = LayerNorm(h + Dropout(FFN(h)))                   d -> 4d -> d, GELU
    item table = E_id (+ P with text)

P is the text of every item projected once and shared: in training, one P (one set of dropout masks, drawn per item)
serves a step's input stream at every position and its output item table, and both send their gradients into it.
So an item's text dropout is the same wherever it occurs in the step, where projecting per position would draw a
mask per occurrence; in return the step projects N+1 rows instead of N+1 + B·L (see `_training_text`).

Every part can be switched off. scales=[1], fourier=False, semantic=False, residual=False (n_layers=1) is the released
Mamba4Rec: LayerNorm(Dropout(emb)) -> Mamba -> LayerNorm(Dropout(.)) -> FFN with residual + LayerNorm, with no gate
and no scale weights in the path.

Serving (`init_state`, `step`, `encode_state`): every stream is a recurrence or per position, so a user's state (an
M2RecState, models/state.py) is carried forward one item at a time in O(1), and the hidden state after t items equals
forward's at position t. A history longer than max_len is read whole, not cut to its last max_len items: the Mamba
scales read every item, the Fourier filter its last max_len inputs (its kernel has max_len taps), so the result is
forward's on an encoder with a longer max_len whose extra Fourier taps are zero.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.cpu_kernels import BlockStepWeights, m2rec_block_step_cpu, pack_block_step
from ..ops.mamba import Mamba
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
from .fourier import CausalFourierFilter
from .gate import StreamGate
from .multiscale import MultiScaleMamba
from .semantic import SemanticProjection
from .state import M2RecBlockState, M2RecState, MultiScaleState, step_constant


class M2RecBlock(nn.Module):
    """One M2Rec layer: gated temporal / frequency / semantic mixer, then the FFN (see the module docstring).

    Args:
        hidden_size: model width d.
        scales: time scales of the multi-scale Mamba.
        d_state: Mamba SSM state size.
        d_conv: Mamba convolution width.
        expand: Mamba inner width factor.
        dropout: dropout on the mixer output and inside the FFN.
        fourier: add the causal Fourier filter stream.
        semantic: a semantic stream S is passed to `forward`.
        gate: how the streams are fused ("softmax" or "sum"); unused with a single stream.
        residual: residual connection around the mixer. "gated" mixes skip and mixer per position and channel,
            LN(g ⊙ h + (1 - g) ⊙ m) with g = sigmoid(W [h; m] + b) and m = Dropout(mix), so each position can lean on
            its own item (the residual) or on the history (the residual-free block); W ≈ 0, b = 0 at init make it
            start as the plain residual.
        max_len: longest sequence (the Fourier kernel length).
        mamba_backend: Mamba implementation.
    """

    def __init__(
        self,
        hidden_size: int,
        scales: list[int],
        d_state: int,
        d_conv: int,
        expand: int,
        dropout: float,
        fourier: bool,
        semantic: bool,
        gate: Literal["softmax", "sum"],
        residual: bool | Literal["gated"],
        max_len: int,
        mamba_backend: Literal["auto", "torch", "cpu", "cuda", "triton"],
    ) -> None:
        super().__init__()
        self.temporal = MultiScaleMamba(hidden_size, scales, d_state, d_conv, expand, mamba_backend)
        # the block's Dropout after the gate plays the role of FMLP-Rec's filter-output dropout
        self.fourier = CausalFourierFilter(hidden_size, max_len) if fourier else None
        self.semantic = semantic
        n_streams = 1 + fourier + semantic
        self.gate = StreamGate(hidden_size, n_streams, gate) if n_streams > 1 else None
        if residual not in (True, False, "gated"):
            raise ValueError(f"residual must be true, false or 'gated', got {residual!r}")
        self.residual = residual
        # input-dependent: under the LayerNorm that follows, a learned per-channel scale on the skip would mostly
        # duplicate the mixer's output scale
        self.skip_gate = nn.Linear(2 * hidden_size, hidden_size) if residual == "gated" else None
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.ffn = FeedForward(hidden_size, 4 * hidden_size, dropout, layer_norm_eps=1e-12, inner_dropout=True)

    def streams(self, h: Tensor, s: Tensor | None) -> list[Tensor]:
        """[T, F, S] (those switched on), each (B, L, d)."""
        self._check_semantic(s)
        out = [self.temporal(h)]
        if self.fourier is not None:
            out.append(self.fourier(h))
        if s is not None:
            out.append(s)
        return out

    def _check_semantic(self, s: Tensor | None) -> None:
        if self.semantic != (s is not None):
            raise ValueError(f"M2RecBlock built with semantic={self.semantic} got a semantic stream "
                             f"{'tensor' if s is not None else 'of None'}")

    def forward(self, h: Tensor, s: Tensor | None = None) -> Tensor:  # h, s: (B, L, d) -> (B, L, d)
        return self.fuse(h, self.streams(h, s))

    def forward_last(self, h: Tensor, s_last: Tensor | None, index: Tensor) -> Tensor:
        """The block's output at position index[i] of each row: h (B, L, d), s_last (B, d) = the semantic stream at
        those positions, index (B,) -> (B, d). Every stream is formed at the index alone."""
        self._check_semantic(s_last)
        streams = [self.temporal.forward_last(h, index)]
        if self.fourier is not None:
            streams.append(self.fourier.forward_last(h, index))
        if s_last is not None:
            streams.append(s_last)
        h_last = h[torch.arange(h.size(0), device=h.device), index]  # (B, d)
        if not self.training and not torch.is_grad_enabled():  # evaluation: `step`'s form of fuse, with fewer ops
            return self._fuse_step(h_last, streams)
        return self.fuse(h_last, streams)

    def fuse(self, h: Tensor, streams: list[Tensor]) -> Tensor:  # h and each stream (..., d) -> (..., d)
        """Gate, dropout, residual + LayerNorm, then the FFN."""
        mixed = streams[0] if self.gate is None else self.gate(streams)
        mixed = self.dropout(mixed)
        if self.skip_gate is not None:  # a convex mix of skip and mixer instead of their sum
            g = torch.sigmoid(self.skip_gate(torch.cat([h, mixed], dim=-1)))  # (..., d)
            h, mixed = g * h, (1 - g) * mixed
        h = self.norm(h + mixed if self.residual else mixed)
        return self.ffn(h)

    def init_state(self, batch_size: int) -> M2RecBlockState:
        return M2RecBlockState(
            temporal=self.temporal.init_state(batch_size),
            fourier=self.fourier.init_state(batch_size) if self.fourier is not None else None,
        )

    def step(self, state: M2RecBlockState, h: Tensor, s: Tensor | None) -> tuple[M2RecBlockState, Tensor]:
        """One more position: h (B, d) the block's input there, s (B, d) the semantic stream there or None ->
        (new state, (B, d) the block's output there). On the cpu Mamba backend, one call of the compiled step
        (cpu_kernels.m2rec_block_step_cpu); below, the PyTorch reference it is tested against."""
        self._check_semantic(s)
        compiled = self._compiled_step()
        if compiled is not None:
            t = state.temporal
            (*temporal, fourier), out = m2rec_block_step_cpu(compiled, h, s, t.window_sum, t.window_count, t.conv,
                                                              t.ssm, t.output, state.fourier)
            return M2RecBlockState(MultiScaleState(*temporal), fourier), out
        temporal, out = self.temporal.step(state.temporal, h)
        streams, fourier = [out], None
        if self.fourier is not None:
            fourier, out = self.fourier.step(state.fourier, h)
            streams.append(out)
        if s is not None:
            streams.append(s)
        return M2RecBlockState(temporal, fourier), self._fuse_step(h, streams)

    def _fuse_step(self, h: Tensor, streams: list[Tensor]) -> Tensor:  # h and each stream (B, d) -> (B, d)
        """`fuse` in eval mode with fewer ops, for `step`, where each op's dispatch costs more than its arithmetic: the
        gate's concatenation is the stacked streams' flat view and its weighted sum one bmm, and dropout is skipped."""
        if self.gate is None:
            mixed = streams[0]
        elif self.gate.proj is None:
            mixed = sum(streams[1:], streams[0])
        else:
            stacked = torch.stack(streams, dim=1)  # (B, n, d); flattened, the concatenation of the streams
            alpha = F.linear(stacked.flatten(1), self.gate.proj.weight, self.gate.proj.bias).softmax(dim=-1)
            mixed = torch.bmm(alpha[:, None], stacked)[:, 0]  # (B, d)
        if self.skip_gate is not None:
            g = torch.sigmoid(F.linear(torch.cat([h, mixed], dim=-1), self.skip_gate.weight, self.skip_gate.bias))
            h, mixed = g * h, (1 - g) * mixed
        norm, ffn = self.norm, self.ffn
        h = F.layer_norm(h + mixed if self.residual else mixed, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        y = F.linear(F.gelu(F.linear(h, ffn.w_1.weight, ffn.w_1.bias)), ffn.w_2.weight, ffn.w_2.bias)
        return F.layer_norm(h + y, ffn.norm.normalized_shape, ffn.norm.weight, ffn.norm.bias, ffn.norm.eps)

    def _compiled_step(self) -> BlockStepWeights | None:
        """The block's constants for the compiled step, kept until a parameter changes; None where its Mambas' step
        does not run compiled (see step_weights), and then `step` runs in PyTorch."""
        def compute():
            in_proj, in_bias, scales, mix, mambas = self.temporal._step_constants()
            if mambas.compiled is None:
                return None
            gate = None if self.gate is None else self.gate.proj  # the softmax gate's projection
            skip, ffn = self.skip_gate, self.ffn
            return pack_block_step(
                mambas.compiled, scales, self.semantic,
                gate=0 if self.gate is None else 1 if gate is None else 2,
                residual={False: 0, True: 1, "gated": 2}[self.residual], norm_eps=self.norm.eps,
                ffn_norm_eps=ffn.norm.eps, in_proj=in_proj, in_bias=in_bias, mix=mix,
                kernel=None if self.fourier is None else self.fourier.kernel(dtype=in_proj.dtype),
                gate_weight=None if gate is None else gate.weight.T, gate_bias=None if gate is None else gate.bias,
                skip_weight=None if skip is None else skip.weight.T, skip_bias=None if skip is None else skip.bias,
                norm_weight=self.norm.weight, norm_bias=self.norm.bias, w1=ffn.w_1.weight.T, b1=ffn.w_1.bias,
                w2=ffn.w_2.weight.T, b2=ffn.w_2.bias, ffn_norm_weight=ffn.norm.weight, ffn_norm_bias=ffn.norm.bias)

        return step_constant(self, "_compiled_step_kept", [self], [], compute)

    def prefill(self, h: Tensor, s_last: Tensor | None, lengths: Tensor) -> tuple[M2RecBlockState, Tensor]:
        """The state after the first lengths[i] positions of each row and the output at lengths[i] - 1: h (B, L, d)
        the block's inputs (any L), s_last (B, d) the semantic stream at lengths - 1 or None, lengths (B,) in [1, L]
        -> (state, (B, d))."""
        self._check_semantic(s_last)
        temporal, out = self.temporal.prefill(h, lengths)
        streams, fourier = [out], None
        if self.fourier is not None:
            fourier, out = self.fourier.prefill(h, lengths)
            streams.append(out)
        if s_last is not None:
            streams.append(s_last)
        h_last = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, d)
        return M2RecBlockState(temporal, fourier), self.fuse(h_last, streams)

    def forward_unbounded(self, h: Tensor, s: Tensor | None = None) -> Tensor:  # (B, L, d) -> (B, L, d), any L
        """forward for a sequence of any length, a longer one with the Fourier filter on its last max_len inputs
        (CausalFourierFilter.convolve): the block outputs a prefill of a long history feeds to the next block."""
        self._check_semantic(s)
        streams = [self.temporal(h)]
        if self.fourier is not None:
            streams.append(self.fourier.convolve(h))
        if s is not None:
            streams.append(s)
        return self.fuse(h, streams)


class M2RecEncoder(SequenceEncoder):
    """M2Rec sequence encoder: (B, L) right-padded item ids -> (B, L, hidden_size), strictly causal.

    With text (text_dim > 0 and semantic on) the encoder holds the frozen item-text table as the buffer `text_table`
    (N+1, text_dim); fill it with `set_text_table` before use (a forward with an all-zero table raises).

    Args:
        num_items: number of items N (ids 1..N; 0 = padding).
        text_dim: width of the frozen item-text vectors; 0 = no text.
        hidden_size: model width d.
        n_layers: number of M2Rec blocks.
        d_state: Mamba SSM state size.
        d_conv: Mamba causal convolution width.
        expand: Mamba inner width factor.
        dropout: dropout on embeddings, mixer output, FFN and text projection (whose masks are drawn per item and
            training step, not per position: see the module docstring).
        scales: time scales of the multi-scale Mamba (window lengths); [1] = plain Mamba.
        fourier: add the causal Fourier filter stream.
        semantic: add the item-text stream, on the input side and in the output item table (E_id + projected
            text, so items with few interactions still get meaningful scores). None (default) = on exactly when there
            is text (text_dim > 0); True demands text and raises without it, so a config that names the semantic
            branch never silently trains without one; False = off.
        gate: fusion of the streams: "softmax" (one weight per stream and position, summing to 1) or "sum" (plain
            sum, the ablation without a learned gate).
        residual: residual connection around the mixer, h = LN(h + Dropout(mix)). The released Mamba4Rec has none
            when n_layers == 1 (h = LN(Dropout(Mamba(h)))): set False to reproduce it. "gated" = LN(g ⊙ h +
            (1 - g) ⊙ Dropout(mix)) with g = sigmoid(W [h; mix] + b) per position and channel, starting as the plain
            residual (see M2RecBlock).
        max_len: longest input sequence (the Fourier kernel has max_len taps; longer inputs raise).
        mamba_backend: Mamba implementation: "auto" (the mamba_ssm CUDA kernels when installed and on GPU, the
            compiled CPU scan on CPU when g++ builds it, else PyTorch), "torch", "cpu", "cuda" or "triton" (the Triton
            scan; see Mamba).
    """

    def __init__(
        self,
        num_items: int,
        text_dim: int = 0,
        hidden_size: int = 64,
        n_layers: int = 1,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.2,
        scales: list[int] = [1, 2, 4],
        fourier: bool = True,
        semantic: bool | None = None,
        gate: Literal["softmax", "sum"] = "softmax",
        residual: bool | Literal["gated"] = True,
        max_len: int = 50,
        mamba_backend: Literal["auto", "torch", "cpu", "cuda", "triton"] = "auto",
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {text_dim}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if semantic and text_dim == 0:
            raise ValueError(
                "semantic=True needs item text, but text_dim is 0: give the datamodule a text section (data.text) "
                "so its embeddings are linked in, or set semantic: false for the model without the semantic branch"
            )
        if max(scales, default=1) > max_len:
            raise ValueError(f"scales {scales} has a window longer than max_len={max_len}")
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_len = max_len
        use_text = semantic is not False and text_dim > 0

        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        # persistent, so a checkpoint carries the table it was trained with
        self.register_buffer("text_table", torch.zeros(num_items + 1, text_dim) if use_text else None)
        self.semantic = SemanticProjection(text_dim, hidden_size, dropout) if use_text else None
        self._text_checked = False
        self.blocks = nn.ModuleList(
            M2RecBlock(
                hidden_size, scales, d_state, d_conv, expand, dropout, fourier, use_text, gate, residual, max_len,
                mamba_backend,
            )
            for _ in range(n_layers)
        )
        init_recbole_(self, 0.02, skip=(Mamba,))  # RecBole / Mamba4Rec: N(0, 0.02)

    def _check_text_filled(self) -> None:
        # one device sync per encoder instance: a table never filled would silently feed constants
        if self._text_checked:
            return
        if not self.text_table[1:].any():
            raise RuntimeError(
                "M2RecEncoder reads item text but its text_table is all zeros: call set_text_table(table) with the "
                "datamodule's (num_items + 1, text_dim) table first, or build it with semantic=False / text_dim=0"
            )
        self._text_checked = True

    def forward(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, L, d)
        check_ids(input_ids, self.num_items)
        h = self.norm(self.dropout(lookup(self.item_embedding, input_ids)))  # (B, L, d)
        s = self._semantic(input_ids)  # (B, L, d) or None
        for block in self.blocks:
            h = block(h, s)
        return h

    def forward_last(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, d)
        """The hidden state at each row's last real position: all blocks but the last run on every position, the
        last one only at that position (see SequenceEncoder.forward_last)."""
        check_ids(input_ids, self.num_items)
        index = last_positions(input_ids)  # (B,)
        h = self.norm(self.dropout(lookup(self.item_embedding, input_ids)))  # (B, L, d)
        *blocks, last = self.blocks
        s = self._semantic(input_ids) if blocks else None  # (B, L, d): the earlier blocks read every position
        for block in blocks:
            h = block(h, s)
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        s_last = s[rows, index] if s is not None else self._semantic(input_ids[rows, index])  # (B, d) or None
        return last.forward_last(h, s_last, index)

    def _semantic(self, input_ids: Tensor) -> Tensor | None:
        """(...) ids -> (..., d) semantic stream; None without the text stream."""
        if self.semantic is None:
            return None
        self._check_text_filled()
        if self._training_with_grad():
            table = self._training_text()
        elif not self.semantic.training and not torch.is_grad_enabled() and input_ids.numel() > len(self.text_table):
            # evaluation of more positions than items: rows of the projected text of every item, projected once per
            # change of the weights (the table `step` keeps), which costs less than projecting the positions even
            # when the weights change between batches
            table = self._projected_text()
        else:
            rows = self.text_table.index_select(0, input_ids.flatten())  # half the time of text_table[input_ids]
            return self.semantic(rows.view(*input_ids.shape, -1))
        return table.index_select(0, input_ids.flatten()).view(*input_ids.shape, -1)

    def _training_with_grad(self) -> bool:
        return self.semantic.training and torch.is_grad_enabled()

    def _projected_text(self) -> Tensor:  # (N+1, d), recomputed when the text table or the projection changes
        return step_constant(self, "_step_text", [self.semantic], [self.text_table],
                             lambda: self.semantic(self.text_table))

    def _training_text(self) -> Tensor:
        """(N+1, d) P = SemanticProjection(E_text) of a training step, with its dropout masks: what both the input
        stream (rows P[x]) and the output item table (E_id + P) read, so a step projects each item once, not once per
        position too (B·L = 6400 rows through the MLP and their weight gradients at B=32, L=200, beside the table's
        3707 at ML-1M). One P serves every forward until a backward passes through it or the weights change, whichever comes
        first: the module builds the item table before encoding, other callers encode first, and with gradient
        accumulation each forward/backward pair gets its own P."""
        return step_constant(self, "_step_training_text", [self.semantic], [self.text_table],
                             lambda: self.semantic(self.text_table), until_backward=True)

    def item_embeddings(self) -> Tensor:  # (N+1, d)
        table = self.item_embedding.weight
        if self.semantic is None:
            return table
        self._check_text_filled()
        return table + (self._training_text() if self._training_with_grad() else self.semantic(self.text_table))

    def init_state(self, batch_size: int) -> M2RecState:
        return M2RecState([block.init_state(batch_size) for block in self.blocks])

    @torch.no_grad()
    def step(self, state: M2RecState, item_ids: Tensor) -> tuple[M2RecState, Tensor]:
        """Append one item per user, in O(1): item_ids (B,) -> (new state, (B, d)); see SequenceEncoder.step. Layer
        l's input is layer l-1's output at the new item, so no earlier position is read again."""
        check_serving(self)
        check_step_ids(item_ids, self.num_items)
        # rows by index_select and the functional LayerNorm: 4 µs less than the modules at batch 1, a third of the time
        norm = self.norm
        h = F.layer_norm(self.item_embedding.weight.index_select(0, item_ids), norm.normalized_shape, norm.weight,
                         norm.bias, norm.eps)  # (B, d); dropout is off in eval mode
        s = None
        if self.semantic is not None:  # the projected text of every item, once: a step then only looks its row up
            self._check_text_filled()
            s = self._projected_text().index_select(0, item_ids)  # (B, d)
        blocks = []
        for block, block_state in zip(self.blocks, state.blocks):
            block_state, h = block.step(block_state, h, s)
            blocks.append(block_state)
        return M2RecState(blocks), h

    @torch.no_grad()
    def encode_state(self, input_ids: Tensor) -> tuple[M2RecState, Tensor]:
        """Prefill from whole histories of any length, (B, L) right-padded -> (state, (B, d)); see
        SequenceEncoder.encode_state. Every block but the last runs on every position (the next one reads them),
        each Mamba's scan once more to each row's last item for its state."""
        check_serving(self)
        check_ids(input_ids, self.num_items)  # no max_len: the whole history is read
        lengths = history_lengths(input_ids)  # (B,)
        h = self.norm(self.item_embedding(input_ids))  # (B, L, d)
        s = self._semantic(input_ids)  # (B, L, d) or None
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        s_last = s[rows, lengths - 1] if s is not None else None  # (B, d)
        blocks = []
        for i, block in enumerate(self.blocks):
            block_state, hidden = block.prefill(h, s_last, lengths)
            blocks.append(block_state)
            if i + 1 < len(self.blocks):
                h = block.forward_unbounded(h, s)
        return M2RecState(blocks), hidden
