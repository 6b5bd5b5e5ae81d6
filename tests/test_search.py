"""experiments/search.py: grid parsing, and a two-point search on a synthetic sequence file (1 epoch, tiny models)."""
from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from filelock import FileLock


@pytest.fixture(scope="module")
def search():
    return import_module("experiments.search")


def test_grid_values_split_outside_brackets(search):
    assert search.split_values("0.1, [1,2],{a: 1, b: 2},x") == ["0.1", "[1,2]", "{a: 1, b: 2}", "x"]
    for bad in ("[1,2", "1,,2", "1]"):
        with pytest.raises(ValueError, match="unbalanced brackets or an empty value"):
            search.split_values(bad)


def test_grid_keys_and_product(search):
    assert search.cli_key("encoder.dropout") == "model.init_args.encoder.init_args.dropout"
    assert search.cli_key("data.batch_size") == "data.init_args.batch_size"
    assert search.cli_key("lr") == "model.init_args.lr"
    assert search.cli_key("trainer.gradient_clip_val") == "trainer.gradient_clip_val"
    assert search.cli_key("model.init_args.lr") == "model.init_args.lr"
    with pytest.raises(ValueError, match="grid key 'foo.bar'"):
        search.cli_key("foo.bar")
    assert search.parse_grid(["lr=1e-3,1e-2", "encoder.scales=[1],[1,2]"]) == [
        {"lr": "1e-3", "encoder.scales": "[1]"}, {"lr": "1e-3", "encoder.scales": "[1,2]"},
        {"lr": "1e-2", "encoder.scales": "[1]"}, {"lr": "1e-2", "encoder.scales": "[1,2]"},
    ]
    with pytest.raises(ValueError, match="names a key twice"):
        search.parse_grid(["lr=1", "lr=2"])
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        search.parse_grid(["lr"])


def test_settings_rank_by_mean_over_seeds_whatever_their_key_order(search):
    def point(setting, seed, ndcg):
        return {"setting": setting, "seed": seed, "val_at_best": {"NDCG@10": ndcg}, "config_files": []}

    points = [point({"a": "1", "b": "2"}, 42, 0.050), point({"a": "0", "b": "2"}, 42, 0.052),
              point({"b": "2", "a": "1"}, 43, 0.056), point({"a": "0", "b": "2"}, 43, 0.050)]
    ranked = search.quality_table.rank_settings(points)
    assert [[p["seed"] for p in group] for _, group in ranked] == [[42, 43], [42, 43]]
    assert ranked[0][0] == {"a": "1", "b": "2"}  # mean 0.053 beats 0.051, though seed 42 alone says otherwise

    lucky = [*points, point({"a": "2", "b": "2"}, 42, 0.060)]
    assert search.quality_table.search_winner(lucky, 1, "s.json")[0] == {"a": "2", "b": "2"}
    assert search.quality_table.search_winner(lucky, 2, "s.json")[0] == {"a": "1", "b": "2"}
    with pytest.raises(ValueError, match=r"s.json: no setting has 3 or more seeds \(most: 2\)"):
        search.quality_table.search_winner(lucky, 3, "s.json")
    setting, group = search.quality_table.search_winner(lucky, 2, "s.json", [43])
    assert setting == {"a": "1", "b": "2"} and [p["seed"] for p in group] == [43]  # chosen on both seeds, seed 43 kept
    with pytest.raises(ValueError, match=r"was not fitted with seed\(s\) \[7\]"):
        search.quality_table.search_winner(lucky, 2, "s.json", [43, 7])


