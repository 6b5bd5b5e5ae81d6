"""ML-1M's same-second ties: how much of its time order the tie rule decides, and what a learnable tie order is worth.

MovieLens-1M timestamps have one-second resolution and users rated pages of movies at once, so many of a user's
ratings share a second. Sorting by (user, time) with ties in file order, as RecBole and this project do, puts each
tied group in ``ratings.dat``'s own per-user order. That order is not random: ``stats`` measures how often two movies
keep the same relative order across the users who rated both, against per-user shuffles of the same file. A
sequence file whose ties were broken another way (``--sequences``, e.g. ``ml-1m.seq.txt``, which carries no
timestamps) is checked against the ratings: same items per user, time order respected, and how often its tied
neighbours agree with the file order.

``simulate`` writes a copy of a sequence file in which runs of consecutive items, cut with the tie-group sizes measured
in ``--ratings``, are put in one fixed random global item order: the artefact at full strength, for training on.

    python -m experiments.tie_order stats --ratings data/ml-1m/ratings.dat --sequences ../shared/data/ml-1m/ml-1m.seq.txt
    python -m experiments.tie_order simulate --ratings data/ml-1m/ratings.dat \\
        --sequences ../shared/data/ml-1m/ml-1m.seq.txt --out /tmp/ml-1m.ordered-ties.seq.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from datamodules.preprocess import tie_stats, time_order
from datamodules.sources.movielens import read_ratings_dat
from datamodules.sources.sequence_files import read_user_items


def time_sorted(users: np.ndarray, items: np.ndarray, times: np.ndarray):
    """(user, time) order with ties in file order (the project's and RecBole's rule); also each row's file position."""
    order = time_order(users, times)
    return users[order], items[order], times[order], order


def user_bounds(users: np.ndarray) -> np.ndarray:
    """(U+1,) offsets of the runs of equal user ids (rows grouped by user)."""
    return np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])


