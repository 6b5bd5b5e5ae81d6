"""The synthetic Amazon Reviews 2023 generator of benchmarks/data_scale.py, and the bincount k-core of preprocess.py
against plain-Python references (random inputs with ties, a 10^5 synthetic table, and the real data when present)."""

import json
from collections import Counter

import numpy as np
import pytest
from conftest import load_benchmark

from datamodules import Amazon2023, InteractionTable
from datamodules.preprocess import MIN_SPLITTABLE, EmptyDataError, Interactions, kcore, preprocess
from datamodules.sources.sequence_files import read_user_items
from datamodules.splits import EvalSequences, TrainSequences

data_scale = load_benchmark("data_scale")


# ---- plain references --------------------------------------------------------------------------------------------

def reference_kcore(users, items, min_user, min_item):
    """Row mask and per-round counts of the iterative k-core, with Counters and sets."""
    alive = list(range(len(users)))
    rounds = []
    while True:
        uc, ic = Counter(users[r] for r in alive), Counter(items[r] for r in alive)
        kept = [r for r in alive if uc[users[r]] >= min_user and ic[items[r]] >= min_item]
        if len(kept) == len(alive):
            break
        rounds.append({
            "interactions_removed": len(alive) - len(kept),
            "users_removed": len(uc) - len({users[r] for r in kept}),
            "items_removed": len(ic) - len({items[r] for r in kept}),
        })
        alive = kept
        if not alive:
            break
    mask = np.zeros(len(users), dtype=bool)
    mask[alive] = True
    return mask, rounds


def reference_preprocess(users, items, times, min_user, min_item, drop_duplicates=False):
    """The whole protocol (tie_order="file") the slow, obvious way, with the arrays `preprocess` returns (None when
    nothing is left)."""
    users, items = list(users), list(items)
    times = list(times) if times is not None else None
    first_user, first_item = {}, {}
    for u in users:
        first_user.setdefault(u, len(first_user))
    for i in items:
        first_item.setdefault(i, len(first_item))
    rows = list(range(len(users)))
    duplicates, seen = 0, set()
    kept = []
    for r in rows:
        key = (users[r], items[r]) + ((times[r],) if times is not None else ())
        if key in seen:
            duplicates += 1
            if drop_duplicates:
                continue
        seen.add(key)
        kept.append(r)
    rows = kept
    rows.sort(key=lambda r: (first_user[users[r]], times[r] if times is not None else 0))  # stable
    rounds = []
    if min_user > 0 or min_item > 0:
        mask, rounds = reference_kcore([users[r] for r in rows], [items[r] for r in rows], min_user, min_item)
        rows = [r for r, m in zip(rows, mask) if m]
    length = Counter(users[r] for r in rows)
    rows = [r for r in rows if length[users[r]] >= MIN_SPLITTABLE]
    if not rows:
        return None
    order_users = sorted({users[r] for r in rows}, key=first_user.__getitem__)
    item_number = {}
    for r in rows:
        item_number.setdefault(items[r], len(item_number) + 1)
    lengths = Counter(users[r] for r in rows)
    offsets = np.concatenate([[0], np.cumsum([lengths[u] for u in order_users])]).astype(np.int64)

    def ids(values, pad):
        if all(isinstance(v, (int, np.integer)) for v in values):
            return np.array(([-1] if pad else []) + [int(v) for v in values], dtype=np.int64)
        return np.array(([""] if pad else []) + [str(v) for v in values])

    return {
        "offsets": offsets,
        "items": np.array([item_number[items[r]] for r in rows], dtype=np.int64),
        "timestamps": np.array([times[r] for r in rows]) if times is not None else None,
        "user_ids": ids(order_users, pad=False),
        "item_ids": ids(list(item_number), pad=True),
        "duplicates": duplicates,
        "rounds": rounds,
    }


def assert_same(processed, expected):
    for name in ("offsets", "items", "user_ids", "item_ids"):
        got, want = getattr(processed, name), expected[name]
        assert got.dtype.kind == want.dtype.kind, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    if expected["timestamps"] is None:
        assert processed.timestamps is None
    else:
        np.testing.assert_array_equal(processed.timestamps, expected["timestamps"])
    assert processed.stats["duplicates"] == expected["duplicates"]
    assert processed.stats["kcore"]["rounds"] == expected["rounds"]


# ---- the bincount k-core ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresholds", [(5, 5), (3, 8), (0, 4), (6, 0), (1, 1), (40, 40)])
def test_kcore_equals_the_reference_on_random_codes(seed, thresholds):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    users = (rng.zipf(1.5, n) - 1) % 300
    items = (rng.zipf(1.3, n) - 1) % 200
    times = rng.integers(0, 20, n)  # many ties
    mask, rounds = reference_kcore(users.tolist(), items.tolist(), *thresholds)
    got_users, got_items, got_times, got_rounds = kcore(users, items, times, 300, 200, *thresholds)
    np.testing.assert_array_equal(got_users, users[mask])
    np.testing.assert_array_equal(got_items, items[mask])
    np.testing.assert_array_equal(got_times, times[mask])
    assert got_rounds == rounds
    none = kcore(users, items, None, 300, 200, *thresholds)
    assert none[2] is None and none[3] == rounds


