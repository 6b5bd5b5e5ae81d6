"""The LightningModule on synthetic data: learning, loss masking, NaN stop, predict, optimiser groups."""
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.splits import EvalSequences, TrainSequences, collate
from m2rec_lightning.models.m2rec import M2RecEncoder
from m2rec_lightning.models.sasrec import SASRecEncoder
from m2rec_lightning.module import SequentialRecommender
from m2rec_lightning.seen_score import SeenItemScore

N_ITEMS, MAX_LEN = 60, 12


def synthetic_sequences(n_users: int, seed: int) -> list[list[int]]:
    """Histories whose next item follows deterministically from the history.

    Half the users walk an arithmetic progression whose step is set by their first two items (so the model must look
    back further than the last item); the other half repeat a user-specific cycle of period 3 (a periodic pattern).
    """
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for u in range(n_users):
        length = int(torch.randint(6, MAX_LEN + 2, (1,), generator=g))
        if u % 2 == 0:
            start = int(torch.randint(0, N_ITEMS, (1,), generator=g))
            step = int(torch.randint(1, 4, (1,), generator=g))
            seqs.append([(start + i * step) % N_ITEMS + 1 for i in range(length)])
        else:
            cycle = (torch.randperm(N_ITEMS, generator=g)[:3] + 1).tolist()
            seqs.append([cycle[i % 3] for i in range(length)])
    return seqs


