"""Hostile inputs for every parser: each one either parses or raises DataFormatError naming the file (and line where
there is one) — never a traceback from deep inside pandas/pyarrow/numpy. Property-based (hypothesis)."""

import gzip
import json
import math
import string

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.item_tables import read_item_table
from datamodules.parsing import DataFormatError
from datamodules.preprocess import Interactions, preprocess
from datamodules.sources.amazon import amazon2014_fields, amazon2018_fields, read_metadata_lines, read_review_lines
from datamodules.sources.amazon2023 import amazon2023_fields
from datamodules.sources.custom import read_interaction_table
from datamodules.sources.movielens import read_movies_dat, read_ratings_dat
from datamodules.sources.sequence_files import read_user_item_pairs, read_user_items

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# tokens a hostile file is made of: huge / negative / zero-padded ids, unicode, NaN-ish words, separators
ID = st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(["0", "007", "+3", "-1", "1e5", "nan", "NaN",
                                                                        "inf", "", " ", "ü", "日本", "\u200b", "a b"]),
               st.text(string.ascii_letters + string.digits + "éß_-", min_size=1, max_size=6))


def check(parse, path):
    """Run a parser; the only acceptable failure is a DataFormatError that names this file."""
    try:
        return parse(path)
    except DataFormatError as e:
        assert str(path) in str(e) and e.path == path
        return None


def maybe_gzip(tmp_path, name, data: bytes, gz: bool):
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@SETTINGS
@given(lines=st.lists(st.lists(ID, min_size=0, max_size=6), min_size=0, max_size=8), sep=st.sampled_from([" ", "\t"]))
def test_sequence_files(tmp_path, lines, sep):
    data = "\n".join(sep.join(tokens) for tokens in lines).encode("utf-8")
    path = tmp_path / "seq.txt"
    path.write_bytes(data)
    for reader in (read_user_items, read_user_item_pairs):
        result = check(reader, path)
        if result is not None:
            assert len(result.users) == len(result.items) > 0


@SETTINGS
@given(rows=st.lists(st.tuples(ID, ID, ID, ID), min_size=0, max_size=8), junk=st.sampled_from(["", "::", "1::2", "\xff"]))
def test_ratings_dat(tmp_path, rows, junk):
    text = "\n".join("::".join(r) for r in rows) + ("\n" + junk if junk else "")
    path = tmp_path / "ratings.dat"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if junk != "\xff" else text.encode("utf-8") + b"\xff")
    result = check(read_ratings_dat, path)
    if result is not None:
        assert result.users.dtype == np.int64 and result.timestamps.dtype == np.int64


@SETTINGS
@given(rows=st.lists(st.tuples(ID, st.text(max_size=12), st.text(max_size=8)), min_size=0, max_size=6))
def test_movies_dat(tmp_path, rows):
    path = tmp_path / "movies.dat"
    path.write_bytes("\n".join("::".join(r) for r in rows).encode("latin-1", "replace"))
    check(read_movies_dat, path)


JSON_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(), max_size=2))


@SETTINGS
@given(records=st.lists(st.one_of(st.fixed_dictionaries({"reviewerID": JSON_VALUE, "asin": JSON_VALUE,
                                                         "unixReviewTime": JSON_VALUE}),
                                  st.fixed_dictionaries({"reviewerID": ID, "asin": ID,
                                                         "unixReviewTime": st.integers(-(2**62), 2**62)}),
                                  st.just("not json {"), st.just("[1, 2]"), st.just("")),
                        min_size=0, max_size=6),
       gz=st.booleans(), truncate=st.booleans())