def tie_group_sizes(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Sizes of the runs of one user's ratings sharing a second, in time order (users and times already sorted)."""
    starts = np.ones(len(users), dtype=bool)
    starts[1:] = (users[1:] != users[:-1]) | (times[1:] != times[:-1])
    return np.diff(np.append(np.flatnonzero(starts), len(users)))


def order_consistency(users: np.ndarray, items: np.ndarray, rng: np.random.Generator | None = None) -> dict:
    """How consistently the per-user row order ranks pairs of items across users.

    For every pair of items rated by at least two users, count the users listing a first and those listing b first;
    ``share`` is the majority count summed over pairs, divided by all pair occurrences (1.0: one global order; a
    per-user random order gives about 0.75 when most pairs are shared by two users). With ``rng``, each user's rows
    are shuffled first (the null).
    """
    num_items = int(items.max()) + 1
    ahead = np.zeros(num_items * num_items, dtype=np.int64)  # ahead[a * N + b]: users listing a before b
    bounds = user_bounds(users)
    keys, pending = [], 0
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        row = items[start:end] if rng is None else rng.permutation(items[start:end])
        first, second = np.triu_indices(len(row), k=1)
        keys.append(row[first] * num_items + row[second])
        pending += len(first)
        if pending > 50_000_000 or k == len(bounds) - 2:  # count in chunks: one bincount per ~50M pairs
            ahead += np.bincount(np.concatenate(keys), minlength=len(ahead))
            keys, pending = [], 0
    ahead = ahead.reshape(num_items, num_items)
    upper = np.triu_indices(num_items, k=1)
    forward, backward = ahead[upper], ahead.T[upper]
    shared = (forward + backward) >= 2
    total = int((forward + backward)[shared].sum())
    return {"pairs": int(shared.sum()), "occurrences": total,
            "share": float(np.maximum(forward, backward)[shared].sum() / total) if total else float("nan")}


def sequence_agreement(ratings, sequences) -> dict:
    """A sequence file against the ratings it was made from: per shared user, the same items, no step back in time,
    and for neighbours sharing a second, whether the sequence keeps them in file order."""
    users, items, times, file_pos = time_sorted(ratings.users, ratings.items, ratings.timestamps)
    bounds = user_bounds(users)
    by_user = {int(users[s]): (items[s:e], times[s:e], file_pos[s:e]) for s, e in zip(bounds[:-1], bounds[1:])}
    seq_bounds = user_bounds(sequences.users)
    counts = dict(users=0, items_differ=0, steps_back_in_time=0, tied_neighbours=0, tied_in_file_order=0)
    for s, e in zip(seq_bounds[:-1], seq_bounds[1:]):
        user = int(sequences.users[s])
        if user not in by_user:
            continue
        rated, when, pos = by_user[user]
        seq = sequences.items[s:e]
        counts["users"] += 1
        if len(seq) != len(rated) or len(np.unique(rated)) != len(rated) or set(seq.tolist()) != set(rated.tolist()):
            counts["items_differ"] += 1
            continue
        lookup = {int(m): k for k, m in enumerate(rated)}
        k = np.array([lookup[int(m)] for m in seq])
        t, p = when[k], pos[k]
        counts["steps_back_in_time"] += int((t[1:] < t[:-1]).sum())
        tied = t[1:] == t[:-1]
        counts["tied_neighbours"] += int(tied.sum())
        counts["tied_in_file_order"] += int((tied & (p[1:] > p[:-1])).sum())
    return counts


def tie_stats_table(ratings) -> dict:
    users, _, times, _ = time_sorted(ratings.users, ratings.items, ratings.timestamps)
    sizes = tie_group_sizes(users, times)
    offsets = user_bounds(users)
    ties = tie_stats(offsets, times)  # the counts `m2rec stats` reports for a prepared dataset
    return {
        "users": len(offsets) - 1, "ratings": len(users),
        "tied_with_previous": ties["tied_interactions"],
        "groups": len(sizes), "mean_group_size": float(sizes.mean()), "largest_group": int(sizes.max()),
        "users_with_tied_test_target": ties["users_with_tied_test_target"],
    }


def simulate(sequences, sizes: np.ndarray, seed: int) -> list[tuple[int, np.ndarray]]:
    """Each user's sequence cut into consecutive runs whose sizes are drawn from ``sizes``, every run reordered by one
    global random item order (the same for all users)."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(int(sequences.items.max()) + 1)
    bounds = user_bounds(sequences.users)
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        seq = sequences.items[s:e].copy()
        start = 0
        while start < len(seq):
            stop = min(len(seq), start + int(rng.choice(sizes)))
            run = seq[start:stop]
            seq[start:stop] = run[np.argsort(rank[run], kind="stable")]
            start = stop
        out.append((int(sequences.users[s]), seq))
    return out


def stats_report(args) -> str:
    ratings = read_ratings_dat(args.ratings)
    ties = tie_stats_table(ratings)
    # rows grouped by user, each user's rows in file order (ratings.dat is grouped already; other files may not be)
    file_rows = np.lexsort((np.arange(len(ratings.users)), ratings.users))
    users, items = ratings.users[file_rows], ratings.items[file_rows]
    observed = order_consistency(users, items)
    rng = np.random.default_rng(args.seed)
    nulls = [order_consistency(users, items, rng)["share"] for _ in range(args.shuffles)]
    lines = [
        "# ML-1M same-second ties", "",
        f"Command: `python -m experiments.tie_order stats --ratings {args.ratings}"
        + (f" --sequences {args.sequences}" if args.sequences else "") + "`", "",
        f"- Ratings: {ties['ratings']:,} by {ties['users']:,} users.",
        f"- Tied with the user's previous rating (same second): {ties['tied_with_previous']:,} "
        f"({ties['tied_with_previous'] / ties['ratings']:.1%}); {ties['groups']:,} same-second groups, mean size "
        f"{ties['mean_group_size']:.2f}, largest {ties['largest_group']}.",
        f"- Users whose last rating (the leave-one-out test target) shares its second with the one before: "
        f"{ties['users_with_tied_test_target']:,} of {ties['users']:,}.",
        f"- File order across users: {observed['pairs']:,} movie pairs rated by two or more users; the majority order "
        f"holds for {observed['share']:.3f} of their occurrences, against {np.mean(nulls):.3f} "
        f"(max {np.max(nulls):.3f}) when each user's rows are shuffled ({args.shuffles} shuffles).",
    ]
    if args.sequences:
        agreement = sequence_agreement(ratings, read_user_items(args.sequences))
        tied = agreement["tied_neighbours"]
        lines.append(
            f"- `{args.sequences}` on the {agreement['users']:,} users it shares with the ratings: "
            f"{agreement['items_differ']} with other items, {agreement['steps_back_in_time']} steps back in time; of "
            f"its {tied:,} neighbours that share a second, {agreement['tied_in_file_order']:,} "
            f"({agreement['tied_in_file_order'] / max(tied, 1):.1%}) are in file order.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="tie statistics of a ratings.dat (and a sequence file against it)")
    stats.add_argument("--ratings", required=True, help="ratings.dat (UserID::MovieID::Rating::Timestamp)")
    stats.add_argument("--sequences", help="a 'user item item ...' file of the same ratings to check")
    stats.add_argument("--shuffles", type=int, default=5, help="per-user shuffles for the null")
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--out", help="also write the report here (Markdown)")
    sim = sub.add_parser("simulate", help="a sequence file with its tied runs in one global item order")
    sim.add_argument("--ratings", required=True, help="ratings.dat whose same-second group sizes are drawn")
    sim.add_argument("--sequences", required=True, help="the 'user item item ...' file to reorder")
    sim.add_argument("--out", required=True)
    sim.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "stats":
        report = stats_report(args)
        print(report, end="")
        if args.out:
            Path(args.out).write_text(report)
        return
    ratings = read_ratings_dat(args.ratings)
    users, _, times, _ = time_sorted(ratings.users, ratings.items, ratings.timestamps)
    sizes = tie_group_sizes(users, times)
    rows = simulate(read_user_items(args.sequences), sizes, args.seed)
    with open(args.out, "w") as f:
        for user, seq in rows:
            f.write(f"{user} {' '.join(map(str, seq.tolist()))}\n")
    print(f"wrote {args.out}: {len(rows):,} users; run sizes drawn from {len(sizes):,} same-second groups "
          f"(mean {sizes.mean():.2f}) of {args.ratings}")


if __name__ == "__main__":
    main()