def test_kcore_that_empties_everything_records_the_round():
    users, items = np.array([0, 0, 1]), np.array([0, 1, 2])
    got_users, _, _, rounds = kcore(users, items, None, 2, 3, 3, 1)
    assert len(got_users) == 0
    assert rounds == [{"interactions_removed": 3, "users_removed": 2, "items_removed": 3}]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("thresholds", [(5, 5), (2, 7), (0, 3), (4, 0)])
def test_preprocess_equals_the_reference_on_random_data_with_ties(seed, drop, thresholds):
    rng = np.random.default_rng(100 + seed)
    n = 4000
    users = rng.permutation(900)[(rng.zipf(1.4, n) - 1) % 900]
    items = rng.permutation(500)[(rng.zipf(1.3, n) - 1) % 500]
    times = rng.integers(0, 30, n)
    expected = reference_preprocess(users, items, times, *thresholds, drop)
    if expected is None:
        with pytest.raises(EmptyDataError):
            preprocess(Interactions(users, items, times), *thresholds, drop)
        return
    assert_same(preprocess(Interactions(users, items, times), *thresholds, drop), expected)


def test_preprocess_equals_the_reference_on_a_synthetic_table_of_1e5():
    data = data_scale.synth_interactions(100_000, seed=3)
    users = np.array([f"U{u}" for u in data["user"]], dtype=object)
    items = np.array([f"I{i}" for i in data["item"]], dtype=object)
    expected = reference_preprocess(users, items, data["timestamp"], 5, 5)
    processed = preprocess(Interactions(users, items, data["timestamp"]), 5, 5)
    assert len(expected["rounds"]) >= 3
    assert_same(processed, expected)


REAL = [("beauty/Beauty.txt", (5, 5)), ("beauty/Beauty.txt", (10, 10)), ("beauty/Beauty.txt", (3, 30)),
        ("ml-1m/ml-1m.seq.txt", (5, 5)), ("ml-1m/ml-1m.seq.txt", (20, 5))]


@pytest.mark.slow
@pytest.mark.parametrize("file,thresholds", REAL)
def test_preprocess_equals_the_reference_on_the_real_data(shared_data, file, thresholds):
    """Beauty and ML-1M are already 5-cored: the larger thresholds make the k-core take several rounds."""
    interactions = read_user_items(shared_data / file)
    expected = reference_preprocess(interactions.users, interactions.items, None, *thresholds)
    assert_same(preprocess(interactions, *thresholds), expected)


# ---- the generator -----------------------------------------------------------------------------------------------