def test_amazon_reviews(tmp_path, records, gz, truncate):
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()
    path = maybe_gzip(tmp_path, "reviews.json", text, gz)
    if truncate and gz:
        path.write_bytes(path.read_bytes()[: max(len(path.read_bytes()) // 2, 1)])
    result = check(lambda p: read_review_lines(p, "reviewerID", "asin", "unixReviewTime"), path)
    if result is not None:
        assert len(result.users) == len(result.items) == len(result.timestamps) > 0


@SETTINGS
@given(records=st.lists(st.one_of(st.fixed_dictionaries({"asin": ID, "title": JSON_VALUE, "categories": JSON_VALUE,
                                                         "price": JSON_VALUE, "brand": JSON_VALUE,
                                                         "description": JSON_VALUE, "details": JSON_VALUE}),
                                  st.just("{'asin': 'A1', 'title': "), st.just("{'asin': 'A1'} trailing")),
                        min_size=0, max_size=6),
       python_literals=st.booleans(), gz=st.booleans())
def test_amazon_metadata(tmp_path, records, python_literals, gz):
    lines = [r if isinstance(r, str) else (repr(r) if python_literals else json.dumps(r)) for r in records]
    path = maybe_gzip(tmp_path, "meta.json", "\n".join(lines).encode(), gz)
    wanted = {str(r["asin"]) for r in records if isinstance(r, dict)} | {"A1"}
    import ast

    for parse, fields, id_field in ((ast.literal_eval, amazon2014_fields, "asin"), (json.loads, amazon2018_fields, "asin"),
                                    (json.loads, amazon2023_fields, "asin")):
        table = check(lambda p: read_metadata_lines(p, wanted, id_field, parse, fields), path)
        for value in (table or {}).values():
            json.dumps(value)  # text fields are JSON-able (they go into the cache)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(b'{"reviewerID": "u", "asin": "i", "unixReviewTime": 1}\n' * 2000)
    path = tmp_path / "reviews.json.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="reviews.json.gz"):
        read_review_lines(path, "reviewerID", "asin", "unixReviewTime")
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(gzip.compress(b"{'asin': 'i', 'title': 't'}\n" * 2000)[:300])
    with pytest.raises(DataFormatError, match="meta.json.gz"):
        read_metadata_lines(meta, {"i"}, "asin", json.loads, amazon2014_fields)


TIMESTAMP = st.one_of(st.integers(-(2**62), 2**62).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                      st.sampled_from(["", "NaN", "2024-01-02T03:04:05Z", "2024-13-45", "yesterday", "1e300"]))


@SETTINGS
@given(rows=st.lists(st.tuples(ID, ID, TIMESTAMP), min_size=0, max_size=8), fmt=st.sampled_from(["csv", "tsv"]),
       gz=st.booleans())
def test_custom_tables(tmp_path, rows, fmt, gz):
    sep = "," if fmt == "csv" else "\t"
    text = "\n".join([sep.join(["user_id", "item_id", "timestamp"])] + [sep.join(r) for r in rows])
    path = maybe_gzip(tmp_path, f"t.{fmt}", text.encode(), gz)
    result = check(lambda p: read_interaction_table(p, "user_id", "item_id", "timestamp", fmt), path)
    if result is not None:
        assert len(result.users) == len(result.items) == len(result.timestamps) == len(rows)
        assert not np.isnan(np.asarray(result.timestamps, dtype=np.float64)).any()


@SETTINGS
@given(users=st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.none()), min_size=1, max_size=6),
       stamps=st.lists(st.floats(allow_nan=True), min_size=6, max_size=6))
def test_parquet_tables(tmp_path, users, stamps):
    frame = pd.DataFrame({"user_id": pd.array(users, dtype="Int64"), "item_id": [f"i{k}" for k in range(len(users))],
                          "timestamp": stamps[: len(users)]})
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    result = check(lambda p: read_interaction_table(p, "user_id", "item_id", "timestamp", "parquet"), path)
    if result is not None:
        assert all(u is not None for u in users) and not any(math.isnan(s) for s in stamps[: len(users)])
    check(lambda p: read_item_table(p, "parquet"), path)


@SETTINGS
@given(rows=st.lists(st.tuples(ID, st.text(max_size=10)), min_size=0, max_size=6), fmt=st.sampled_from(["csv", "tsv"]))
def test_item_tables(tmp_path, rows, fmt):
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"items.{fmt}"
    path.write_text("\n".join([f"id{sep}title"] + [sep.join(r) for r in rows]), encoding="utf-8")
    table = check(lambda p: read_item_table(p, fmt), path)
    if table is not None:
        json.dumps(table)


@settings(max_examples=40, deadline=None)
@given(users=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=40),
       items=st.lists(st.text(min_size=1, max_size=3), min_size=40, max_size=40))
def test_preprocess_counts_every_filtered_row(users, items):
    """Huge/negative ids and duplicate rows: every raw row is kept or accounted for by a counted filter."""
    data = Interactions(np.array(users, dtype=np.int64), np.array(items[: len(users)]), None)
    try:
        out = preprocess(data, 0, 0, drop_duplicates=True)
    except ValueError as e:
        assert "no user has" in str(e)
        return
    s = out.stats
    removed = s["duplicates_dropped"] + s["short_user_interactions_removed"]
    assert s["interactions"] + removed == len(users)
    assert set(out.user_ids.tolist()) <= set(users)


def test_yaml_config_errors_are_clear(tmp_path, capsys):
    """A bad value or unknown key in a config file is reported by the CLI parser, naming the key, not a traceback."""
    from m2rec_lightning.cli import main

    bad = tmp_path / "bad.yaml"
    for content, needle in (({"data": {"class_path": "datamodules.SequenceFile",
                                       "init_args": {"path": "x.txt", "max_len": "ten"}}}, "max_len"),
                            ({"model": {"class_path": "m2rec_lightning.SequentialRecommender",
                                        "init_args": {"lr": "fast"}}}, "lr"),
                            ({"trainer": {"max_epochz": 3}}, "max_epochz")):
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(bad), "--print_config"])
        assert exit_info.value.code != 0
        assert needle in capsys.readouterr().err
    bad.write_text("data: [unclosed\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0 and "error" in capsys.readouterr().err.lower()
