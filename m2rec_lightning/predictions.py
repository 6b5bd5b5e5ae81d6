"""Writes `m2rec predict` output: the top-K items per user in RAW ids, with scores, as CSV or Parquet."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter


class OutputPathError(ValueError):
    """The predictions file cannot be written where it is asked for (a user's error, printed as one line)."""


class TopKWriter(BasePredictionWriter):
    """Collects `predict_step` outputs and writes one row per (user, rank): user_id, rank (1-based), item_id, score.

    Args:
        output_path: file to write; the suffix picks the format (.csv, .tsv or .parquet). Under DDP each process writes
            its own users to `<stem>.rank<r><suffix>` (users are split without duplicates).
    """

    def __init__(self, output_path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        suffix = Path(output_path).suffix.lower()
        if suffix not in {".csv", ".tsv", ".parquet"}:
            raise OutputPathError(f"predict_writer.output_path must end in .csv, .tsv or .parquet, got {output_path!r}")
        self.output_path = Path(output_path)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        users = np.concatenate([b["user"].cpu().numpy() for b in batches])  # (U,)
        items = np.concatenate([b["items"].cpu().numpy() for b in batches])  # (U, k)
        scores = np.concatenate([b["scores"].float().cpu().numpy() for b in batches])  # (U, k)
        dm = trainer.datamodule
        k = items.shape[1]
        frame = pd.DataFrame(
            {
                "user_id": np.repeat(np.asarray(dm.user_ids)[users], k),
                "rank": np.tile(np.arange(1, k + 1), len(users)),
                "item_id": np.asarray(dm.item_ids)[items.reshape(-1)],
                "score": scores.reshape(-1),
            }
        )
        path = self.output_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if path.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        os.replace(tmp, path)
        print(f"wrote top-{k} items for {len(users):,} users to {path}")
