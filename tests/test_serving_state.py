"""Recurrent user state (serving): step and encode_state give exactly the hidden states of forward.

Float64, atol 1e-10, over every M2Rec option, SASRec's key/value cache, and batches of users with different histories;
M2Rec's step both in PyTorch (the torch Mamba backend) and compiled (the cpu backend).
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from m2rec_lightning.models.m2rec import M2RecEncoder
from m2rec_lightning.models.sasrec import SASRecEncoder
from m2rec_lightning.models.state import StatePool, cat_states, map_state, select_state
from m2rec_lightning.ops.cpu_kernels import cpu_kernels_unavailable
from m2rec_lightning.ops.mamba import Mamba

N_ITEMS, TEXT_DIM, D = 40, 12, 16
ATOL = 1e-10
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    cpu_kernels_unavailable() is not None, reason=f"the CPU kernels do not build here: {cpu_kernels_unavailable()}"))]

# every value of every option appears at least once; Mamba4Rec is the second
M2REC_OPTIONS = [
    dict(),  # the default: scales [1, 2, 4], Fourier, text, softmax gate, residual
    dict(scales=[1], fourier=False, semantic=False, residual=False),  # Mamba4Rec
    dict(scales=[2], fourier=False, semantic=False),
    dict(scales=[4, 1], gate="sum", residual="gated"),
    dict(scales=[1, 2], semantic=False, residual=False, n_layers=2, d_conv=2),
    dict(scales=[2, 4], fourier=True, semantic=True, residual="gated", n_layers=3, d_conv=1),
    dict(scales=[1, 3], fourier=False, semantic=True, gate="softmax", d_conv=3),
]


def make_m2rec(options: dict, max_len: int = 16, seed: int = 0, backend: str = "torch") -> M2RecEncoder:
    torch.manual_seed(seed)
    encoder = M2RecEncoder(N_ITEMS, TEXT_DIM, hidden_size=D, d_state=4, max_len=max_len, mamba_backend=backend,
                           **options)
    with torch.no_grad():  # away from the init's symmetries, so every parameter shapes the output
        for name, p in encoder.named_parameters():
            if name.endswith("bias") or "scale_logits" in name or "offset" in name:
                p.normal_(0.0, 0.3)
    if encoder.uses_text:
        table = torch.randn(N_ITEMS + 1, TEXT_DIM)
        table[0] = 0
        encoder.set_text_table(table)
    return encoder.double().eval()


def with_longer_max_len(encoder: M2RecEncoder, options: dict, max_len: int) -> M2RecEncoder:
    """The same encoder with max_len taps more, the extra Fourier taps zero: the reference for long histories."""
    longer = make_m2rec(options, max_len=max_len)
    state = encoder.state_dict()
    for i, block in enumerate(encoder.blocks):
        if block.fourier is not None:
            k = block.fourier.kernel(dtype=torch.float64)  # (max_len, d)
            # the response whose length-2·max_len inverse FFT is k followed by zeros
            response = torch.fft.rfft(k, n=2 * max_len, dim=0)  # (max_len + 1, d)
            state[f"blocks.{i}.fourier.weight"] = torch.view_as_real(response)
    longer.load_state_dict(state)
    for block in longer.blocks:
        if block.fourier is not None:
            taps = block.fourier.kernel(dtype=torch.float64)
            assert taps[encoder.max_len:].abs().max() < 1e-15
    return longer


def histories(gen: torch.Generator, batch: int, length: int, min_length: int = 1) -> tuple[Tensor, Tensor]:
    """Right-padded ids (batch, length) with lengths in [min_length, length], one full row; and the lengths."""
    ids = torch.randint(1, N_ITEMS + 1, (batch, length), generator=gen)
    lengths = torch.randint(min_length, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return ids.masked_fill(torch.arange(length) >= lengths[:, None], 0), lengths


def forward_at(encoder, ids: Tensor, positions: Tensor) -> Tensor:
    """forward's hidden state at positions[i] of row i, (B, d)."""
    return encoder(ids)[torch.arange(len(ids)), positions]


