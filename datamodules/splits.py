"""Leave-one-out datasets over the CSR sequences of preprocess.py.

Each dataset implements ``__getitems__`` (the DataLoader calls it with a whole batch of indices), so a batch is built
with a few numpy gathers instead of one Python call per sample; ``collate`` then only converts to tensors. All
sequences are right-padded with 0, inputs to exactly ``max_len`` columns so every batch has the same shape.

For user u with sequence ``seq`` (oldest first): train part = ``seq[:-2]``, validation target = ``seq[-2]``, test
target = ``seq[-1]``; the test input includes the validation item.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def gather(flat: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows ``flat[start[b]:start[b]+length[b]]`` right-padded with 0 to ``width`` columns.

    Args:
        flat: (n,) int64.
        start: (B,) int64 first position of each row.
        length: (B,) int64 number of items per row (<= width).
        width: number of columns.

    Returns:
        (B, width) int64.
    """
    columns = np.arange(width)
    valid = columns[None, :] < length[:, None]  # B×width
    positions = np.where(valid, start[:, None] + columns[None, :], 0)
    return np.where(valid, flat[positions], 0)


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The datasets already return whole batches; only convert to LongTensors."""
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in batch.items()}


class _Batched(Dataset):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in collate(self.__getitems__([index])).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class TrainSequences(_Batched):
    """``train_mode="all_positions"``: samples of up to ``max_len + 1`` consecutive train items of one user.

    A sample is a window ``s`` of train items: ``input_ids = s[:-1]``, ``target_ids = s[1:]``, both B×max_len,
    right-padded, 0 = no target; ``history`` (B×H, right-padded, H >= 1 the longest in the batch) holds the user's
    train items older than the window, for a model that scores what the user has seen (``seen_scope="history"``).
    Users whose train part has < 2 items give no sample. ``window`` picks the windows:

    - ``recent``: one per user, the most recent ``max_len + 1`` train items.
    - ``random``: one per user, a uniformly drawn contiguous window of that length, redrawn on every access.
    - ``all``: ``ceil((m - 1) / max_len)`` per user with m train items, tiling the user's train targets from the
      most recent back (the first is the ``recent`` window; the oldest may be shorter), so every train target is
      in exactly one sample. Histories longer than ``max_len + 1`` then train every position each epoch, as
      RecBole's prefix augmentation does, at the cost of one sample per ``max_len`` targets rather than one per
      target; a target early in a window sees only the window's items before it.

    Args:
        items: (n,) internal item ids, all users' sequences concatenated.
        offsets: (U+1,) sequence boundaries.
        max_len: input length L.
        window: "recent", "random" or "all".
        seed: seeds the window draws (in DataLoader workers, the worker's own per-epoch seed is mixed in).
    """

    def __init__(self, items: np.ndarray, offsets: np.ndarray, max_len: int,
                 window: Literal["recent", "random", "all"] = "recent", seed: int = 0):
        if window not in ("recent", "random", "all"):
            raise ValueError(f"window must be 'recent', 'random' or 'all', got {window!r}")
        self.items, self.max_len, self.window, self.seed = items, max_len, window, seed
        train_length = np.diff(offsets) - 2
        users = np.flatnonzero(train_length >= 2)
        start, train_length = offsets[users], train_length[users]
        # per sample: its user's first train position and train length, and which window back from the most recent
        per_user = -(-(train_length - 1) // max_len) if window == "all" else np.ones_like(users)
        self.users = np.repeat(users, per_user)
        self.start = np.repeat(start, per_user)
        self.train_length = np.repeat(train_length, per_user)
        self.back = np.arange(len(self.users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        self._generator = torch.Generator().manual_seed(seed)
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.users)

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        start, m = self.start[idx], self.train_length[idx]
        if self.window == "all":
            last_target = m - 1 - self.back[idx] * self.max_len
            n = np.minimum(last_target, self.max_len) + 1
            offset = last_target + 1 - n
        else:
            n = np.minimum(m, self.max_len + 1)  # window length
            if self.window == "random":
                offset = np.floor(self._uniform(len(idx)) * (m - n + 1)).astype(np.int64)
            else:
                offset = m - n
        first = start + offset
        return {
            "input_ids": gather(self.items, first, n - 1, self.max_len),
            "target_ids": gather(self.items, first + 1, n - 1, self.max_len),
            "history": gather(self.items, start, offset, max(int(offset.max()), 1)),
        }

    def _uniform(self, size: int) -> np.ndarray:
        worker = get_worker_info()
        # Each worker process gets a copy of this dataset; reseed from the worker's seed (new every epoch unless the
        # workers are persistent) so workers and epochs draw different windows, reproducibly under a seeded loader.
        if worker is not None and self._worker_seed != worker.seed:
            self._worker_seed = worker.seed
            self._generator.manual_seed((self.seed * 1_000_003 + worker.seed) % 2**63)
        return torch.rand(size, generator=self._generator, dtype=torch.float64).numpy()


class PrefixSequences(_Batched):
    """``train_mode="prefix"`` (RecBole-style augmentation): one sample per train position t >= 1.

    ``input_ids`` = the most recent ``max_len`` train items before t; ``target_ids`` is zero except at the last
    input position, which holds item t; ``history`` = the train items older than the input. Same keys as
    TrainSequences, so the loss code is shared.

    Args:
        items: (n,) internal item ids.
        offsets: (U+1,) sequence boundaries.
        max_len: input length L.
    """

    def __init__(self, items: np.ndarray, offsets: np.ndarray, max_len: int):
        self.items, self.max_len = items, max_len
        train_length = np.maximum(np.diff(offsets) - 2, 0)
        per_user = np.maximum(train_length - 1, 0)  # targets at train positions 1..m-1
        user = np.repeat(np.arange(len(per_user)), per_user)
        first_sample = np.cumsum(per_user) - per_user
        t = np.arange(len(user)) - first_sample[user] + 1
        self.user_start = offsets[:-1][user]
        self.target_position = self.user_start + t  # S

    def __len__(self) -> int:
        return len(self.target_position)

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        end, user_start = self.target_position[idx], self.user_start[idx]
        n = np.minimum(end - user_start, self.max_len)
        targets = np.zeros((len(idx), self.max_len), dtype=np.int64)
        targets[np.arange(len(idx)), n - 1] = self.items[end]
        older = end - n - user_start
        return {"input_ids": gather(self.items, end - n, n, self.max_len), "target_ids": targets,
                "history": gather(self.items, user_start, older, max(int(older.max()), 1))}


class EvalSequences(_Batched):
    """Validation, test or prediction samples: one per user, in user order.

    Keys: ``user`` (B), ``input_ids`` (B×max_len: the most recent items before the target), ``target`` (B; not for
    predict) and ``seen`` (B×H: every item before the target, right-padded, H = longest in the batch). For
    ``split="predict"`` the input and ``seen`` are the full history.

    Args:
        items: (n,) internal item ids.
        offsets: (U+1,) sequence boundaries.
        max_len: input length L.
        split: "val", "test" or "predict".
    """

    def __init__(self, items: np.ndarray, offsets: np.ndarray, max_len: int,
                 split: Literal["val", "test", "predict"]):
        if split not in ("val", "test", "predict"):
            raise ValueError(f"split must be 'val', 'test' or 'predict', got {split!r}")
        self.items, self.max_len, self.split = items, max_len, split
        self.start = offsets[:-1]
        self.end = offsets[1:] - {"val": 2, "test": 1, "predict": 0}[split]  # position of the target

    def __len__(self) -> int:
        return len(self.start)

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        start, end = self.start[idx], self.end[idx]
        history = end - start
        n = np.minimum(history, self.max_len)
        batch = {
            "user": idx,
            "input_ids": gather(self.items, end - n, n, self.max_len),
            "seen": gather(self.items, start, history, int(history.max())),
        }
        if self.split != "predict":
            batch["target"] = self.items[end]
        return batch
