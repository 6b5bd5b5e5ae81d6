"""benchmarks/throughput.py: the timed inference step is the module's evaluation batch (item table built once)."""
from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

from m2rec_lightning.metrics import pessimistic_rank


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("throughput")


def test_infer_steps_rank_like_evaluation_without_rebuilding_the_item_table(throughput, monkeypatch):
    batch, length, num_items = 4, 16, 50
    model = throughput.build_model("m2rec", length, num_items, text_dim=8, device="cpu", mamba_backend="torch")
    model.train()  # make_steps must build the table in eval mode: M2Rec's text projection has dropout
    steps = throughput.make_steps(model, batch, length, "cpu")

    calls = []
    build_table = model.encoder.item_embeddings
    monkeypatch.setattr(model.encoder, "item_embeddings", lambda: calls.append(1) or build_table())
    last_ranks, full_ranks = steps["infer"](), steps["infer_full"]()
    steps["infer"]()
    assert not calls, "the item table is built per batch; evaluation builds it once per epoch"

    # the batch make_steps draws, ranked as evaluation ranks it
    ids = torch.randint(1, num_items + 1, (batch, length + 1), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.inference_mode():
        table = build_table()
        for hidden, ranks in ((model.encoder.forward_last(ids[:, :-1]), last_ranks),
                              (model.encoder(ids[:, :-1])[:, -1], full_ranks)):
            scores = hidden @ table.T
            scores[:, 0] = float("-inf")
            assert torch.equal(ranks, pessimistic_rank(scores, ids[:, -1]))
