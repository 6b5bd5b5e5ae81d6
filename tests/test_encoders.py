"""Behaviour of the M2Rec parts and encoders, and of the SASRec baseline (causality: tests/test_causality.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from m2rec_lightning.models.encoder import Dropout, SequenceEncoder
from m2rec_lightning.models.fourier import CausalFourierFilter
from m2rec_lightning.models.gate import StreamGate
from m2rec_lightning.models.m2rec import M2RecEncoder
from m2rec_lightning.models.multiscale import MultiScaleMamba, broadcast_windows, pool_windows
from m2rec_lightning.models.sasrec import SASRecEncoder, attention_bias
from m2rec_lightning.models.semantic import SemanticProjection
from m2rec_lightning.ops.mamba import Mamba

N_ITEMS, TEXT_DIM, D, L = 30, 10, 16, 12


def right_padded(lengths: list[int], length: int = L, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, N_ITEMS + 1, (len(lengths), length), generator=gen)
    return ids.masked_fill(torch.arange(length) >= torch.tensor(lengths)[:, None], 0)


def text_table(seed: int = 1) -> Tensor:
    table = torch.randn(N_ITEMS + 1, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    table[0] = 0
    return table


def m2rec(**overrides) -> M2RecEncoder:
    torch.manual_seed(0)
    text_dim = overrides.pop("text_dim", TEXT_DIM)
    options = dict(hidden_size=D, d_state=8, max_len=L, mamba_backend="torch")
    options.update(overrides)
    return M2RecEncoder(N_ITEMS, text_dim, **options)


# ---- multi-scale ---------------------------------------------------------------------------------------------------
def test_pool_and_broadcast_alignment_by_hand():
    h = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]).reshape(1, 5, 1)  # L = 5
    z = pool_windows(h, 2)
    assert z.flatten().tolist() == [2.0, 6.0]  # windows {0,1}, {2,3}; position 4 opens no complete window
    # window k is known from position 2k+1 on: position 0 has nothing, 1-2 read w0, 3-4 read w1
    assert broadcast_windows(z, 2, 5).flatten().tolist() == [0.0, 2.0, 2.0, 6.0, 6.0]
    z4 = pool_windows(h, 4)
    assert z4.flatten().tolist() == [4.0]
    assert broadcast_windows(z4, 4, 5).flatten().tolist() == [0.0, 0.0, 0.0, 4.0, 4.0]
    assert torch.equal(broadcast_windows(pool_windows(h, 1), 1, 5), h)
    for length in range(1, 14):  # every remainder of L by the scale
        for scale in range(1, min(length, 5) + 1):
            z = torch.randn(2, length // scale, 3)
            up = torch.stack([z[:, (t + 1) // scale - 1] if t >= scale - 1 else torch.zeros(2, 3)
                              for t in range(length)], dim=1)
            assert torch.equal(broadcast_windows(z, scale, length), up), (length, scale)


def test_multiscale_is_weighted_sum_of_scale_paths():
    torch.manual_seed(0)
    ms = MultiScaleMamba(D, [1, 2, 4], d_state=8, mamba_backend="torch").double()
    with torch.no_grad():
        ms.scale_logits.copy_(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    h = torch.randn(2, L, D, dtype=torch.float64)
    w = torch.softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0)
    expected = w[0] * ms.mambas[0](h)
    for i, s in ((1, 2), (2, 4)):
        coarse = ms.mambas[i](h[:, : L // s * s].reshape(2, L // s, s, D).mean(2))  # (2, L/s, D)
        up = torch.zeros_like(h)
        for t in range(s - 1, L):
            up[:, t] = coarse[:, (t + 1) // s - 1]
        expected = expected + w[i] * up
    torch.testing.assert_close(ms(h), expected, atol=1e-12, rtol=0)
    assert torch.equal(ms.paths(h[:, :3])[2], torch.zeros_like(h[:, :3]))  # L < s: no complete window


def test_multiscale_rejects_bad_scales():
    for scales in ([], [0], [2, 2]):
        with pytest.raises(ValueError, match="scales"):
            MultiScaleMamba(D, scales)
    with pytest.raises(ValueError, match="max_len"):
        M2RecEncoder(N_ITEMS, scales=[1, 64], max_len=50)


# ---- Fourier filter ------------------------------------------------------------------------------------------------
def explicit_causal_conv(h: Tensor, k: Tensor) -> Tensor:
    """y[t] = sum_{j <= t} k[j] h[t - j], one position at a time. h (B, L, d), k (>= L, d)."""
    y = torch.zeros_like(h)
    for t in range(h.size(1)):
        for j in range(t + 1):
            y[:, t] += k[j] * h[:, t - j]
    return y


@pytest.mark.parametrize("length", [L, 5, 1])
def test_fourier_filter_equals_time_domain_convolution(length):
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L).double()
    h = torch.randn(3, length, D, dtype=torch.float64)
    expected = explicit_causal_conv(h, filt.kernel(dtype=torch.float64))
    torch.testing.assert_close(filt(h), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("length", [L, 5, 1])
def test_fourier_filter_gradients_equal_time_domain_convolution(length):
    # the filter's hand-written backward against autograd through the explicit convolution, both in float64
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L).double()
    h = torch.randn(3, length, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, length, D, dtype=torch.float64)
    grads = torch.autograd.grad((filt(h) * g).sum(), [h, filt.weight])
    expected = torch.autograd.grad((explicit_causal_conv(h, filt.kernel(length, torch.float64)) * g).sum(),
                                   [h, filt.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_fourier_response_is_a_frequency_response():
    filt = CausalFourierFilter(D, max_len=L).double()
    h = torch.randn(2, L, D, dtype=torch.float64)
    freqs = torch.arange(L + 1, dtype=torch.float64) * math.pi / L  # bins of the length-2L FFT
    with torch.no_grad():  # all-pass response 1: the kernel is a unit impulse, the filter the identity
        filt.weight.zero_()
        filt.weight[..., 0] = 1.0
    torch.testing.assert_close(filt(h), h, atol=1e-12, rtol=0)
    with torch.no_grad():  # response e^{-iω}: a delay of one step
        filt.weight[..., 0] = torch.cos(freqs)[:, None]
        filt.weight[..., 1] = -torch.sin(freqs)[:, None]
    delayed = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
    torch.testing.assert_close(filt(h), delayed, atol=1e-12, rtol=0)


def test_fourier_filter_rejects_sequences_longer_than_max_len():
    filt = CausalFourierFilter(D, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        filt(torch.randn(1, 9, D))


def test_fourier_filter_runs_ffts_in_float32_under_autocast():
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L)
    h = torch.randn(2, L, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = filt(h)
    assert y.dtype == torch.bfloat16
    reference = explicit_causal_conv(h.double(), filt.kernel(dtype=torch.float64))
    # float32 FFTs: the only error left is rounding the result to bfloat16
    torch.testing.assert_close(y.double(), reference, atol=1e-6, rtol=2**-8)


# ---- gate ----------------------------------------------------------------------------------------------------------
def streams(n: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, L, D, generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("n", [2, 3])
def test_softmax_gate_is_a_convex_combination(n):
    gate = StreamGate(D, n, "softmax").double()
    s = streams(n)
    alpha = gate.weights(s)  # (B, L, n, 1)
    assert alpha.shape == (2, L, n, 1)
    torch.testing.assert_close(alpha.sum(dim=2), torch.ones(2, L, 1, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (alpha > 0).all()
    torch.testing.assert_close(gate(s), sum(alpha[:, :, i] * s[i] for i in range(n)), atol=1e-12, rtol=0)
    # gradients against the stacked form, with a gate far from uniform
    torch.nn.init.normal_(gate.proj.weight, std=0.5)
    s = [x.requires_grad_() for x in s]
    g = torch.randn_like(s[0])
    inputs = [*s, *gate.parameters()]
    reference = (gate.weights(s) * torch.stack(s, dim=-2)).sum(dim=-2)
    for a, b in zip(torch.autograd.grad(gate(s), inputs, g), torch.autograd.grad(reference, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_sum_gate_is_exactly_the_sum():
    gate = StreamGate(D, 3, "sum")
    s = streams(3)
    assert torch.equal(gate(s), s[0] + s[1] + s[2])
    assert list(gate.parameters()) == []


def test_gate_checks_stream_count():
    with pytest.raises(ValueError, match="3 streams got 2"):
        StreamGate(D, 3).weights(streams(2))


# ---- M2Rec encoder -------------------------------------------------------------------------------------------------
def test_m2rec_shapes_and_text_buffer():
    enc = m2rec()
    enc.set_text_table(text_table())
    assert isinstance(enc, SequenceEncoder) and enc.uses_text
    ids = right_padded([L, 4, 1])
    assert enc(ids).shape == (3, L, D)
    assert enc(ids[:, :5]).shape == (3, 5, D)  # shorter than max_len
    assert enc.item_embeddings().shape == (N_ITEMS + 1, D)
    assert "text_table" in dict(enc.named_buffers()) and "text_table" in enc.state_dict()
    assert all(p is not enc.text_table for p in enc.parameters())
    assert enc.blocks[0].gate.n_streams == 3


def test_gradient_reaches_every_parameter():
    enc = m2rec(n_layers=2, dropout=0.1)
    enc.set_text_table(text_table())
    ids = right_padded([L, 7, 3])
    loss = (enc(ids) @ enc.item_embeddings().T).logsumexp(-1).mean()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert enc.text_table.grad is None and not enc.text_table.requires_grad


def test_item_table_adds_projected_text():
    enc = m2rec().eval()
    enc.set_text_table(text_table())
    expected = enc.item_embedding.weight + enc.semantic(text_table())
    torch.testing.assert_close(enc.item_embeddings(), expected)
    plain = m2rec(semantic=False)
    assert plain.item_embeddings() is plain.item_embedding.weight


def test_semantic_projection_is_whitening_then_mlp():
    torch.manual_seed(0)
    proj = SemanticProjection(TEXT_DIM, D).double()
    with torch.no_grad():
        proj.offset.normal_()
    x = torch.randn(4, TEXT_DIM, dtype=torch.float64)
    z = (x - proj.offset) @ proj.whiten.weight.T
    reference = F.gelu(z) @ proj.out.weight.T + proj.out.bias
    torch.testing.assert_close(proj(x), reference)
    g, params = torch.randn_like(reference), list(proj.parameters())
    for a, b in zip(torch.autograd.grad(proj(x), params, g), torch.autograd.grad(reference, params, g)):
        torch.testing.assert_close(a, b)


def test_text_table_is_validated_and_required():
    enc = m2rec()
    with pytest.raises(RuntimeError, match="set_text_table"):
        enc(right_padded([3]))
    with pytest.raises(ValueError, match=r"\(31, 10\)"):
        enc.set_text_table(torch.randn(N_ITEMS, TEXT_DIM))
    bad = text_table()
    bad[0, 0] = 1.0
    with pytest.raises(ValueError, match="row 0"):
        enc.set_text_table(bad)
    bad = text_table()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        enc.set_text_table(bad)
    with pytest.raises(ValueError, match="does not read item text"):
        m2rec(semantic=False).set_text_table(text_table())


def test_without_text_the_gate_has_two_streams():
    for enc in (m2rec(text_dim=0), m2rec(semantic=False)):
        assert not enc.uses_text and enc.semantic is None and enc.text_table is None
        assert enc.blocks[0].gate.n_streams == 2
        assert enc.item_embeddings() is enc.item_embedding.weight
        assert enc(right_padded([L, 2])).shape == (2, L, D)


def test_asking_for_the_semantic_branch_without_text_raises():
    with pytest.raises(ValueError, match="semantic=True needs item text"):
        m2rec(text_dim=0, semantic=True)
    assert m2rec(semantic=True).uses_text and m2rec(semantic=None).uses_text


def test_bad_ids_raise():
    enc = m2rec(semantic=False)
    with pytest.raises(ValueError, match=r"\[0, 30\]"):
        enc(torch.tensor([[1, 31]]))
    with pytest.raises(ValueError, match=r"\[0, 30\]"):
        enc(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="batch, length"):
        enc(torch.tensor([1, 2]))


def test_degenerate_config_is_mamba4rec():
    enc = m2rec(n_layers=1, scales=[1], fourier=False, semantic=False, residual=False).double().eval()
    block = enc.blocks[0]
    assert block.gate is None and block.fourier is None and block.temporal.scale_logits is None
    names = {n for n, _ in enc.named_parameters()}
    assert not any(k in n for n in names for k in ("gate", "scale_logits", "fourier", "semantic"))
    ids = right_padded([L, 5, 1])

    # the released Mamba4Rec (1 layer): LN(Dropout(emb)) -> Mamba -> LN(Dropout(.)) -> FFN with residual + LN
    mamba, ffn = block.temporal.mambas[0], block.ffn
    e = F.layer_norm(enc.item_embedding(ids), (D,), enc.norm.weight, enc.norm.bias, 1e-12)
    h = F.layer_norm(mamba(e), (D,), block.norm.weight, block.norm.bias, 1e-12)
    y = ffn.w_2(F.gelu(ffn.w_1(h)))
    expected = F.layer_norm(h + y, (D,), ffn.norm.weight, ffn.norm.bias, 1e-12)
    torch.testing.assert_close(enc(ids), expected, atol=1e-12, rtol=0)


def test_gated_residual_spans_the_residual_and_the_residual_free_block():
    ids = right_padded([L, 5, 1])
    gated = m2rec(residual="gated").double().eval()
    gated.set_text_table(text_table().double())
    skip_gate = gated.blocks[0].skip_gate
    plain = {residual: m2rec(residual=residual).double().eval() for residual in (True, False)}
    for residual, bias in ((True, 0.0), (False, -60.0)):  # g = 1/2 everywhere: LN(h/2 + m/2) = LN(h + m); g = 0
        plain[residual].set_text_table(text_table().double())
        missing, unexpected = gated.load_state_dict(plain[residual].state_dict(), strict=False)
        assert not unexpected and all(".skip_gate." in k for k in missing)
        with torch.no_grad():
            skip_gate.weight.zero_()
            skip_gate.bias.fill_(bias)
        torch.testing.assert_close(gated(ids), plain[residual](ids), atol=1e-9, rtol=0)
    # with weights the gate depends on the input, so it is neither block, and forward_last applies it too
    torch.manual_seed(1)
    with torch.no_grad():
        skip_gate.weight.normal_(0, 1)
        skip_gate.bias.zero_()
    for residual in (True, False):
        assert (gated(ids) - plain[residual](ids)).abs().max() > 1e-2
    assert_last_matches_forward(gated, ids)
    gated.train()
    gated(ids).square().sum().backward()
    assert skip_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="residual must be"):
        m2rec(residual="learned")


def test_init_leaves_mamba_parameters_alone():
    enc = m2rec()
    for mamba in (m for m in enc.modules() if isinstance(m, Mamba)):
        # RecBole's init would zero dt_proj.bias (Δ = softplus(0) = 0.69) and shrink in_proj to N(0, 0.02)
        dt = F.softplus(mamba.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert mamba.in_proj.weight.std() > 0.1  # PyTorch's default uniform(±1/sqrt(d)), std 0.144 for d = 16
        assert torch.equal(mamba.A_log, torch.log(torch.arange(1.0, 9.0)).repeat(mamba.d_inner, 1))
        assert mamba.D.eq(1).all()
    assert enc.norm.weight.eq(1).all() and enc.norm.bias.eq(0).all()
    assert enc.blocks[0].ffn.w_1.bias.eq(0).all()
    assert abs(enc.item_embedding.weight.std().item() - 0.02) < 0.003
    assert abs(enc.blocks[0].ffn.w_1.weight.std().item() - 0.02) < 0.003


def test_semantic_stream_in_evaluation_reads_rows_of_the_projected_table():
    """Without autograd in eval mode, for more positions than items, the text stream reads rows of the projected
    table: equal to projecting the gathered rows, also after a fused optimizer step (which changes the weights
    without bumping their versions) and a new text table."""
    enc = m2rec().double()
    enc.set_text_table(text_table().double())
    enc.eval()
    ids = right_padded([L, 5, L])  # 36 positions > 31 table rows
    optimizer = torch.optim.Adam(enc.semantic.parameters(), lr=0.1, fused=True)
    for change in range(3):
        with torch.no_grad():
            torch.testing.assert_close(enc._semantic(ids), enc.semantic(enc.text_table[ids]), rtol=1e-12, atol=1e-12)
        if change == 0:
            enc.semantic(enc.text_table).square().sum().backward()
            optimizer.step()
        else:
            enc.set_text_table(text_table(seed=change + 1).double())


def test_train_mode_uses_dropout():
    enc = m2rec(dropout=0.5)
    enc.set_text_table(text_table())
    ids = right_padded([L, 6])
    enc.train()
    a, b = enc(ids), enc(ids)
    assert not torch.allclose(a, b)
    enc.eval()
    assert torch.equal(enc(ids), enc(ids))


# ---- the projected text of a training step -------------------------------------------------------------------------
def text_encoder() -> M2RecEncoder:
    enc = m2rec(n_layers=2, dropout=0.5).double()
    enc.set_text_table(text_table().double())
    return enc.train()


def explicit_forward(enc: M2RecEncoder, ids: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """enc(ids) written out with the semantic stream text[ids] for one projected table text (N+1, d), projected here
    when None, after the embedding dropout as forward draws it: (B, L) -> ((B, L, d), text)."""
    h = enc.norm(enc.dropout(enc.item_embedding(ids)))
    text = enc.semantic(enc.text_table) if text is None else text
    for block in enc.blocks:
        h = block(h, text[ids])
    return h, text


def next_item_loss(hidden: Tensor, table: Tensor) -> Tensor:  # (B, L, d), (N+1, d) -> ()
    scores = hidden @ table.T
    return scores.logsumexp(-1).mean() - scores[..., 1].mean()


def gradients(enc: M2RecEncoder) -> dict[str, Tensor]:
    return {name: p.grad.to_dense() for name, p in enc.named_parameters()}  # the item lookup's may be sparse


def assert_same_gradients(enc: M2RecEncoder, reference: M2RecEncoder) -> None:
    got, expected = gradients(enc), gradients(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_training_semantic_stream_reads_the_item_tables_projection():
    """In a training step the text is projected once: the item table is E_id + P and every block's semantic stream,
    over length groups too, is P[ids], the same dropout masks."""
    enc = text_encoder()
    projections, streams = [], []
    enc.semantic.register_forward_hook(lambda module, args, out: projections.append(out))
    enc.blocks[1].gate.register_forward_pre_hook(lambda module, args: streams.append(args[0][-1]))
    ids = right_padded([L, 7, 3, L])
    table = enc.item_embeddings()
    enc(ids[:2]), enc(ids[2:, :7])  # two length groups, as the module encodes a batch
    (text,) = projections
    assert text.shape == (N_ITEMS + 1, D) and torch.equal(table, enc.item_embedding.weight + text)
    assert torch.equal(streams[0], text[ids[:2]]) and torch.equal(streams[1], text[ids[2:, :7]])


@pytest.mark.parametrize("table_first", [True, False], ids=["table-then-encoder", "encoder-then-table"])
def test_training_gradients_equal_one_explicit_projection(table_first):
    """The module builds the item table before encoding, benchmarks/throughput.py after: either way the step's
    values and gradients are those of one projection P that both the stream and the table read."""
    enc = text_encoder()
    reference = copy.deepcopy(enc)
    ids = right_padded([L, 9, 4])
    torch.manual_seed(1)
    if table_first:
        table = enc.item_embeddings()
        hidden = enc(ids)
    else:
        hidden = enc(ids)
        table = enc.item_embeddings()
    loss = next_item_loss(hidden, table)
    loss.backward()
    torch.manual_seed(1)  # the same dropout draws, in the same order
    text = reference.semantic(reference.text_table) if table_first else None
    hidden, text = explicit_forward(reference, ids, text)
    expected = next_item_loss(hidden, reference.item_embedding.weight + text)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert_same_gradients(enc, reference)


def test_gradient_accumulation_projects_once_per_backward():
    """Two forward/backward pairs, then an optimizer step, twice: each pair has its own P (the first backward freed
    the graph of its P), and the accumulated gradients are the explicit ones."""
    enc = text_encoder()
    reference = copy.deepcopy(enc)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01, fused=True) for m in (enc, reference)]
    batches = [right_padded([L, 5], seed=seed) for seed in range(4)]
    for step in range(2):
        torch.manual_seed(step)
        for ids in batches[2 * step:2 * step + 2]:
            table = enc.item_embeddings()
            next_item_loss(enc(ids), table).backward()
        torch.manual_seed(step)
        for ids in batches[2 * step:2 * step + 2]:
            text = reference.semantic(reference.text_table)
            next_item_loss(explicit_forward(reference, ids, text)[0], reference.item_embedding.weight + text).backward()
        assert_same_gradients(enc, reference)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def test_forward_without_backward_leaves_the_next_step_correct():
    """A forward whose output is dropped keeps its P for the next step (its graph is intact); a forward without
    autograd keeps none (its P would have no graph); a (fused) optimizer step retires a P no backward spent."""
    enc = text_encoder()
    reference = copy.deepcopy(enc)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01, fused=True) for m in (enc, reference)]
    ids, other = right_padded([L, 6]), right_padded([5, L], seed=1)
    torch.manual_seed(0)
    enc(other)  # dropped
    with torch.no_grad():
        enc(other)
    next_item_loss(enc(ids), enc.item_embeddings()).backward()
    enc(other)  # dropped, then the weights change
    optimizers[0].step()
    optimizers[0].zero_grad()
    table = enc.item_embeddings()
    loss = next_item_loss(enc(ids), table)
    loss.backward()

    torch.manual_seed(0)
    _, text = explicit_forward(reference, other)
    with torch.no_grad():
        reference(other)  # the same draws as the model's
    next_item_loss(explicit_forward(reference, ids, text)[0], reference.item_embedding.weight + text).backward()
    explicit_forward(reference, other)
    optimizers[1].step()
    optimizers[1].zero_grad()
    text = reference.semantic(reference.text_table)
    expected = next_item_loss(explicit_forward(reference, ids, text)[0], reference.item_embedding.weight + text)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert_same_gradients(enc, reference)



@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_draws_independent_masks_with_keep_probability_one_minus_p(p):
    """Dropout's CPU path (uniform >= p instead of bernoulli_) against nn.Dropout's law: each element kept with
    probability 1 - p, independently, kept ones scaled by 1/(1-p); backward multiplies by the same mask."""
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.rand(400, 500, dtype=torch.float64) + 1  # positive: kept <=> non-zero output
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    n = kept.numel()
    assert torch.allclose(y[kept], x[kept] / (1 - p))  # kept elements scaled, the others exactly 0
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # independence: neighbours (in a row and across rows) are kept together with probability (1 - p)^2
    for both in (kept[:, 1:] & kept[:, :-1], kept[1:] & kept[:-1]):
        assert abs(both.double().mean().item() - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / both.numel())
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.allclose(x.grad, g * kept / (1 - p))
    assert not torch.equal(drop(x), y)  # a new mask per call
    assert drop(x.detach().bfloat16()).dtype == torch.bfloat16
    frozen = x.detach().clone()
    dropped = drop(frozen)  # no autograd: the product is written into the mask's memory, never into the input
    assert torch.equal(frozen, x.detach()) and torch.equal((dropped != 0), (dropped / frozen * (1 - p)).round() == 1)
    drop.eval()
    assert torch.equal(drop(x), x)

# ---- SASRec --------------------------------------------------------------------------------------------------------
def sasrec(**overrides) -> SASRecEncoder:
    torch.manual_seed(0)
    options = dict(hidden_size=D, n_layers=2, n_heads=2, inner_size=32, max_len=L)
    options.update(overrides)
    return SASRecEncoder(N_ITEMS, **options).double().eval()


def recbole_sasrec_reference(enc: SASRecEncoder, ids: Tensor) -> Tensor:
    """RecBole's SASRec forward written out: explicit softmax attention with the -10000 additive mask."""
    length = ids.size(1)
    h = enc.item_embedding(ids) + enc.position_embedding(torch.arange(length))
    h = F.layer_norm(h, (D,), enc.norm.weight, enc.norm.bias, 1e-12)
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool)) & (ids > 0)[:, None, None, :]
    bias = torch.where(mask, 0.0, -10000.0).double()
    for att, ffn in zip(enc.attention, enc.ffn):
        heads = lambda x: x.view(x.size(0), length, att.n_heads, -1).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(att.query(h)), heads(att.key(h)), heads(att.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + bias
        context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(h.shape)
        h = F.layer_norm(att.out(context) + h, (D,), att.norm.weight, att.norm.bias, 1e-12)
        y = ffn.w_2(0.5 * ffn.w_1(h) * (1 + torch.erf(ffn.w_1(h) / math.sqrt(2))))
        h = F.layer_norm(y + h, (D,), ffn.norm.weight, ffn.norm.bias, 1e-12)
    return h


def test_sasrec_equals_explicit_attention():
    enc = sasrec()
    ids = right_padded([L, 6, 1])
    out = enc(ids)
    assert out.shape == (3, L, D) and enc.item_embeddings().shape == (N_ITEMS + 1, D)
    torch.testing.assert_close(out, recbole_sasrec_reference(enc, ids), atol=1e-12, rtol=0)
    # a row that starts with padding has no visible key: RecBole's finite mask averages instead of NaN
    leading_pad = torch.tensor([[0, 0, 3, 4]])
    torch.testing.assert_close(enc(leading_pad), recbole_sasrec_reference(enc, leading_pad), atol=1e-12, rtol=0)
    assert torch.isfinite(enc(leading_pad)).all()


def test_sasrec_attention_bias_masks_future_and_padding():
    bias = attention_bias(torch.tensor([[5, 6, 0]]), torch.float32)[0, 0]
    assert bias.tolist() == [[0, -10000, -10000], [0, 0, -10000], [0, 0, -10000]]


def test_sasrec_padding_does_not_affect_real_positions():
    enc = sasrec()
    ids = right_padded([5, 3], length=6)
    longer = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)  # more trailing padding
    out, out_long = enc(ids), enc(longer)
    for row, n in enumerate([5, 3]):
        torch.testing.assert_close(out[row, :n], out_long[row, :n], atol=1e-12, rtol=0)