def append(ids: Tensor, lengths: Tensor, new: Tensor) -> Tensor:
    """Each row's history followed by the new items (B, S), right-padded."""
    out = torch.cat([ids, torch.zeros_like(new)], dim=1)
    rows = torch.arange(len(ids))[:, None]
    out[rows, lengths[:, None] + torch.arange(new.size(1))] = new
    return out


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", M2REC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("backend", BACKENDS)
def test_m2rec_step_from_empty_equals_forward(options: dict, backend: str) -> None:
    encoder = make_m2rec(options, backend=backend)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, N_ITEMS + 1, (3, 16), generator=gen)
    expected = encoder(ids)  # (B, L, d)
    state = encoder.init_state(3)
    for t in range(ids.size(1)):
        state, hidden = encoder.step(state, ids[:, t])
        close(hidden, expected[:, t])


@pytest.mark.parametrize("options", M2REC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("backend", BACKENDS)
def test_m2rec_prefill_then_steps_equal_forward_for_users_of_different_lengths(options: dict, backend: str) -> None:
    encoder = make_m2rec(options, backend=backend)
    gen = torch.Generator().manual_seed(2)
    ids, lengths = histories(gen, batch=5, length=11)
    state, hidden = encoder.encode_state(ids)
    close(hidden, encoder.forward_last(ids))
    new = torch.randint(1, N_ITEMS + 1, (5, 5), generator=gen)
    whole = append(ids, lengths, new)  # (B, 16), each row's own history then the new items
    expected = encoder(whole)
    for j in range(new.size(1)):
        state, hidden = encoder.step(state, new[:, j])
        close(hidden, expected[torch.arange(5), lengths + j])


@pytest.mark.parametrize("options", M2REC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("backend", BACKENDS)
def test_m2rec_reads_a_history_longer_than_max_len_whole(options: dict, backend: str) -> None:
    encoder = make_m2rec(options, max_len=8, backend=backend)
    reference = with_longer_max_len(encoder, options, max_len=32)
    gen = torch.Generator().manual_seed(3)
    ids, lengths = histories(gen, batch=4, length=23, min_length=9)  # lengths not multiples of the scales
    expected = reference(ids)
    # prefill of the long histories
    state, hidden = encoder.encode_state(ids)
    close(hidden, expected[torch.arange(4), lengths - 1])
    # step by step from nothing, past max_len (the full row)
    stepped = encoder.init_state(1)
    for t in range(ids.size(1)):
        stepped, hidden = encoder.step(stepped, ids[:1, t])
        close(hidden, expected[:1, t])
    # the whole history is read: the window of the last max_len items gives another state, so a state cut to it
    # would fail the checks above
    assert not torch.allclose(hidden, encoder.forward_last(ids[:1, -8:]), atol=1e-6)
    # and steps after the long prefill
    new = torch.randint(1, N_ITEMS + 1, (4, 3), generator=gen)
    expected = reference(append(ids, lengths, new))
    for j in range(new.size(1)):
        state, hidden = encoder.step(state, new[:, j])
        close(hidden, expected[torch.arange(4), lengths + j])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba_step_and_prefill_equal_forward_with_biases(backend: str) -> None:
    torch.manual_seed(0)
    mamba = Mamba(D, d_state=4, d_conv=3, bias=True, conv_bias=False, backend=backend).double()
    with torch.no_grad():
        mamba.in_proj.bias.normal_(0.0, 0.5)  # padding must be zeros of the conv's input x, not of in_proj's input
    u = torch.randn(2, 9, D, dtype=torch.float64)
    expected = mamba(u)
    state = mamba.init_state(2)
    for t in range(9):
        state, y = mamba.step(state, u[:, t])
        close(y, expected[:, t])
    lengths = torch.tensor([1, 6])
    state, y = mamba.prefill(u, lengths)
    close(y, expected[torch.arange(2), lengths - 1])
    state, y = mamba.step(state, u[:, 6])  # row 0 continues after 1 input with another
    close(y[1], expected[1, 6])
    close(y[0], mamba(torch.cat([u[:1, :1], u[:1, 6:7]], dim=1))[0, 1])


def test_sasrec_cache_equals_forward_and_past_max_len_the_window() -> None:
    torch.manual_seed(0)
    encoder = SASRecEncoder(N_ITEMS, hidden_size=D, n_layers=2, n_heads=2, inner_size=32, max_len=6).double().eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, N_ITEMS + 1, (3, 15), generator=gen)
    state = encoder.init_state(3)
    for t in range(ids.size(1)):
        state, hidden = encoder.step(state, ids[:, t])
        window = ids[:, max(0, t + 1 - encoder.max_len): t + 1]  # what SASRec reads: at most max_len items
        close(hidden, encoder(window)[:, -1])
    # a batch whose users have different lengths: some below max_len, some at it (their window is re-encoded)
    prefix, lengths = histories(gen, batch=5, length=6)
    state, hidden = encoder.encode_state(prefix)
    close(hidden, encoder.forward_last(prefix))
    new = torch.randint(1, N_ITEMS + 1, (5, 4), generator=gen)
    whole = append(prefix, lengths, new)
    for j in range(new.size(1)):
        state, hidden = encoder.step(state, new[:, j])
        for row in range(5):
            end = int(lengths[row]) + j + 1
            close(hidden[row], encoder(whole[row: row + 1, max(0, end - encoder.max_len): end])[0, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_stack_select_and_are_not_changed_by_a_step(backend: str) -> None:
    encoder = make_m2rec(dict(n_layers=2), backend=backend)
    gen = torch.Generator().manual_seed(5)
    ids, _ = histories(gen, batch=4, length=10)
    state, _ = encoder.encode_state(ids)
    before = map_state(torch.clone, state)
    users = [select_state(state, slice(i, i + 1)) for i in range(4)]
    restacked = cat_states([users[2], users[0]])
    item = torch.tensor([7, 9])
    _, hidden = encoder.step(restacked, item)
    _, expected = encoder.step(select_state(state, torch.tensor([2, 0])), item)
    close(hidden, expected)
    map_state(lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0), state, before)  # functional steps
    # SASRec's cache selects the same way
    sasrec = SASRecEncoder(N_ITEMS, hidden_size=D, max_len=10).double().eval()
    cache, _ = sasrec.encode_state(ids)
    _, hidden = sasrec.step(cat_states([select_state(cache, [3]), select_state(cache, [1])]), item)
    _, expected = sasrec.step(cache, torch.tensor([1, 9, 1, 7]))  # user 3 gets 7, user 1 gets 9
    close(hidden, expected[[3, 1]])


def test_serving_refuses_what_it_cannot_do_exactly() -> None:
    encoder = make_m2rec(dict())
    sasrec = SASRecEncoder(N_ITEMS, hidden_size=D, max_len=4).double().eval()
    state = encoder.init_state(2)
    with pytest.raises(ValueError, match="no padding"):
        encoder.step(state, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="right-padded"):
        encoder.encode_state(torch.tensor([[0, 3, 4]]))
    with pytest.raises(ValueError, match="no item"):
        sasrec.encode_state(torch.tensor([[2, 3], [0, 0]]))
    with pytest.raises(ValueError, match="max_len"):
        sasrec.encode_state(torch.ones(1, 5, dtype=torch.long))
    encoder.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        encoder.step(state, torch.tensor([3, 4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_constants_follow_parameter_changes(backend: str) -> None:
    """step keeps item-independent tensors (Fourier kernel, A, projected text) between calls; a changed parameter or
    text table must not leave a stale copy behind."""
    encoder = make_m2rec(dict(), backend=backend)
    ids = torch.randint(1, N_ITEMS + 1, (2, 5), generator=torch.Generator().manual_seed(6))
    encoder.step(encoder.init_state(2), ids[:, 0])  # fills the kept constants
    with torch.no_grad():
        block = encoder.blocks[0]
        block.fourier.weight.mul_(3.0)
        block.temporal.mambas[0].A_log.add_(0.5)
        encoder.semantic.offset.add_(1.0)
        table = encoder.text_table.clone()
        table[1:] = table[1:].flip(0)
    encoder.set_text_table(table)
    state, expected = encoder.init_state(2), encoder(ids)
    for t in range(ids.size(1)):
        state, hidden = encoder.step(state, ids[:, t])
        close(hidden, expected[:, t])


def test_kept_constants_follow_a_fused_optimizer_step():
    # fused Adam (the module's optimizer) updates parameters without bumping their versions: what is kept for
    # inference must still be recomputed after every step
    from m2rec_lightning.models.fourier import CausalFourierFilter

    torch.manual_seed(0)
    filt = CausalFourierFilter(8, max_len=6)
    h, index = torch.randn(3, 6, 8), torch.tensor([5, 0, 3])
    opt = torch.optim.Adam(filt.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        with torch.no_grad():
            kept = filt.forward_last(h, index)
        torch.testing.assert_close(kept, filt(h)[torch.arange(3), index].detach(), rtol=1e-5, atol=1e-6)
        filt(h).square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_constants_follow_training_conversion_and_loading(backend: str) -> None:
    """The kept constants are recomputed after an optimizer step in training mode, dtype conversions (new storages)
    and a load_state_dict that assigns other tensors in place of the parameters."""
    options = dict(n_layers=2, residual="gated")
    encoder = make_m2rec(options, backend=backend)
    ids = torch.randint(1, N_ITEMS + 1, (2, 6), generator=torch.Generator().manual_seed(7))

    def steps_equal_forward(tolerance: float = ATOL) -> None:
        state, expected = encoder.init_state(2), encoder(ids)
        for t in range(ids.size(1)):
            state, hidden = encoder.step(state, ids[:, t])
            torch.testing.assert_close(hidden, expected[:, t], atol=tolerance, rtol=tolerance)

    steps_equal_forward()  # fills the kept constants
    encoder.train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder(ids).square().sum().backward()
    optimizer.step()
    encoder.eval()
    steps_equal_forward()
    encoder.float()
    steps_equal_forward(1e-5)
    encoder.double()
    steps_equal_forward()
    encoder.load_state_dict(make_m2rec(options, seed=1, backend=backend).state_dict(), assign=True)
    steps_equal_forward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_pool_reads_writes_grows_and_reuses_slots(backend: str) -> None:
    encoder = make_m2rec(dict(n_layers=2), backend=backend)
    gen = torch.Generator().manual_seed(8)
    ids, _ = histories(gen, batch=5, length=9)
    state, _ = encoder.encode_state(ids)
    doubling = StatePool(encoder.init_state, limit=16)
    doubling.take(3)
    doubling.take(1)
    assert doubling.size == 6  # doubles below the limit
    pool = StatePool(encoder.init_state, limit=4)
    slots = pool.take(3)
    assert pool.size == 3 and sorted(slots) == [0, 1, 2]
    slots += pool.take(2)
    assert pool.size == 5 and len(set(slots)) == 5  # beyond the limit, only as far as needed
    pool.write(torch.tensor(slots), state)
    order = torch.tensor([3, 0, 4])
    read = pool.read(torch.tensor([slots[i] for i in order]))
    map_state(lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0), read, select_state(state, order))
    # a read is a copy: stepping it leaves the pool as it was
    item = torch.tensor([3, 5, 7])
    stepped, hidden = encoder.step(read, item)
    close(hidden, encoder.step(select_state(state, order), item)[1])
    map_state(lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0), pool.read(torch.tensor(slots)), state)
    # written back to its slots, the other slots untouched
    pool.write(torch.tensor([slots[i] for i in order]), stepped)
    again = pool.read(torch.tensor(slots))
    map_state(lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0), select_state(again, order), stepped)
    map_state(lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0), select_state(again, [1, 2]),
              select_state(state, [1, 2]))
    # given-back slots are taken again before the pool grows
    pool.give([slots[1], slots[2]])
    assert sorted(pool.take(2)) == sorted([slots[1], slots[2]]) and pool.size == 5
    pool.take(1)
    assert pool.size == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_of_an_encoder_made_under_inference_mode(backend: str) -> None:
    """Parameters made under torch.inference_mode have no version counter, so step keeps no constants for them (and
    recomputes them each step) instead of failing."""
    with torch.inference_mode():
        encoder = make_m2rec(dict(), backend=backend)
        ids = torch.randint(1, N_ITEMS + 1, (2, 5), generator=torch.Generator().manual_seed(9))
        state, expected = encoder.init_state(2), encoder(ids)
        for t in range(ids.size(1)):
            state, hidden = encoder.step(state, ids[:, t])
            close(hidden, expected[:, t])
        encoder.blocks[0].fourier.weight.mul_(2.0)  # not seen by a version: nothing was kept
        state, expected = encoder.init_state(2), encoder(ids)
        for t in range(ids.size(1)):
            state, hidden = encoder.step(state, ids[:, t])
            close(hidden, expected[:, t])
