"""Strict causality: changing the items after position t leaves every output at positions <= t unchanged.

Each check is also run on a deliberately non-causal variant, which must fail it: the check can fail.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import m2rec_lightning.models.sasrec as sasrec_module
from m2rec_lightning.models.fourier import CausalFourierFilter
from m2rec_lightning.models.m2rec import M2RecEncoder
from m2rec_lightning.models.multiscale import MultiScaleMamba, pool_windows
from m2rec_lightning.models.sasrec import SASRecEncoder

N_ITEMS, TEXT_DIM, D, L, B = 40, 12, 16, 16, 4
ATOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def random_ids(gen: torch.Generator, batch: int = B, length: int = L) -> Tensor:
    """Right-padded ids with random lengths 1..length (at least one full-length row)."""
    ids = torch.randint(1, N_ITEMS + 1, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return ids.masked_fill(torch.arange(length) >= lengths[:, None], 0)


def cut_points(ids: Tensor, gen: torch.Generator) -> Tensor:
    """A random position t per row inside its real items, (B,)."""
    lengths = (ids > 0).sum(1)
    return (torch.rand(len(ids), generator=gen) * lengths).long()


def after(t: Tensor, length: int) -> Tensor:
    return torch.arange(length) > t[:, None]  # (B, L): positions strictly after t


def assert_prefix_equal(a: Tensor, b: Tensor, t: Tensor) -> None:
    for row, tb in enumerate(t.tolist()):
        torch.testing.assert_close(a[row, : tb + 1], b[row, : tb + 1], atol=ATOL[a.dtype], rtol=0)
    # the perturbation must reach the outputs after t somewhere, or the check proves nothing
    assert any(not torch.allclose(a[r, tb + 1 :], b[r, tb + 1 :]) for r, tb in enumerate(t.tolist()))


def check_ids_causal(encoder: nn.Module, seed: int = 0, trials: int = 3) -> None:
    """Replace the items after t by other items, and by padding; outputs up to t must not move."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        ids = random_ids(gen)
        t = cut_points(ids, gen)
        future = after(t, L)
        shift = torch.randint(1, N_ITEMS, ids.shape, generator=gen)
        other = torch.where(future, (ids.clamp(min=1) - 1 + shift) % N_ITEMS + 1, ids)  # different real items
        padded = ids.masked_fill(future, 0)
        with torch.no_grad():
            base = encoder(ids)
            assert_prefix_equal(base, encoder(other), t)
            for row, tb in enumerate(t.tolist()):  # padding after t
                torch.testing.assert_close(
                    base[row, : tb + 1], encoder(padded)[row, : tb + 1], atol=ATOL[base.dtype], rtol=0
                )


def check_tensor_causal(fn, dtype: torch.dtype = torch.float64, seed: int = 0, trials: int = 3, length: int = L) -> None:
    """For a (B, L, d) -> (B, L, d) map: replace h after t by fresh noise; outputs up to t must not move."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        h = torch.randn(B, length, D, generator=gen, dtype=dtype)
        t = torch.randint(0, length - 1, (B,), generator=gen)
        h2 = torch.where(after(t, length)[..., None], torch.randn(h.shape, generator=gen, dtype=dtype), h)
        with torch.no_grad():
            assert_prefix_equal(fn(h), fn(h2), t)


def text_table(seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(N_ITEMS + 1, TEXT_DIM, generator=gen)
    table[0] = 0
    return table


def full_m2rec(**overrides) -> M2RecEncoder:
    torch.manual_seed(0)
    options = dict(hidden_size=D, n_layers=2, d_state=8, scales=[1, 2, 4], max_len=L, mamba_backend="torch")
    options.update(overrides)
    enc = M2RecEncoder(N_ITEMS, TEXT_DIM, **options)
    if enc.uses_text:
        enc.set_text_table(text_table())
    return enc.double().eval()


# ---- components ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_each_scale_path_is_causal(scale):
    torch.manual_seed(0)
    ms = MultiScaleMamba(D, [scale], d_state=8, mamba_backend="torch").double().eval()
    check_tensor_causal(lambda h: ms.paths(h)[0])


def test_weighted_multiscale_is_causal():
    torch.manual_seed(0)
    ms = MultiScaleMamba(D, [1, 2, 4], d_state=8, mamba_backend="torch").double().eval()
    check_tensor_causal(ms)


def test_multiscale_without_shift_fails_the_check():
    torch.manual_seed(0)
    ms = MultiScaleMamba(D, [2], d_state=8, mamba_backend="torch").double().eval()

    def unshifted(h):  # window k broadcast to its own positions k·s .. k·s+s-1: position k·s sees k·s+1
        z = ms.mambas[0](pool_windows(h, 2))
        out = z.repeat_interleave(2, dim=1)
        return torch.cat([out, out.new_zeros(h.size(0), h.size(1) - out.size(1), D)], dim=1)

    with pytest.raises(AssertionError, match="not close"):
        check_tensor_causal(unshifted)


@pytest.mark.parametrize("length", [L, 7])
def test_fourier_filter_is_causal(length):
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L).double().eval()
    check_tensor_causal(filt, length=length)


def test_fourier_filter_is_causal_in_float32():
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L).eval()
    check_tensor_causal(filt, dtype=torch.float32)


def test_circular_fft_filter_fails_the_check():
    torch.manual_seed(0)
    filt = CausalFourierFilter(D, max_len=L).double().eval()

    def circular(h):  # FMLP-Rec: no zero padding, so the convolution wraps the future around
        n = h.size(1)
        k = filt.kernel(n, h.dtype)
        return torch.fft.irfft(torch.fft.rfft(h, n=n, dim=1) * torch.fft.rfft(k, n=n, dim=0), n=n, dim=1)

    with pytest.raises(AssertionError, match="not close"):
        check_tensor_causal(circular)


# ---- whole encoders ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["softmax", "sum"])
def test_full_m2rec_is_causal(gate):
    check_ids_causal(full_m2rec(gate=gate))


def test_m2rec_without_text_is_causal():
    check_ids_causal(full_m2rec(semantic=False))


def test_m2rec_float32_is_causal():
    check_ids_causal(full_m2rec().float())


def test_mamba4rec_config_is_causal():
    check_ids_causal(full_m2rec(n_layers=1, scales=[1], fourier=False, semantic=False, residual=False))


def test_m2rec_with_circular_filter_fails_the_check():
    enc = full_m2rec()
    for block in enc.blocks:
        block.fourier.forward = lambda h, f=block.fourier: torch.fft.irfft(
            torch.fft.rfft(h, dim=1) * torch.fft.rfft(f.kernel(h.size(1), h.dtype), n=h.size(1), dim=0),
            n=h.size(1), dim=1,
        )
    with pytest.raises(AssertionError, match="not close"):
        check_ids_causal(enc)


def sasrec() -> SASRecEncoder:
    torch.manual_seed(0)
    return SASRecEncoder(N_ITEMS, hidden_size=D, n_layers=2, n_heads=2, inner_size=32, max_len=L).double().eval()


def test_sasrec_is_causal():
    check_ids_causal(sasrec())


def test_sasrec_without_causal_mask_fails_the_check(monkeypatch):
    def padding_only(input_ids, dtype):
        visible = (input_ids != 0)[:, None, None, :].expand(-1, 1, input_ids.size(1), -1)
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, -10000.0)

    monkeypatch.setattr(sasrec_module, "attention_bias", padding_only)
    with pytest.raises(AssertionError, match="not close"):
        check_ids_causal(sasrec())
