"""`m2rec fit` / `m2rec test` under DDP (2 CPU processes, gloo) count every user exactly once, give the same metrics
as one process on the same checkpoint, and build the data and text-embedding caches once (in rank 0).

Slow: three CLI subprocesses (two of them with two ranks), about a minute each on a busy 2-core machine.
"""

import json
from pathlib import Path

import pytest
import torch
from test_reliability_support import (
    read_metrics,
    run_cli,
    tiny_model_args,
    write_item_titles,
    write_sequences,
)

N_USERS = 301  # odd: a padding DistributedSampler would evaluate one user twice


def common_args(tmp_path: Path, run: str) -> list[str]:
    users = json.dumps({"class_path": "test_reliability_support.UserRecorder",
                        "init_args": {"folder": str(tmp_path / run / "users")}})
    return [
        *tiny_model_args(semantic=True),
        "--data", "test_reliability_support.CountingSequenceFile",
        "--data.path", str(tmp_path / "seq.txt"), "--data.item_text_path", str(tmp_path / "items.tsv"),
        "--data.data_dir", str(tmp_path / "data"), "--data.max_len", "10", "--data.batch_size", "32",
        "--data.eval_batch_size", "64", "--data.min_user_interactions", "0", "--data.min_item_interactions", "0",
        "--data.text", '{"template": "title"}',
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / run / "logs"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        f"--trainer.callbacks+={users}",
    ]


def ddp(devices: int) -> list[str]:
    return ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])


def recorded(folder: Path, stage: str) -> dict[int, list[int]]:
    """{rank: users evaluated in the last epoch of `stage`}."""
    out = {}
    for path in sorted(folder.glob(f"{stage}.rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        last = max(r["epoch"] for r in rows)
        out[int(path.stem.split("rank")[1])] = [u for r in rows if r["epoch"] == last for u in r["users"]]
    return out


def last_values(rows: list[dict], prefix: str) -> dict[str, float]:
    values = {}
    for row in rows:
        values.update({k: v for k, v in row.items() if k.startswith(prefix)})
    return values


@pytest.mark.slow
def test_ddp_fit_and_test_match_one_process_on_the_same_checkpoint(tmp_path):
    write_sequences(tmp_path / "seq.txt", n_users=N_USERS)
    write_item_titles(tmp_path / "items.tsv")

    run_cli(["fit", *common_args(tmp_path, "fit"), *ddp(2), "--trainer.max_epochs", "2"], tmp_path, timeout=400)
    last = tmp_path / "ckpt" / "last.ckpt"
    run_cli(["test", *common_args(tmp_path, "test2"), *ddp(2), "--ckpt_path", str(last)], tmp_path, timeout=300)
    run_cli(["validate", *common_args(tmp_path, "val1"), *ddp(1), "--ckpt_path", str(last)], tmp_path)
    run_cli(["test", *common_args(tmp_path, "test1"), *ddp(1), "--ckpt_path", str(last)], tmp_path)

    # every user evaluated exactly once, split between the two ranks
    for run, stage in (("fit", "val"), ("test2", "test")):
        per_rank = recorded(tmp_path / run / "users", stage)
        assert set(per_rank) == {0, 1}, run
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_USERS)), run
        assert abs(len(per_rank[0]) - len(per_rank[1])) == 1
    assert sorted(recorded(tmp_path / "test1" / "users", "test")[0]) == list(range(N_USERS))

    # the same metrics (sums over users in float64; only float32 logging rounds them)
    val_ddp = last_values(read_metrics(tmp_path / "fit" / "logs"), "val/")
    val_one = last_values(read_metrics(tmp_path / "val1" / "logs"), "val/")
    test_ddp = last_values(read_metrics(tmp_path / "test2" / "logs"), "test/")
    test_one = last_values(read_metrics(tmp_path / "test1" / "logs"), "test/")
    assert len(val_one) == len(test_one) == 9
    assert val_ddp == pytest.approx(val_one, abs=1e-6) and test_ddp == pytest.approx(test_one, abs=1e-6)
    assert val_one["val/HR@20"] > 0.2  # it learned something, so the comparison is not between two zero vectors

    # data and text caches were built once, by the process that became rank 0; everyone else loaded them
    fit_pids = {json.loads(line)["pid"] for f in (tmp_path / "fit" / "users").glob("*.jsonl")
                for line in f.read_text().splitlines()}
    rank0_pid = json.loads((tmp_path / "fit" / "users" / "val.rank0.jsonl").read_text().splitlines()[0])["pid"]
    assert len(fit_pids) == 2
    assert (tmp_path / "data" / "builds.log").read_text().split() == [str(rank0_pid)]
    assert (tmp_path / "data" / "text_builds.log").read_text().split() == [str(rank0_pid)]
    assert len(list((tmp_path / "data").rglob("text_emb-*.safetensors"))) == 1
    assert torch.load(last, weights_only=True)["text_embedding_key"]
