"""Lightning's EMA weight averaging, made safe for models whose `setup` fills buffers (M2Rec's item-text table)."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeightAveraging(LightningEMA):
    """Validate, checkpoint and finish on an exponential moving average of the weights (Lightning's callback).

    Lightning copies the model for the average in the callback's `setup`, which runs before the LightningModule's:
    the copy of a text-reading encoder then holds an all-zero item-text table, and the sanity check before the first
    step, which validates that copy, fails. Until the first update the average is by definition the model itself, so
    the copy is refreshed from it then. Use in `trainer.callbacks` (class_path m2rec_lightning.EMAWeightAveraging).

    Lightning's callback also loads a checkpoint's live weights over its averaged ones whenever it still holds an
    average, so `trainer.test(ckpt_path="best")` after `fit` in one process would score weights that validation did
    not choose; outside fit this callback leaves the checkpoint's `state_dict` (the average) in place, and puts it in
    its own copy too, which validation swaps in after a fit in the same process."""

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and int(self._average_model.n_averaged) == 0:
            self._average_model.module.load_state_dict(pl_module.state_dict())
        super().on_validation_epoch_start(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resuming: restore both the live weights and the average
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        elif self._average_model is not None:
            self._average_model.module.load_state_dict(checkpoint["state_dict"])
