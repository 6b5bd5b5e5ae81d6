"""Amazon2023(source="datasets"): Hugging Face `datasets` copies (save_to_disk folders, local JSON-lines / Parquet)
give exactly what the file source gives for the same rows, and bad locations are one-line errors."""

import json

import numpy as np
import pytest
from test_data_amazon import META_2023, _review_2023, write_gz

from datamodules import Amazon2023, DataFormatError
from datamodules.base import DataOptionError
from datamodules.parsing import MissingFileError
from datamodules.sources import hf_datasets

datasets = pytest.importorskip("datasets")

# user U3 has a repeated review and the meta table a repeated parent_asin (the first row must win in both sources)
ROWS = [("U1", "P1", 1588687728923), ("U1", "P2", 1588687728000), ("U1", "P3", 1600000000000),
        ("U2", "P1", 1500000000000), ("U2", "P2", 1500000000001), ("U2", "P3", 1500000000002),
        ("U3", "P2", 1700000000000), ("U3", "P4", 1700000000000), ("U3", "P2", 1700000000000),
        ("U3", "P1", 1690000000000)]
META = META_2023 + [
    json.dumps({"parent_asin": "P2", "title": "Toner", "store": None, "categories": ["Beauty", "Skin"],
                "details": {"Size": "200 ml", "Brand": "Acme &amp; Co"}, "price": None, "features": []}),
    json.dumps({"parent_asin": "P2", "title": "a later duplicate"}),
    json.dumps({"parent_asin": "P9", "title": "not reviewed"}),
]
COMMON = dict(min_user_interactions=0, min_item_interactions=0)


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "mirror"
    write_gz(folder / "review_categories" / "All_Beauty.jsonl.gz", [_review_2023(*r) for r in ROWS])
    write_gz(folder / "meta_categories" / "meta_All_Beauty.jsonl.gz", META)
    return folder


def saved_copies(tmp_path):
    """save_to_disk folders laid out as the Hub's raw_review / raw_meta configs (meta `details` as JSON text)."""
    reviews = [json.loads(_review_2023(*r)) for r in ROWS]
    meta = [json.loads(line) for line in META]
    review_dir, meta_dir = tmp_path / "raw_review_All_Beauty", tmp_path / "raw_meta_All_Beauty"
    datasets.Dataset.from_dict({k: [r[k] for r in reviews] for k in ("user_id", "parent_asin", "timestamp",
                                                                      "rating", "text")}).save_to_disk(review_dir)
    columns = {"parent_asin", "title", "store", "categories", "features", "description", "price"}
    table = {k: [r.get(k) for r in meta] for k in columns}
    table["details"] = [json.dumps(r.get("details")) for r in meta]
    datasets.DatasetDict({"full": datasets.Dataset.from_dict(table)}).save_to_disk(meta_dir)
    return review_dir, meta_dir


def prepared(dm):
    return (dm.user_ids.tolist(), dm.item_ids.tolist(), [dm.sequence(u).tolist() for u in range(dm.num_users)],
            dm.item_text, {k: v for k, v in dm.stats.items() if k != "prepare_seconds"})


def test_save_to_disk_and_local_files_equal_the_file_source(files, tmp_path):
    expected = prepared(Amazon2023("All_Beauty", base_url=files.as_uri(), data_dir=str(tmp_path / "a"), **COMMON))
    assert expected[3][expected[1].index("P2")]["title"] == "Toner"  # the fixture exercises the first-row rule
    review_dir, meta_dir = saved_copies(tmp_path)
    from_disk = Amazon2023("All_Beauty", source="datasets", review_dataset=str(review_dir),
                           meta_dataset=str(meta_dir), data_dir=str(tmp_path / "b"), **COMMON)
    from_files = Amazon2023("All_Beauty", source="datasets", data_dir=str(tmp_path / "c"), **COMMON,
                            review_dataset=str(files / "review_categories" / "All_Beauty.jsonl.gz"),
                            meta_dataset=str(files / "meta_categories" / "*.jsonl.gz"))
    for dm in (from_disk, from_files):
        got = prepared(dm)
        assert got[:3] == expected[:3] and got[3] == expected[3] and got[4]["dataset"] == expected[4]["dataset"]
        assert got[4] == expected[4]
        assert (tmp_path / dm.data_dir.name / "amazon2023-All_Beauty" / "processed").is_dir()
    assert all(".arrow" in f.name for f in from_disk.raw_files()) and len(from_disk.raw_files()) == 2


