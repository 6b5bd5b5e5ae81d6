"""The chunked evaluation and prediction path on the real Beauty and ML-1M test splits: every rank and every top-K
list equals the dense path's (the (B, N+1) scores, mask_scores, pessimistic_rank, topk), with the catalogue cut into
one chunk (the default at these sizes) and into many, with and without the seen-item score and exclude_seen."""
from functools import partial

import pytest
import torch

import m2rec_lightning.ops.chunked_softmax as chunked_softmax
from datamodules import SequenceFile
from m2rec_lightning import M2RecEncoder, SeenItemScore, SequentialRecommender
from m2rec_lightning.metrics import RankingMetrics, pessimistic_rank

DATASETS = {"beauty": ("beauty/Beauty.txt", 50), "ml-1m": ("ml-1m/ml-1m.seq.txt", 200)}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def test_split(request, shared_data, tmp_path_factory):
    path, max_len = DATASETS[request.param]
    data = SequenceFile(str(shared_data / path), data_dir=str(tmp_path_factory.mktemp("data")), max_len=max_len,
                        eval_batch_size=1024)
    data.prepare_data()
    data.setup("test")
    return data


CASES = [(None, False, False), (1024, False, False), (None, True, True), (1024, True, True)]  # chunk, score, exclude


def test_chunked_ranks_and_top_k_equal_the_dense_path(test_split, monkeypatch):
    torch.manual_seed(0)
    encoder = partial(M2RecEncoder, hidden_size=16, d_state=4, max_len=test_split.max_len, semantic=False,
                      mamba_backend="torch")
    model = SequentialRecommender(encoder=encoder, num_items=test_split.num_items, seen_score=SeenItemScore()).eval()
    score = model.seen_score
    score.weight.data.fill_(-0.7)
    encode_last, states = model.encode_last, {}

    def encode_once(ids):  # each batch encoded once, for every case and both paths
        if ids.data_ptr() not in states:
            states[ids.data_ptr()] = encode_last(ids)
        return states[ids.data_ptr()]

    monkeypatch.setattr(model, "encode_last", encode_once)
    batches = list(test_split.test_dataloader())
    for chunk, seen_score, exclude_seen in CASES:
        monkeypatch.setattr(chunked_softmax, "default_chunk_size", lambda rows, num_items, c=chunk: c or num_items)
        model.seen_score = score if seen_score else None
        model.hparams.exclude_seen = exclude_seen
        dense_metrics, chunked_metrics = RankingMetrics([5, 10, 20]), RankingMetrics([5, 10, 20])
        with torch.no_grad():
            for batch in batches:
                target = batch["target"]
                dense_rank = pessimistic_rank(model.score(batch, target), target)
                rank, _, _ = model.rank_and_top_k(batch, target, 0)
                assert torch.equal(rank, dense_rank), (chunk, seen_score, exclude_seen)
                dense_metrics.update(dense_rank)
                chunked_metrics.update(rank)
                prediction = model.score(batch, None)
                _, top_scores, top_items = model.rank_and_top_k(batch, None, 20)
                assert torch.equal(top_scores, prediction.topk(20, dim=1).values)
                assert torch.equal(prediction.gather(1, top_items), top_scores)  # each listed item has its score
        dense, chunked = dense_metrics.compute(), chunked_metrics.compute()
        assert {k: float(v) for k, v in chunked.items()} == {k: float(v) for k, v in dense.items()}
