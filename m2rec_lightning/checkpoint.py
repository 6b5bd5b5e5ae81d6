"""The checkpoint callback of `m2rec`: Lightning's, with a `last.ckpt` that follows every epoch; and the download of
a checkpoint given as a URL."""
from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


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


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `save_last` refreshes `last.ckpt` after every validation (or every
    training epoch, where checkpoints are saved then), not only when a top-k file is saved.

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

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # the skip check is Lightning's own: not fitting, sanity check, fast_dev_run, or already saved at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
