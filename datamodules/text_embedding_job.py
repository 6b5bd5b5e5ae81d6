"""The item-text table as a Lightning predict job: one process per device, each embedding its own shard files.

Every rank derives the same ``ShardPlan`` (same texts, key and longest-first order), takes the shards ``k`` with
``k % world_size == rank``, skips those whose file already verifies (a resumed job) and hands the others to a
``BasePredictionWriter`` that writes them in the shard format of ``text_embeddings``. After a barrier, rank 0
assembles the table from the verified shard files exactly as a one-process build does (embedding any shard still
missing itself), so it is the table ``load_or_build_text_embeddings`` would build, under the same key.

Run it from a script that every rank can re-run (Lightning's ``ddp`` starts ranks 1.. by re-running the command):
``python -m datamodules.embed_text`` is one.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader

from .text_embeddings import ShardPlan, TextBuild, TextEmbeddings, TextEncoder, plan_text_build

log = logging.getLogger(__name__)


class ShardEmbedder(L.LightningModule):
    """Predicts one shard per step: ``(k, vectors)``, or ``(k, None)`` when shard k's file already verifies.

    The encoder is built in ``setup``, on the device Lightning gave the rank, and is not a submodule: it has no
    trainable state, and DDP then has nothing to wrap or synchronise.
    """

    def __init__(self, build: TextBuild, batch_size: int, shard_size: int):
        super().__init__()
        self.build, self.batch_size, self.shard_size = build, batch_size, shard_size
        self.encoder: TextEncoder | None = None
        self.plan: ShardPlan | None = None

    def setup(self, stage: str) -> None:
        self.encoder = self.build.encoder(self.batch_size, str(self.trainer.strategy.root_device))
        self.plan = self.build.plan(self.encoder, self.shard_size)

    def predict_dataloader(self) -> DataLoader:
        # a static, disjoint split: no DistributedSampler, whose padding would embed a shard twice
        mine = list(range(self.trainer.global_rank, self.plan.num_shards, self.trainer.world_size))
        return DataLoader(mine, batch_size=None)

    def predict_step(self, k: int, batch_idx: int = 0) -> tuple[int, Tensor | None]:
        k = int(k)
        if self.plan.load(k) is not None:
            return k, None
        return k, self.plan.embed(self.encoder, k)


class ShardWriter(BasePredictionWriter):
    """Writes each newly embedded shard file and counts this rank's shards; a barrier at the end makes every
    rank's files visible before rank 0 assembles the table."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.embedded = self.reused = 0

    def write_on_batch_end(self, trainer, pl_module: ShardEmbedder, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        k, vec = prediction
        if vec is None:
            self.reused += 1
            return
        pl_module.plan.save(k, vec)
        self.embedded += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("rank %d: embedded %d shards, reused %d finished ones", trainer.global_rank, self.embedded,
                 self.reused)
        trainer.strategy.barrier()


def build_text_embeddings(
    arguments: dict[str, Any],
    *,
    devices: int | str = 1,
    accelerator: str = "auto",
    strategy: str = "auto",
    shard_size: int = 4096,
    progress: bool = True,
) -> tuple[TextEmbeddings | None, ShardWriter | None]:
    """Build (or load) the table of ``load_or_build_text_embeddings(**arguments)`` with a Lightning predict job.

    Args:
        arguments: ``load_or_build_text_embeddings``'s arguments (e.g. ``SequentialDataModule.text_build_arguments()``);
            ``device`` is ignored: each rank embeds on the device Lightning gives it.
        devices, accelerator, strategy: the Trainer's (e.g. ``2, "cpu", "ddp"``: two processes over gloo; ``8,
            "gpu", "ddp"``: one per GPU).
        shard_size: items per shard file; a resumed job must use the same size to reuse shards.
        progress: Lightning's progress bar (shards done on rank 0).

    Returns:
        (the table, this rank's writer with its counts) on rank 0; (None, writer) on the other ranks; (table, None)
        when the table was already cached.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    arguments = dict(arguments)
    batch_size = arguments.pop("batch_size", 64)
    for name in ("device", "progress", "shard_size"):
        arguments.pop(name, None)
    build = plan_text_build(**arguments)
    if (hit := build.cached()) is not None:
        return hit, None
    start = time.perf_counter()
    module, writer = ShardEmbedder(build, batch_size, shard_size), ShardWriter()
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress, callbacks=[writer],
    )
    with warnings.catch_warnings():  # the batches are shard indices; Lightning's "batch indices" do not apply
        warnings.filterwarnings("ignore", "Couldn't infer the batch indices")
        trainer.predict(module, return_predictions=False)
    if not trainer.is_global_zero:
        return None, writer
    with build.lock():
        if (hit := build.cached()) is not None:  # another process finished it meanwhile
            return hit, writer
        return build.assemble(module.encoder, module.plan, progress=False, start=start), writer
