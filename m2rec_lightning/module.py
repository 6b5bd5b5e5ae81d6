"""The LightningModule: next-item cross-entropy over all items, full-ranking evaluation, optimisation.

Encoders are plain `nn.Module`s (see `models/encoder.py`); this module owns everything Lightning-specific. Subclass hooks:
- a new encoder: pass any class whose first two init parameters are `(num_items, text_dim)` as `encoder`;
- a new loss: override `loss(hidden, target_ids)`;
- a new scorer: override `rank_and_top_k(batch, target, k)` (how users are ranked; `score` is its dense twin), or
  pass a `seen_score`; a new metric: add to `self.val_metrics`/`self.test_metrics`.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .checkpoint import CheckpointError
from .metrics import RankingMetrics, mask_scores
from .models.encoder import SequenceEncoder
from .models.m2rec import M2RecEncoder
from .ops.chunked_softmax import chunked_cross_entropy, chunked_rank_and_top_k
from .sampled_softmax import SampledSoftmax
from .seen_score import SeenItemScore


class _GradientLast(torch.autograd.Function):
    """Identity on the output item table, applied before the encoder runs: autograd runs ready backward nodes newest
    first, so this node hands the loss's (N+1, d) table gradient on only after the encoder's input lookup has sent its
    sparse one (B·L rows) to the shared embedding, and autograd then adds those rows into it in place. In the other
    order, the loss's gradient (from a Python Function) waits in autograd's buffer, is not added into in place, and the
    sum is a second table-sized tensor: 256 MB more at the step's peak at 10^6 items, d=64."""

    @staticmethod
    def forward(ctx, table: Tensor) -> Tensor:
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class SequentialRecommender(L.LightningModule):
    """Next-item recommender trained with full-softmax cross-entropy at every non-padding position.

    Args:
        encoder: the sequence encoder class and its options; it is built as `encoder(num_items, text_dim)`.
        num_items: number of items N (ids 1..N, 0 = padding); linked from the datamodule.
        text_dim: width of the frozen item-text table (0 = no text); linked from the datamodule.
        optimizer: "adam" (the published setting) or "adamw" (decoupled weight decay).
        lr: learning rate.
        weight_decay: L2 (adam) or decoupled (adamw) weight decay; never applied to biases, norms, embeddings or the
            Mamba `A_log`/`D` parameters.
        warmup_steps: linear learning-rate warm-up steps (0 = none).
        scheduler: "constant", or "cosine" decay to 0 over the whole fit (trainer.max_epochs) after the warm-up.
        label_smoothing: share of each target's probability mass spread evenly over all N items in the training
            cross-entropy (0 = the published one-hot target); evaluation is unaffected.
        sampled_softmax: train with a softmax over in-batch targets and sampled negatives (`SampledSoftmax`), an
            approximation for catalogues where the exact loss is too slow; None = the exact full-softmax loss.
            Evaluation and prediction rank all items exactly either way.
        seen_score: a learned score for the items the user already had (`SeenItemScore`: its scope, detachment and
            learning rate); None = the published model, which scores every item alike.
        exclude_seen: mask the items the user already had when ranking (RecBole's sequential default is off).
        ks: cut-offs for HR/NDCG/MRR.
        top_k: how many items `predict` returns per user.
        length_groups: encode each batch in this many groups of similar length, each cut to its longest sequence.
            Exact for causal encoders over right padding, and it skips the work on padding. None = 4 on CPU, 1 on
            accelerators (where more, smaller kernel launches may cost more than the padding).
    """

    def __init__(
        self,
        encoder: Callable[[int, int], SequenceEncoder] = M2RecEncoder,
        num_items: int = 0,
        text_dim: int = 0,
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        scheduler: Literal["constant", "cosine"] = "constant",
        label_smoothing: float = 0.0,
        sampled_softmax: SampledSoftmax | None = None,
        seen_score: SeenItemScore | None = None,
        exclude_seen: bool = False,
        ks: list[int] = [5, 10, 20],
        top_k: int = 20,
        length_groups: int | None = None,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1 (got {num_items}); link it from the datamodule")
        if length_groups is not None and length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if sampled_softmax is not None and (label_smoothing or seen_score is not None):
            raise ValueError("sampled_softmax is a loss of its own, without label_smoothing or a seen_score: set "
                             "label_smoothing: 0.0 and seen_score: null, or sampled_softmax: null")
        self.save_hyperparameters(ignore=["encoder", "sampled_softmax", "seen_score"])
        self.encoder = encoder(num_items, text_dim)
        self.sampled_softmax = sampled_softmax
        self.seen_score = seen_score
        self._eval_table: Tensor | None = None
        self.val_metrics = RankingMetrics(ks)
        self.test_metrics = RankingMetrics(ks)

    # ---- item text -------------------------------------------------------------------------------------------------
    # The frozen text table is a persistent buffer of the encoder: it never reaches the optimiser, and checkpoints carry
    # it (plus the cache key it came from), so a checkpoint is self-contained and test/predict can verify that the
    # datamodule embeds items exactly as training did.
    def setup(self, stage: str) -> None:
        self._item_map_sha256 = self._item_map_fingerprint()  # once per run: checkpoints save it every epoch
        counts = getattr(self._datamodule(), "train_item_counts", None)
        if stage == "fit" and self.sampled_softmax is not None and counts is not None:
            self.sampled_softmax.set_item_counts(torch.from_numpy(counts()))
        if not self.encoder.uses_text:
            return
        table = self._datamodule_text()
        if table is None:
            raise ValueError(
                "the encoder has a semantic (text) stream but the datamodule provides no text embeddings: "
                "set data.text, or model.encoder.init_args.semantic: false"
            )
        self.encoder.set_text_table(table.table.to(self.encoder.text_table))
        self.text_embedding_key = table.key

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _datamodule_text(self):
        return getattr(self._datamodule(), "text_embeddings", None)

    def _item_map_fingerprint(self, item_ids=None) -> str | None:
        """sha256 of the raw item ids (default: the datamodule's) in internal-id order: two catalogues with the same
        item count but other items (or another numbering) differ, and a checkpoint would silently score the wrong
        items."""
        item_ids = getattr(self._datamodule(), "item_ids", None) if item_ids is None else item_ids
        if item_ids is None:
            return None
        return hashlib.sha256("\n".join(map(str, item_ids.tolist())).encode()).hexdigest()

    def load_trained(self, checkpoint: dict, item_ids) -> None:
        """Load a checkpoint's weights outside a Trainer (`m2rec serve`), with the checks test and predict make: the
        catalogue (item_ids: the datamodule's raw ids) and the scoring must be the checkpoint's."""
        self._item_map_sha256 = self._item_map_fingerprint(item_ids)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])

    def _scoring(self) -> dict:
        """What decides how a trained model ranks, beyond its weights: checked when a checkpoint is evaluated."""
        score = self.seen_score
        return {"seen_score": None if score is None else {"class": type(score).__qualname__, "scope": score.scope},
                "exclude_seen": self.hparams.exclude_seen}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["item_map_sha256"] = getattr(self, "_item_map_sha256", None)
        checkpoint["scoring"] = self._scoring()
        if self.encoder.uses_text:
            checkpoint["text_embedding_key"] = getattr(self, "text_embedding_key", None)
        # Lightning does not checkpoint the global RNG; without it a resumed run draws other dropout masks. Plain
        # uint8 tensors, so the checkpoint still loads with torch.load(weights_only=True). Under DDP: rank 0's state.
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
            if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
                torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])
        self._check_scoring(checkpoint.get("scoring"), fitting)
        stored_map, current_map = checkpoint.get("item_map_sha256"), getattr(self, "_item_map_sha256", None)
        if stored_map is not None and current_map is not None and stored_map != current_map:
            raise CheckpointError(
                "this checkpoint was trained on another item catalogue (its raw item ids differ from the "
                "datamodule's, though the count may match); use the training config's data section"
            )
        current = self._datamodule_text() if self.encoder.uses_text else None
        stored = checkpoint.get("text_embedding_key")
        if current is None or stored is None:
            return
        saved = checkpoint["state_dict"].get("encoder.text_table")
        same = saved is not None and saved.shape == current.table.shape and torch.allclose(
            saved.float().cpu(), current.table.float().cpu(), atol=1e-5
        )
        if not same:
            raise CheckpointError(
                f"this checkpoint was trained with item-text embeddings {stored} but the datamodule now gives "
                f"{current.key} (different items, texts, model, pooling, template or length); use the training "
                "config's data.text section"
            )

    def _check_scoring(self, stored: dict | None, fitting: bool) -> None:
        """A config's seen_score must be the checkpoint's (another scope silently changes what counts as seen; another
        presence changes the model). exclude_seen may differ, as a diagnostic, but never silently."""
        if stored is None:
            return
        current = self._scoring()
        if stored["seen_score"] != current["seen_score"]:
            raise CheckpointError(
                f"this checkpoint was trained with seen_score {stored['seen_score']} but the config gives "
                f"{current['seen_score']}; use the training config's model.init_args.seen_score"
            )
        if not fitting and stored["exclude_seen"] != current["exclude_seen"]:
            rank_zero_warn(f"evaluating with exclude_seen={current['exclude_seen']}, but the checkpoint was trained "
                           f"and validated with exclude_seen={stored['exclude_seen']}: report these metrics apart")

    # ---- model -----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, history: Tensor | None = None) -> Tensor:
        """(B, L) right-padded item ids -> (B, N+1) scores of the next item after each sequence's last real item.

        history (B, H), 0-padded: the user's other items, which a `seen_score` of scope "history" counts as seen; it
        is required then and ignored otherwise."""
        scores = self.logits(self.encode_last(input_ids))  # (B, N+1)
        if self.seen_score is None:
            return scores
        return self.seen_score(scores, self.seen_score.seen_ids(input_ids, history))

    def encode(self, input_ids: Tensor) -> Tensor:
        """(B, L) right-padded ids -> (B, L, d) hidden states, in `length_groups` groups of similar length; positions
        cut off as padding come back as zeros (no loss or score reads them)."""
        return self._in_length_groups(input_ids, self.encoder, every_position=True)

    def encode_last(self, input_ids: Tensor) -> Tensor:
        """(B, L) right-padded ids -> (B, d) hidden state at each row's last real item (the encoder's forward_last,
        which skips what only the other positions need), in `length_groups` groups as `encode`."""
        return self._in_length_groups(input_ids, self.encoder.forward_last, every_position=False)

    def _in_length_groups(self, input_ids: Tensor, encode: Callable[[Tensor], Tensor], every_position: bool) -> Tensor:
        groups = self.hparams.length_groups or (4 if input_ids.device.type == "cpu" else 1)
        groups = min(groups, input_ids.size(0))
        if groups == 1:
            return encode(input_ids)
        lengths = (input_ids > 0).sum(dim=1)  # (B,)
        order = lengths.argsort()
        sorted_lengths = lengths[order].tolist()  # one device sync per batch
        parts, start = [], 0
        for rows in order.tensor_split(groups):
            start += rows.numel()
            longest = max(sorted_lengths[start - 1], 1)
            part = encode(input_ids[rows, :longest])  # (b, longest, d) or (b, d)
            parts.append(F.pad(part, (0, 0, 0, input_ids.size(1) - longest)) if every_position else part)
        return torch.cat(parts)[order.argsort()]  # back to batch order

    def logits(self, hidden: Tensor, first_item: int = 0) -> Tensor:
        """(..., d) sequence states -> (..., N+1-first_item) scores of items first_item..N."""
        return hidden @ self.item_table()[first_item:].T

    def item_table(self) -> Tensor:
        """(N+1, d) output-side item table; frozen for a whole evaluation/prediction epoch, so it is built once there
        (with item text it projects every item's text, too costly to repeat per batch)."""
        in_eval_loop = self._trainer is not None and (self.trainer.evaluating or self.trainer.predicting)
        if self.training or torch.is_grad_enabled() or not in_eval_loop:
            return self.encoder.item_embeddings()
        if self._eval_table is None:
            self._eval_table = self.encoder.item_embeddings()
        return self._eval_table

    def _drop_eval_table(self) -> None:
        self._eval_table = None

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _drop_eval_table

    def loss(self, hidden: Tensor, target_ids: Tensor, input_ids: Tensor | None = None,
             history: Tensor | None = None, table: Tensor | None = None) -> Tensor:
        """Cross-entropy over items 1..N at every position with a target, in item chunks (never an (M, N) matrix).
        hidden (B, L, d), target_ids (B, L); input_ids (B, L), the sequences `hidden` encodes, and history (B, H), the
        items before them, are read by the `seen_score` only; table (N+1, d) = `item_table()` unless given."""
        mask = target_ids > 0
        table = self.item_table() if table is None else table  # candidates: rows 1..N; the padding id is never one
        hidden, targets = hidden[mask], target_ids[mask] - 1  # (M, d), (M,) candidate indices
        if self.sampled_softmax is not None:
            return self.sampled_softmax(hidden, table, targets)
        if self.seen_score is None:
            return chunked_cross_entropy(hidden, table, targets, self.hparams.label_smoothing, first_item=1)
        if input_ids is None:
            raise ValueError("seen_score needs the input_ids the hidden states encode: loss(hidden, target_ids, "
                             "input_ids)")
        rows, positions = mask.nonzero(as_tuple=True)  # (M,) each, in hidden[mask]'s order
        seen = self.seen_score.seen_ids(input_ids, history, rows, positions)  # (M, K)
        return self.seen_score.cross_entropy(hidden, table, targets, seen, self.hparams.label_smoothing)

    def score(self, batch: dict[str, Tensor], target: Tensor | None) -> Tensor:
        """Masked (B, N+1) scores for an evaluation or prediction batch (dense: for inspection and small catalogues;
        evaluation and prediction use `rank_and_top_k`, which gives the same ranks without the (B, N+1) matrix)."""
        scores = self(batch["input_ids"], batch.get("seen")).float()
        return mask_scores(scores, target, batch["seen"] if self.hparams.exclude_seen else None)

    def rank_and_top_k(self, batch: dict[str, Tensor], target: Tensor | None, k: int) -> tuple[Tensor | None, Tensor,
                                                                                               Tensor]:
        """Pessimistic rank of each target (None without one) and the top k items with their scores, (B,) and
        (B, k) each, as `score` would rank them, in item chunks: memory O(B·chunk + N·d), not O(B·N)."""
        input_ids = batch["input_ids"]
        seen, weight = None, None
        if self.seen_score is not None:
            seen, weight = self.seen_score.seen_ids(input_ids, batch.get("seen")), self.seen_score.weight
        exclude = batch["seen"] if self.hparams.exclude_seen else None
        return chunked_rank_and_top_k(self.encode_last(input_ids), self.item_table(), target, k, seen, weight,
                                      exclude)

    # ---- steps -----------------------------------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The loss of one training batch: every position encoded, the cross-entropy at each one with a target."""
        input_ids = batch["input_ids"]
        table = _GradientLast.apply(self.item_table())  # taken before encoding: see _GradientLast
        return self.loss(self.encode(input_ids), batch["target_ids"], input_ids, batch.get("history"), table)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids = batch["input_ids"]
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower the learning rate or use 32-bit precision"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=input_ids.size(0))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], metrics: RankingMetrics) -> None:
        rank, _, _ = self.rank_and_top_k(batch, batch["target"], 0)
        metrics.update(rank)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._drop_eval_table()
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._drop_eval_table()
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: RankingMetrics) -> None:
        values = metrics.compute()  # synced sums: exact over all processes
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "NDCG@10")
        metrics.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        k = min(self.hparams.top_k, self.hparams.num_items)
        _, top_scores, top_items = self.rank_and_top_k(batch, None, k)  # (B, k) each
        return {"user": batch["user"], "items": top_items, "scores": top_scores}

    # ---- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                exempt = (
                    name.endswith("bias")
                    or isinstance(module, (nn.LayerNorm, nn.Embedding))
                    or getattr(p, "_no_weight_decay", False)
                )
                if module is self.seen_score:
                    continue  # its own group below
                (no_decay if exempt else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if self.seen_score is not None:
            groups.append(self.seen_score.param_group())
        opt_cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.Adam
        # fused: one pass per tensor with no temporaries; the multi-tensor and per-tensor updates allocate the size of
        # each parameter (twice for a moment), which at 10^6 items is 0.5 GB beside a 0.26 GB table
        optimizer = opt_cls(groups, lr=self.hparams.lr, fused=True)
        if self.hparams.warmup_steps == 0 and self.hparams.scheduler == "constant":
            return optimizer
        warmup, cosine = self.hparams.warmup_steps, self.hparams.scheduler == "cosine"
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)
        if cosine and any(isinstance(c, Timer) and c.time_remaining() is not None for c in self.trainer.callbacks):
            # a time-based horizon would make a resumed fit differ from an uninterrupted one
            rank_zero_warn(f"the cosine decay runs over {total} steps (from max_epochs / max_steps); trainer.max_time "
                           "may stop the fit before it has decayed: set max_epochs to what the time allows")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
