"""Recurrent user states for serving: what an encoder carries from one interaction to the next.

A server keeps one state per user. When the user interacts with a new item it calls
`encoder.step(state, item_ids)` and gets the new state and the hidden vector to score with, in O(1) for the Mamba
encoders (no history is re-read). `encoder.encode_state(input_ids)` builds the state from a whole history at once
(the prefill); `encoder.init_state(batch)` is the state of users with no history yet.

Every state is a tree of dataclasses and lists whose leaves are tensors with the batch (one row per user) in dim 0,
so the helpers below stack, select, merge and detach any of them without knowing its layout. Absent parts are None.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


@dataclass
class MambaState:
    """One Mamba block after t inputs.

    conv: (B, E·D, d_conv-1) the last d_conv-1 pre-convolution inputs x (the x half of in_proj), oldest first;
        zeros stand for the positions before the first input, as the convolution's zero padding does.
    ssm: (B, E·D, N) the scan state h_{t-1}, float32 (float64 for a float64 model), as the scan runs.
    """

    conv: Tensor
    ssm: Tensor


@dataclass
class PooledScaleState:
    """One scale s > 1 of the multi-scale Mamba after t inputs (see multiscale.py for the alignment).

    window_sum: (B, d) sum of the inputs of the open window (positions t - t % s .. t-1).
    window_count: (B,) how many inputs the open window holds, t % s, in [0, s).
    mamba: the scale's Mamba after the t // s complete windows.
    output: (B, d) that Mamba's output on the last complete window, zeros before the first; what this scale
        contributes at every position until the next window completes.
    """

    window_sum: Tensor
    window_count: Tensor
    mamba: MambaState
    output: Tensor


@dataclass
class M2RecBlockState:
    """One M2Rec block: temporal[i] is scale i's state (MambaState for scale 1, else PooledScaleState); fourier is
    (B, max_len, d) the last max_len block inputs, newest first (fourier[:, j] = input t-1-j, zeros before the first
    input), or None without the Fourier stream."""

    temporal: list[MambaState | PooledScaleState]
    fourier: Tensor | None


@dataclass
class M2RecState:
    """An M2Rec encoder after t items: one state per block."""

    blocks: list[M2RecBlockState]


@dataclass
class SASRecState:
    """A SASRec encoder after t items, as a key/value cache of capacity max_len.

    items: (B, max_len) the last min(t, max_len) item ids, oldest first, 0 after them (for the re-encoding once the
        position table is full).
    length: (B,) how many of them there are, min(t, max_len).
    keys, values: per layer (B, n_heads, max_len, d/n_heads), the attention keys and values of those positions;
        slots at and after `length` are never read.
    """

    items: Tensor
    length: Tensor
    keys: list[Tensor]
    values: list[Tensor]


def map_state(fn: Callable[..., Tensor], state: Any, *others: Any) -> Any:
    """Apply fn leaf by leaf to one state, or to several states of the same layout (fn gets their leaves)."""
    if isinstance(state, Tensor):
        return fn(state, *others)
    if state is None:
        return None
    if isinstance(state, list):
        return [map_state(fn, *parts) for parts in zip(state, *others)]
    if is_dataclass(state):
        return replace(state, **{f.name: map_state(fn, getattr(state, f.name), *(getattr(o, f.name) for o in others))
                                 for f in fields(state)})
    raise TypeError(f"not a state part: {type(state).__name__}")


def select_state(state: Any, rows: Tensor | slice) -> Any:
    """The states of some users: rows indexes the batch dim (a LongTensor, a bool mask or a slice)."""
    return map_state(lambda t: t[rows], state)


def cat_states(states: Sequence[Any]) -> Any:
    """Stack the states of several batches of users (e.g. single users) into one batch, in order."""
    return map_state(lambda *ts: torch.cat(ts), *states)


def where_state(mask: Tensor, a: Any, b: Any) -> Any:
    """Row by row, a where mask (B,) is true, else b."""
    return map_state(lambda x, y: torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, y), a, b)


def detach_state(state: Any) -> Any:
    """A copy to keep per user: detached from autograd and owning its memory (not a view into a batch)."""
    return map_state(lambda t: t.detach().clone(), state)


_optimizer_steps = 0  # optimizer steps taken in this process (see step_constant)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# fused and foreach optimizers update parameters without bumping their version counters (fused Adam, which the module
# uses, is one): every step of any optimizer invalidates what step_constant keeps
register_optimizer_step_post_hook(_count_optimizer_step)


def step_constant(module: nn.Module, name: str, sources: Sequence[Tensor], compute: Callable[[], Tensor]) -> Tensor:
    """compute(), a tensor that depends on the given parameters only (not on the item), kept on the module under
    `name` for the next step. It is recomputed when a source changes: in place (load_state_dict and manual edits bump
    the tensor's version; an optimizer step, fused or not, is counted by a hook) or by replacement (.to(), .double():
    a new storage)."""
    key = (_optimizer_steps, *((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
    kept = module.__dict__.get(name)
    if kept is None or kept[0] != key:
        kept = key, compute()
        module.__dict__[name] = kept  # a plain attribute: not a buffer, so not in the state dict
    return kept[1]