def test_sasrec_gradients_and_limits():
    enc = SASRecEncoder(N_ITEMS, TEXT_DIM, hidden_size=D, inner_size=32, max_len=L)
    assert not enc.uses_text
    ids = right_padded([L, 4])
    (enc(ids) @ enc.item_embeddings().T).logsumexp(-1).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="max_len=12"):
        enc(torch.ones(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SASRecEncoder(N_ITEMS, hidden_size=10, n_heads=3)


# ---- last position (what ranking reads) ---------------------------------------------------------------------------
LAST_LENGTHS = [L, 1, 3, 5, 7, 0, 4, L - 1, 2]  # 0 = a row of padding only (its "last position" is 0)


def assert_last_matches_forward(enc: SequenceEncoder, ids: Tensor) -> None:
    expected = enc(ids)[torch.arange(ids.size(0)), (ids > 0).sum(1).clamp(min=1) - 1]
    with torch.no_grad():  # the M2Rec fast path (state-only scan) runs without autograd
        torch.testing.assert_close(enc.forward_last(ids), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(enc.forward_last(ids), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [
    {},
    {"n_layers": 2},
    {"gate": "sum", "scales": [3, 5]},
    {"fourier": False, "text_dim": 0},
    {"scales": [1], "fourier": False, "text_dim": 0, "residual": False},  # Mamba4Rec
    {"residual": "gated", "n_layers": 2},
    {"scales": [2, 4], "n_layers": 3, "semantic": False},
])
def test_m2rec_forward_last_equals_forward_at_the_last_item(options, monkeypatch):
    import m2rec_lightning.ops.mamba as mamba_module

    state_calls = []
    state_fn = mamba_module.selective_scan_state
    monkeypatch.setattr(mamba_module, "selective_scan_state", lambda *a, **k: state_calls.append(1) or state_fn(*a, **k))
    enc = m2rec(**options).double().eval()
    if enc.uses_text:
        enc.set_text_table(text_table().double())
    assert_last_matches_forward(enc, right_padded(LAST_LENGTHS))
    assert state_calls  # the last block took the state-only scan
    assert_last_matches_forward(enc, right_padded([3, 1, 2], length=3))  # shorter than the widest scale window


@pytest.mark.parametrize("n_layers", [1, 2])
def test_sasrec_forward_last_equals_forward_at_the_last_item(n_layers):
    assert_last_matches_forward(sasrec(n_layers=n_layers), right_padded(LAST_LENGTHS))


def test_fourier_forward_last_is_the_filter_at_the_index():
    filt = CausalFourierFilter(D, L).double()
    h = torch.randn(3, 9, D, dtype=torch.float64)
    index = torch.tensor([8, 0, 4])
    torch.testing.assert_close(filt.forward_last(h, index), filt(h)[torch.arange(3), index], rtol=1e-10, atol=1e-12)
    # without autograd too, also after a fused optimizer step (which changes the weight without bumping its
    # version, so nothing may be kept between calls keyed on it)
    optimizer = torch.optim.Adam(filt.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(filt.forward_last(h, index), filt(h)[torch.arange(3), index], rtol=1e-10,
                                       atol=1e-12)
        filt(h).square().sum().backward()
        optimizer.step()
