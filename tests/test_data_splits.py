"""Leave-one-out batches (vectorised __getitems__) against a per-user Python reference on random sequences."""

import numpy as np
import pytest
import torch

from datamodules.splits import EvalSequences, PrefixSequences, TrainSequences, collate


def random_sequences(rng, users=40, max_length=30, items=50):
    lengths = rng.integers(3, max_length, size=users)
    lengths[:3] = [3, 4, max_length + 7]  # the shortest splittable user, one pair, one longer than any window
    flat = rng.integers(1, items + 1, size=lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return flat, offsets


def pad(values, width):
    return list(values) + [0] * (width - len(values))


def sequences(flat, offsets):
    return [flat[offsets[u]: offsets[u + 1]].tolist() for u in range(len(offsets) - 1)]


def batch(dataset, indices=None):
    return collate(dataset.__getitems__(list(range(len(dataset))) if indices is None else indices))


def assert_history(got, expected):
    """`history` holds each sample's older train items, right-padded to the batch's longest (at least one column)."""
    width = max(1, max(map(len, expected)))
    assert got["history"].tolist() == [pad(h, width) for h in expected]


@pytest.mark.parametrize("max_len", [1, 4, 50])
def test_all_positions_recent_window(max_len):
    flat, offsets = random_sequences(np.random.default_rng(0))
    dataset = TrainSequences(flat, offsets, max_len)
    expected_inputs, expected_targets, expected_history = [], [], []
    for seq in sequences(flat, offsets):
        train = seq[:-2]
        if len(train) < 2:
            continue
        window = train[-(max_len + 1):]
        expected_inputs.append(pad(window[:-1], max_len))
        expected_targets.append(pad(window[1:], max_len))
        expected_history.append(train[:-(max_len + 1)])
    got = batch(dataset)
    assert got["input_ids"].dtype == torch.int64 and got["input_ids"].shape == (len(dataset), max_len)
    assert got["input_ids"].tolist() == expected_inputs
    assert got["target_ids"].tolist() == expected_targets
    assert_history(got, expected_history)
    assert len(dataset) == sum(len(s) - 2 >= 2 for s in sequences(flat, offsets))


@pytest.mark.parametrize("max_len", [1, 4, 50])
def test_all_windows_tile_every_train_target_once(max_len):
    flat, offsets = random_sequences(np.random.default_rng(6))
    dataset = TrainSequences(flat, offsets, max_len, window="all")
    expected_inputs, expected_targets, expected_history, train_targets = [], [], [], 0
    for seq in sequences(flat, offsets):
        train = seq[:-2]
        if len(train) < 2:
            continue
        train_targets += len(train) - 1
        end = len(train)  # windows from the most recent back; each starts on the item the next one's inputs start at
        while end > 1:
            window = train[max(0, end - max_len - 1): end]
            expected_inputs.append(pad(window[:-1], max_len))
            expected_targets.append(pad(window[1:], max_len))
            expected_history.append(train[: max(0, end - max_len - 1)])
            end -= len(window) - 1
    got = batch(dataset)
    assert got["input_ids"].tolist() == expected_inputs
    assert got["target_ids"].tolist() == expected_targets
    assert_history(got, expected_history)
    assert (got["target_ids"] > 0).sum().item() == train_targets
    # the most recent window of each user is the "recent" sample
    recent = batch(TrainSequences(flat, offsets, max_len))
    first_of_user = np.flatnonzero(dataset.back == 0)
    assert torch.equal(got["input_ids"][first_of_user], recent["input_ids"])


def test_unknown_window_is_rejected():
    flat, offsets = random_sequences(np.random.default_rng(0))
    with pytest.raises(ValueError, match="'recent', 'random' or 'all'.*'latest'"):
        TrainSequences(flat, offsets, 4, window="latest")


def test_prefix_mode():
    flat, offsets = random_sequences(np.random.default_rng(1))
    max_len = 5
    dataset = PrefixSequences(flat, offsets, max_len)
    expected_inputs, expected_targets, expected_history = [], [], []
    for seq in sequences(flat, offsets):
        train = seq[:-2]
        for t in range(1, len(train)):
            inputs = train[max(0, t - max_len): t]
            targets = [0] * max_len
            targets[len(inputs) - 1] = train[t]
            expected_inputs.append(pad(inputs, max_len))
            expected_targets.append(targets)
            expected_history.append(train[: max(0, t - max_len)])
    got = batch(dataset)
    assert got["input_ids"].tolist() == expected_inputs
    assert got["target_ids"].tolist() == expected_targets
    assert_history(got, expected_history)


@pytest.mark.parametrize("split", ["val", "test", "predict"])
def test_eval_batches(split):
    flat, offsets = random_sequences(np.random.default_rng(2))
    max_len = 6
    dataset = EvalSequences(flat, offsets, max_len, split)
    indices = [5, 2, 0, 1]  # any order, including the longest user (2)
    got = batch(dataset, indices)
    seqs = sequences(flat, offsets)
    cut = {"val": 2, "test": 1, "predict": 0}[split]
    history = [seqs[u][: len(seqs[u]) - cut] for u in indices]
    width = max(map(len, history))
    assert got["user"].tolist() == indices
    assert got["input_ids"].tolist() == [pad(h[-max_len:], max_len) for h in history]
    assert got["seen"].tolist() == [pad(h, width) for h in history]
    if split == "predict":
        assert "target" not in got
    else:
        assert got["target"].tolist() == [seqs[u][len(seqs[u]) - cut] for u in indices]


def test_single_item_access_matches_batch():
    flat, offsets = random_sequences(np.random.default_rng(3))
    dataset = EvalSequences(flat, offsets, 4, "test")
    one = dataset[2]
    assert one["target"].item() == flat[offsets[3] - 1]
    assert one["input_ids"].shape == (4,)


def contains(train, window):
    return any(train[i: i + len(window)] == window for i in range(len(train) - len(window) + 1))


def test_random_windows_are_contiguous_redrawn_and_reproducible():
    flat, offsets = random_sequences(np.random.default_rng(4), users=30, max_length=40)
    max_len = 5
    seqs = [s for s in sequences(flat, offsets) if len(s) - 2 >= 2]
    draws = []
    for _ in range(2):
        dataset = TrainSequences(flat, offsets, max_len, window="random", seed=7)
        epochs = [batch(dataset) for _ in range(3)]
        draws.append(epochs)
        for got in epochs:
            for seq, inputs, targets, history in zip(seqs, got["input_ids"].tolist(), got["target_ids"].tolist(),
                                                     got["history"].tolist()):
                train = seq[:-2]
                n = min(len(train), max_len + 1)
                window = inputs[: n - 1] + [targets[n - 2]]
                assert inputs[n - 1:] == [0] * (max_len - n + 1) and targets[: n - 1] == window[1:]
                assert contains(train, window)
                older = [i for i in history if i]  # ids are >= 1: the zeros are padding
                assert train[: len(older) + n] == older + window  # the history is everything before the window
    # same seed -> same draws; successive epochs differ for users with room to move
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(draws[0], draws[1]))
    assert not torch.equal(draws[0][0]["input_ids"], draws[0][1]["input_ids"])
    other = TrainSequences(flat, offsets, max_len, window="random", seed=8)
    assert not torch.equal(batch(other)["input_ids"], draws[0][0]["input_ids"])


def test_random_window_covers_every_offset():
    # one user, train part of 10 items, window of 4 -> 7 possible offsets, each should appear
    flat = np.arange(1, 13)
    offsets = np.array([0, 12])
    dataset = TrainSequences(flat, offsets, max_len=3, window="random", seed=0)
    firsts = {batch(dataset)["input_ids"][0, 0].item() for _ in range(200)}
    assert firsts == set(range(1, 8))


def test_random_window_in_dataloader_workers_differs_per_epoch():
    flat, offsets = random_sequences(np.random.default_rng(5), users=8, max_length=40)
    dataset = TrainSequences(flat, offsets, 3, window="random", seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=1,
                                         generator=torch.Generator().manual_seed(0))
    first, second = next(iter(loader)), next(iter(loader))
    assert not torch.equal(first["input_ids"], second["input_ids"])
