"""Smoke test of experiments/quality_table.py on a synthetic sequence file: 1 epoch, tiny models."""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import subprocess
from collections import Counter
from importlib import import_module
from pathlib import Path

import pytest
import torch
import yaml

from experiments.render import TUNED_SEARCHES
from experiments.upgrade import upgrade_config
from m2rec_lightning.seen_score import SeenItemScore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality_table():
    return import_module("experiments.quality_table")


def hand_popularity(sequences: dict[int, list[int]], k: int) -> tuple[float, float]:
    """HR@k and NDCG@k of ranking by training counts, ties counted against the target, by plain Python."""
    counts = Counter(i for s in sequences.values() for i in s[:-2])
    items = {i for s in sequences.values() for i in s}
    hr = ndcg = 0.0
    for s in sequences.values():
        target = s[-1]
        rank = sum(1 for i in items if i != target and counts[i] >= counts[target])
        if rank < k:
            hr += 1
            ndcg += 1 / math.log2(rank + 2)
    return hr / len(sequences), ndcg / len(sequences)


def test_source_commit_names_the_checkout_and_flags_code_changes(tmp_path, quality_table, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    assert quality_table.source_commit() is None  # not a checkout
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "experiments" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert quality_table.source_commit() == head
    (tmp_path / "experiments" / "results" / "r.json").write_text('{"runs": []}\n')  # results written by a run
    (tmp_path / "new.py").write_text("untracked\n")
    assert quality_table.source_commit() == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert quality_table.source_commit() == head + "+changes"
    assert quality_table.short_commit(head + "+changes") == head[:10] + "+changes"
    assert quality_table.short_commit(None) == "—"


def test_quality_table_smoke(tmp_path, quality_table, synthetic_sequence_file):
    config, sequences = synthetic_sequence_file
    out = tmp_path / "results" / "quality_test"
    common = ["--dataset", "beauty", "--max-epochs", "1", "--patience", "1", "--accelerator", "cpu",
              "--extra-config", str(config), "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    quality_table.main(["--models", "sasrec", "mamba4rec", "--seeds", "1", "2", *common])
    # a second invocation adds rows to the same record instead of overwriting it
    results = quality_table.main(["--models", "popularity", "--note", "synthetic smoke data", *common])

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == results
    assert [(r["model"], r["seed"]) for r in saved["runs"]] == [
        ("popularity", None), ("sasrec", 1), ("sasrec", 2), ("mamba4rec", 1), ("mamba4rec", 2)]
    for run in saved["runs"]:
        assert set(run["test"]) == set(quality_table.METRICS)
        assert all(0.0 <= v <= 1.0 for v in run["test"].values())
    for run in saved["runs"][1:]:
        assert run["epochs_run"] == 1 and run["best_epoch"] == 0 and len(run["history"]) == 1
        assert run["ended_by"] == "max_epochs"
        assert run["commit"] == quality_table.source_commit()
        assert run["config_files"][-2:] == [f"configs/models/{run['model']}.yaml", os.path.relpath(config, ROOT)]
        assert "SASRecEncoder" in run["config"] if run["model"] == "sasrec" else "M2RecEncoder" in run["config"]
        assert f"path: {tmp_path / 'seq.txt'}" in run["config"]
    assert saved["runs"][1]["history"] != saved["runs"][2]["history"]  # the seed reaches the model

    pop = saved["runs"][0]
    for k in (5, 10, 20):
        hr, ndcg = hand_popularity(sequences, k)
        assert pop["test"][f"HR@{k}"] == pytest.approx(hr, abs=1e-6)
        assert pop["test"][f"NDCG@{k}"] == pytest.approx(ndcg, abs=1e-6)

    table = out.with_suffix(".md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    for name in ("popularity", "**sasrec**", "**mamba4rec**"):
        assert name in rows
    sasrec_row = next(line for line in table.splitlines() if line.startswith("| **sasrec** | 1, 2 |"))
    assert "±" in sasrec_row and "1/1, 1/1" in sasrec_row  # two seeds: mean ± std; best epoch / epochs run
    assert "- synthetic smoke data" in table and saved["notes"] == ["synthetic smoke data"]
    assert "Budget-limited" in table and "max 1 epochs, early-stopping patience 1" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_tested_run_records_that_early_stopping_ended_it(tmp_path, quality_table, synthetic_sequence_file):
    """lr 0 keeps validation flat, so patience 1 stops the fit after its second epoch; testing the best checkpoint
    afterwards restores the callbacks' state from before the stop, which must not rewrite what ended the fit."""
    config, _ = synthetic_sequence_file
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text("model:\n  init_args:\n    lr: 0.0\n")
    results = quality_table.main(["--dataset", "beauty", "--models", "sasrec", "--seeds", "1", "--max-epochs", "4",
                                  "--patience", "1", "--accelerator", "cpu", "--extra-config", str(config),
                                  "--extra-config", str(frozen), "--out", str(tmp_path / "quality"),
                                  "--work-dir", str(tmp_path / "runs")])
    (run,) = results["runs"]
    assert run["test"] is not None and (run["best_epoch"], run["epochs_run"]) == (0, 2)
    assert run["ended_by"] == "early stopping"


def test_a_fit_cut_off_and_resumed_records_what_an_uninterrupted_fit_records(tmp_path, quality_table,
                                                                           synthetic_sequence_file):
    """--resume continues from last.ckpt: the record keeps the epochs before the cut (EpochHistory rides in the
    checkpoint) and says where the fit resumed; Lightning restores the optimiser and loop, the module the RNG, the
    loader each epoch's order, so the resumed epochs are the ones a fit that ran through would have had."""
    config, _ = synthetic_sequence_file

    def fit(work: str, epochs: int, *extra: str) -> dict:
        (run,) = quality_table.main(["--dataset", "beauty", "--models", "mamba4rec", "--seeds", "1", "--max-epochs",
                                     str(epochs), "--patience", "5", "--accelerator", "cpu", "--extra-config",
                                     str(config), "--out", str(tmp_path / f"{work}-{epochs}"),
                                     "--work-dir", str(tmp_path / work), *extra])["runs"]
        return run

    through = fit("through", 3)
    cut = fit("cut", 1)
    # the earlier process's fit time must carry over: make it large enough that no fresh count could reach it
    last = tmp_path / "cut" / "beauty" / "mamba4rec" / "seed1" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    checkpoint["callbacks"]["EpochHistory"]["seconds"] += 1000.0
    torch.save(checkpoint, last)
    resumed = fit("cut", 3, "--resume")
    assert [e["epoch"] for e in resumed["history"]] == [0, 1, 2] and resumed["epochs_run"] == 3
    assert resumed["history"][0] == cut["history"][0]  # restored from the checkpoint, not re-measured
    for ours, theirs in zip(resumed["history"], through["history"]):
        assert ours["val"] == pytest.approx(theirs["val"], abs=1e-6)
    assert resumed["test"] == pytest.approx(through["test"], abs=1e-6)
    assert resumed["best_epoch"] == through["best_epoch"]
    assert [s["after_epochs"] for s in resumed["fit_segments"]] == [0, 1] and "fit_segments" not in through
    assert "| 3 (resumed after 1) |" in (tmp_path / "cut-3.md").read_text()
    assert all(e["seconds"] > 1000 for e in resumed["history"][1:])
    assert resumed["fit_seconds"] >= resumed["history"][-1]["seconds"]

    # a checkpoint without the history (an older benchmark's) is refused rather than resumed into a partial record
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    del checkpoint["callbacks"]["EpochHistory"]
    torch.save(checkpoint, last)
    with pytest.raises(RuntimeError, match="holds no epoch history"):
        fit("cut", 4, "--resume")
    assert fit("cut", 1)["history"][0]["val"] == cut["history"][0]["val"]  # without --resume: from the start


def test_every_model_config_builds_the_encoder_it_names(quality_table, synthetic_sequence_file):
    config, _ = synthetic_sequence_file
    configs = sorted((ROOT / "configs" / "models").glob("*.yaml"))
    assert {c.stem for c in configs} == set(quality_table.MODELS) - {"popularity"}
    for path in configs:
        cli = quality_table.build_cli(quality_table.dataset_configs("beauty") + [path, config],
                                      ["--trainer.logger=false", "--model.init_args.encoder.init_args.semantic=false"]
                                      if "semantic: true" in path.read_text() else ["--trainer.logger=false"])
        encoder = cli.model.encoder
        wanted = yaml.safe_load(path.read_text())["model"]["init_args"]["encoder"]
        assert type(encoder).__name__ == wanted["class_path"].rsplit(".", 1)[1], path.name
        if path.stem == "mamba4rec_residual":
            assert encoder.blocks[0].residual and encoder.blocks[0].temporal.scales == [1]
            assert encoder.blocks[0].fourier is None and encoder.semantic is None
        if path.stem == "m2rec_no_residual":
            assert not encoder.blocks[0].residual and encoder.blocks[0].temporal.scales == [1, 2, 4]
            assert encoder.blocks[0].fourier is not None and encoder.blocks[0].gate is not None


def test_ended_by_tells_early_stopping_from_the_caps(quality_table):
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping, Timer

    def trainer(stopped_epoch: int, timer: Timer | None):
        early = EarlyStopping(monitor="val/NDCG@10", mode="max")
        early.stopped_epoch = stopped_epoch
        return SimpleNamespace(early_stopping_callback=early, callbacks=[early] + ([timer] if timer else []),
                               max_epochs=200)

    assert quality_table.ended_by(trainer(7, None), 8) == "early stopping"
    assert quality_table.ended_by(trainer(0, None), 200) == "max_epochs"
    assert quality_table.ended_by(trainer(0, Timer(duration=timedelta(0))), 18) == "max_time"
    assert quality_table.ended_by(trainer(0, Timer(duration=timedelta(hours=1))), 18) == "interrupted"


@pytest.mark.parametrize("dataset, search_files", sorted(TUNED_SEARCHES.items()))
def test_tuned_config_is_the_measured_search_winner(quality_table, synthetic_sequence_file, dataset, search_files):
    """configs/tuned/DATASET.yaml must build exactly the model whose test numbers it quotes: the 3-seed validation
    winner of its searches taken together, with every searched option (encoder, module, data, trainer) at the
    winning value."""
    search_module = import_module("experiments.search")
    config, _ = synthetic_sequence_file
    points = [point for name in search_files
              for point in json.loads((ROOT / "experiments" / "results" / dataset / name).read_text())["points"]]
    setting, points = quality_table.search_winner(points, 3, ", ".join(search_files))
    measured_config = upgrade_config(yaml.safe_load(points[0]["config"]))  # in today's option names
    offline = ["--trainer.logger=false", "--model.init_args.encoder.init_args.semantic=false"]
    # the tuned file goes last, as users add it, so its data options apply to the synthetic file's datamodule
    cli = quality_table.build_cli(quality_table.dataset_configs(dataset) + [config, ROOT / f"configs/tuned/{dataset}.yaml"],
                                  offline)
    built_config = cli.config.as_dict()
    built_module = dict(built_config["model"]["init_args"])
    built = built_module.pop("encoder")["init_args"]
    for linked in ("num_items", "text_dim"):  # filled from the datamodule at instantiation, absent from saved configs
        built_module.pop(linked)

    def saved_options(saved: dict, built_options: dict) -> dict:
        """A saved {class_path, init_args}'s options, plus the class's defaults for options added after the run (it
        had the default's behaviour)."""
        module_name, _, class_name = saved["class_path"].rpartition(".")
        defaults = inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
        options = {key: value for key, value in saved["init_args"].items() if key != "encoder"}
        if "seen_score" in options and options["seen_score"] is not None:
            options["seen_score"] = {**options["seen_score"], "init_args": {**{
                key: param.default for key, param in inspect.signature(SeenItemScore).parameters.items()},
                **options["seen_score"]["init_args"]}}
        return {**{key: defaults[key].default for key in built_options.keys() - options.keys()}, **options}

    measured_module = saved_options(measured_config["model"], built_module)
    measured = saved_options(measured_config["model"]["init_args"]["encoder"], built)
    assert {k: v for k, v in built.items() if k != "semantic"} == {k: v for k, v in measured.items() if k != "semantic"}
    assert built_module == measured_module  # the module's options too (label smoothing, optimiser, lr, scheduler)
    def resolved(config: dict, key: str):
        for part in search_module.cli_key(key).split("."):
            config = config[part]
        return config

    # compared as the measured run resolved them, not as the setting spells them ("1e-3" is a string to YAML)
    for key in setting:
        if key.startswith("seen_bias"):  # regrouped into seen_score, compared with the module's options above
            continue
        assert resolved(built_config, key) == resolved(measured_config, key), key
    # the cosine decay's horizon is the trainer's max_epochs, which the setting holds; the patience is the search's
    assert "trainer.max_epochs" in setting and built_module["scheduler"] == "cosine"
    assert built_config["early_stopping"]["patience"] == points[0]["budget"]["patience"]


def test_the_plot_draws_every_search_winner_even_past_the_palette(tmp_path, quality_table):
    """Eight winners of different searches in one record, more names than distinct colours: the plot must still be
    drawn (it raised KeyError past six)."""
    runs = [{"model": "m2rec", "seed": 42, "setting": {"lr": str(i)}, "search": "s.json", "config_files": [],
             "history": [{"epoch": e, "val": {"NDCG@10": 0.01 * (e + i)}} for e in range(3)]} for i in range(8)]
    path = tmp_path / "curves.png"
    quality_table.plot({"dataset": "beauty", "runs": runs}, path)
    assert path.stat().st_size > 0


def test_plot_rows_are_told_apart_by_colour_or_line_style(quality_table):
    """The ML-1M record holds 11 row names; with colours alone, four pairs of rows drew the same line."""
    names = ["m2rec", *[f"m2rec [lr={i}]" for i in range(28)]]  # the Beauty long record holds 23
    styles = quality_table.line_styles(names)
    assert len(set(styles.values())) == len(names) and styles["m2rec"][0] == "tab:red"
    assert quality_table.line_styles(["x", "sasrec"]) == {"x": ("tab:purple", "-", "o"),
                                                          "sasrec": ("tab:blue", "-", "o")}


def test_a_failing_plot_does_not_lose_the_run_it_was_drawing(tmp_path, quality_table, monkeypatch):
    """The record is written before the Markdown and the plot are rendered from it."""
    def broken_plot(results, path):
        raise RuntimeError("no colour left")

    monkeypatch.setattr(quality_table, "markdown", lambda results: "table\n")
    monkeypatch.setattr(quality_table, "plot", broken_plot)
    run = {"model": "popularity", "seed": None, "test": {"NDCG@10": 0.01}, "config_files": []}
    with pytest.raises(RuntimeError, match="no colour left"):
        quality_table.record(tmp_path / "q", "beauty", run, ["a note"])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["runs"] == [run] and saved["notes"] == ["a note"]


def test_a_run_with_weight_averaging_is_tested_on_the_averaged_weights(tmp_path, quality_table,
                                                                        synthetic_sequence_file):
    """With Lightning's EMAWeightAveraging in trainer.callbacks, validation (and so checkpoint selection) sees the
    averaged weights and the best checkpoint stores them. Testing it in the fitting process must score those weights,
    exactly as a fresh `m2rec test` of the same checkpoint does, not the live weights the callback keeps beside them."""
    config, _ = synthetic_sequence_file
    ema = tmp_path / "ema.yaml"
    ema.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
                   "      init_args:\n        decay: 0.5\nmodel:\n  init_args:\n    lr: 0.01\n")
    results = quality_table.main(["--dataset", "beauty", "--models", "sasrec", "--seeds", "1", "--max-epochs", "2",
                                  "--patience", "2", "--accelerator", "cpu", "--extra-config", str(config),
                                  "--extra-config", str(ema), "--out", str(tmp_path / "quality"),
                                  "--work-dir", str(tmp_path / "runs")])
    (run,) = results["runs"]
    checkpoint = torch.load(ROOT / run["best_checkpoint"], map_location="cpu", weights_only=False)
    averaged, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], live[k]) for k in averaged)  # the two weight sets really differ

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(run["config"])
    fresh = quality_table.build_cli([resolved], ["--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    best = str(ROOT / run["best_checkpoint"])
    (logged,) = fresh.trainer.test(fresh.model, datamodule=fresh.datamodule, ckpt_path=best, verbose=False)
    assert run["test"] == pytest.approx({k.removeprefix("test/"): float(v) for k, v in logged.items()}, abs=1e-7)


def test_a_run_with_a_training_config_is_its_own_row(tmp_path, quality_table, monkeypatch):
    """Recording an EMA fit of m2rec seed 42 must not replace the plain m2rec seed 42 already in the record (the row
    key once ignored experiments/configs/ files), and the two must not share a row or a run folder. A max_time or data
    file elsewhere changes none of that."""
    monkeypatch.setattr(quality_table, "plot", lambda results, path: None)

    def run(*extra: str) -> dict:
        metrics = {m: 0.05 for m in quality_table.METRICS}
        return {"model": "m2rec", "seed": 42, "test": metrics, "val_at_best": metrics, "best_epoch": 3, "epochs_run": 8,
                "fit_seconds": 1.0, "budget": {"max_epochs": 8, "patience": 5}, "hardware": "cpu", "history": [],
                "config_files": ["configs/beauty.yaml", "configs/models/m2rec.yaml", *extra]}

    ema = "experiments/configs/ml-1m_batch64.yaml"
    quality_table.record(tmp_path / "q", "beauty", run("/tmp/max_time.yaml"))
    results = quality_table.record(tmp_path / "q", "beauty", run(ema, "/tmp/max_time.yaml"))
    assert [quality_table.label(r) for r in results["runs"]] == ["m2rec", "m2rec + ml-1m_batch64"]
    table = (tmp_path / "q.md").read_text()
    assert "| **m2rec** | 42 |" in table and "| **m2rec + ml-1m_batch64** | 42 |" in table
    assert quality_table.run_folder("m2rec", [quality_table.ROOT / ema, tmp_path / "data.yaml"]) == "m2rec+ml-1m_batch64"
    assert quality_table.run_folder("m2rec", [tmp_path / "ema.yaml"]) == "m2rec"  # same name, outside the folder


def test_the_recbole_check_counts_only_runs_at_the_default_settings(quality_table):
    """A tuned SASRec (a search winner, or one trained with a experiments/configs/ file) is not RecBole's SASRec: it
    must not move the reproduction line, which reads the default runs' mean."""
    def run(seed: int, ndcg: float, **extra) -> dict:
        metrics = {m: ndcg for m in quality_table.METRICS}
        return {"model": "sasrec", "seed": seed, "test": metrics, "val_at_best": metrics, "best_epoch": 3,
                "epochs_run": 8, "fit_seconds": 1.0, "budget": {"max_epochs": 8, "patience": 5}, "hardware": "cpu",
                "config_files": ["configs/beauty.yaml", "configs/models/sasrec.yaml"], "history": [], **extra}

    tuned = run(42, 0.9, setting={"encoder.hidden_size": "512"}, search="s.json")
    averaged = run(42, 0.8)
    averaged["config_files"] = averaged["config_files"] + ["experiments/configs/ml-1m_batch64.yaml"]
    text = quality_table.markdown({"dataset": "beauty", "runs": [run(42, 0.0412), run(43, 0.0420), tuned, averaged]})
    assert "- sasrec: HR@10 0.0416 vs 0.083 (-49.9 %), NDCG@10 0.0416 vs 0.0416 (+0.0 %)" in text
