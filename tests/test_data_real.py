"""The real benchmark files (../shared/data): published statistics and leave-one-out checked against raw lines."""

import numpy as np
import pytest
import torch

from datamodules import SequenceFile
from datamodules.stats import main as stats_main


@pytest.fixture(scope="module")
def beauty(shared_data, tmp_path_factory):
    return SequenceFile(str(shared_data / "beauty" / "Beauty.txt"),
                        item_text_path=str(shared_data / "beauty" / "beauty_items.tsv"),
                        item_id_column="s3rec_item_id", item_text_columns=["title"],
                        data_dir=str(tmp_path_factory.mktemp("data")), max_len=50)


@pytest.fixture(scope="module")
def ml1m(shared_data, tmp_path_factory):
    return SequenceFile(str(shared_data / "ml-1m" / "ml-1m.seq.txt"),
                        item_text_path=str(shared_data / "ml-1m" / "movies.dat"),
                        data_dir=str(tmp_path_factory.mktemp("data")), max_len=200)


def raw_lines(path):
    return [line.split() for line in path.read_text().splitlines()]


def picked_users(lines):
    """First, last, shortest and longest line."""
    lengths = [len(t) for t in lines]
    return {"first": 0, "last": len(lines) - 1, "shortest": int(np.argmin(lengths)),
            "longest": int(np.argmax(lengths))}


def eval_rows(loader):
    """{internal user: (input_ids, target, seen)} over a whole evaluation loader."""
    rows = {}
    for batch in loader:
        for k, user in enumerate(batch["user"].tolist()):
            seen = batch["seen"][k]
            rows[user] = (batch["input_ids"][k].tolist(), batch["target"][k].item(), seen[seen > 0].tolist())
    return rows


def check_leave_one_out(dm, lines, kept_items):
    max_len = dm.max_len
    to_raw = lambda ids: [str(dm.item_ids[i]) for i in ids if i]  # noqa: E731
    user_index = {str(u): k for k, u in enumerate(dm.user_ids.tolist())}
    val, test = eval_rows(dm.val_dataloader()), eval_rows(dm.test_dataloader())
    train = dm.train_dataset()
    train_row = {u: k for k, u in enumerate(train.users.tolist())}
    for which, line in picked_users(lines).items():
        user, *items = lines[line]
        items = [i for i in items if i in kept_items]
        u = user_index[user]
        inputs, target, seen = test[u]
        assert to_raw([target]) == [items[-1]], which
        assert to_raw(inputs) == items[:-1][-max_len:], which
        assert inputs[len(to_raw(inputs)):] == [0] * (max_len - len(to_raw(inputs))), which  # right padding
        assert to_raw(seen) == items[:-1], which
        inputs, target, seen = val[u]
        assert to_raw([target]) == [items[-2]] and to_raw(inputs) == items[:-2][-max_len:], which
        assert to_raw(seen) == items[:-2], which
        sample = train.__getitems__([train_row[u]])
        window = items[:-2][-(max_len + 1):]
        assert to_raw(sample["input_ids"][0]) == window[:-1], which
        assert to_raw(sample["target_ids"][0]) == window[1:], which


def test_beauty_statistics(beauty):
    assert (beauty.num_users, beauty.num_items, beauty.stats["interactions"]) == (22_363, 12_101, 198_502)
    assert round(beauty.stats["mean_sequence_length"], 2) == 8.88
    assert beauty.stats["kcore"]["rounds"] == []  # already 5-core
    # contiguous ids in first-appearance order: the remap is the identity
    assert beauty.item_ids[1:].tolist() == list(range(1, 12_102))
    assert beauty.stats["items_without_text"] == 7  # the 7 empty titles of beauty_items.tsv


def test_beauty_leave_one_out_by_hand(beauty, shared_data):
    lines = raw_lines(shared_data / "beauty" / "Beauty.txt")
    assert lines[0] == ["1", "1", "2", "3", "4", "5"]  # first user, read by eye
    test = next(iter(beauty.test_dataloader()))
    assert test["input_ids"][0, :5].tolist() == [1, 2, 3, 4, 0] and test["target"][0].item() == 5
    val = next(iter(beauty.val_dataloader()))
    assert val["input_ids"][0, :4].tolist() == [1, 2, 3, 0] and val["target"][0].item() == 4
    assert beauty.item_text[1] == {"title": "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce"}
    check_leave_one_out(beauty, lines, {str(i) for i in range(1, 12_102)})


def test_ml1m_statistics(ml1m):
    assert (ml1m.num_users, ml1m.num_items, ml1m.stats["interactions"]) == (6_040, 3_416, 999_611)
    assert ml1m.stats["raw_interactions"] == 1_000_209 and ml1m.stats["raw_items"] == 3_706
    assert ml1m.stats["kcore"]["rounds"] == [{"interactions_removed": 598, "users_removed": 0,
                                              "items_removed": 290}]


def test_ml1m_leave_one_out_by_hand(ml1m, shared_data):
    lines = raw_lines(shared_data / "ml-1m" / "ml-1m.seq.txt")
    # user 1's line ends with Mulan, Hercules, Pocahontas
    assert lines[0][0] == "1" and lines[0][-3:] == ["1907", "1566", "48"]
    test = eval_rows(ml1m.test_dataloader())
    inputs, target, _ = test[0]
    assert ml1m.item_ids[target] == 48 and ml1m.item_ids[inputs[len(lines[0]) - 3]] == 1566
    assert ml1m.item_text[target] == {"title": "Pocahontas", "year": "1995",
                                      "genres": ["Animation", "Children's", "Musical", "Romance"]}
    kept = {str(i) for i in ml1m.item_ids[1:].tolist()}
    check_leave_one_out(ml1m, lines, kept)


def test_ml1m_latin1_titles(ml1m):
    titles = [t["title"] for t in ml1m.item_text[1:] if t]
    assert any("é" in t for t in titles)


def test_train_batches_have_static_shape(ml1m):
    batch = next(iter(ml1m.train_dataloader()))
    assert batch["input_ids"].shape == batch["target_ids"].shape == (256, 200)
    assert batch["input_ids"].dtype == torch.int64


def test_stats_command_on_merged_configs(beauty, shared_data, tmp_path, capsys):
    base = tmp_path / "beauty.yaml"
    base.write_text("model:\n  d_model: 64\ndata:\n  class_path: datamodules.SequenceFile\n  init_args:\n"
                    "    path: does/not/exist.txt\n    max_len: 50\n")
    override = tmp_path / "shared.yaml"
    override.write_text(f"data:\n  init_args:\n    path: {shared_data / 'beauty' / 'Beauty.txt'}\n"
                        f"    data_dir: {beauty.data_dir}\n"
                        f"    item_text_path: {shared_data / 'beauty' / 'beauty_items.tsv'}\n"
                        f"    item_id_column: s3rec_item_id\n    item_text_columns: [title]\n")
    stats_main(["--config", str(base), "--config", str(override)])
    out = capsys.readouterr().out
    assert "users              22,363" in out and "interactions       198,502" in out
    assert "items w/o text     7" in out
    assert (beauty.processed_dir / "stats.json").is_file()
