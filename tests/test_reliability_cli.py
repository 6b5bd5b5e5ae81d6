"""Hostile-user review (issue 55), the CLI: validate/test/predict never score an untrained model by accident, `best`
and `last` are found in a fresh process (or the error says where they were looked for), and errors of the user's
making print one line instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reliability_security import tiny_args

from datamodules.parsing import DataFormatError
from m2rec_lightning.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def holds(cli, path: Path) -> bool:
    """Whether the CLI's model carries the weights of checkpoint `path`."""
    state = cli.model.state_dict()
    return all(torch.equal(state[k], v) for k, v in weights_of(path).items())


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(tmp_path, capsys, subcommand):
    out = tmp_path / "top.csv"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *tiny_args(tmp_path), "--predict_writer.output_path", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: m2rec {subcommand}: no checkpoint given" in err
    assert "--ckpt_path best|last|FILE|URL" in err and "--untrained" in err
    assert not out.exists()  # no file of random recommendations


def test_untrained_runs_only_when_asked(tmp_path, capsys):
    out = tmp_path / "top.csv"
    main(["predict", *tiny_args(tmp_path), "--untrained", "--predict_writer.output_path", str(out)])
    assert out.exists()
    with pytest.raises(SystemExit):
        main(["test", *tiny_args(tmp_path), "--untrained", "--ckpt_path", "last"])
    assert "--untrained and --ckpt_path last exclude each other" in capsys.readouterr().err
    assert "--untrained" in subprocess.run(
        [sys.executable, "-m", "m2rec_lightning.cli", "test", "--help"], cwd=REPO, capture_output=True, text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120,
    ).stdout


@pytest.mark.parametrize("which", ["last", "best"])
def test_best_or_last_before_any_fit_says_where_it_looked(tmp_path, capsys, which):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *tiny_args(tmp_path), "--ckpt_path", which])
    assert exit_info.value.code == 1
    assert f"error: --ckpt_path {which}: no last.ckpt in {tmp_path / 'ckpt'};" in capsys.readouterr().err


def test_best_and_last_after_a_fit_without_a_checkpoint_folder(tmp_path, monkeypatch, capsys):
    """No config: the fit logs to ./lightning_logs/version_N/ and keeps its checkpoints there; a fresh `test` has a
    new logger version, so it must look in the fit's version folders, not its own."""
    monkeypatch.chdir(tmp_path)
    args = tiny_args(tmp_path, run_dir=False)
    with pytest.raises(SystemExit):
        main(["test", *args, "--ckpt_path", "best"])
    assert f"no last.ckpt in {tmp_path / 'lightning_logs' / '*' / 'checkpoints'};" in capsys.readouterr().err

    main(["fit", *args, "--trainer.max_epochs", "2"])
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    best = make_cli(["test", *args, "--ckpt_path", "best"])
    printed = capsys.readouterr().out.split("best checkpoint: ")[1].split()[0]
    assert Path(printed).parent == folder and Path(printed).name.startswith("epoch") and holds(best, Path(printed))
    assert holds(make_cli(["test", *args, "--ckpt_path", "last"]), folder / "last.ckpt")

    main(["fit", *args, "--trainer.max_epochs", "1", "--seed_everything", "7"])  # a newer run, a later version
    (newer,) = [p for p in tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt") if p.parent != folder]
    assert holds(make_cli(["test", *args, "--ckpt_path", "last"]), newer)


def bad_table_args(tmp_path: Path) -> list[str]:
    table = tmp_path / "log.csv"
    table.write_text("user_id,item_id,timestamp\n1,a,5\n1,b,99999999999999999999\n1,c,7\n")
    args = tiny_args(tmp_path)
    args[args.index("datamodules.SequenceFile")] = "datamodules.InteractionTable"
    args[args.index("--data.path") + 1] = str(table)
    return args


def test_user_errors_print_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *bad_table_args(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'log.csv'}:3: timestamp '99999999999999999999'" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) <= 3


def test_traceback_flag_and_variable_show_the_trace(tmp_path, monkeypatch):
    with pytest.raises(DataFormatError, match="log.csv:3"):
        main(["fit", *bad_table_args(tmp_path), "--traceback"])
    monkeypatch.setenv("M2REC_TRACEBACK", "1")
    with pytest.raises(DataFormatError, match="log.csv:3"):
        main(["fit", *bad_table_args(tmp_path)])


def test_the_command_exits_1_with_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "m2rec_lightning.cli", "test", *tiny_args(tmp_path)], cwd=tmp_path, text=True,
        capture_output=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: m2rec test: no checkpoint given, so the model would be untrained; pass --ckpt_path best|last|FILE|URL, "
        "or --untrained to run it untrained on purpose"
    ]