def test_search_runs_each_point_on_validation_only_and_resumes(tmp_path, search, synthetic_sequence_file, capsys):
    config, _ = synthetic_sequence_file
    out = tmp_path / "results" / "search_test"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "encoder.dropout=0.0,0.3", "--grid", "lr=0.01",
            "--max-epochs", "1", "--patience", "1", "--accelerator", "cpu", "--extra-config", str(config),
            "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--note", "synthetic"]
    record = search.main(argv)

    assert json.loads(out.with_suffix(".json").read_text()) == record
    assert [p["setting"] for p in record["points"]] == [{"encoder.dropout": "0.0", "lr": "0.01"},
                                                        {"encoder.dropout": "0.3", "lr": "0.01"}]
    for point, dropout in zip(record["points"], (0.0, 0.3)):
        resolved = yaml.safe_load(point["config"])
        assert resolved["model"]["init_args"]["encoder"]["init_args"]["dropout"] == dropout
        assert resolved["model"]["init_args"]["lr"] == 0.01
        assert "test" not in point and "test_seconds" not in point  # the search never looks at test
        assert 0.0 <= point["val_at_best"]["NDCG@10"] <= 1.0 and point["epochs_run"] == 1
    assert record["points"][0]["history"] != record["points"][1]["history"]  # the setting reaches the model

    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    best = max(record["points"], key=lambda p: p["val_at_best"]["NDCG@10"])
    assert f"| 1 | {best['setting']['encoder.dropout']} | 0.01 | 42 |" in rows[0]
    assert "- synthetic" in table and "Test metrics were not computed" in table
    commit = record["points"][0]["commit"]
    assert f"Code: {search.quality_table.short_commit(commit)} (" in table

    # a second call with one new point runs only that one
    capsys.readouterr()
    record = search.main([*argv[:4], "--grid", "encoder.dropout=0.3,0.5", *argv[6:]])
    printed = capsys.readouterr().out
    assert "already in" in printed and printed.count("best val NDCG@10") == 1
    assert [p["setting"]["encoder.dropout"] for p in record["points"]] == ["0.0", "0.3", "0.5"]

    # a point whose checkpoint is gone is skipped, with a hint, unless --refit-missing refits it in place
    lost = record["points"][0]
    (search.quality_table.ROOT / lost["best_checkpoint"]).unlink()
    only_lost = [*argv[:4], "--grid", "encoder.dropout=0.0", *argv[6:]]
    capsys.readouterr()
    assert search.main(only_lost) == record and "--refit-missing refits it" in capsys.readouterr().out
    record = search.main([*only_lost, "--refit-missing"])
    assert "is gone, refitting it" in capsys.readouterr().out
    assert [p["setting"]["encoder.dropout"] for p in record["points"]] == ["0.3", "0.5", "0.0"]
    refit = record["points"][-1]
    assert (search.quality_table.ROOT / refit["best_checkpoint"]).is_file()
    assert refit["val_at_best"] == pytest.approx(lost["val_at_best"])  # seeded: the same fit again
    capsys.readouterr()
    assert search.main([*only_lost, "--refit-missing"]) == record  # nothing left to refit
    assert "already in" in capsys.readouterr().out

    with pytest.raises(ValueError, match="holds a sasrec search"):
        search.main([*argv[:2], "--model", "mamba4rec", *argv[4:]])

    # the quality table tests the validation winner's checkpoint once and labels the row with its setting
    quality_table = search.quality_table
    path = out.with_suffix(".json")
    table_out = tmp_path / "results" / "quality_from_search"
    common = ["--dataset", "beauty", "--accelerator", "cpu", "--out", str(table_out), "--from-search", str(path)]
    results = quality_table.main(common)
    winner = max(record["points"], key=lambda p: p["val_at_best"]["NDCG@10"])
    (row,) = results["runs"]
    assert row["setting"] == winner["setting"] and row["history"] == winner["history"]
    assert set(row["test"]) == set(quality_table.METRICS) and all(0.0 <= v <= 1.0 for v in row["test"].values())
    name = f"sasrec [encoder.dropout={winner['setting']['encoder.dropout']}, lr=0.01]"
    table = table_out.with_suffix(".md").read_text()
    assert f"| **{name}** | 42 |" in table and "validation winners of a hyper-parameter search" in table
    again = quality_table.main(common)  # the same row is replaced, and testing a checkpoint is deterministic
    assert [r["test"] for r in again["runs"]] == [row["test"]]
    with pytest.raises(ValueError, match=r"was not fitted with seed\(s\) \[7\]"):
        quality_table.main([*common, "--search-seeds", "7"])
    with pytest.raises(SystemExit):  # without --from-search there is nothing for them to choose among
        quality_table.main(["--dataset", "beauty", "--models", "popularity", "--min-seeds", "3"])

    saved = json.loads(path.read_text())
    for p in saved["points"]:
        p["best_epoch"] += 1
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="the run folder was reused after the search"):
        quality_table.main(common)


