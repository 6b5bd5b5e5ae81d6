"""The callbacks of `m2rec` and its checkpoints: Lightning's ModelCheckpoint with a `last.ckpt` that follows every
epoch and a record of the run in every checkpoint (which dataset it was fitted on, whether its epoch was cut short);
per-epoch wall time and throughput in the logs; and the download of a checkpoint given as a URL."""
from __future__ import annotations

import http.client
import math
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

RUN_KEY = "m2rec_run"
"""The checkpoint entry with the run's record: {"dataset": dataset_identity(...), "epoch": epoch_progress(...)}."""


class CheckpointError(ValueError):
    """A `--ckpt_path` that cannot be used: missing, not found where it was looked for, or not a plain checkpoint."""


def is_url(path: str) -> bool:
    return urllib.parse.urlsplit(path).scheme.lower() in ("http", "https")


def download_checkpoint(url: str, folder: Path, timeout: float = 60.0) -> Path:
    """Download `url` to a new file in `folder` and return its path.

    Lightning would hand a URL to `torch.hub.load_state_dict_from_url`, which unpickles it with weights_only=False
    (so the file can run code) and caches it by file name (so `http://a/model.ckpt` could be served the earlier
    `http://b/model.ckpt`). A fresh file per call has no cache to go stale; the caller loads it with
    weights_only=True like any local checkpoint.
    """
    fd, name = tempfile.mkstemp(dir=folder, suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError and HTTPError are OSErrors
        raise CheckpointError(f"--ckpt_path {url}: download failed ({err})") from None
    return Path(name)


def dataset_identity(datamodule: Any) -> dict[str, str] | None:
    """What a checkpoint records of the data it was fitted on: the dataset's name and its cache key (a function of
    the raw files' contents and the preprocessing options, so the same for `m2rec stats` and every subcommand); None
    for a datamodule without a cache key."""
    key = getattr(datamodule, "cache_key", None)
    if key is None:
        return None
    return {"name": str(getattr(datamodule, "name", type(datamodule).__name__)), "cache_key": str(key)}


def stored_dataset(checkpoint: dict) -> dict[str, str] | None:
    """The dataset identity a checkpoint recorded, or None (written before it was recorded, or by other code)."""
    record = checkpoint.get(RUN_KEY)
    return record.get("dataset") if isinstance(record, dict) else None


def epoch_progress(trainer: L.Trainer) -> dict[str, Any]:
    """How far the current training epoch got: batches done of the epoch's batches, and what stopped it short.

    `stopped_by` is "max_time" (trainer.max_time ran out), "max_steps", or "stop requested" (another callback set
    trainer.should_stop) when the epoch ends before its last batch, else None. Lightning validates such a partial
    epoch and numbers it like a full one, so the record is the only sign of it."""
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
    total = trainer.num_training_batches
    total = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
    complete = total is None or done >= total
    stopped_by = None
    if not complete:
        remaining = [c.time_remaining() for c in trainer.callbacks if isinstance(c, Timer)]  # None: no max_time
        if any(r is not None and r <= 0 for r in remaining):
            stopped_by = "max_time"
        elif trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            stopped_by = "max_steps"
        elif trainer.should_stop:
            stopped_by = "stop requested"
    return {"epoch": trainer.current_epoch, "batches": done, "of": total, "complete": complete,
            "stopped_by": stopped_by}


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that

    - `save_last` refreshes `last.ckpt` after every validation (or every training epoch, where checkpoints are saved
      then), not only when a top-k file is saved;
    - every checkpoint records the run under `RUN_KEY`: the dataset it was fitted on (`dataset_identity`, which
      `m2rec --ckpt_path best|last` compares with the current data) and how far its epoch got (`epoch_progress`);
    - a top-k checkpoint of an epoch cut short (by trainer.max_time, max_steps or a stop request) is named
      `epoch003-partial-...`, so the file list does not pass it off as a full epoch.

    Lightning 2.x writes `last.ckpt` only together with a new top-k checkpoint, so a fit resumed from it
    (`--ckpt_path last`, `benchmarks/*.py --resume`) restarts at its best epoch so far and repeats every epoch after
    it: on a cosine schedule, whose last epochs rarely set a new best, that can be most of a fit. The class keeps
    Lightning's name because the callback's checkpoint state is keyed by class name and settings: checkpoints written
    with either class resume with the other.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint[RUN_KEY] = {"dataset": dataset_identity(trainer.datamodule), "epoch": epoch_progress(trainer)}

    def _get_metric_interpolated_filepath_name(self, monitor_candidates: dict, trainer: L.Trainer,
                                               del_filepath: str | None = None) -> str:
        # the top-k file name (last.ckpt keeps its name: resuming looks for it)
        if epoch_progress(trainer)["stopped_by"] is None:
            return super()._get_metric_interpolated_filepath_name(monitor_candidates, trainer, del_filepath)
        template = self.filename
        first, sep, rest = (template or "{epoch}-{step}").partition("-")
        self.filename = f"{first}-partial{sep}{rest}"
        try:
            return super()._get_metric_interpolated_filepath_name(monitor_candidates, trainer, del_filepath)
        finally:
            self.filename = template

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # the skip check is Lightning's own: not fitting, sanity check, fast_dev_run, or already saved at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class EpochTimer(Callback):
    """Logs every training epoch's wall time and throughput, so that runs (and a run cut by trainer.max_time) can be
    compared by time and not only by epoch count.

    Logged at each epoch's end (rank 0's clock): `epoch_time_s` (training and its validation), `train_time_s`,
    `val_time_s`, `train_sequences_per_s` (training samples per second of training time) and `epoch_fraction`
    (batches done / batches of a full epoch: below 1 for an epoch cut short)."""

    def __init__(self) -> None:
        super().__init__()
        self._start = self._val_start = 0.0
        self._val_time = 0.0
        self._sequences = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._val_time, self._sequences = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self._sequences += int(ids.shape[0]) if ids is not None else 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_time += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = time.perf_counter() - self._start
        train = max(wall - self._val_time, 1e-9)
        progress = epoch_progress(trainer)
        values = {"epoch_time_s": wall, "train_time_s": train, "val_time_s": self._val_time,
                  "train_sequences_per_s": self._sequences / train}
        if progress["of"]:
            values["epoch_fraction"] = progress["batches"] / progress["of"]
        # rank_zero_only: a wall clock is not averaged over processes (and needs no collective)
        pl_module.log_dict(values, on_step=False, on_epoch=True, rank_zero_only=True)


def check_readable(path: str, shown: str) -> None:
    """Open a checkpoint file as Lightning will (weights only, memory-mapped, so nothing large is read), so that a
    truncated or foreign file stops with one line instead of a torch trace. A pickled payload is left to raise
    pickle.UnpicklingError, which the CLI reports as refused."""
    import pickle

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # torch reports damage as RuntimeError, KeyError, EOFError, ... by format
        detail = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"--ckpt_path {shown}: not a readable checkpoint file ({type(err).__name__}: "
                              f"{detail})") from None
