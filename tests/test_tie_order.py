"""experiments/tie_order.py on synthetic ratings.dat / sequence files whose tie structure is known by construction."""
from __future__ import annotations

from importlib import import_module

import numpy as np
import pytest

from datamodules.sources.movielens import read_ratings_dat
from datamodules.sources.sequence_files import read_user_items


@pytest.fixture(scope="module")
def tie_order():
    return import_module("experiments.tie_order")


def write_ratings(path, rows):
    path.write_text("".join(f"{u}::{m}::4::{t}\n" for u, m, t in rows))
    return path


# user 1: 10 alone, then 30 and 20 in the same second (file lists 30 first), then 40; user 2: 20 and 30 tied, file
# lists 30 first again; user 3: no ties.
ROWS = [(1, 30, 200), (1, 10, 100), (1, 20, 200), (1, 40, 300),
        (2, 30, 50), (2, 20, 50), (2, 10, 60),
        (3, 10, 5), (3, 20, 6), (3, 30, 7)]


def test_time_sort_keeps_file_order_within_a_second_and_groups_are_counted(tie_order, tmp_path):
    r = read_ratings_dat(write_ratings(tmp_path / "ratings.dat", ROWS))
    users, items, times, pos = tie_order.time_sorted(r.users, r.items, r.timestamps)
    assert items.tolist() == [10, 30, 20, 40, 30, 20, 10, 10, 20, 30]
    assert pos.tolist() == [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert tie_order.tie_group_sizes(users, times).tolist() == [1, 2, 1, 2, 1, 1, 1, 1]
    stats = tie_order.tie_stats_table(r)
    assert (stats["tied_with_previous"], stats["groups"], stats["largest_group"]) == (2, 8, 2)
    assert stats["users_with_tied_test_target"] == 0


def test_order_consistency_is_one_for_a_global_order_and_half_for_contradicting_users(tie_order):
    users = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    same = np.array([5, 7, 9, 5, 7, 9, 7, 9])  # every user lists items in the order 5 < 7 < 9
    assert tie_order.order_consistency(users, same) == {"pairs": 3, "occurrences": 7, "share": 1.0}
    users2 = np.array([1, 1, 2, 2])
    flipped = np.array([5, 7, 7, 5])
    assert tie_order.order_consistency(users2, flipped)["share"] == 0.5
    # a pair seen by one user only is not counted
    assert tie_order.order_consistency(np.array([1, 1, 2, 2]), np.array([1, 2, 3, 4]))["pairs"] == 0


def test_shuffled_null_is_lower_than_a_global_order(tie_order):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 12)
    items = np.concatenate([np.sort(rng.choice(40, 12, replace=False)) for _ in range(30)])
    assert tie_order.order_consistency(users, items)["share"] == 1.0
    null = tie_order.order_consistency(users, items, np.random.default_rng(1))["share"]
    assert 0.5 < null < 0.9


def test_sequence_agreement_counts_tied_neighbours_in_file_order_and_flags_bad_rows(tie_order, tmp_path):
    ratings = read_ratings_dat(write_ratings(tmp_path / "ratings.dat", ROWS))
    in_file_order = tmp_path / "a.txt"
    in_file_order.write_text("1 10 30 20 40\n2 30 20 10\n3 10 20 30\n")
    agreement = tie_order.sequence_agreement(ratings, read_user_items(in_file_order))
    assert agreement == dict(users=3, items_differ=0, steps_back_in_time=0, tied_neighbours=2, tied_in_file_order=2)
    other = tmp_path / "b.txt"  # user 1's tie reversed, user 2 steps back in time, user 3 has another item
    other.write_text("1 10 20 30 40\n2 10 30 20\n3 10 20 99\n")
    agreement = tie_order.sequence_agreement(ratings, read_user_items(other))
    assert agreement == dict(users=3, items_differ=1, steps_back_in_time=1, tied_neighbours=2, tied_in_file_order=1)


def test_simulate_reorders_runs_by_one_global_order_and_keeps_each_users_items(tie_order, tmp_path):
    path = tmp_path / "seq.txt"
    rng = np.random.default_rng(3)
    rows = {u: rng.permutation(50)[:20] + 1 for u in range(1, 9)}
    path.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in rows.items()))
    seqs = read_user_items(path)
    unchanged = tie_order.simulate(seqs, np.array([1]), seed=0)
    assert all((s == rows[u]).all() for u, s in unchanged)
    whole = tie_order.simulate(seqs, np.array([100]), seed=0)  # one run per user: the whole sequence is sorted
    users = np.concatenate([np.full(len(s), u) for u, s in whole])
    items = np.concatenate([s for _, s in whole])
    assert all(sorted(s.tolist()) == sorted(rows[u].tolist()) for u, s in whole)
    assert tie_order.order_consistency(users, items)["share"] == 1.0
    assert tie_order.order_consistency(seqs.users, seqs.items)["share"] < 1.0
    pairs = tie_order.simulate(seqs, np.array([2]), seed=0)  # runs of 2: each user's sequence differs only inside them
    for u, s in pairs:
        assert all(sorted(s[k:k + 2].tolist()) == sorted(rows[u][k:k + 2].tolist()) for k in range(0, 20, 2))


def test_stats_cli_reports_the_measured_counts(tie_order, tmp_path, capsys):
    ratings = write_ratings(tmp_path / "ratings.dat", ROWS)
    seqs = tmp_path / "seq.txt"
    seqs.write_text("1 10 20 30 40\n2 30 20 10\n3 10 20 30\n")
    out = tmp_path / "ties.md"
    tie_order.main(["stats", "--ratings", str(ratings), "--sequences", str(seqs), "--shuffles", "2", "--out", str(out)])
    report = out.read_text()
    assert report == capsys.readouterr().out
    assert "Tied with the user's previous rating (same second): 2 (20.0%)" in report
    assert "of its 2 neighbours that share a second, 1 (50.0%) are in file order" in report


def test_simulate_cli_writes_a_readable_sequence_file(tie_order, tmp_path):
    ratings = write_ratings(tmp_path / "ratings.dat", ROWS)
    seqs = tmp_path / "seq.txt"
    seqs.write_text("1 10 20 30 40\n2 30 20 10\n3 10 20 30\n")
    out = tmp_path / "ordered.txt"
    tie_order.main(["simulate", "--ratings", str(ratings), "--sequences", str(seqs), "--out", str(out)])
    back = read_user_items(out)
    assert back.users.tolist() == read_user_items(seqs).users.tolist()
    assert sorted(back.items.tolist()) == sorted(read_user_items(seqs).items.tolist())
