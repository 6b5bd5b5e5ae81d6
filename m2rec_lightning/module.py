"""The LightningModule: next-item cross-entropy over all items, full-ranking evaluation, optimisation.

Encoders are plain `nn.Module`s (see `encoder.py`); this module owns everything Lightning-specific. Subclass hooks:
- a new encoder: pass any class whose first two init parameters are `(num_items, text_dim)` as `encoder`;
- a new loss: override `loss(hidden, target_ids)`;
- a new metric: override `score(batch)` (how users are scored) or add to `self.val_metrics`/`self.test_metrics`.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import RankingMetrics, mask_scores, pessimistic_rank
from .models.encoder import SequenceEncoder, last_positions
from .models.m2rec import M2RecEncoder


def seen_items(ids: Tensor, num_ids: int) -> Tensor:
    """(B, K) item ids, 0-padded -> (B, num_ids) bool, True at every id in the row (padding column 0 included)."""
    return torch.zeros(ids.size(0), num_ids, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


class SequentialRecommender(L.LightningModule):
    """Next-item recommender trained with full-softmax cross-entropy at every non-padding position.

    Args:
        encoder: the sequence encoder class and its options; it is built as `encoder(num_items, text_dim)`.
        num_items: number of items N (ids 1..N, 0 = padding); linked from the datamodule.
        text_dim: width of the frozen item-text table (0 = no text); linked from the datamodule.
        optimizer: "adam" (the published setting) or "adamw" (decoupled weight decay).
        lr: learning rate.
        weight_decay: L2 (adam) or decoupled (adamw) weight decay; never applied to biases, norms, embeddings of
            padding or the Mamba `A_log`/`D` parameters.
        warmup_steps: linear learning-rate warm-up steps (0 = none).
        scheduler: "constant" or "cosine" decay to 0 over the whole fit after the warm-up.
        exclude_seen: mask items the user already interacted with when ranking (RecBole's sequential default is off).
        ks: cut-offs for HR/NDCG/MRR.
        top_k: how many items `predict` returns per user.
        check_finite: stop with an error naming the step when the loss becomes NaN/inf.
        length_groups: encode each batch in this many groups of similar length, each cut to its longest sequence.
            Exact (causal encoders over right padding: same outputs, loss and gradients), and it skips the work on
            padding, which is most of a batch when lengths vary (Beauty: 11.5 % of the positions are real). 1 = one
            call on the whole padded batch. None = 4 on CPU (1.8x faster M2Rec steps on Beauty, 1.4x on ML-1M:
            benchmarks/length_groups.py) and 1 on accelerators, where more, smaller kernel launches may cost more
            than the padding (not measured yet).
        contrastive_weight: weight of a contrastive regulariser added to the loss (0 = off): each training sequence is
            encoded a second time under fresh dropout, and the two last-position states of a sequence must pick each
            other out of the batch (symmetric InfoNCE on dot products; the unsupervised augmentation of DuoRec,
            Qiu et al. 2022, who weight it 0.1). Costs one more last-position forward pass per step. On Beauty at 0.1 it
            lowered validation NDCG@10 (experiments/results/beauty/search_beauty_m2rec.md).
        contrastive_temperature: divides the dot products of the contrastive regulariser.
        label_smoothing: share of each target's probability mass spread evenly over all N items in the training
            cross-entropy (0 = the published one-hot target); validation and test metrics are unaffected.
        score_temperature: None = score an item by the dot product of the sequence state and its output embedding
            (the published model). A value = cosine similarity divided by it, in training and in ranking alike: item
            norms no longer weigh in (a frequent item cannot win on a long embedding alone), and the temperature
            sets how sharp the softmax over all items can get (at most 2 / temperature between best and worst).
            On Beauty (tuned recipe, seed 42) 0.05 lowered validation and test NDCG@10 (0.0555 / 0.0421 against
            0.0577 / 0.0447): there the norms carry signal.
        item_bias: add a learned score per item (zero at the start, never weight-decayed) to every sequence's scores,
            so an item's overall popularity need not live in its embedding. Level on Beauty (tuned recipe, seed 42:
            validation 0.0578 against 0.0577, test NDCG@10 0.0448 against 0.0447).
        seen_bias: add one learned score (zero at the start, never weight-decayed) to every item that occurs in the
            sequence being scored, in training (the items up to each position) and in ranking (the whole input) alike.
            It is a score, not a mask: evaluation stays the unmasked full ranking, and with the default `seen_scope`
            it reads the model's own input only, not the evaluator's record of the user's history. A strongly
            negative value is the model learning that users do not come back to an item (ML-1M rates each movie
            once), a positive one that they do. Unlike `exclude_seen` it cannot see items older than the input window
            (max_len) unless `seen_scope` is "history".
        seen_scope: which items `seen_bias` scores as seen. "input" (default): the items of the input window only, as
            above. "history": the user's whole history before each position, the items older than the input window
            included (training batches carry them as `history`, evaluation batches as `seen`); the model then reads
            more than its max_len input, like a recommender that keeps each user's full record, so report such rows
            apart from window-only models.
        seen_bias_lr: the seen score's own learning rate (None: `lr`), under the same schedule. Adam moves a parameter
            by about its learning rate per step whatever the gradient, so one scalar needs many steps to get far from
            zero: on Beauty's tuned recipe (88 steps per epoch at 1e-3) it was still falling at full speed when the
            fit ended, at -0.55, where no user ever comes back to an item.
        seen_bias_detach: fit the seen score without letting the encoder lean on it. The loss is then the
            cross-entropy without the score (seen items stay in the encoder's softmax as negatives, and the hardest
            ones: items like those the user had) plus a cross-entropy with the score added to the detached scores,
            whose gradient reaches the score alone and which is not label-smoothed (smoothing would hold the score
            where seen items get the smoothing floor instead of where the data puts them). Ranking adds the score as
            before. With the joint loss a strongly negative score takes the seen items out of the encoder's softmax,
            and on Beauty (where no user reviews an item twice) the ranking of the rest got worse: with the seen items
            masked, the models trained with a weak score (-0.55) rank test at NDCG@10 0.0569, those trained with the
            strong one (-10) at 0.0552 (experiments/results/beauty/exclude_seen_beauty.md). Detached, on the tuned recipe
            (seeds 42-44): validation NDCG@10 0.0720 against 0.0672, test 0.0555 against 0.0531. The encoder trains as
            without the score, which only reranks; it helps encoders that score their last input item high (tied
            embeddings plus a residual path), and SASRec with it tests at 0.0555 too (seen_in_top_beauty.md in
            benchmarks/results says why). The logged training loss is then the sum of the two cross-entropies.
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
        exclude_seen: bool = False,
        ks: list[int] = [5, 10, 20],
        top_k: int = 20,
        check_finite: bool = True,
        length_groups: int | None = None,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 1.0,
        label_smoothing: float = 0.0,
        score_temperature: float | None = None,
        item_bias: bool = False,
        seen_bias: bool = False,
        seen_scope: Literal["input", "history"] = "input",
        seen_bias_lr: float | None = None,
        seen_bias_detach: bool = False,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1 (got {num_items}); link it from the datamodule")
        if length_groups is not None and length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        if contrastive_weight < 0 or contrastive_temperature <= 0:
            raise ValueError(f"contrastive_weight must be >= 0 and contrastive_temperature > 0, got "
                             f"{contrastive_weight} and {contrastive_temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if score_temperature is not None and not score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0 (or None for dot-product scores), got {score_temperature}")
        if seen_scope not in ("input", "history"):
            raise ValueError(f"seen_scope must be 'input' or 'history', got {seen_scope!r}")
        if seen_scope == "history" and not seen_bias:
            raise ValueError("seen_scope='history' only applies with seen_bias: true")
        if seen_bias_lr is not None and not (seen_bias and seen_bias_lr > 0):
            raise ValueError(f"seen_bias_lr must be > 0 and needs seen_bias: true, got {seen_bias_lr}")
        if seen_bias_detach and not seen_bias:
            raise ValueError("seen_bias_detach only applies with seen_bias: true")
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder(num_items, text_dim)
        self.item_bias = nn.Parameter(torch.zeros(num_items + 1)) if item_bias else None  # (N+1,)
        self.seen_bias = nn.Parameter(torch.zeros(())) if seen_bias else None
        self._eval_table: Tensor | None = None
        self.val_metrics = RankingMetrics(ks)
        self.test_metrics = RankingMetrics(ks)

    # ---- item text -------------------------------------------------------------------------------------------------
    # The frozen text table is a persistent buffer of the encoder: it never reaches the optimiser, and checkpoints carry
    # it (plus the cache key it came from), so a checkpoint is self-contained and test/predict can verify that the
    # datamodule embeds items exactly as training did.
    def setup(self, stage: str) -> None:
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

    def _datamodule_text(self):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "text_embeddings", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
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
        current = self._datamodule_text() if self.encoder.uses_text else None
        stored = checkpoint.get("text_embedding_key")
        if current is None or stored is None:
            return
        saved = checkpoint["state_dict"].get("encoder.text_table")
        same = saved is not None and saved.shape == current.table.shape and torch.allclose(
            saved.float().cpu(), current.table.float().cpu(), atol=1e-5
        )
        if not same:
            raise ValueError(
                f"this checkpoint was trained with item-text embeddings {stored} but the datamodule now gives "
                f"{current.key} (different items, texts, model, pooling, template or length); use the training "
                "config's data.text section"
            )

    # ---- model -----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, history: Tensor | None = None) -> Tensor:
        """(B, L) right-padded item ids -> (B, N+1) scores of the next item after each sequence's last real item.

        history (B, H), 0-padded: more items the user has had (any order, may overlap input_ids), which `seen_bias`
        scores as seen when `seen_scope` is "history"; it is required then and ignored otherwise."""
        scores = self.logits(self.encode_last(input_ids))  # (B, N+1)
        if self.seen_bias is None:
            return scores
        seen = seen_items(input_ids, scores.size(1))  # (B, N+1); column 0 is never ranked
        if self.hparams.seen_scope == "history":
            seen |= seen_items(self._history(history), scores.size(1))
        return scores + self.seen_bias * seen

    @staticmethod
    def _history(history: Tensor | None) -> Tensor:
        if history is None:
            raise ValueError("seen_scope='history' needs each sequence's earlier items: pass `history` (training "
                             "batches and evaluation batches of the datamodules carry them as 'history' and 'seen')")
        return history

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
        table = self.item_table()[first_item:]  # (n, d)
        temperature = self.hparams.score_temperature
        if temperature is None:
            scores = hidden @ table.T
        else:
            scores = F.normalize(hidden, dim=-1) @ table.T / temperature
        return scores if self.item_bias is None else scores + self.item_bias[first_item:]

    def item_table(self) -> Tensor:
        """(N+1, d) output-side item table, unit rows when scores are cosines; frozen for a whole evaluation/prediction
        epoch, so it is built once there (with text_output it projects every item's text, too costly to repeat per
        batch)."""
        in_eval_loop = self._trainer is not None and (self.trainer.evaluating or self.trainer.predicting)
        if self.training or torch.is_grad_enabled() or not in_eval_loop:
            return self._scoring_table()
        if self._eval_table is None:
            self._eval_table = self._scoring_table()
        return self._eval_table

    def _scoring_table(self) -> Tensor:
        table = self.encoder.item_embeddings()  # (N+1, d)
        return table if self.hparams.score_temperature is None else F.normalize(table, dim=-1)

    def _drop_eval_table(self) -> None:
        self._eval_table = None

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _drop_eval_table

    def loss(self, hidden: Tensor, target_ids: Tensor, input_ids: Tensor | None = None,
             history: Tensor | None = None) -> Tensor:
        """Cross-entropy over items 1..N at every position with a target. hidden (B, L, d), target_ids (B, L);
        input_ids (B, L), the sequences `hidden` encodes, are needed by `seen_bias` only, and history (B, H), the
        items before them, by `seen_scope` "history" only."""
        mask = target_ids > 0
        logits = self.logits(hidden[mask], first_item=1)  # (M, N): padding id is never a candidate
        targets = target_ids[mask] - 1  # (M,)
        if self.seen_bias is None:
            return F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        if input_ids is None:
            raise ValueError("seen_bias needs the input_ids the hidden states encode: loss(hidden, target_ids, "
                             "input_ids)")
        rows, positions = mask.nonzero(as_tuple=True)  # (M,) each, in hidden[mask]'s order
        upto = torch.arange(input_ids.size(1), device=input_ids.device) <= positions[:, None]  # (M, L)
        seen = seen_items(input_ids[rows] * upto, logits.size(1) + 1)  # (M, N+1): items up to the position
        if self.hparams.seen_scope == "history":
            seen |= seen_items(self._history(history), logits.size(1) + 1)[rows]  # one set per sequence
        scored = self.seen_bias * seen[:, 1:]  # (M, N)
        if self.hparams.seen_bias_detach:
            return (F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
                    + F.cross_entropy((logits.detach() + scored).float(), targets))
        return F.cross_entropy((logits + scored).float(), targets, label_smoothing=self.hparams.label_smoothing)

    def contrastive_loss(self, a: Tensor, b: Tensor) -> Tensor:
        """Symmetric InfoNCE between two views (B, d) of the same B sequences: row i of `a` must rank row i of `b`
        first among all rows of `b`, and vice versa."""
        logits = (a @ b.T).float() / self.hparams.contrastive_temperature  # (B, B)
        labels = torch.arange(a.size(0), device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def score(self, batch: dict[str, Tensor], target: Tensor | None) -> Tensor:
        """Masked (B, N+1) scores for an evaluation or prediction batch."""
        history = batch.get("seen") if self.hparams.seen_scope == "history" else None
        scores = self(batch["input_ids"], history).float()
        return mask_scores(scores, target, batch["seen"] if self.hparams.exclude_seen else None)

    # ---- steps -----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids = batch["input_ids"]
        hidden = self.encode(input_ids)  # (B, L, d)
        loss = self.loss(hidden, batch["target_ids"], input_ids, batch.get("history"))
        if self.hparams.contrastive_weight > 0:
            view = hidden[torch.arange(input_ids.size(0), device=hidden.device), last_positions(input_ids)]  # (B, d)
            contrastive = self.contrastive_loss(view, self.encode_last(input_ids))
            self.log("train/contrastive", contrastive, batch_size=input_ids.size(0))
            loss = loss + self.hparams.contrastive_weight * contrastive
        if self.hparams.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower the learning rate or use 32-bit precision"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=input_ids.size(0))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], metrics: RankingMetrics) -> None:
        target = batch["target"]
        metrics.update(pessimistic_rank(self.score(batch, target), target))

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
        scores = self.score(batch, None)
        k = min(self.hparams.top_k, scores.size(1) - 1)
        top_scores, top_items = scores.topk(k, dim=1)  # (B, k); no full sort of N items
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
                if p is self.seen_bias and self.hparams.seen_bias_lr is not None:
                    continue  # its own group below
                (no_decay if exempt else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if self.hparams.seen_bias_lr is not None:
            groups.append({"params": [self.seen_bias], "weight_decay": 0.0, "lr": self.hparams.seen_bias_lr})
        opt_cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(groups, lr=self.hparams.lr)
        if self.hparams.warmup_steps == 0 and self.hparams.scheduler == "constant":
            return optimizer
        warmup, cosine = self.hparams.warmup_steps, self.hparams.scheduler == "cosine"
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
