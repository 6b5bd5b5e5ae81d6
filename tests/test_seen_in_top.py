"""experiments/seen_in_top.py: top-10 contents on hand-made scores, and its ranking against the trainer's test."""
from __future__ import annotations

import math
from importlib import import_module

import pytest
import torch
from torch import nn

from m2rec_lightning.seen_score import SeenItemScore


class CopyingModel(nn.Module):
    """Scores item i at i / 100, plus 1 for the sequence's last item (what a residual path with tied embeddings does),
    plus a seen score on every input item when it has one, as SequentialRecommender.forward adds it."""

    def __init__(self, num_items: int, seen_bias: float | None) -> None:
        super().__init__()
        self.num_items = num_items
        self.seen_score = None
        if seen_bias is not None:
            self.seen_score = SeenItemScore()
            self.seen_score.weight.data.fill_(seen_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scores = (torch.arange(self.num_items + 1) / 100).expand(len(input_ids), -1).clone()
        last = input_ids.gather(1, ((input_ids > 0).sum(1) - 1)[:, None])
        scores.scatter_add_(1, last, torch.ones_like(last, dtype=scores.dtype))
        if self.seen_score is None:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids, True)
        return scores + self.seen_score.weight * seen


def test_top_k_stats_counts_input_items_and_ranks_with_and_without_the_score():
    seen_in_top = import_module("experiments.seen_in_top")
    batch = {"input_ids": torch.tensor([[3, 7, 0], [19, 5, 0]]), "target": torch.tensor([15, 2])}
    stats = seen_in_top.top_k_stats(CopyingModel(20, -5.0), [batch])

    assert stats["seen_bias"] == pytest.approx(-5.0)
    # encoder alone: row 1's top 10 is 7 (its last item) and 20..12; row 2's is 5 and 20..12, 19 among them
    assert stats["encoder"]["input items in top 10"] == pytest.approx(1.5)
    assert stats["encoder"]["last input item in top 10"] == pytest.approx(1.0)
    # target 15 is beaten by 7 and 16..20 (rank 6), target 2 by 3..20 (rank 18)
    assert stats["encoder"]["HR@10"] == pytest.approx(0.5)
    assert stats["encoder"]["NDCG@10"] == pytest.approx(1 / math.log2(8) / 2)
    # with the score every input item drops out of the top 10 and target 15 moves up to rank 5
    assert stats["with score"]["input items in top 10"] == 0
    assert stats["with score"]["last input item in top 10"] == 0
    assert stats["with score"]["HR@10"] == pytest.approx(0.5)
    assert stats["with score"]["NDCG@10"] == pytest.approx(1 / math.log2(7) / 2)


def test_a_model_without_the_score_has_the_encoder_row_only():
    seen_in_top = import_module("experiments.seen_in_top")
    batch = {"input_ids": torch.tensor([[3, 7, 0]]), "target": torch.tensor([15])}
    stats = seen_in_top.top_k_stats(CopyingModel(20, None), [batch])
    assert stats["seen_bias"] is None and "with score" not in stats
    assert stats["encoder"]["last input item in top 10"] == 1.0


def test_with_score_ranking_is_the_trainers_test(tmp_path, synthetic_sequence_file):
    search, seen_in_top = import_module("experiments.search"), import_module("experiments.seen_in_top")
    config, _ = synthetic_sequence_file
    out = tmp_path / "search"
    search.main(["--dataset", "beauty", "--model", "sasrec", "--grid", "lr=0.01", "--grid",
                 "seen_score=m2rec_lightning.SeenItemScore", "--grid", "seen_score.lr=0.5", "--grid",
                 "seen_score.detach=true", "--seeds", "42", "--max-epochs",
                 "2", "--patience", "2", "--accelerator", "cpu", "--extra-config", str(config), "--out", str(out),
                 "--work-dir", str(tmp_path / "runs")])
    table = tmp_path / "results" / "seen_in_top"
    (row,) = seen_in_top.main(["--dataset", "beauty", "--from-search", str(out.with_suffix(".json")),
                               "--out", str(table)])
    quality = search.quality_table.main(["--dataset", "beauty", "--accelerator", "cpu", "--from-search",
                                         str(out.with_suffix(".json")), "--out", str(tmp_path / "results" / "q")])
    (run,) = quality["runs"]
    assert row["seen_bias"] < 0
    for metric in ("NDCG@10", "HR@10"):
        assert row["with score"][metric] == pytest.approx(run["test"][metric], abs=1e-6)
    assert row["with score"]["input items in top 10"] <= row["encoder"]["input items in top 10"]
    assert "| sasrec [lr=0.01, seen_score=m2rec_lightning.SeenItemScore" in table.with_suffix(".md").read_text()
