"""experiments/exclude_seen.py on a one-epoch search over a synthetic sequence file."""
from __future__ import annotations

import json
from importlib import import_module

import pytest


def test_masking_seen_items_never_lowers_a_metric_and_leaves_the_default_ranking_alone(tmp_path,
                                                                                      synthetic_sequence_file):
    search, exclude_seen = import_module("experiments.search"), import_module("experiments.exclude_seen")
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    search.main(["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--seeds", "42", "43",
                 "--max-epochs", "1", "--patience", "1", "--accelerator", "cpu", "--extra-config", str(config),
                 "--out", str(out), "--work-dir", str(tmp_path / "runs")])
    table = tmp_path / "results" / "exclude_seen"
    rows = exclude_seen.main(["--dataset", "beauty", "--from-search", str(out.with_suffix(".json")),
                              "--min-seeds", "2", "--accelerator", "cpu", "--out", str(table)])

    assert [r["seed"] for r in rows] == [42, 43] and json.loads(table.with_suffix(".json").read_text())["rows"] == rows
    quality = search.quality_table.main(["--dataset", "beauty", "--accelerator", "cpu", "--min-seeds", "2",
                                         "--from-search", str(out.with_suffix(".json")),
                                         "--out", str(tmp_path / "results" / "quality")])
    assert [r["test"] for r in rows] == [r["test"] for r in quality["runs"]]  # the default column is the table's
    for r in rows:
        assert all(r["test_exclude_seen"][m] >= r["test"][m] for m in exclude_seen.METRICS)
    # the synthetic users repeat items, so masking what they saw moves some target's rank
    assert any(r["test_exclude_seen"] != r["test"] for r in rows)
    assert "| sasrec [lr=0.01] | 42, 43 |" in table.with_suffix(".md").read_text()

    # another invocation adds its rows to the record; a row measured again replaces its earlier copy
    copy = tmp_path / "copy.json"
    copy.write_text(out.with_suffix(".json").read_text())
    args = ["--min-seeds", "2", "--accelerator", "cpu", "--out", str(table)]
    both = exclude_seen.main(["--dataset", "beauty", "--from-search", str(copy), *args])
    assert [(r["search"] == rows[0]["search"], r["seed"]) for r in both] == [(True, 42), (True, 43), (False, 42),
                                                                               (False, 43)]
    again = exclude_seen.main(["--dataset", "beauty", "--from-search", str(out.with_suffix(".json")), *args])
    assert again == both[2:] + rows  # testing a checkpoint is deterministic
    assert json.loads(table.with_suffix(".json").read_text())["rows"] == again
    record = json.loads(table.with_suffix(".json").read_text())
    table.with_suffix(".json").write_text(json.dumps(record | {"dataset": "ml-1m"}))
    with pytest.raises(ValueError, match="holds ml-1m rows; use another --out"):
        exclude_seen.main(["--dataset", "beauty", "--from-search", str(copy), *args])

    # --search-seeds measures only the seeds named, so a seed whose checkpoint is gone can be left out
    only = exclude_seen.main(["--dataset", "beauty", "--from-search", str(out.with_suffix(".json")),
                              "--search-seeds", "43", "--min-seeds", "2", "--accelerator", "cpu",
                              "--out", str(tmp_path / "only43")])
    assert only == rows[1:]

    # a later record whose checkpoint is gone fails the run, but the rows measured before it are kept
    gone = json.loads(out.with_suffix(".json").read_text())
    for point in gone["points"]:
        point["best_checkpoint"] = str(tmp_path / "deleted.ckpt")
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    with pytest.raises(FileNotFoundError, match="is gone"):
        exclude_seen.main(["--dataset", "beauty", "--from-search", str(out.with_suffix(".json")),
                           str(tmp_path / "gone.json"), "--min-seeds", "2", "--accelerator", "cpu", "--out",
                           str(tmp_path / "partial")])
    assert json.loads((tmp_path / "partial.json").read_text())["rows"] == rows
