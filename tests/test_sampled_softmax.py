"""The sampled-softmax module option, the datamodule's training counts it draws from, and the memory of the exact
loss's table gradient."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from m2rec_lightning import M2RecEncoder, SampledSoftmax, SASRecEncoder, SeenItemScore, SequentialRecommender
from m2rec_lightning.ops.chunked_softmax import _ChunkedCrossEntropy


def tiny(num_items=40, sampled=None, encoder=M2RecEncoder, **kw):
    torch.manual_seed(0)
    return SequentialRecommender(lambda n, t: encoder(n, t, hidden_size=16, max_len=8), num_items=num_items,
                                 sampled_softmax=sampled, **kw)


def batch(num_items=40, rows=3, length=8, seed=0):
    ids = torch.randint(1, num_items + 1, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}


def test_every_item_a_candidate_with_uniform_draws_is_the_exact_loss():
    exact, sampled = tiny(), tiny(sampled=SampledSoftmax(negatives=40, proposal="uniform"))
    exact.eval(), sampled.eval()  # no dropout: the same hidden states
    b = batch()
    assert sampled.training_loss(b).item() == pytest.approx(exact.training_loss(b).item(), rel=1e-6)


def test_few_negatives_approximate_and_popularity_needs_counts():
    model = tiny(sampled=SampledSoftmax(negatives=3))
    model.eval()
    with pytest.raises(RuntimeError, match="set_item_counts"):
        model.training_loss(batch())
    model.sampled_softmax.set_item_counts(torch.arange(41.0))
    exact = tiny()
    exact.eval()
    assert model.training_loss(batch()).item() != pytest.approx(exact.training_loss(batch()).item(), rel=1e-3)
    with pytest.raises(ValueError, match="counts for 40 items"):
        tiny(num_items=50, sampled=model.sampled_softmax).training_loss(batch(50))


def test_popularity_draws_follow_the_counts():
    sampled = SampledSoftmax(negatives=20_000)
    counts = torch.zeros(5)
    counts[1:] = torch.tensor([0.0, 9.0, 99.0, 999.0])  # + 1 each: 1 : 10 : 100 : 1000
    sampled.set_item_counts(counts)
    assert torch.allclose(sampled.log_q.exp(), torch.tensor([1.0, 10.0, 100.0, 1000.0]))


@pytest.mark.parametrize("kw", [{"label_smoothing": 0.1}, {"seen_score": SeenItemScore()}])
def test_sampled_softmax_refuses_options_it_does_not_compute(kw):
    with pytest.raises(ValueError, match="sampled_softmax is a loss of its own"):
        tiny(sampled=SampledSoftmax(), **kw)


def test_bad_sampled_softmax_options():
    with pytest.raises(ValueError, match="negatives"):
        SampledSoftmax(negatives=0)
    with pytest.raises(ValueError, match="proposal"):
        SampledSoftmax(proposal="zipf")


def test_train_item_counts_leave_out_validation_and_test(tmp_path):
    from datamodules import SequenceFile
    path = tmp_path / "seqs.txt"
    path.write_text("u1 a b c d e\nu2 b c d\nu3 a a b c d e f\n")
    dm = SequenceFile(str(path), data_dir=str(tmp_path / "data"), min_user_interactions=0,
                      min_item_interactions=0)
    dm.prepare_data()
    dm.setup("fit")
    counts = dm.train_item_counts()
    expected = np.zeros(dm.num_items + 1, dtype=np.int64)
    for user in range(dm.num_users):
        np.add.at(expected, dm.sequence(user)[:-2], 1)
    assert counts.tolist() == expected.tolist() and counts[0] == 0
    raw = {raw_id: count for raw_id, count in zip(dm.item_ids.tolist(), counts.tolist())}
    assert raw["a"] == 3 and raw["f"] == 0  # u3 has a twice in its training part; f is u3's test item only


@pytest.mark.parametrize("encoder", [M2RecEncoder, SASRecEncoder])
@pytest.mark.parametrize("groups", [1, 4])
def test_the_item_table_gradient_is_the_loss_buffer_with_the_input_rows_added(monkeypatch, encoder, groups):
    """The loss's (N+1, d) table gradient becomes the weight's .grad itself, the input lookup's sparse rows added into
    it in place: no slice copy, no dense lookup gradient, no out-of-place sum (each one more table at 10^6+ items).
    The values equal those of a dense lookup gradient."""
    written = {}
    backward = _ChunkedCrossEntropy.backward

    def spy(ctx, grad):
        out = backward(ctx, grad)
        written["ptr"] = out[1].data_ptr()
        return out

    monkeypatch.setattr(_ChunkedCrossEntropy, "backward", staticmethod(spy))
    num_items, b = 500, batch(500, rows=4)
    grads, loss_buffers = [], []
    for sparse in (True, False):
        model = tiny(num_items, encoder=encoder, length_groups=groups)
        model.eval()  # no dropout: both models compute the same function
        if not sparse:  # the reference: nn.Embedding's dense lookup gradient
            monkeypatch.setattr(sys.modules[encoder.__module__], "lookup", lambda table, ids: table(ids))
        model.training_loss(b).backward()
        grads.append(model.encoder.item_embedding.weight.grad)
        loss_buffers.append(written.pop("ptr"))
    assert not grads[0].is_sparse and grads[0].data_ptr() == loss_buffers[0]
    torch.testing.assert_close(grads[0], grads[1])
