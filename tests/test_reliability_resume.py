"""Kill and resume: a run SIGKILLed mid-epoch and resumed with `--ckpt_path last` ends bit-identical to an
uninterrupted run (seeded, deterministic, dropout on), because

- Lightning restores weights, optimiser, schedulers and loop counters;
- the training loader checkpoints how many batches of the epoch it served and skips them on restart, and each
  epoch's shuffle depends only on (seed, epoch) (datamodules/resume.py) — a plain map-style DataLoader would restart
  the epoch from its first batch, in epoch 0's order;
- the module checkpoints the global torch RNG (dropout masks), which Lightning does not.
Not covered: `train_window="random"` (its window draws come from a per-dataset generator that is not checkpointed),
and DDP training (rank 0's RNG state is saved for all ranks).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from test_reliability_support import REPO, TESTS, read_metrics, run_cli, tiny_model_args, write_sequences
from torch.utils.data import DataLoader, TensorDataset

from datamodules.resume import EpochRandomSampler, ResumableDataLoader, epoch_seed
from m2rec_lightning.checkpoint import ModelCheckpoint

STEPS_PER_EPOCH = 10  # 301 users with training pairs / batch size 32
EPOCHS = 3


def fit_args(tmp_path: Path, run: str, ckpt: str) -> list[str]:
    return [
        "fit", *tiny_model_args(), "--seed_everything", "7", "--trainer.deterministic", "true",
        "--data", "datamodules.SequenceFile", "--data.path", str(tmp_path / "seq.txt"),
        "--data.data_dir", str(tmp_path / "data"), "--data.max_len", "10", "--data.batch_size", "32",
        "--data.eval_batch_size", "128", "--data.min_user_interactions", "0", "--data.min_item_interactions", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", str(EPOCHS),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / run),
        "--checkpoint.dirpath", str(tmp_path / ckpt), "--checkpoint.every_n_train_steps", "5",
    ]


def val_by_epoch(rows: list[dict]) -> dict[int, dict]:
    return {int(r["epoch"]): {k: v for k, v in r.items() if k.startswith("val/")} for r in rows if "val/HR@10" in r}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    write_sequences(tmp_path / "seq.txt", n_users=301)
    run_cli(fit_args(tmp_path, "straight", "ckpt_straight"), tmp_path)

    # step 17 is batch 6 of epoch 1; the newest checkpoint (step 15) is 5 batches into that epoch
    marker = tmp_path / "frozen.json"
    freeze = json.dumps({"class_path": "test_reliability_support.FreezeAtStep",
                         "init_args": {"step": 17, "marker": str(marker)}})
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "OMP_NUM_THREADS": "1",
                        "PYTHONWARNINGS": "ignore"}
    killed = subprocess.Popen([sys.executable, "-m", "m2rec_lightning.cli",
                               *fit_args(tmp_path, "killed", "ckpt_resumed"), f"--trainer.callbacks+={freeze}"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert killed.poll() is None, f"training ended before step 17:\n{killed.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "training never reached step 17"
            time.sleep(0.2)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.kill()
        killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert json.loads(marker.read_text())["epoch"] == 1
    interrupted = torch.load(tmp_path / "ckpt_resumed" / "last.ckpt", weights_only=True)
    assert interrupted["global_step"] == 15 and interrupted["epoch"] == 1
    assert interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches_served": 5}]

    run_cli([*fit_args(tmp_path, "resumed", "ckpt_resumed"), "--ckpt_path", "last"], tmp_path)

    straight = torch.load(tmp_path / "ckpt_straight" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "ckpt_resumed" / "last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the final validation metrics, and those of the epoch that was cut, are identical
    metrics_straight = val_by_epoch(read_metrics(tmp_path / "straight"))
    metrics_resumed = val_by_epoch(read_metrics(tmp_path / "resumed"))
    assert sorted(metrics_resumed) == [1, 2]
    for epoch in (1, 2):
        assert metrics_resumed[epoch] == metrics_straight[epoch]


def test_resumable_loader_continues_where_it_stopped():
    data = list(range(103))
    loader = ResumableDataLoader(data, batch_size=10, sampler=EpochRandomSampler(data, seed=3))
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    assert sorted(sum(full, [])) == data and len(full) == 11

    loader.sampler.set_epoch(2)  # Lightning calls set_epoch before every epoch
    it = iter(loader)
    first = [next(it).tolist() for _ in range(4)]
    state = loader.state_dict()
    assert first == full[:4] and state == {"batches_served": 4}

    fresh = ResumableDataLoader(data, batch_size=10, sampler=EpochRandomSampler(data, seed=3))
    fresh.sampler.set_epoch(2)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[4:]
    fresh.sampler.set_epoch(2)
    assert [b.tolist() for b in fresh] == full  # the skip applies once
    fresh.sampler.set_epoch(3)
    assert [b.tolist() for b in fresh] != full  # a new epoch draws a new order


def test_epoch_order_depends_only_on_seed_and_epoch():
    data = list(range(50))
    a, b = EpochRandomSampler(data, seed=1), EpochRandomSampler(data, seed=1)
    for epoch in (0, 1, 5):
        list(a)  # drawing other epochs first must not matter
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_adjacent_run_seeds_share_no_epoch_order():
    # with a seed of seed + epoch, run seed 43's epoch e was run seed 42's epoch e + 1, so "3 seeds" replayed one
    # stream of batch orders shifted by an epoch
    data = list(range(200))
    orders = {}
    for seed in (42, 43, 44):
        sampler = EpochRandomSampler(data, seed=seed)
        for epoch in range(20):
            sampler.set_epoch(epoch)
            orders[seed, epoch] = tuple(sampler)
    assert len(set(orders.values())) == len(orders)
    assert len({epoch_seed(s, e) for s in range(100) for e in range(100)}) == 100 * 100
    assert epoch_seed(-1, 0) != epoch_seed(1, 0) and 0 <= epoch_seed(-1, 0) < 2**63  # negative seeds are valid


class ScriptedScore(L.LightningModule):
    """Logs a given validation score per epoch, so which epochs set a new best is known in advance."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.scores = scores
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_follows_every_epoch_not_only_new_bests(tmp_path):
    # Lightning's own ModelCheckpoint leaves last.ckpt at epoch 1 here, the last new best
    scores = [0.5, 0.9, 0.3, 0.2]
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_last=True)
    L.Trainer(max_epochs=len(scores), callbacks=[callback], accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(ScriptedScore(scores), data, data)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.load(callback.best_model_path, map_location="cpu", weights_only=False)["epoch"] == 1
    # a fit resumed from last.ckpt continues after epoch 3, knows the best, and Lightning's class reads its state
    assert last["epoch"] == len(scores) - 1
    assert last["callbacks"][callback.state_key]["best_model_path"] == callback.best_model_path
    assert callback.state_key == LightningModelCheckpoint(monitor="val/score", mode="max").state_key
