"""The preprocessing protocol against hand-checked cases and a plain-Python reference on random data."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.preprocess import Interactions, preprocess


def raw_sequences(p):
    """{raw user: [raw items]} in internal user order, from a Processed result."""
    return {
        p.user_ids[u].item(): [p.item_ids[i].item() for i in p.items[p.offsets[u]: p.offsets[u + 1]]]
        for u in range(len(p.user_ids))
    }


def reference(users, items, times, min_user, min_item, drop_duplicates):
    """The protocol written the slow, obvious way."""
    rows = list(zip(users, items, times if times is not None else [0] * len(users)))
    if drop_duplicates:
        seen, kept = set(), []
        for row in rows:
            key = row if times is not None else row[:2]
            if key not in seen:
                seen.add(key)
                kept.append(row)
        rows = kept
    first = {}
    for u in users:
        first.setdefault(u, len(first))
    rows.sort(key=lambda r: (first[r[0]], r[2]))  # Python's sort is stable: ties keep file order
    while True:
        uc, ic = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if uc[r[0]] >= min_user and ic[r[1]] >= min_item]
        if len(kept) == len(rows):
            break
        rows = kept
    uc = Counter(r[0] for r in rows)
    rows = [r for r in rows if uc[r[0]] >= 3]
    out = {}
    for u, i, _ in rows:
        out.setdefault(u, []).append(i)
    return out


def test_stable_sort_keeps_file_order_for_ties():
    # user 7: items 30 and 10 share timestamp 5 -> file order (30 before 10); item 20 at t=1 comes first
    inter = Interactions(np.array([7, 7, 7, 7]), np.array([30, 20, 10, 40]), np.array([5, 1, 5, 9]))
    p = preprocess(inter, 0, 0)
    assert raw_sequences(p) == {7: [20, 30, 10, 40]}
    assert p.timestamps.tolist() == [1, 5, 5, 9]
    # items numbered by first appearance in the sorted sequences; 0 is padding
    assert p.item_ids.tolist() == [-1, 20, 30, 10, 40]
    assert p.items.tolist() == [1, 2, 3, 4]


def test_iterative_kcore_needs_several_rounds():
    # 2-core. Item "x" has 2 interactions, one from user "c" who has only 2 interactions, one of them with a
    # singleton item "y": round 1 removes y, then c falls to 1 interaction (round 2), then x falls to 1 (round 3).
    users = ["a"] * 3 + ["b"] * 3 + ["c", "c"] + ["a"]
    items = ["p", "q", "r", "p", "q", "r", "x", "y", "x"]
    inter = Interactions(np.array(users), np.array(items), np.arange(9))
    p = preprocess(inter, 2, 2)
    assert raw_sequences(p) == {"a": ["p", "q", "r"], "b": ["p", "q", "r"]}
    rounds = p.stats["kcore"]["rounds"]
    assert [r["interactions_removed"] for r in rounds] == [1, 1, 1]
    assert [r["items_removed"] for r in rounds] == [1, 0, 1]
    assert [r["users_removed"] for r in rounds] == [0, 1, 0]
    assert p.stats["interactions"] == 6 and p.stats["raw_interactions"] == 9


def test_thresholds_zero_disable_kcore_and_short_users_are_counted():
    inter = Interactions(np.array([1, 1, 2, 2, 2, 3]), np.array([5, 6, 5, 6, 7, 5]), None)
    p = preprocess(inter, 0, 0)
    assert raw_sequences(p) == {2: [5, 6, 7]}
    assert p.stats["kcore"]["rounds"] == []
    assert p.stats["short_users_removed"] == 2
    assert p.stats["short_user_interactions_removed"] == 3


def test_duplicates_counted_kept_by_default_and_dropped_on_request():
    users = np.array([1, 1, 1, 1, 1])
    items = np.array([8, 8, 9, 8, 7])
    times = np.array([3, 3, 4, 5, 6])  # (1, 8, 3) twice; (1, 8, 5) is a re-interaction, not a duplicate
    kept = preprocess(Interactions(users, items, times), 0, 0)
    assert kept.stats["duplicates"] == 1 and kept.stats["duplicates_dropped"] == 0
    assert raw_sequences(kept) == {1: [8, 8, 9, 8, 7]}
    dropped = preprocess(Interactions(users, items, times), 0, 0, drop_duplicates=True)
    assert dropped.stats["duplicates"] == 1 and dropped.stats["duplicates_dropped"] == 1
    assert raw_sequences(dropped) == {1: [8, 9, 8, 7]}
    # without timestamps any repeated (user, item) pair is a duplicate
    untimed = preprocess(Interactions(users, items, None), 0, 0, drop_duplicates=True)
    assert untimed.stats["duplicates"] == 2
    assert raw_sequences(untimed) == {1: [8, 9, 7]}


def test_tie_order_shuffle_permutes_within_a_timestamp_only_and_the_same_way_every_time():
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(6), 40)
    times = rng.integers(0, 8, len(users))  # 8 distinct seconds per user: many large same-second groups
    items = rng.permutation(len(users))  # distinct items, so positions can be traced
    inter = Interactions(users, items, times)
    file_order = preprocess(inter, 0, 0)
    shuffled = preprocess(inter, 0, 0, tie_order="shuffle")
    assert shuffled.stats["tie_order"] == "shuffle" and file_order.stats["tie_order"] == "file"
    assert np.array_equal(shuffled.timestamps, file_order.timestamps)  # the same time order
    raw = dict(zip(items.tolist(), times.tolist()))
    seq_file, seq_shuffled = raw_sequences(file_order), raw_sequences(shuffled)
    changed = 0
    for user in seq_file:
        assert sorted(seq_file[user]) == sorted(seq_shuffled[user])
        assert [raw[i] for i in seq_shuffled[user]] == sorted(raw[i] for i in seq_shuffled[user])
        changed += seq_file[user] != seq_shuffled[user]
    assert changed == 6
    assert raw_sequences(preprocess(inter, 0, 0, tie_order="shuffle")) == seq_shuffled
    with pytest.raises(ValueError, match="needs timestamps"):
        preprocess(Interactions(users, items, None), 0, 0, tie_order="shuffle")


def test_everything_filtered_is_a_clear_error():
    with pytest.raises(ValueError, match="no user has >= 3"):
        preprocess(Interactions(np.array([1, 2]), np.array([1, 1]), None), 0, 0)
    with pytest.raises(ValueError, match="no interactions"):
        preprocess(Interactions(np.array([], dtype=np.int64), np.array([], dtype=np.int64)), 0, 0)


def test_string_ids_keep_their_form():
    inter = Interactions(np.array(["u1", "u1", "u1"]), np.array(["0123", "B00X", "0123"]), None)
    p = preprocess(inter, 0, 0)
    assert p.item_ids.tolist() == ["", "0123", "B00X"]
    assert p.user_ids.tolist() == ["u1"]


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8), st.integers(0, 3)), min_size=1, max_size=80),
    min_user=st.integers(0, 4),
    min_item=st.integers(0, 4),
    timed=st.booleans(),
    drop=st.booleans(),
)
def test_matches_reference_on_random_data(data, min_user, min_item, timed, drop):
    users = np.array([d[0] for d in data])
    items = np.array([d[1] for d in data])
    times = np.array([d[2] for d in data]) if timed else None
    expected = reference(users.tolist(), items.tolist(), None if times is None else times.tolist(),
                         min_user, min_item, drop)
    if not expected:
        with pytest.raises(ValueError):
            preprocess(Interactions(users, items, times), min_user, min_item, drop)
        return
    p = preprocess(Interactions(users, items, times), min_user, min_item, drop)
    got = raw_sequences(p)
    assert got == expected and list(got) == list(expected)  # same sequences, users in first-appearance order
    # items numbered 1..N by first appearance along the concatenated sequences
    order = list(dict.fromkeys(i for seq in expected.values() for i in seq))
    assert p.item_ids[1:].tolist() == order
    assert p.stats["interactions"] == sum(map(len, expected.values()))
    assert p.offsets[0] == 0 and p.offsets[-1] == len(p.items)


def test_tie_stats_count_ties_within_users_and_tied_targets():
    # user 1 times 1, 5, 5, 9, 12: one tie, in the history (neither target is decided by the tie order);
    # user 2 times 3, 4, 4: its test target ties with its validation target (both decided by file order);
    # user 3 times 4, 4, 8, 9: a tie before both targets; user 3's first time equals user 2's last (not a tie)
    inter = Interactions(np.array([1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]), np.arange(12),
                         np.array([1, 5, 5, 9, 12, 3, 4, 4, 4, 4, 8, 9]))
    stats = preprocess(inter, 0, 0).stats
    assert stats["tied_interactions"] == 3
    assert stats["users_with_tied_test_target"] == 1
    assert stats["users_with_tied_validation_target"] == 1


def test_tie_stats_match_a_per_user_reference_on_random_data():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600)
    inter = Interactions(users, rng.integers(0, 50, 600), rng.integers(0, 20, 600))
    p = preprocess(inter, 0, 0)
    tied = test_tied = val_tied = 0
    for u in range(len(p.user_ids)):
        t = p.timestamps[p.offsets[u]: p.offsets[u + 1]].tolist()
        tied += sum(a == b for a, b in zip(t, t[1:]))
        test_tied += t[-1] == t[-2]
        val_tied += t[-2] in (t[-3], t[-1])
    assert (p.stats["tied_interactions"], p.stats["users_with_tied_test_target"],
            p.stats["users_with_tied_validation_target"]) == (tied, test_tied, val_tied)
    assert tied > 0 and test_tied > 0