def test_parquet_copy_and_a_changed_copy_rekeys_the_cache(files, tmp_path):
    frame = datasets.load_dataset("json", data_files=str(files / "review_categories" / "All_Beauty.jsonl.gz"),
                                  split="train", cache_dir=str(tmp_path / "hf"))
    frame.to_parquet(str(tmp_path / "reviews.parquet"))
    one = Amazon2023("All_Beauty", source="datasets", review_dataset=str(tmp_path / "reviews.parquet"),
                     with_text=False, data_dir=str(tmp_path / "d"), **COMMON)
    assert one.num_users == 3
    frame.select(range(6)).to_parquet(str(tmp_path / "reviews.parquet"))  # U3 gone: a new cache, not the old one
    two = Amazon2023("All_Beauty", source="datasets", review_dataset=str(tmp_path / "reviews.parquet"),
                     with_text=False, data_dir=str(tmp_path / "d"), **COMMON)
    assert two.num_users == 2 and two.cache_key != one.cache_key


def test_unreachable_hub_is_one_line_naming_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_datasets, "hub_offline_reason", lambda: "HF_HUB_OFFLINE=1")
    dm = Amazon2023("All_Beauty", source="datasets", data_dir=str(tmp_path), **COMMON)
    with pytest.raises(MissingFileError) as err:
        dm.num_items
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "data.review_dataset" in message
    assert "McAuley-Lab/Amazon-Reviews-2023/raw/review_categories/All_Beauty.jsonl" in message


@pytest.mark.parametrize("case,error,match", [
    ("missing", MissingFileError, r"nowhere.jsonl not found \(data.review_dataset\)"),
    ("glob", MissingFileError, r"no file matches \(data.review_dataset\)"),
    ("csv", DataFormatError, r"data.review_dataset: expected a save_to_disk folder"),
    ("folder", DataFormatError, r"data.review_dataset: a folder must be one written by datasets' save_to_disk"),
    ("column", DataFormatError, r"data.review_dataset: missing column\(s\) \['timestamp'\]"),
    ("null", DataFormatError, r"data.review_dataset: row 1: column 'user_id' is empty"),
    ("type", DataFormatError, r"data.review_dataset: column 'timestamp' holds string, expected integers"),
])
def test_bad_local_copies_are_one_line(tmp_path, case, error, match):
    location = {"missing": tmp_path / "nowhere.jsonl", "glob": tmp_path / "none-*.jsonl",
                "csv": tmp_path / "r.csv", "folder": tmp_path}[case] if case in ("missing", "glob", "csv", "folder") \
        else tmp_path / case
    if case in ("column", "null", "type"):
        table = {"user_id": ["U1", None if case == "null" else "U2"], "parent_asin": ["P1", "P2"],
                 "timestamp": ["1", "2"] if case == "type" else [1, 2]}
        if case == "column":
            del table["timestamp"]
        datasets.Dataset.from_dict(table).save_to_disk(location)
    if case == "csv":
        location.write_text("user_id,parent_asin,timestamp\n")
    dm = Amazon2023("All_Beauty", source="datasets", review_dataset=str(location), with_text=False,
                    data_dir=str(tmp_path / "data"), **COMMON)
    with pytest.raises(error, match=match) as err:
        dm.num_items
    assert "\n" not in str(err.value)


def test_local_copy_needs_the_datasets_source():
    with pytest.raises(DataOptionError, match="data.review_dataset is read only with source: datasets"):
        Amazon2023(review_dataset="x")


def test_rows_of_matches_in_arrow_and_keeps_the_first_row():
    table = datasets.Dataset.from_dict({"parent_asin": ["A", "B", "A", "C"], "title": ["a1", "b", "a2", "c"]})
    assert hf_datasets.rows_of(table, {"A", "C", "Z"}, "parent_asin", "opt") == {
        "A": {"parent_asin": "A", "title": "a1"}, "C": {"parent_asin": "C", "title": "c"}}
    assert hf_datasets.rows_of(table, set(), "parent_asin", "opt") == {}
    users, items, times = hf_datasets.interaction_columns(
        datasets.Dataset.from_dict({"u": ["x"], "i": ["y"], "t": [np.int32(5)]}), "u", "i", "t", "opt")
    assert users.tolist() == ["x"] and times.dtype == np.int64
