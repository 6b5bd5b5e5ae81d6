"""The Triton selective scan against the float64 reference: on CUDA when there is one, else the same kernels on CPU
under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before anything imports triton)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_selective_scan import NAMES, make_inputs, rel_err  # noqa: E402

from m2rec_lightning.ops.selective_scan import selective_scan_ref, selective_scan_state  # noqa: E402
from m2rec_lightning.ops.selective_scan_triton import selective_scan_state_triton, selective_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(fn, inputs: dict, use: tuple, softplus: bool, dtype: torch.dtype):
    leaves = {k: v.to(DEVICE, dtype).clone().requires_grad_() for k, v in inputs.items()}
    args = {k: (leaves[k] if k in use or k in ("u", "delta", "A", "B", "C") else None) for k in NAMES}
    y = fn(**args, delta_softplus=softplus)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE, dtype)
    used = [k for k in NAMES if args[k] is not None]
    return y, dict(zip(used, torch.autograd.grad(y, [leaves[k] for k in used], g)))


@pytest.mark.parametrize("L", [1, 5, 16, 37])  # CHUNK = 16: inside one chunk, exactly one, several with a tail
@pytest.mark.parametrize("use,softplus", [(("D", "z", "delta_bias"), True), ((), False), (("z",), True),
                                          (("D",), False)])
def test_triton_scan_matches_float64_reference(L, use, softplus):
    inputs = make_inputs(2, 12, 5, L, dtype=torch.float64, seed=L, realistic=True)  # d=12, n=5: masked tiles
    y, g = grads_of(selective_scan_triton, inputs, use, softplus, torch.float32)
    y_ref, g_ref = grads_of(selective_scan_ref, inputs, use, softplus, torch.float64)
    assert y.dtype == torch.float32 and rel_err(y.double(), y_ref) <= 1e-5
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert rel_err(g[k].double(), g_ref[k]) <= 1e-4, k


def test_triton_scan_takes_strided_views_like_the_mamba_block():
    """The Mamba block passes (b, d, L) views of (b, L, d) memory and B, C sliced out of one projection."""
    b, d, n, L = 3, 8, 4, 20
    gen = torch.Generator().manual_seed(0)
    x_dbl = torch.randn(b, L, 2 + 2 * n, generator=gen)
    u, delta, z = (torch.randn(b, L, d, generator=gen).transpose(1, 2) for _ in range(3))
    A = -torch.rand(d, n, generator=gen) * 3
    B, C = x_dbl[..., 2:2 + n].transpose(1, 2), x_dbl[..., 2 + n:].transpose(1, 2)
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, torch.ones(d), z)]
    y = selective_scan_triton(*args, delta_softplus=True)
    y_ref = selective_scan_ref(*(t.double() for t in args), delta_softplus=True)
    assert rel_err(y.double(), y_ref) <= 1e-5


def test_triton_state_matches_the_pytorch_state():
    x = make_inputs(5, 12, 5, 37, dtype=torch.float32, seed=3, realistic=True)
    index = torch.tensor([36, 0, 15, 16, 7])
    args = [x[k].to(DEVICE) for k in ("u", "delta", "A", "B")]
    h = selective_scan_state_triton(*args, index.to(DEVICE), delta_bias=x["delta_bias"].to(DEVICE),
                                    delta_softplus=True)
    h_ref = selective_scan_state(*(t.double() for t in args), index.to(DEVICE), x["delta_bias"].double().to(DEVICE),
                                 True)
    assert h.dtype == torch.float32 and rel_err(h.double(), h_ref) <= 1e-5
    with pytest.raises(ValueError, match=r"index must lie in \[0, 37\)"):
        selective_scan_state_triton(*args, torch.tensor([37, 0, 0, 0, 0], device=DEVICE))


def test_triton_scan_refuses_float64():
    x = make_inputs(1, 4, 2, 3)
    with pytest.raises(NotImplementedError, match="runs in float32"):
        selective_scan_triton(*(x[k] for k in ("u", "delta", "A", "B", "C")))


def test_mamba_block_on_the_triton_backend_matches_the_torch_backend():
    from m2rec_lightning.ops.mamba import Mamba

    torch.manual_seed(0)
    ref = Mamba(16, d_state=4, backend="torch").to(DEVICE)
    tri = Mamba(16, d_state=4, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 21, 16, device=DEVICE)
    outs = []
    for m in (ref, tri):
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (y_ref, g_ref), (y_tri, g_tri) = outs
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], rtol=1e-3, atol=1e-4, msg=name)
    index = torch.tensor([20, 0, 9], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(tri.forward_last(x, index), y_ref[torch.arange(3), index], rtol=1e-4, atol=1e-5)
