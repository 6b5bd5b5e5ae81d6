"""The preprocessing protocol (DESIGN.md §2), vectorised: duplicates -> stable time sort -> k-core -> short users ->
id remap. The result is one CSR-style array of item sequences; leave-one-out splits are views of it (splits.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

MIN_SPLITTABLE = 3  # leave-one-out needs at least one train item, a validation target and a test target


class EmptyDataError(ValueError):
    """No interactions were read, or none is left after filtering (the data or the filter settings need fixing)."""


@dataclass
class Interactions:
    """Raw interactions in file order, as a reader returns them.

    Args:
        users: (n,) raw user ids (int64 or str).
        items: (n,) raw item ids (int64 or str).
        timestamps: (n,) int64 or float64, or None when the file order is the time order.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None
    notes: dict = field(default_factory=dict)  # reader-side counts (e.g. lines skipped by a documented rule)

    def __post_init__(self):
        self.users, self.items = np.asarray(self.users), np.asarray(self.items)
        if self.timestamps is not None:
            self.timestamps = np.asarray(self.timestamps)
        lengths = {len(self.users), len(self.items)}
        if self.timestamps is not None:
            lengths.add(len(self.timestamps))
        if len(lengths) != 1:
            raise ValueError(f"users, items and timestamps differ in length: {lengths}")