def test_a_grid_point_that_caps_the_epochs_is_recorded_as_ended_by_that_cap(tmp_path, search, synthetic_sequence_file):
    """A cosine schedule needs its own epoch horizon, so trainer.max_epochs can be a grid key; what ended the fit must
    be read from the trainer, not from --max-epochs (which would call this fit interrupted)."""
    config, _ = synthetic_sequence_file
    record = search.main(["--dataset", "beauty", "--model", "sasrec", "--grid", "trainer.max_epochs=1",
                          "--grid", "scheduler=cosine", "--max-epochs", "5", "--patience", "5", "--accelerator", "cpu",
                          "--extra-config", str(config), "--out", str(tmp_path / "search"),
                          "--work-dir", str(tmp_path / "runs")])
    (point,) = record["points"]
    assert point["epochs_run"] == 1 and point["ended_by"] == "max_epochs"
    assert yaml.safe_load(point["config"])["trainer"]["max_epochs"] == 1


def test_an_empty_record_renders_without_a_table(search):
    text = search.markdown({"dataset": "ml-1m", "model": "m2rec", "notes": ["why"], "points": []})
    assert text.splitlines()[-1] == "No point has been fitted yet."
    assert "- why" in text and "| rank |" not in text and "Hardware" not in text


def test_a_rendering_error_does_not_lose_the_fitted_point(tmp_path, search, synthetic_sequence_file, monkeypatch):
    """The point is on disk before its Markdown is rendered, as in quality_table.record."""
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--max-epochs", "1", "--patience", "1",
            "--accelerator", "cpu", "--extra-config", str(config), "--out", str(out), "--work-dir", str(tmp_path / "r")]
    search.main(argv[:4] + ["--grid", "lr=0.02"] + argv[6:])  # an earlier point: the Markdown renders it
    markdown = search.markdown

    def fail_on_the_new_point(record):
        if len(record["points"]) > 1:
            raise KeyError("a renderer bug")
        return markdown(record)

    monkeypatch.setattr(search, "markdown", fail_on_the_new_point)
    with pytest.raises(KeyError, match="a renderer bug"):
        search.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [p["setting"] for p in saved["points"]] == [{"lr": "0.02"}, {"lr": "0.01"}]


def test_a_point_fitted_with_a_training_config_is_its_own_setting_and_run_folder(tmp_path, search,
                                                                                 synthetic_sequence_file):
    """The same grid values with experiments/configs/ema.yaml are another setting: the search must fit them (not skip
    them as done), in their own run folder (the first fit's checkpoints must survive for --from-search), and rank and
    show them apart; the quality table must give them their own row."""
    config, _ = synthetic_sequence_file
    out, runs = tmp_path / "search", tmp_path / "runs"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--max-epochs", "1", "--patience", "1",
            "--accelerator", "cpu", "--extra-config", str(config), "--out", str(out), "--work-dir", str(runs)]
    ema = search.quality_table.ROOT / "experiments" / "configs" / "ml-1m_batch64.yaml"
    plain = search.main(argv)["points"][0]
    record = search.main([*argv, "--extra-config", str(ema)])
    assert len(record["points"]) == 2
    averaged = record["points"][1]
    assert averaged["config_files"][-1] == "experiments/configs/ml-1m_batch64.yaml"
    folders = {Path(p["best_checkpoint"]).parents[2].name for p in record["points"]}
    name = search.point_name("sasrec", {"lr": "0.01"})
    assert folders == {name, name + "+ml-1m_batch64"}
    assert (search.quality_table.ROOT / plain["best_checkpoint"]).is_file()
    assert [len(group) for _, group in search.quality_table.rank_settings(record["points"])] == [1, 1]
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert "experiments/configs/" in rows[0] and {row.split(" | ")[2] for row in rows[1:]} == {"ml-1m_batch64", "—"}

    again = search.main([*argv, "--extra-config", str(ema)])  # now both are done
    assert len(again["points"]) == 2
    assert [search.quality_table.label(p) for p in again["points"]] == [
        "sasrec [lr=0.01]", "sasrec [lr=0.01] + ml-1m_batch64"]


