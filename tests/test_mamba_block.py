import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

import m2rec_lightning.ops.mamba as mamba_module
from m2rec_lightning.ops.mamba import Mamba
from m2rec_lightning.ops.selective_scan import selective_scan_ref

# mamba_ssm.modules.mamba_simple.Mamba(d_model=16, d_state=8, d_conv=4, expand=2): dt_rank = ceil(16/16) = 1,
# d_inner = 32; keys and shapes as in its source
MAMBA_SSM_STATE = {
    "A_log": (32, 8),
    "D": (32,),
    "in_proj.weight": (64, 16),
    "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,),
    "x_proj.weight": (1 + 2 * 8, 32),
    "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,),
    "out_proj.weight": (16, 32),
}


def reference_block(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba-1 block written out from the equations, with the per-step reference scan."""
    L = x.shape[1]
    xz = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    xi, z = xz.chunk(2, dim=-1)  # (b, L, E·D)
    w = m.conv1d.weight[:, 0, :]  # (E·D, d_conv)
    pad = F.pad(xi, (0, 0, m.d_conv - 1, 0))
    conv = sum(pad[:, k:k + L] * w[:, k] for k in range(m.d_conv)) + m.conv1d.bias  # causal, tap k-1 = newest
    xc = F.silu(conv)
    dt, B, C = torch.split(xc @ m.x_proj.weight.t(), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.t() + m.dt_proj.bias)
    y = selective_scan_ref(xc.transpose(1, 2), delta.transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2),
                           C.transpose(1, 2), m.D, z=z.transpose(1, 2))
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


def test_state_dict_matches_mamba_ssm():
    m = Mamba(16, d_state=8, d_conv=4, expand=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_STATE
    with_bias = Mamba(16, d_state=8, bias=True).state_dict()
    assert set(with_bias) == set(MAMBA_SSM_STATE) | {"in_proj.bias", "out_proj.bias"}


def test_initialisation_matches_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, dt_min=0.002, dt_max=0.05, dtype=torch.float64)
    assert m.dt_rank == 4 and m.d_inner == 128
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(128, 1))
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32  # kept fp32, as mamba_ssm does
    assert m.in_proj.weight.dtype == torch.float64
    assert torch.equal(m.D, torch.ones(128))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    dt0 = F.softplus(m.dt_proj.bias)
    assert dt0.min() >= 0.002 * (1 - 1e-9) and dt0.max() <= 0.05 * (1 + 1e-9)
    # log-uniform: the mean of log dt is near the middle of [log dt_min, log dt_max]
    assert abs(dt0.log().mean().item() - (math.log(0.002) + math.log(0.05)) / 2) < 0.3
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.5 * bound
    const = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.all(const.dt_proj.weight == 2.0 * const.dt_rank**-0.5)
    floor = Mamba(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(floor.dt_proj.bias), torch.full((32,), 1e-4))


@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_block_written_from_equations(bias):
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, bias=bias, backend="torch").double()
    if bias:
        torch.nn.init.normal_(m.in_proj.bias)
    x = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = reference_block(m, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the conv's path without autograd
        torch.testing.assert_close(m(x), y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g)
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_matches_mambapy_block_with_copied_weights():
    mambapy = pytest.importorskip("mambapy.mamba")
    torch.manual_seed(0)
    ours = Mamba(16, d_state=8, d_conv=4, expand=2, backend="torch").double()
    theirs = mambapy.MambaBlock(mambapy.MambaConfig(d_model=16, n_layers=1, d_state=8, d_conv=4,
                                                    expand_factor=2, pscan=True)).double()
    theirs.load_state_dict(ours.state_dict())  # same names: strict load must succeed
    x = torch.randn(2, 32, 16, dtype=torch.float64, requires_grad=True)
    y, y_theirs = ours(x), theirs(x)
    # mambapy computes A = -exp(A_log) in float32 even in a float64 model, hence the tolerance
    torch.testing.assert_close(y, y_theirs, rtol=1e-6, atol=1e-8)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_theirs, x, g)[0],
                               rtol=1e-6, atol=1e-8)


def test_strictly_causal():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, backend="torch")
    x = torch.randn(2, 30, 16)
    y = m(x)
    for t in (0, 7, 28):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 5
        y2 = m(x2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3  # the change does reach later positions
    # and gradients: output t does not depend on inputs after t
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m(xg)[:, 10].sum(), xg)
    assert torch.all(g[:, 11:] == 0) and g[:, :11].abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_forward_last_equals_forward_at_the_index(bias):
    # without autograd forward_last projects z and C at the index only and runs the state-only scan
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, bias=bias, backend="torch").double()
    if bias:
        torch.nn.init.normal_(m.in_proj.bias)
    x = torch.randn(5, 23, 16, dtype=torch.float64)
    index = torch.tensor([22, 0, 9, 22, 14])
    with torch.no_grad():
        torch.testing.assert_close(m.forward_last(x, index), m(x)[torch.arange(5), index], rtol=1e-10, atol=1e-12)


def test_bfloat16_autocast_runs_scan_in_float32():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, backend="torch")
    x = torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)
    y.float().square().sum().backward()  # the hand-written conv backward with bfloat16 activations
    assert m.conv1d.weight.grad.dtype == torch.float32 and torch.isfinite(m.conv1d.weight.grad).all()


def test_backend_selection_and_errors(caplog):
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch', 'cpu', 'cuda' or 'triton'"):
        Mamba(16, backend="tritonn")
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="normal")
    x = torch.randn(1, 5, 16)
    if mamba_module._mamba_ssm_kernels()[0] is None:
        with pytest.raises(ImportError, match="mamba_ssm"):
            Mamba(16, backend="cuda")(x)
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            Mamba(16, backend="cuda")(x)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises((ImportError, ValueError), match="triton"):  # not installed, or not CUDA tensors
            Mamba(16, backend="triton")(x)
    mamba_module._log_once.cache_clear()
    m = Mamba(16, backend="auto")
    with caplog.at_level(logging.INFO, logger="m2rec"):
        m(x)
        m(x)
    msgs = [r.getMessage() for r in caplog.records if r.name == "m2rec"]
    expected = "torch" if mamba_module.cpu_kernels_unavailable() else "cpu"  # the compiled CPU scan when g++ builds it
    assert len(msgs) == 1 and msgs[0].startswith(f"Mamba backend: {expected}")


@pytest.mark.gpu
def test_cuda_backend_matches_mamba_ssm():
    """Our block (cuda and torch backends) against mamba_ssm's own Mamba with the same state dict."""
    mamba_simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    theirs = mamba_simple.Mamba(64, d_state=16, d_conv=4, expand=2).to(dev)
    x = torch.randn(4, 50, 64, device=dev, requires_grad=True)
    g = torch.randn(4, 50, 64, device=dev)
    y_ref = theirs(x)
    grads_ref = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
    for backend in ("cuda", "torch", "auto"):
        ours = Mamba(64, d_state=16, d_conv=4, expand=2, backend=backend).to(dev)
        ours.load_state_dict(theirs.state_dict())
        y = ours(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5, msg=backend)
        grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
        names = ["x", *(n for n, _ in ours.named_parameters())]
        for name, a, b in zip(names, grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=f"{backend}: {name}")


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu():
    """The pure-PyTorch scan also runs on CUDA tensors (what "auto" uses there without mamba_ssm)."""
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, backend="torch")
    x = torch.randn(4, 40, 32, requires_grad=True)
    g = torch.randn(4, 40, 32)
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    m_cuda = Mamba(32, d_state=16, backend="torch").cuda()
    m_cuda.load_state_dict(m.state_dict())
    x_cuda = x.detach().cuda().requires_grad_()
    y_cuda = m_cuda(x_cuda)
    grads_cuda = torch.autograd.grad(y_cuda, [x_cuda, *m_cuda.parameters()], g.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", *(n for n, _ in m.named_parameters())], grads_cuda, grads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert m_cuda(x_cuda).dtype == torch.bfloat16
