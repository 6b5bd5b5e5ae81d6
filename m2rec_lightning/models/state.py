"""Recurrent user states for serving: what an encoder carries from one interaction to the next.

A server keeps one state per user. When the user interacts with a new item it calls
`encoder.step(state, item_ids)` and gets the new state and the hidden vector to score with, in O(1) for the Mamba
encoders (no history is re-read). `encoder.encode_state(input_ids)` builds the state from a whole history at once
(the prefill); `encoder.init_state(batch)` is the state of users with no history yet.

Every state is a tree of dataclasses and lists whose leaves are tensors with the batch (one row per user) in dim 0,
so the helpers below stack, select and pool any of them without knowing its layout. Absent parts are None.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from operator import attrgetter
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
class MultiScaleState:
    """The multi-scale Mamba after t inputs, its S scales stacked in dim 1 so that one step updates them all (see
    multiscale.py for the alignment; scale s's Mamba has read t // s window means).

    window_sum: (B, S, 2·E·D) sum of in_proj of the inputs of each scale's open window (positions t - t % s .. t-1),
        divided by s: in_proj is affine, so once the window completes this is in_proj of its mean, the scale's Mamba
        input.
    window_count: (B, S) how many inputs each open window holds, t % s, in [0, s).
    conv, ssm: (B, S, E·D, d_conv-1) and (B, S, E·D, N), each scale's MambaState.
    output: (B, S, d) each scale's Mamba output on its last complete window, zeros before the first; what the scale
        contributes at every position until its next window completes.
    """

    window_sum: Tensor
    window_count: Tensor
    conv: Tensor
    ssm: Tensor
    output: Tensor


@dataclass
class M2RecBlockState:
    """One M2Rec block: temporal is the multi-scale Mamba's state; fourier is (B, max_len, d) the last max_len block
    inputs, newest first (fourier[:, j] = input t-1-j, zeros before the first input), or None without the Fourier
    stream."""

    temporal: MultiScaleState
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


class StatePool:
    """The states of many users, for a server: one row (a slot) per user in each leaf of one preallocated state, so a
    batch of users is read with one index per leaf and written back with one index_copy_ per leaf (a state kept per
    user costs a select, a cat and a copy per user and leaf instead).

    The caller takes and gives back slots (it decides which users to keep); a slot's rows hold nothing meaningful
    until written. The tensors grow by doubling up to `limit` slots and beyond it only as far as slots are taken, and
    never shrink: given-back slots are reused, so memory follows the most slots held at once.

    Args:
        empty: n -> the state of n users (its layout; any values).
        limit: slots up to which the tensors grow by doubling.
    """

    def __init__(self, empty: Callable[[int], Any], limit: int) -> None:
        self.empty, self.limit = empty, limit
        self.state: Any = None  # leaves (size, ...)
        self.size = 0
        self.free: list[int] = []

    def take(self, n: int) -> list[int]:
        """n free slots."""
        if n > len(self.free):
            self._grow(n - len(self.free))
        taken = self.free[len(self.free) - n:]
        del self.free[len(self.free) - n:]
        return taken

    def give(self, slots: Sequence[int]) -> None:
        self.free.extend(slots)

    def read(self, slots: Tensor) -> Any:
        """The states in these slots, (len(slots), ...) copies."""
        return map_state(lambda t: t.index_select(0, slots), self.state)  # 4x faster than t[slots] for big rows

    def write(self, slots: Tensor, state: Any) -> None:
        """Store a batch of states (len(slots), ...) in these slots."""
        map_state(lambda pool, new: pool.index_copy_(0, slots, new), self.state, state)

    def _grow(self, short: int) -> None:
        size = max(self.size + short, min(2 * self.size, self.limit))
        extra = self.empty(size - self.size)
        self.state = extra if self.state is None else cat_states([self.state, extra])
        self.free.extend(range(size - 1, self.size - 1, -1))  # taken from the end: lowest slots first
        self.size = size


@dataclass
class _Kept:
    dicts: list[dict]  # the parameter and buffer dicts of the source modules and their submodules, listed then
    key: list[int]  # the optimizer-step count, then the address and then the version of every source tensor
    storages: list  # the sources' memory, held so that a replacement never reuses an address in the key
    value: Any


_optimizer_steps = 0  # optimizer steps taken in this process (see step_constant)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# fused and foreach optimizers update parameters without bumping their version counters (fused Adam, which the module
# uses, is one): every step of any optimizer invalidates what step_constant keeps
register_optimizer_step_post_hook(_count_optimizer_step)


def _source_tensors(dicts: list[dict], tensors: Sequence[Tensor]) -> list[Tensor]:
    # the modules' own dicts, not .parameters(): a quarter of the cost, and it sees a parameter replaced by assignment
    return [*tensors, *(t for d in dicts for t in d.values() if t is not None)]


_version = attrgetter("_version")


def _key(tensors: list[Tensor]) -> list[int]:
    # map over the methods: 30% less than a tuple per tensor, at a step's budget of a few µs
    return [_optimizer_steps, *map(Tensor.data_ptr, tensors), *map(_version, tensors)]


def step_constant(owner: nn.Module, name: str, modules: Sequence[nn.Module], tensors: Sequence[Tensor],
                  compute: Callable[[], Any], until_backward: bool = False) -> Any:
    """compute(): what a step needs that depends on parameters only (not on the item), kept on `owner` under `name`
    for the next step. It reads the parameters and buffers of `modules` (and their submodules) and `tensors`, and is
    recomputed when any of them changes: in place (load_state_dict and manual edits bump the tensor's version; an
    optimizer step, fused or not, is counted by a hook) or by replacement (.to(), .double(),
    load_state_dict(assign=True): another storage). Checking costs about 0.2 µs per tensor; the submodules are listed
    when the value is computed. Parameters made under torch.inference_mode have no version to check, so with them
    nothing is kept: compute() runs at every step.

    until_backward: compute() returns a tensor in autograd's graph, shared by every use until a backward has passed
    through it, then recomputed: that backward has freed its graph (and, with gradient accumulation, the next
    forward of the same weights needs a graph of its own). A hook on its gradient marks it spent. A forward with no
    backward leaves it kept, graph and all, for the next."""
    kept = owner.__dict__.get(name)
    if kept is not None:
        try:
            if _key(_source_tensors(kept.dicts, tensors)) == kept.key:
                return kept.value
        except RuntimeError:  # an inference tensor: see below
            pass
    dicts = [d for module in modules for m in module.modules() for d in (m._parameters, m._buffers)]
    sources = _source_tensors(dicts, tensors)
    value = compute()
    try:
        # a plain attribute: not a buffer, so not in the state dict
        kept = _Kept(dicts, _key(sources), [t.untyped_storage() for t in sources], value)
    except RuntimeError:  # "Inference tensors do not track version counter"
        owner.__dict__.pop(name, None)
        return value
    owner.__dict__[name] = kept
    if until_backward and value.requires_grad:
        value.register_hook(_spend(weakref.ref(kept)))
    return value


def _spend(kept: weakref.ref) -> Callable[[Tensor], None]:
    """A gradient hook that makes the kept value match no key and lets it go. The reference is weak: a strong one
    from the value's hook back to its _Kept would be a cycle that holds the value's graph until the garbage collector
    runs."""
    def hook(grad: Tensor) -> None:
        if (spent := kept()) is not None:
            spent.key, spent.value = [], None
    return hook
