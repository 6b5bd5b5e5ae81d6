"""Hostile-user review (issue 55): a checkpoint names the item catalogue it was trained on, and testing it against
another catalogue with the same number of items is refused instead of scoring the wrong items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_reliability_security import tiny_args

from m2rec_lightning.cli import main


def relabelled(folder: Path, source: Path, offset: int) -> Path:
    """The same sequences with every raw item id moved by `offset`: same counts and structure, other items."""
    lines = [line.split() for line in source.read_text().splitlines()]
    path = folder / "seq_other.txt"
    path.write_text("".join(f"{u} {' '.join(str(int(i) + offset) for i in items)}\n" for u, *items in lines))
    return path


def test_a_checkpoint_from_another_catalogue_with_the_same_item_count_is_refused(tmp_path, capsys):
    args = tiny_args(tmp_path)
    main(["fit", *args, "--trainer.max_epochs", "1"])
    last = tmp_path / "ckpt" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)["item_map_sha256"]
    assert isinstance(stored, str) and len(stored) == 64

    main(["test", *args, "--ckpt_path", str(last)])  # the training catalogue: accepted
    other = list(args)
    other[other.index("--data.path") + 1] = str(relabelled(tmp_path, tmp_path / "seq.txt", 1000))
    other[other.index("--data.data_dir") + 1] = str(tmp_path / "data_other")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *other, "--ckpt_path", str(last)])
    assert exit_info.value.code == 1
    assert "error: this checkpoint was trained on another item catalogue" in capsys.readouterr().err


def test_scoring_options_are_checked_against_the_checkpoint(tmp_path, capsys):
    """A window-only checkpoint tested with another seen-score scope, or without its score, is refused, naming the
    option; exclude_seen may differ, as a diagnostic, with a warning."""
    score = ["--model.seen_score", "m2rec_lightning.SeenItemScore"]
    args = tiny_args(tmp_path) + score
    main(["fit", *args, "--trainer.max_epochs", "1"])
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["scoring"] == {
        "seen_score": {"class": "SeenItemScore", "scope": "input"}, "exclude_seen": False}
    capsys.readouterr()
    for changed in (["--model.seen_score.scope", "history"], ["--model.seen_score", "null"]):
        with pytest.raises(SystemExit):
            main(["test", *args, *changed, "--ckpt_path", last])
        err = capsys.readouterr().err
        assert "error: this checkpoint was trained with seen_score {'class': 'SeenItemScore', 'scope': 'input'}" in err
    with pytest.warns(UserWarning, match="exclude_seen=True, but the checkpoint was trained"):
        main(["test", *args, "--model.exclude_seen", "true", "--ckpt_path", last])
