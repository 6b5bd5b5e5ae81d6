"""Numerics (bf16-mixed on CPU, NaN stop through the Trainer) and caches prepared by two processes at once."""

import json
import multiprocessing
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_reliability_support import write_sequences

from datamodules import SequenceFile
from datamodules.cache import load_cache
from m2rec_lightning.models.m2rec import M2RecEncoder
from m2rec_lightning.module import SequentialRecommender


def tiny(tmp_path: Path, **kwargs) -> SequenceFile:
    path = tmp_path / "seq.txt"
    if not path.exists():
        write_sequences(path, n_users=101)
    return SequenceFile(str(path), data_dir=str(tmp_path / "data"), max_len=10, batch_size=32, eval_batch_size=64,
                        min_user_interactions=0, min_item_interactions=0, **kwargs)


def module(num_items: int, **kwargs) -> SequentialRecommender:
    encoder = partial(M2RecEncoder, hidden_size=16, d_state=4, max_len=10, scales=[1, 2], semantic=False,
                      mamba_backend="torch")
    return SequentialRecommender(encoder=encoder, num_items=num_items, **kwargs)


class FiniteLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_one_epoch_bf16_mixed_on_cpu_is_finite(tmp_path):
    L.seed_everything(0)
    dm = tiny(tmp_path)
    model, seen = module(dm.num_items), FiniteLoss()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[seen])
    trainer.fit(model, datamodule=dm)
    result = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert len(seen.losses) == 4 and all(np.isfinite(seen.losses))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(np.isfinite(v) for v in result.values()) and len(result) == 9


def test_nan_loss_through_the_trainer_names_the_step(tmp_path):
    dm = tiny(tmp_path)
    model = module(dm.num_items)

    class PoisonAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.encoder.item_embedding.weight.fill_(float("nan"))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[PoisonAtStep()])
    with pytest.raises(FloatingPointError, match=r"global step 3 \(epoch 0, batch 3\)"):
        trainer.fit(model, datamodule=dm)


def _prepare(path: str, data_dir: str, queue) -> None:
    torch.set_num_threads(1)
    dm = SequenceFile(path, data_dir=data_dir, min_user_interactions=0, min_item_interactions=0)
    queue.put((dm.num_items, str(dm.processed_dir)))


def test_two_processes_preparing_at_once_end_with_one_valid_cache(tmp_path):
    path = write_sequences(tmp_path / "seq.txt", n_users=2001)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_prepare, args=(str(path), str(tmp_path / "data"), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert results[0] == results[1]
    folder = Path(results[0][1])
    meta = json.loads((folder / "meta.json").read_text())
    assert load_cache(folder, {"key": meta["key"]}) is not None
    assert not list(folder.glob(".*.tmp"))  # no torn temporary files left behind
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]