@dataclass
class Processed:
    """Filtered, time-ordered sequences with contiguous ids.

    Args:
        offsets: (U+1,) int64; user u's interactions are ``items[offsets[u]:offsets[u+1]]``, oldest first.
        items: (n,) int64 internal item ids in 1..N.
        timestamps: (n,) aligned with ``items``, or None.
        user_ids: (U,) raw id of each internal user index.
        item_ids: (N+1,) raw id of each internal item id; entry 0 is a padding placeholder ("" or -1).
        stats: counts of what each step kept and removed.
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    user_ids: np.ndarray
    item_ids: np.ndarray
    stats: dict


def preprocess(
    interactions: Interactions,
    min_user_interactions: int = 5,
    min_item_interactions: int = 5,
    drop_duplicates: bool = False,
    tie_order: Literal["file", "shuffle"] = "file",
) -> Processed:
    """Apply the protocol.

    Args:
        interactions: raw interactions in file order.
        min_user_interactions: iterative k-core threshold for users (0 disables).
        min_item_interactions: iterative k-core threshold for items (0 disables).
        drop_duplicates: drop repeated (user, item, timestamp) rows, keeping the first; without timestamps a
            duplicate is a repeated (user, item) pair. Duplicates are counted either way.
        tie_order: the order of one user's interactions sharing a timestamp. ``file``: as in the file (RecBole's
            rule, behind the published numbers). ``shuffle``: a fixed pseudo-random order (the same in every run),
            for files whose own order inside a timestamp is informative (ML-1M's; ``experiments/tie_order.py``).

    Returns:
        Processed sequences. Users are numbered by first appearance in the file; items by first appearance when
        reading the sequences user by user, oldest first (so an already-contiguous file keeps its ids).
    """
    n_raw = len(interactions.users)
    if n_raw == 0:
        raise EmptyDataError("no interactions were read")
    users, raw_users = pd.factorize(interactions.users)
    items, raw_items = pd.factorize(interactions.items)
    times = interactions.timestamps
    stats: dict = {
        "raw_interactions": n_raw,
        "raw_users": len(raw_users),
        "raw_items": len(raw_items),
        "has_timestamps": times is not None,
        "reader": dict(interactions.notes),
    }

    key = {"u": users, "i": items} | ({"t": times} if times is not None else {})
    duplicated = pd.DataFrame(key).duplicated().to_numpy()
    stats["duplicates"] = int(duplicated.sum())
    stats["duplicates_dropped"] = int(duplicated.sum()) if drop_duplicates else 0
    if drop_duplicates and duplicated.any():
        users, items, times = _select(~duplicated, users, items, times)

    if tie_order not in ("file", "shuffle"):
        raise ValueError(f"tie_order must be 'file' or 'shuffle', got {tie_order!r}")
    if tie_order == "shuffle" and times is None:
        raise ValueError("tie_order='shuffle' needs timestamps; without them the file order is the time order")
    stats["tie_order"] = tie_order
    order = time_order(users, times, tie_order)
    users, items = users[order], items[order]
    times = times[order] if times is not None else None

    rounds: list[dict] = []
    if min_user_interactions > 0 or min_item_interactions > 0:
        users, items, times, rounds = kcore(users, items, times, len(raw_users), len(raw_items),
                                            min_user_interactions, min_item_interactions)
    stats["kcore"] = {"min_user_interactions": min_user_interactions,
                      "min_item_interactions": min_item_interactions, "rounds": rounds}

    length = np.bincount(users, minlength=len(raw_users))
    short = length[users] < MIN_SPLITTABLE
    stats["short_users_removed"] = int(((length > 0) & (length < MIN_SPLITTABLE)).sum())
    stats["short_user_interactions_removed"] = int(short.sum())
    if short.any():
        users, items, times = _select(~short, users, items, times)
    if len(users) == 0:
        raise EmptyDataError(
            f"no user has >= {MIN_SPLITTABLE} interactions after filtering: {stats['raw_interactions']} interactions of "
            f"{stats['raw_users']} users read; lower min_user_interactions / min_item_interactions (now "
            f"{min_user_interactions} / {min_item_interactions})")

    # users are sorted by first-appearance code, so dense ranks keep that order
    kept_users, user_index = np.unique(users, return_inverse=True)
    item_codes, kept_items = pd.factorize(items)
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_index, minlength=len(kept_users)), out=offsets[1:])
    user_ids = _id_array(raw_users, kept_users)
    item_ids = _id_array(raw_items, np.asarray(kept_items), pad=True)
    processed = Processed(
        offsets=offsets,
        items=item_codes.astype(np.int64) + 1,
        timestamps=times,
        user_ids=user_ids,
        item_ids=item_ids,
        stats=stats,
    )
    stats.update(sequence_stats(offsets, len(item_ids) - 1))
    if times is not None:
        stats.update(tie_stats(offsets, times))
    return processed


def time_order(users: np.ndarray, times: np.ndarray | None, tie_order: str = "file") -> np.ndarray:
    """Row order sorting by (user, time); rows sharing both keep file order (RecBole's rule) or, with ``shuffle``, a
    fixed pseudo-random order. Without timestamps the file order is the time order."""
    # Two stable sorts = sort by (user, time) with ties in the order of `start`.
    start = np.random.default_rng(0).permutation(len(users)) if tie_order == "shuffle" else np.arange(len(users))
    order = start[np.argsort(times[start], kind="stable")] if times is not None else start
    return order[np.argsort(users[order], kind="stable")]


def kcore(users: np.ndarray, items: np.ndarray, times: np.ndarray | None, num_users: int, num_items: int,
          min_user_interactions: int, min_item_interactions: int):
    """Iterative k-core on integer codes: drop, all at once, every row whose user has fewer than
    ``min_user_interactions`` rows or whose item has fewer than ``min_item_interactions``, until no row is dropped.

    Counts are ``np.bincount`` over the codes (O(n) per round, no sort or hash); the counts of the kept rows are the
    next round's counts, so each round costs two bincounts and one selection.

    Args:
        users, items: (n,) int codes in 0..num_users-1 and 0..num_items-1, in the order to keep.
        times: (n,) aligned with them, or None.
        num_users, num_items: code ranges.
        min_user_interactions, min_item_interactions: thresholds (0 disables one side).

    Returns:
        (users, items, times) of the kept rows in their order, and per round that removed something:
        ``interactions_removed``, ``users_removed`` and ``items_removed`` (those left with no row).
    """
    rounds = []
    user_count = np.bincount(users, minlength=num_users)
    item_count = np.bincount(items, minlength=num_items)
    while True:
        keep = (user_count[users] >= min_user_interactions) & (item_count[items] >= min_item_interactions)
        removed = len(keep) - int(np.count_nonzero(keep))
        if removed == 0:
            break
        users, items, times = _select(keep, users, items, times)
        kept_user_count = np.bincount(users, minlength=num_users)
        kept_item_count = np.bincount(items, minlength=num_items)
        rounds.append({
            "interactions_removed": removed,
            "users_removed": int(np.count_nonzero(user_count)) - int(np.count_nonzero(kept_user_count)),
            "items_removed": int(np.count_nonzero(item_count)) - int(np.count_nonzero(kept_item_count)),
        })
        user_count, item_count = kept_user_count, kept_item_count
        if len(users) == 0:
            break
    return users, items, times, rounds


def _select(mask, users, items, times):
    return users[mask], items[mask], (times[mask] if times is not None else None)


def _id_array(raw: pd.Index, codes: np.ndarray, pad: bool = False) -> np.ndarray:
    values = np.asarray(raw)[codes]
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
        placeholder = np.array([-1], dtype=np.int64)
    else:
        values = values.astype(str)
        placeholder = np.array([""])
    return np.concatenate([placeholder, values]) if pad else values


def tie_stats(offsets: np.ndarray, times: np.ndarray) -> dict:
    """How much of the time order is decided by the tie rule (file order): interactions sharing their timestamp with
    the user's previous one, and users whose test / validation target would change with another tie order (the test
    target ties with the item before it; the validation target ties with a neighbour)."""
    tied = np.zeros(len(times), dtype=bool)  # tied[i]: same timestamp as the previous interaction of the same user
    tied[1:] = times[1:] == times[:-1]
    tied[offsets[:-1]] = False
    last = offsets[1:] - 1  # every user has >= MIN_SPLITTABLE items, so last - 1 is still theirs
    return {
        "tied_interactions": int(tied.sum()),
        "users_with_tied_test_target": int(tied[last].sum()),
        "users_with_tied_validation_target": int((tied[last - 1] | tied[last]).sum()),
    }


def sequence_stats(offsets: np.ndarray, num_items: int) -> dict:
    lengths = np.diff(offsets)
    n, num_users = int(lengths.sum()), len(lengths)
    return {
        "users": num_users,
        "items": num_items,
        "interactions": n,
        "mean_sequence_length": float(lengths.mean()),
        "median_sequence_length": float(np.median(lengths)),
        "min_sequence_length": int(lengths.min()),
        "max_sequence_length": int(lengths.max()),
        "sparsity": 1.0 - n / (num_users * num_items),
        # all_positions training has no sample for users whose train part (all but the last two) is one item
        "users_without_train_pairs": int((lengths - 2 < 2).sum()),
    }
