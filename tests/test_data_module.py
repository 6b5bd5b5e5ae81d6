"""The base datamodule: lazy preparation, the verified cache (corruption, staleness, locking) and its loaders."""

import json
import threading

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules import SequenceFile, SequentialDataModule, samplers
from datamodules import base as base_module
from datamodules.cache import save_cache


@pytest.fixture
def seq_file(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, 31):
        items = rng.integers(1, 25, size=rng.integers(3, 15))
        lines.append(" ".join(map(str, [user, *items])))
    path = tmp_path / "toy.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def builds(monkeypatch):
    """Counts how often preprocessing really runs."""
    calls = []
    original = SequentialDataModule._build

    def counting(self, *args):
        calls.append(threading.get_ident())
        return original(self, *args)

    monkeypatch.setattr(SequentialDataModule, "_build", counting)
    return calls


def make(seq_file, tmp_path, **kwargs):
    kwargs = {"min_user_interactions": 0, "min_item_interactions": 0, "data_dir": str(tmp_path / "data")} | kwargs
    return SequenceFile(str(seq_file), **kwargs)


def test_properties_prepare_lazily_once(seq_file, tmp_path, builds):
    dm = make(seq_file, tmp_path)
    assert builds == []  # constructing does nothing
    assert dm.num_items == 24 and dm.num_users == 30
    assert len(builds) == 1
    dm.prepare_data()
    dm.setup("fit")
    assert len(builds) == 1
    again = make(seq_file, tmp_path, batch_size=7, max_len=3)  # loader options share the cache
    assert again.num_items == 24 and again.processed_dir == dm.processed_dir and len(builds) == 1
    assert dm.item_text is None
    assert dm.user_ids.tolist() == list(range(1, 31))
    assert dm.item_ids[0] == -1 and sorted(dm.item_ids[1:].tolist()) == list(range(1, 25))
    first_line = seq_file.read_text().splitlines()[0].split()
    assert [dm.item_ids[i] for i in dm.sequence(0)] == [int(t) for t in first_line[1:]]


def test_cache_files_are_plain_npy_with_checksums(seq_file, tmp_path):
    dm = make(seq_file, tmp_path)
    folder = dm.processed_dir
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["checksums"]) == {"offsets.npy", "items.npy", "user_ids.npy", "item_ids.npy"}
    for name in meta["checksums"]:
        np.load(folder / name, allow_pickle=False)
    assert meta["stats"]["users"] == 30 and meta["raw_files"] == {"toy.txt": meta["raw_files"]["toy.txt"]}
    with pytest.raises(TypeError, match="object"):
        save_cache(tmp_path / "x", {"bad": np.array([{"a": 1}], dtype=object)}, {}, {})


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "delete", "version"])
def test_damaged_cache_is_detected_and_rebuilt(seq_file, tmp_path, builds, damage, caplog):
    dm = make(seq_file, tmp_path)
    items = dm.sequence(3).copy()
    folder = dm.processed_dir
    target = folder / "items.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-5])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "meta":
        (folder / "meta.json").write_text("{not json")
    elif damage == "delete":
        target.unlink()
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(meta | {"version": -1}))
    fresh = make(seq_file, tmp_path)
    assert np.array_equal(fresh.sequence(3), items)
    assert len(builds) == 2
    assert any("rebuilding" in r.message for r in caplog.records)
    make(seq_file, tmp_path).num_items  # and the rebuilt cache is good again
    assert len(builds) == 2


def test_changed_raw_file_or_option_gives_a_new_cache(seq_file, tmp_path, builds):
    dm = make(seq_file, tmp_path)
    first = dm.processed_dir
    assert make(seq_file, tmp_path, min_item_interactions=2).processed_dir != first
    assert make(seq_file, tmp_path, drop_duplicates=True).processed_dir != first
    with open(seq_file, "a") as f:
        f.write("99 1 2 3\n")
    changed = make(seq_file, tmp_path)
    assert changed.processed_dir != first and changed.num_users == 31
    assert len(builds) == 4


def test_concurrent_preparation_builds_once(seq_file, tmp_path, builds):
    results, errors = [], []

    def worker():
        try:
            results.append(make(seq_file, tmp_path).num_items)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [24] * 4
    assert len(builds) == 1


def test_argument_validation(seq_file, tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        make(seq_file, tmp_path, max_len=0)
    with pytest.raises(ValueError, match="train_window"):
        make(seq_file, tmp_path, train_mode="prefix", train_window="random")
    with pytest.raises(ValueError, match="train_window='all' only applies"):
        make(seq_file, tmp_path, train_mode="prefix", train_window="all")
    with pytest.raises(ValueError, match="min_item_interactions"):
        make(seq_file, tmp_path, min_item_interactions=-1)


def test_loaders_shapes_and_counts(seq_file, tmp_path):
    dm = make(seq_file, tmp_path, max_len=6, batch_size=8, eval_batch_size=7)
    train = list(dm.train_dataloader())
    assert all(b["input_ids"].shape == (len(b["input_ids"]), 6) for b in train)
    lengths = np.diff(np.load(dm.processed_dir / "offsets.npy"))
    assert sum(len(b["input_ids"]) for b in train) == int((lengths - 2 >= 2).sum())
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader()),
                          ("predict", dm.predict_dataloader())):
        users = torch.cat([b["user"] for b in loader])
        assert users.tolist() == list(range(dm.num_users)), split
    prefix = make(seq_file, tmp_path, train_mode="prefix", max_len=6)
    assert len(prefix.train_dataloader().dataset) == int(np.maximum(lengths - 3, 0).sum())


def test_eval_loaders_use_the_unpadded_sampler_under_ddp(seq_file, tmp_path, monkeypatch):
    dm = make(seq_file, tmp_path)
    dm.num_items
    monkeypatch.setattr(samplers.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(samplers.dist, "get_rank", lambda group=None: 3)
    loader = dm.test_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)
    assert torch.cat([b["user"] for b in loader]).tolist() == list(range(3, 30, 4))


class _Probe(L.LightningModule):
    """Just enough model to run Lightning's loops over the datamodule's batches."""

    def __init__(self, num_items):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_items + 1, 8, padding_idx=0)
        self.seen_users = []

    def training_step(self, batch, batch_idx):
        logits = self.embedding(batch["input_ids"]) @ self.embedding.weight.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=0)

    def validation_step(self, batch, batch_idx):
        self.seen_users.append(batch["user"])

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return batch["user"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_in_lightning_loops(seq_file, tmp_path):
    dm = make(seq_file, tmp_path, batch_size=8, eval_batch_size=16)
    model = _Probe(dm.num_items)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    model.seen_users.clear()
    trainer.test(model, datamodule=dm, verbose=False)
    assert torch.cat(model.seen_users).tolist() == list(range(30))
    predicted = trainer.predict(model, datamodule=dm)
    assert torch.cat(predicted).tolist() == list(range(30))
    assert base_module.LOADER_OPTIONS <= set(dm.hparams)


def test_no_training_pairs_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("1 1 2 3\n2 2 3 1\n")
    dm = make(path, tmp_path)
    assert dm.stats["users_without_train_pairs"] == 2
    assert len(list(dm.test_dataloader())) == 1  # still evaluable
    with pytest.raises(ValueError, match="no training samples"):
        dm.train_dataloader()