def test_zipf_offset_and_digit_and_id_helpers():
    q = data_scale.zipf_offset(10_000, 1.0, 0.01)
    weights = (np.arange(1, 10_001) + q) ** -1.0
    assert weights[0] / weights.sum() == pytest.approx(0.01, rel=1e-6)
    assert data_scale.zipf_offset(10, 1.0, 0.9) == 0.0
    values = np.array([0, 7, 1588687728923, 9_999_999_999_999])
    assert [bytes(row).decode() for row in data_scale._digits(values, 13)] == [f"{v:013d}" for v in values]
    ids = data_scale._id_bytes(np.random.default_rng(0), 5000, b"B0", 10, b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    strings = {bytes(row).decode() for row in ids}
    assert len(strings) == 5000 and all(len(s) == 10 and s.startswith("B0") for s in strings)


def test_synthetic_law_user_timestamps_and_ties():
    data = data_scale.synth_interactions(20_000, seed=1, user_top_share=0.01, tie_fraction=0.1)
    assert len(data["user"]) == len(data["item"]) == len(data["timestamp"]) == 20_000
    user_counts, item_counts = np.bincount(data["user"]), np.bincount(data["item"])
    # power law: a heavy head and a long tail of users with one interaction
    assert user_counts.max() >= 10 * np.median(user_counts[user_counts > 0])
    assert (user_counts == 1).sum() > 0.3 * (user_counts > 0).sum()
    assert item_counts.max() >= 20
    order = np.lexsort((data["timestamp"], data["user"]))
    users, stamps = data["user"][order], data["timestamp"][order]
    same_user = users[1:] == users[:-1]
    tied = same_user & (stamps[1:] == stamps[:-1])
    assert 0.05 < tied.sum() / same_user.sum() < 0.15
    assert (stamps >= data_scale.MS_2012).all() and (stamps < 10**13).all()  # 13-digit milliseconds
    assert not np.array_equal(order, np.arange(len(order)))  # the file is not in (user, time) order


def read_lines(path):
    import gzip

    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_tiny_table_is_valid_and_the_datamodule_prepares_it(tmp_path):
    manifest = data_scale.generate(6000, tmp_path / "synth", seed=2, text_width=40)
    records = read_lines(manifest["path"])
    assert len(records) == 6000
    assert set(records[0]) == {"rating", "title", "text", "images", "asin", "parent_asin", "user_id", "timestamp",
                               "helpful_vote", "verified_purchase"}
    for r in records[:500]:
        assert isinstance(r["timestamp"], int) and len(str(r["timestamp"])) == 13
        assert len(r["user_id"]) == 28 and len(r["parent_asin"]) == 10 and len(r["asin"]) == 10
        assert r["rating"] in (1.0, 2.0, 3.0, 4.0, 5.0) and isinstance(r["verified_purchase"], bool)
    assert manifest["distinct_users"] == len({r["user_id"] for r in records})
    assert manifest["distinct_items"] == len({r["parent_asin"] for r in records})

    dm = data_scale.make_datamodule(tmp_path / "synth", "jsonl")
    assert isinstance(dm, Amazon2023)
    dm.prepare_data()
    dm.setup("fit")
    stats, offsets = dm.stats, dm._prepared().offsets
    items = dm._prepared().items
    lengths = np.diff(offsets)
    # counts are consistent and the 5-core holds on both sides
    assert stats["raw_interactions"] == 6000 and stats["users"] == dm.num_users == len(lengths)
    assert stats["interactions"] == offsets[-1] == len(items) and stats["items"] == dm.num_items
    assert len(stats["kcore"]["rounds"]) >= 2
    assert lengths.min() >= 5
    item_counts = np.bincount(items, minlength=dm.num_items + 1)
    assert item_counts[0] == 0 and item_counts[1:].min() >= 5
    assert stats["tied_interactions"] == int(sum(
        (np.diff(dm._prepared().timestamps[offsets[u]:offsets[u + 1]]) == 0).sum() for u in range(len(lengths))))

    # each kept user's sequence: their rows with a kept item, by timestamp, equal timestamps in file order
    kept_items = set(dm.item_ids[1:].tolist())
    index = {raw: k for k, raw in enumerate(dm.item_ids.tolist())}
    by_user = {}
    for r in records:
        if r["parent_asin"] in kept_items:
            by_user.setdefault(r["user_id"], []).append((r["timestamp"], index[r["parent_asin"]]))
    for u, raw_user in enumerate(dm.user_ids.tolist()):
        expected = [item for _, item in sorted(by_user[raw_user], key=lambda row: row[0])]
        assert dm.sequence(u).tolist() == expected

    # leave-one-out: validation target = second to last, test target = last, training = the rest
    users = np.arange(dm.num_users)
    val = EvalSequences(items, offsets, 50, "val").__getitems__(users.tolist())
    test = EvalSequences(items, offsets, 50, "test").__getitems__(users.tolist())
    train = TrainSequences(items, offsets, 50, "recent").__getitems__(list(range(dm.num_users)))
    for u in users:
        seq = dm.sequence(u)
        assert val["target"][u] == seq[-2] and test["target"][u] == seq[-1]
        assert test["input_ids"][u][min(len(seq) - 1, 50) - 1] == seq[-2]
        assert test["seen"][u][: len(seq) - 1].tolist() == seq[:-1].tolist()
        window = train["target_ids"][u]
        assert window[window > 0][-1] == seq[-3]


def test_parquet_table_prepares_the_same_as_the_jsonl_file(tmp_path):
    data_scale.generate(3000, tmp_path / "j", seed=4, text_width=8)
    data_scale.generate(3000, tmp_path / "p", seed=4, format="parquet")
    a = data_scale.make_datamodule(tmp_path / "j", "jsonl", min_user_interactions=3, min_item_interactions=3)
    b = data_scale.make_datamodule(tmp_path / "p", "parquet", min_user_interactions=3, min_item_interactions=3)
    assert isinstance(b, InteractionTable)
    pa, pb = a._prepared(), b._prepared()
    for name in ("offsets", "items", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(pa, name), getattr(pb, name))


def test_prepare_in_a_child_process_reports_time_memory_and_steps(tmp_path):
    data_scale.generate(3000, tmp_path, seed=5, text_width=8)
    result = data_scale.prepare(tmp_path, min_user=3, min_item=3)
    assert result["raw_interactions"] == 3000 and result["users"] > 0
    assert result["peak_rss"] >= result["import_rss"] > 0 and result["wall_seconds"] > 0
    assert [s["step"] for s in result["steps"]] == ["hash raw file", "cache lookup (miss)", "read", "preprocess",
                                                    "write cache", "load + verify cache"]
    result["file_bytes"], result["generate_seconds"] = 1, 0.0
    text = data_scale.render([result], "python benchmarks/data_scale.py sweep")
    assert "| 3,000 |" in text and "Machine:" in text