def test_notes_land_with_the_runs_they_describe(tmp_path, search, synthetic_sequence_file, monkeypatch):
    """A search killed before it saved a point leaves no note; rerunning a finished search only appends the note."""
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--max-epochs", "1", "--patience", "1",
            "--accelerator", "cpu", "--extra-config", str(config), "--out", str(out),
            "--work-dir", str(tmp_path / "runs")]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(search.quality_table, "run_model", killed)
        with pytest.raises(KeyboardInterrupt):
            search.main([*argv, "--note", "the killed run"])
    assert json.loads(out.with_suffix(".json").read_text())["notes"] == []

    record = search.main([*argv, "--note", "the run"])
    assert record["notes"] == ["the run"] and len(record["points"]) == 1
    again = search.main([*argv, "--note", "the run", "--note", "read later"])
    assert again["notes"] == ["the run", "read later"] and again["points"] == record["points"]
    assert "- read later" in out.with_suffix(".md").read_text()


def test_resume_takes_a_cut_off_point_to_its_full_schedule(tmp_path, search, synthetic_sequence_file, capsys):
    """A screen cut by trainer.max_time is recorded like a finished point; --resume (and only it) continues it from
    last.ckpt, keeping its earlier epochs, and replaces its record."""
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--patience", "5", "--accelerator", "cpu",
            "--extra-config", str(config), "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    (screen,) = search.main([*argv, "--max-epochs", "1"])["points"]
    # a fit that ran through its budget is never resumed
    assert search.main([*argv, "--max-epochs", "2", "--resume"])["points"] == [screen]
    saved = json.loads(out.with_suffix(".json").read_text())
    saved["points"][0]["ended_by"] = "max_time"  # what the record says when the Timer cut the fit after epoch 1
    out.with_suffix(".json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert search.main([*argv, "--max-epochs", "2"])["points"] == saved["points"]  # without --resume: skipped
    (point,) = search.main([*argv, "--max-epochs", "2", "--resume"])["points"]
    assert "cut off before its last epoch, resuming it" in capsys.readouterr().out
    assert point["epochs_run"] == 2 and [e["epoch"] for e in point["history"]] == [0, 1]
    assert point["history"][0] == screen["history"][0] and point["ended_by"] == "max_epochs"
    assert [s["after_epochs"] for s in point["fit_segments"]] == [0, 1]


def test_processes_sharing_a_record_skip_the_points_the_other_fits_or_recorded(tmp_path, search, synthetic_sequence_file,
                                                                              capsys, monkeypatch):
    """Two searches on one OUT.json with overlapping seeds: the second must neither delete nor resume a run folder the
    first is fitting, nor refit a point the first recorded after the second started."""
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    argv = ["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--max-epochs", "1", "--patience", "1",
            "--accelerator", "cpu", "--extra-config", str(config), "--out", str(out), "--work-dir", str(tmp_path / "r")]
    (first,) = search.main([*argv, "--seeds", "42"])["points"]
    busy_dir = (search.quality_table.ROOT / first["best_checkpoint"]).parents[1].with_name("seed43")
    busy_dir.mkdir()
    (busy_dir / "marker").touch()
    with FileLock(str(search.quality_table.lock_path(busy_dir))):  # what a process fitting seed 43 holds
        record = search.main([*argv, "--seeds", "42", "43"])
    assert [p["seed"] for p in record["points"]] == [42]
    assert (busy_dir / "marker").is_file()
    printed = capsys.readouterr().out
    assert "seed 43: skipped" in printed and "is being fitted by another process" in printed

    fitted = []
    run_model = search.quality_table.run_model

    def fit_while_another_records(model, seed, *rest, **kwargs):
        fitted.append(seed)
        run = run_model(model, seed, *rest, **kwargs)

        def add_other(record):  # the other process finishes seed 45 while this one fits 44
            record["points"].append({**record["points"][0], "seed": 45})

        search.quality_table.update_json(out.with_suffix(".json"), None, add_other)
        return run

    monkeypatch.setattr(search.quality_table, "run_model", fit_while_another_records)
    record = search.main([*argv, "--seeds", "44", "45"])
    assert fitted == [44] and sorted(p["seed"] for p in record["points"]) == [42, 44, 45]
    assert "seed 45: recorded by another process meanwhile, skipped" in capsys.readouterr().out
