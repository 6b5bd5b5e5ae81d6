import math

import pytest
import torch

from m2rec_lightning.metrics import RankingMetrics, mask_scores, pessimistic_rank


def test_rank_hand_computed_with_ties_and_padding():
    # column 0 is padding: it has the highest raw score but must never be ranked
    scores = torch.tensor(
        [
            [9.0, 0.5, 0.9, 0.1, 0.9],  # target 2 ties with item 4 -> pessimistic rank 1
            [9.0, 0.7, 0.2, 0.3, 0.1],  # target 1 is the best -> rank 0
            [9.0, 0.7, 0.2, 0.3, 0.1],  # target 4 is the worst -> rank 3 (last of N=4)
        ]
    )
    target = torch.tensor([2, 1, 4])
    ranks = pessimistic_rank(mask_scores(scores), target)
    assert ranks.tolist() == [1, 0, 3]


def test_constant_model_scores_zero_not_one():
    n_items, users = 500, 64
    scores = torch.zeros(users, n_items + 1)
    target = torch.randint(1, n_items + 1, (users,))
    metric = RankingMetrics([5, 10, 20])
    metric.update(pessimistic_rank(mask_scores(scores), target))
    values = metric.compute()
    assert all(v.item() == 0.0 for v in values.values())


def test_metric_values_match_formulas():
    metric = RankingMetrics([1, 5])
    metric.update(torch.tensor([0, 2, 7]))
    metric.update(torch.tensor([4]))  # accumulation over batches
    v = metric.compute()
    assert v["HR@1"].item() == pytest.approx(1 / 4)
    assert v["HR@5"].item() == pytest.approx(3 / 4)
    ndcg5 = (1.0 + 1 / math.log2(4) + 1 / math.log2(6)) / 4
    assert v["NDCG@5"].item() == pytest.approx(ndcg5, rel=1e-6)
    assert v["MRR@5"].item() == pytest.approx((1 + 1 / 3 + 1 / 5) / 4, rel=1e-6)
    assert v["MRR@1"].item() == pytest.approx(1 / 4)


def test_exclude_seen_masks_history_but_keeps_a_repeated_target():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0], [0.0, 5.0, 4.0, 3.0, 1.0]])
    seen = torch.tensor([[1, 2, 0], [1, 3, 0]])
    target = torch.tensor([3, 3])  # user 2 bought item 3 before: it stays rankable
    masked = mask_scores(scores, target, seen)
    assert pessimistic_rank(masked, target).tolist() == [0, 1]
    assert masked[0, 1] == float("-inf") and masked[1, 3] == 3.0 and masked[:, 0].eq(float("-inf")).all()


def test_nan_scores_raise():
    scores = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(FloatingPointError):
        pessimistic_rank(mask_scores(scores), torch.tensor([1]))


def test_rank_matches_sorting_reference_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (50, 101), generator=g).float()  # many ties
    target = torch.randint(1, 101, (50,), generator=g)
    ranks = pessimistic_rank(mask_scores(scores), target)
    for b in range(50):
        t = target[b].item()
        expected = sum(1 for j in range(1, 101) if j != t and scores[b, j] >= scores[b, t])
        assert ranks[b].item() == expected