def pad(rows: list[list[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[-width:])
    return out


def train_batches(seqs):
    inputs = pad([s[:-2][:-1] for s in seqs], MAX_LEN)
    targets = pad([s[:-2][1:] for s in seqs], MAX_LEN)
    batches = [{"input_ids": i, "target_ids": t} for i, t in zip(inputs.split(64), targets.split(64))]
    return DataLoader(batches, batch_size=None, shuffle=True)


def eval_batches(seqs):
    inputs = pad([s[:-1] for s in seqs], MAX_LEN)
    target = torch.tensor([s[-1] for s in seqs])
    seen = pad([s[:-1] for s in seqs], MAX_LEN)
    users = torch.arange(len(seqs))
    batches = [
        {"user": u, "input_ids": i, "target": t, "seen": s}
        for u, i, t, s in zip(users.split(256), inputs.split(256), target.split(256), seen.split(256))
    ]
    return DataLoader(batches, batch_size=None)


def make_module(encoder=None, **kwargs) -> SequentialRecommender:
    encoder = encoder or partial(
        M2RecEncoder, hidden_size=32, d_state=8, dropout=0.1, max_len=MAX_LEN, scales=[1, 2], mamba_backend="torch"
    )
    return SequentialRecommender(encoder=encoder, num_items=N_ITEMS, **{"lr": 3e-3, **kwargs})


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def test_m2rec_learns_deterministic_and_periodic_next_items():
    L.seed_everything(0)
    seqs = synthetic_sequences(600, seed=1)
    module = make_module()
    trainer(max_epochs=25).fit(module, train_dataloaders=train_batches(seqs))
    result = trainer().test(module, dataloaders=eval_batches(synthetic_sequences(300, seed=2)), verbose=False)[0]
    assert result["test/HR@10"] > 0.9, result


def test_loss_ignores_padding_targets_and_padding_item():
    torch.manual_seed(0)
    module = make_module(encoder=partial(SASRecEncoder, hidden_size=16, n_heads=2, max_len=MAX_LEN))
    module.eval()
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    targets = torch.tensor([[4, 5, 6, 0, 0]])
    hidden = module.encoder(ids)
    logits = hidden[0, :3] @ module.encoder.item_embeddings()[1:].T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([3, 4, 5]))
    torch.testing.assert_close(module.loss(hidden, targets), expected)


def test_label_smoothing_matches_a_float64_reference():
    torch.manual_seed(0)
    eps = 0.2
    encoder = partial(SASRecEncoder, hidden_size=16, n_heads=2, max_len=MAX_LEN)
    module = make_module(encoder=encoder, label_smoothing=eps)
    module.eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [7, 8, 0, 0, 0]])
    targets = torch.tensor([[4, 5, 6, 0, 0], [8, 9, 0, 0, 0]])
    hidden = module.encoder(ids)
    logp = (hidden[targets > 0] @ module.encoder.item_embeddings()[1:].T).double().log_softmax(-1)  # (M, N)
    target_logp = logp.gather(1, (targets[targets > 0] - 1)[:, None]).squeeze(1)
    # the smoothed target puts 1 - eps on the item and eps / N on every item (the target included)
    expected = -((1 - eps) * target_logp + eps * logp.mean(1)).mean()
    torch.testing.assert_close(module.loss(hidden, targets).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_module(label_smoothing=1.0)


@pytest.mark.parametrize("scope", ["input", "history"])
def test_seen_score_scores_the_items_seen_before_each_position_like_a_float64_loop(scope):
    torch.manual_seed(0)
    module = make_module(encoder=partial(SASRecEncoder, hidden_size=16, n_heads=2, max_len=MAX_LEN), seen_score=SeenItemScore(scope),
                         weight_decay=0.1)
    module.eval()
    with torch.no_grad():
        module.seen_score.weight.fill_(-1.5)
    ids = torch.tensor([[3, 4, 3, 5, 0], [7, 8, 7, 7, 9], [2, 0, 0, 0, 0]])  # repeats, padding, a one-item row
    targets = torch.tensor([[4, 3, 5, 4, 0], [8, 7, 7, 9, 7], [3, 0, 0, 0, 0]])
    history = torch.tensor([[11, 12, 4], [0, 0, 0], [20, 0, 0]])  # items older than the input; 4 is also an input
    older = history if scope == "history" else torch.zeros_like(history)  # the "input" scope must not read them
    hidden = module.encoder(ids)  # (3, 5, d)
    table = module.encoder.item_embeddings().double()  # (N+1, d)
    terms = []
    for b in range(3):
        for t in range(5):
            if targets[b, t] == 0:
                continue
            scores = hidden[b, t].double() @ table.T  # (N+1,)
            for item in (set(ids[b, : t + 1].tolist()) | set(older[b].tolist())) - {0}:
                scores[item] -= 1.5
            terms.append(-scores[1:].log_softmax(-1)[targets[b, t] - 1])
    torch.testing.assert_close(module.loss(hidden, targets, ids, history).double(), torch.stack(terms).mean(),
                               rtol=1e-5, atol=1e-6)
    # ranking reads the evaluator's `seen` (the whole history before the target) as the history
    seen = torch.tensor([[11, 12, 3, 4, 3, 5], [7, 8, 7, 7, 9, 0], [20, 2, 0, 0, 0, 0]])
    expected = []
    for b, last in enumerate([3, 4, 0]):
        scores = hidden[b, last].double() @ table.T
        for item in (set(ids[b].tolist()) | set(older[b].tolist())) - {0}:
            scores[item] -= 1.5
        expected.append(scores[1:])
    got = module.score({"input_ids": ids, "seen": seen}, None)
    torch.testing.assert_close(got[:, 1:].double(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    # a repeated target (item 7 after 7) pulls the learned score up, first-time targets push it down
    module.loss(hidden, targets, ids, history).backward()
    assert module.seen_score.weight.grad is not None and module.seen_score.weight.grad != 0
    decayed = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert id(module.seen_score.weight) not in decayed
    with pytest.raises(ValueError, match="input_ids"):
        module.loss(hidden, targets)
    if scope == "input":
        torch.testing.assert_close(module(ids)[:, 1:].double(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="history"):
            module.loss(hidden, targets, ids)
        with pytest.raises(ValueError, match="history"):
            module(ids)


def test_seen_score_options_are_checked():
    with pytest.raises(ValueError, match="'input' or 'history'"):
        SeenItemScore(scope="all")
    with pytest.raises(ValueError, match="lr must be > 0"):
        SeenItemScore(lr=0.0)


def test_seen_score_detach_trains_the_encoder_as_without_the_score_and_the_score_on_detached_scores():
    # the encoder's gradients must be those of the plain label-smoothed loss (seen items kept as negatives), and the
    # score's gradient that of an unsmoothed cross-entropy over the detached scores plus the score (float64 loop)
    ids = torch.tensor([[3, 4, 3, 5, 0], [7, 8, 7, 7, 9], [2, 0, 0, 0, 0]])
    targets = torch.tensor([[4, 3, 5, 4, 0], [8, 7, 7, 9, 7], [3, 0, 0, 0, 0]])
    kwargs = dict(encoder=partial(SASRecEncoder, hidden_size=16, n_heads=2, max_len=MAX_LEN),
                  label_smoothing=0.2)
    torch.manual_seed(0)
    plain = make_module(**kwargs)
    detached = make_module(**kwargs, seen_score=SeenItemScore(detach=True))
    detached.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        detached.seen_score.weight.fill_(-1.5)
    plain.eval(), detached.eval()  # no dropout: both losses see the same hidden states
    plain.loss(plain.encoder(ids), targets).backward()
    hidden = detached.encoder(ids)  # (3, 5, d)
    detached.loss(hidden, targets, ids).backward()
    for (name, a), b in zip(plain.encoder.named_parameters(), detached.encoder.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    table = detached.encoder.item_embeddings().detach().double()  # (N+1, d)
    terms = []
    for b in range(3):
        for t in range(5):
            if targets[b, t] == 0:
                continue
            scores = hidden[b, t].detach().double() @ table.T  # (N+1,)
            seen = torch.zeros_like(scores)
            seen[list(set(ids[b, : t + 1].tolist()) - {0})] = 1.0
            terms.append(-(scores + bias * seen)[1:].log_softmax(-1)[targets[b, t] - 1])
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(detached.seen_score.weight.grad.double(), bias.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scope", ["input", "history"])
def test_seen_score_learns_to_skip_what_the_user_already_has(scope):
    # every sequence is a random order of distinct items, so the next item is uniform over the unseen ones and the
    # seen-item score is the only thing to learn: it must go clearly negative. Histories are three windows long and
    # the batches come from the datamodules' own datasets, so "history" trains on `history` and validates on `seen`.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randperm(N_ITEMS, generator=gen)[:3 * MAX_LEN] + 1 for _ in range(128)]
    flat = torch.cat(seqs).numpy()
    offsets = np.arange(len(seqs) + 1) * 3 * MAX_LEN
    train = DataLoader(TrainSequences(flat, offsets, MAX_LEN, window="all"), batch_size=64, shuffle=True,
                       collate_fn=collate)
    val = DataLoader(EvalSequences(flat, offsets, MAX_LEN, "val"), batch_size=64, collate_fn=collate)
    module = make_module(encoder=partial(SASRecEncoder, hidden_size=8, n_heads=1, max_len=MAX_LEN), seen_score=SeenItemScore(scope),
                         lr=5e-2)
    trainer(max_epochs=5).fit(module, train_dataloaders=train, val_dataloaders=val)
    assert module.seen_score.weight.item() < -1.0


def test_seen_score_lr_lets_the_score_move_faster_than_the_rest():
    # the same distinct-item sequences as above at a small lr: Adam moves the scalar by about lr per step, so it stays
    # near zero unless it has its own, larger rate (cosine-scheduled like every other group)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randperm(N_ITEMS, generator=gen)[:3 * MAX_LEN] + 1 for _ in range(128)]
    flat = torch.cat(seqs).numpy()
    offsets = np.arange(len(seqs) + 1) * 3 * MAX_LEN
    learned = {}
    for score_lr in (None, 0.2):
        torch.manual_seed(0)
        train = DataLoader(TrainSequences(flat, offsets, MAX_LEN, window="all"), batch_size=64, shuffle=True,
                           collate_fn=collate)
        module = make_module(encoder=partial(SASRecEncoder, hidden_size=8, n_heads=1, max_len=MAX_LEN),
                             seen_score=SeenItemScore(lr=score_lr), lr=1e-3, scheduler="cosine",
                             weight_decay=0.1, optimizer="adamw")
        fit = trainer(max_epochs=3)
        fit.fit(module, train_dataloaders=train)
        learned[score_lr] = module.seen_score.weight.item()
        groups = fit.optimizers[0].param_groups
        assert sum(any(p is module.seen_score.weight for p in g["params"]) for g in groups) == 1
        own = [g for g in groups if any(p is module.seen_score.weight for p in g["params"])][0]
        assert own["weight_decay"] == 0.0
        if score_lr is not None:
            assert own["params"] == [module.seen_score.weight] and own["initial_lr"] == score_lr
            assert own["lr"] < score_lr  # the cosine decays it too
    steps = 3 * len(train)
    assert -steps * 1e-3 * 1.5 < learned[None] < 0
    assert learned[0.2] < -1.0


def test_nan_loss_stops_with_the_step():
    module = make_module()
    with torch.no_grad():
        module.encoder.item_embedding.weight.fill_(float("nan"))
    batches = train_batches(synthetic_sequences(64, seed=3))
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer(max_epochs=1).fit(module, train_dataloaders=batches)


def test_predict_returns_topk_without_padding_and_excludes_seen():
    torch.manual_seed(0)
    module = make_module(exclude_seen=True, top_k=5)
    module.eval()
    batch = next(iter(eval_batches(synthetic_sequences(8, seed=4))))
    out = module.predict_step(batch, 0)
    assert out["items"].shape == (8, 5)
    assert (out["items"] > 0).all()
    for row, seen in zip(out["items"], batch["seen"]):
        assert not set(row.tolist()) & set(seen[seen > 0].tolist())
    assert (out["scores"][:, :-1] >= out["scores"][:, 1:]).all()


def test_no_weight_decay_on_norms_embeddings_biases_and_ssm_parameters():
    module = make_module(weight_decay=0.1, optimizer="adamw")
    decayed = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    names = {n for n, p in module.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") for n in names)
    assert not any("A_log" in n or "norm" in n.lower() or "embedding" in n for n in names)


def test_evaluation_with_cached_item_table_equals_direct_scoring():
    """The trainer's eval loop builds the (text-projected) item table once per epoch; numbers must not change."""
    from m2rec_lightning.metrics import RankingMetrics, mask_scores, pessimistic_rank

    torch.manual_seed(0)
    encoder = partial(M2RecEncoder, hidden_size=16, d_state=4, max_len=MAX_LEN, mamba_backend="torch")
    module = SequentialRecommender(encoder=encoder, num_items=N_ITEMS, text_dim=8)
    table = torch.randn(N_ITEMS + 1, 8)
    table[0] = 0
    module.encoder.set_text_table(table)
    loader = eval_batches(synthetic_sequences(300, seed=5))
    module.setup = lambda stage: None  # the table was filled by hand, no datamodule here
    cached = trainer().test(module, dataloaders=loader, verbose=False)[0]
    module.eval()
    direct = RankingMetrics([5, 10, 20])
    with torch.no_grad():
        for batch in loader:
            scores = module.encoder(batch["input_ids"])
            last = (batch["input_ids"] > 0).sum(1) - 1
            h = scores[torch.arange(len(last)), last]
            full = h @ module.encoder.item_embeddings().T
            direct.update(pessimistic_rank(mask_scores(full), batch["target"]))
    for name, value in direct.compute().items():
        assert cached[f"test/{name}"] == pytest.approx(value.item(), abs=1e-6)


def test_item_text_is_projected_once_per_training_batch_with_gradient_accumulation():
    """A training step (the item table, then the batch in length groups) projects the item text once, also when
    Lightning accumulates the gradients of two batches (a backward after each) before an optimizer step."""
    torch.manual_seed(0)
    encoder = partial(M2RecEncoder, hidden_size=16, d_state=4, dropout=0.3, max_len=MAX_LEN, mamba_backend="torch")
    module = SequentialRecommender(encoder=encoder, num_items=N_ITEMS, text_dim=8, length_groups=4)
    table = torch.randn(N_ITEMS + 1, 8)
    table[0] = 0
    module.encoder.set_text_table(table)
    module.setup = lambda stage: None  # the table was filled by hand, no datamodule here
    projected = []
    module.encoder.semantic.register_forward_hook(lambda m, args, out: projected.append(tuple(out.shape)))
    before = [p.detach().clone() for p in module.encoder.semantic.parameters()]
    trainer(max_steps=2, accumulate_grad_batches=2).fit(module, train_batches(synthetic_sequences(300, seed=1)))
    assert projected == [(N_ITEMS + 1, 16)] * 4  # 4 batches, each one projection of the whole table
    assert all(not torch.equal(a, b) for a, b in zip(before, module.encoder.semantic.parameters()))


@pytest.mark.parametrize("name", ["m2rec", "sasrec"])
def test_length_groups_give_the_same_loss_gradients_and_scores(name):
    """Encoding a batch in groups of similar length, each cut to its longest row, changes no number."""
    if name == "m2rec":
        encoder = partial(M2RecEncoder, hidden_size=16, d_state=4, dropout=0.0, max_len=MAX_LEN, scales=[1, 2, 4],
                          mamba_backend="torch")
    else:
        encoder = partial(SASRecEncoder, hidden_size=16, n_heads=2, dropout=0.0, attn_dropout=0.0, max_len=MAX_LEN)
    seqs = synthetic_sequences(40, seed=3) + [[5, 6, 7, 8]]  # input lengths 1..11: groups of very different lengths
    batch = next(iter(train_batches(seqs)))
    results = []
    for groups in (1, 3, 7, 64):  # 64 > batch size: one row per group
        torch.manual_seed(0)
        module = make_module(encoder, length_groups=groups).double()
        loss = module.loss(module.encode(batch["input_ids"]), batch["target_ids"])
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        with torch.no_grad():
            scores = module(batch["input_ids"])
        results.append((loss.detach(), grads, scores))
    (loss_1, grads_1, scores_1), rest = results[0], results[1:]
    for loss_g, grads_g, scores_g in rest:
        torch.testing.assert_close(loss_g, loss_1, rtol=1e-12, atol=0)
        assert len(grads_g) == len(grads_1)
        for g, g1 in zip(grads_g, grads_1):
            torch.testing.assert_close(g, g1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(scores_g, scores_1, rtol=1e-9, atol=1e-12)


def test_length_groups_must_be_positive():
    with pytest.raises(ValueError, match="length_groups must be >= 1"):
        make_module(length_groups=0)
