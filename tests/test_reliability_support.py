"""Helpers for the reliability tests: synthetic data, and callbacks / a datamodule that `m2rec` subprocesses load by
class path (tests/ is put on their PYTHONPATH). No tests here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np

import datamodules.text_embeddings as text_embeddings
from datamodules import SequenceFile

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def write_sequences(path: Path, n_users: int = 301, n_items: int = 50, seed: int = 0) -> Path:
    """`user item item ...` lines: a noisy walk over the items, so a model learns something in a few epochs."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(5, 16))
        start, step = int(rng.integers(0, n_items)), int(rng.integers(1, 4))
        items = [(start + i * step) % n_items + 1 if rng.random() > 0.2 else int(rng.integers(1, n_items + 1))
                 for i in range(length)]
        lines.append(" ".join(map(str, [user, *items])))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_item_titles(path: Path, n_items: int = 50) -> Path:
    rows = ["item_id\ttitle"] + [f"{i}\tproduct number {i} in colour {('red', 'blue', 'green')[i % 3]}"
                                 for i in range(1, n_items + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 240, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`python -m m2rec_lightning.cli ARGS` with tests/ importable and one thread per process."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "m2rec_lightning.cli", *args], cwd=cwd, env=env, text=True,
                            capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"m2rec {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def tiny_model_args(semantic: bool = False) -> list[str]:
    """A small M2Rec (pure-PyTorch Mamba) that trains in seconds on CPU."""
    return [
        "--model", "m2rec_lightning.SequentialRecommender",
        "--model.encoder", "m2rec_lightning.M2RecEncoder",
        "--model.encoder.init_args.hidden_size", "16", "--model.encoder.init_args.d_state", "4",
        "--model.encoder.init_args.max_len", "10", "--model.encoder.init_args.scales", "[1, 2]",
        "--model.encoder.init_args.mamba_backend", "torch",
        "--model.encoder.init_args.semantic", str(semantic).lower(),
    ]


def read_metrics(csv_dir: Path) -> list[dict]:
    """Rows of a CSVLogger metrics.csv (one per logging call), empty cells dropped."""
    import csv

    (path,) = list(csv_dir.rglob("metrics.csv"))
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class UserRecorder(L.Callback):
    """Appends every evaluated user id, with this process's rank, to `<folder>/<stage>.rank<r>.jsonl`.

    Args:
        folder: where to write.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _record(self, trainer: L.Trainer, stage: str, batch: dict) -> None:
        if trainer.sanity_checking:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{stage}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "epoch": trainer.current_epoch,
                                "users": batch["user"].tolist()}) + "\n")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, "val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, "test", batch)


class FreezeAtStep(L.Callback):
    """After optimizer step `step` finishes, write `marker` (with the pid) and wait to be SIGKILLed by the test.

    Args:
        step: global step (1-based count of optimizer steps) at which to stop.
        marker: file to create.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(json.dumps({"pid": os.getpid(), "epoch": trainer.current_epoch,
                                               "batch_idx": batch_idx}))
            time.sleep(600)


class CountingSequenceFile(SequenceFile):
    """SequenceFile that appends the pid to `<data_dir>/builds.log` whenever it really preprocesses, and to
    `<data_dir>/text_builds.log` whenever a text encoder is loaded (which only happens on a cache miss)."""

    def _build(self, folder, identity) -> None:
        with open(self.data_dir / "builds.log", "a") as f:
            f.write(f"{os.getpid()}\n")
        super()._build(folder, identity)

    @property
    def text_embeddings(self):
        log = self.data_dir / "text_builds.log"
        original = text_embeddings.TextEncoder

        class Counting(original):
            def __init__(self, *args, **kwargs):
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
                super().__init__(*args, **kwargs)

        text_embeddings.TextEncoder = Counting
        try:
            return super().text_embeddings
        finally:
            text_embeddings.TextEncoder = original
