"""The compiled CPU kernels (ops/cpu_kernels.cpp) against the float64 one-step reference and the PyTorch paths."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import m2rec_lightning.ops.cpu_kernels as cpu_scan
import m2rec_lightning.ops.mamba as mamba_module
from m2rec_lightning.ops.cpu_kernels import causal_conv1d_silu_cpu, selective_scan_cpu, selective_scan_state_cpu
from m2rec_lightning.ops.mamba import Mamba
from m2rec_lightning.ops.selective_scan import selective_scan_last, selective_scan_ref
from tests.test_selective_scan import NAMES, make_inputs, rel_err, states_per_step

pytestmark = pytest.mark.skipif(cpu_scan.cpu_kernels_unavailable() is not None,
                                reason=f"the CPU scan does not build here: {cpu_scan.cpu_kernels_unavailable()}")


def scan_and_grads(fn, inputs, use, softplus):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    args = {k: (leaves[k] if k in use or k in ("u", "delta", "A", "B", "C") else None) for k in NAMES}
    y = fn(**args, delta_softplus=softplus)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    used = [k for k in NAMES if args[k] is not None]
    return y, dict(zip(used, torch.autograd.grad(y, [leaves[k] for k in used], g)))


# L = 16, 17, 37 cross the kernel's 16-step chunks (backward recomputes each chunk's states from its first)
@pytest.mark.parametrize("L", [1, 2, 7, 16, 17, 37])
@pytest.mark.parametrize("use", [("D", "z", "delta_bias"), ("D",), ("z",), ("delta_bias",), ()])
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_reference_float64(L, use, softplus):
    inputs = make_inputs(3, 5, 4, L, seed=L)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()
    y, g = scan_and_grads(selective_scan_cpu, inputs, use, softplus)
    y_ref, g_ref = scan_and_grads(selective_scan_ref, inputs, use, softplus)
    assert y.dtype == torch.float64 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= 1e-12
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) <= 1e-12, k


@pytest.mark.parametrize("threads,dim", [(1, 16), (2, 16), (1, 37)])
def test_float32_close_to_float64_reference(threads, dim):
    # the float32 path uses the kernel's own exp2 (a degree-5 polynomial); Mamba's ranges at L = 200. With AVX-512 the
    # state update runs on blocks of 16 channels: dim 37 has two full blocks and a masked partial one
    inputs = make_inputs(5, dim, 16, 200, seed=3, realistic=True)
    inputs["delta"] *= 6.0  # raw delta up to a few units: decays from ~1 to ~0
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, g = scan_and_grads(selective_scan_cpu, {k: v.float() for k, v in inputs.items()}, NAMES, True)
    finally:
        torch.set_num_threads(old)
    y_ref, g_ref = scan_and_grads(selective_scan_ref, inputs, NAMES, True)
    assert y.dtype == torch.float32
    assert rel_err(y.double(), y_ref) <= 2e-6
    for k in g_ref:
        assert rel_err(g[k].double(), g_ref[k]) <= 2e-6, k


def test_exp2_over_its_range():
    # the decay exp(dt A) of one cell: u = 1, B = 1, C = 1, one step from h = 0 then one decay step with no input
    x = torch.linspace(-80, 5, 4001, dtype=torch.float64)  # dt A, with A = -1 and dt = -x
    b = len(x)
    u = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(b, 1, 2)
    dt = torch.stack([torch.ones(b, dtype=torch.float64), -x], 1)[:, None, :]
    ones = torch.ones(b, 1, 2, dtype=torch.float64)
    A = -torch.ones(1, 1, dtype=torch.float64)
    y = selective_scan_cpu(u.float(), dt.float(), A.float(), ones.float(), ones.float())[:, 0, 1].double()
    expected = torch.exp(x.float().double())  # h_1 = exp(dt_1 A) h_0, h_0 = 1
    # the polynomial's own error is below 1.8e-7; dt A log2(e) rounded to float32 adds about |x| · 6e-8
    assert (((y - expected).abs() / expected) / (1.8e-7 + 8e-8 * x.abs())).max() <= 1


def test_inputs_not_modified_and_no_grad_paths():
    x = {k: v.requires_grad_() for k, v in make_inputs(2, 3, 4, 9).items()}
    before = {k: v.detach().clone() for k, v in x.items()}
    y = selective_scan_cpu(**x, delta_softplus=True)
    g = torch.randn_like(y)
    g_before = g.clone()
    y.backward(g)
    assert all(torch.equal(x[k].detach(), before[k]) for k in x) and torch.equal(g, g_before)
    with torch.no_grad():
        y0 = selective_scan_cpu(**before, delta_softplus=True)
    torch.testing.assert_close(y0, selective_scan_ref(**before, delta_softplus=True), rtol=1e-12, atol=1e-12)
    u = before["u"].clone().requires_grad_()  # only u needs a gradient
    (gu,) = torch.autograd.grad(selective_scan_cpu(**{**before, "u": u}, delta_softplus=True).sum(), u)
    u2 = before["u"].clone().requires_grad_()
    (gu_ref,) = torch.autograd.grad(selective_scan_ref(**{**before, "u": u2}, delta_softplus=True).sum(), u2)
    torch.testing.assert_close(gu, gu_ref, rtol=1e-10, atol=1e-12)


def test_bfloat16_inputs_scan_in_float32_and_bad_inputs_are_refused():
    x = make_inputs(2, 8, 4, 20, dtype=torch.float32, seed=4)
    xb = {k: v.bfloat16() for k, v in x.items()}
    y = selective_scan_cpu(**xb, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    y32 = selective_scan_ref(**{k: v.float() for k, v in xb.items()}, delta_softplus=True)
    assert torch.allclose(y.float(), y32, rtol=2 ** -7, atol=1e-6)
    with pytest.raises(ValueError, match=r"C must be \(batch=2, dstate=4, seqlen=20\)"):
        selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"][..., :4])


@pytest.mark.parametrize("L", [1, 7, 40])
@pytest.mark.parametrize("softplus", [True, False])
def test_state_at_index_matches_per_step_states(L, softplus):
    x = make_inputs(6, 5, 4, L, seed=L)
    index = torch.randint(0, L, (6,), generator=torch.Generator().manual_seed(7))
    index[0], index[-1] = 0, L - 1
    args = (x["u"], x["delta"], x["A"], x["B"])
    h = selective_scan_state_cpu(*args, index, delta_bias=x["delta_bias"], delta_softplus=softplus)
    expected = states_per_step(*args, x["delta_bias"], softplus)[torch.arange(6), index]
    assert h.dtype == torch.float64 and h.shape == (6, 5, 4) and rel_err(h, expected) <= 1e-12
    if softplus:  # (a raw delta can be negative: the states grow without bound, beyond float32's precision)
        h32 = selective_scan_state_cpu(*(t.float() for t in args), index, delta_bias=x["delta_bias"].float(),
                                       delta_softplus=True)
        assert h32.dtype == torch.float32 and rel_err(h32.double(), expected) <= 1e-5
    with pytest.raises(ValueError, match=r"index must lie in \[0, %d\)" % L):
        selective_scan_state_cpu(*args, torch.full((6,), L))


@pytest.mark.parametrize("use", [("D", "z"), ("D",), ("z",), ()])
def test_output_at_index_reference(use):
    # selective_scan_last, the scan's output at each row's index from the state there (forward_last on the torch
    # and triton backends), against the one-step reference
    x = make_inputs(5, 21, 4, 30, seed=13)
    index = torch.tensor([29, 0, 9, 17, 29])
    rows = torch.arange(5)
    D, z = (x["D"] if "D" in use else None), (x["z"][rows, :, index] if "z" in use else None)
    expected = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D, x["z"] if "z" in use else None,
                                  x["delta_bias"], delta_softplus=True)[rows, :, index]
    got = selective_scan_last(x["u"], x["delta"], x["A"], x["B"], x["C"][rows, :, index], index, D, z,
                              x["delta_bias"], True)
    assert got.shape == (5, 21) and rel_err(got, expected) <= 1e-12
    with pytest.raises(ValueError, match=r"C must be \(batch=5, dstate\)"):
        selective_scan_last(x["u"], x["delta"], x["A"], x["B"], x["C"], index)


def _mamba_pair(d_model, d_conv, bias, seed):
    torch.manual_seed(seed)
    fast = Mamba(d_model, d_state=6, d_conv=d_conv, bias=bias, backend="cpu").double()
    for name, p in fast.named_parameters():  # away from the initialisation, biases included
        if name != "A_log":
            torch.nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.5)
    ref = Mamba(d_model, d_state=6, d_conv=d_conv, bias=bias, backend="torch").double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


# lengths crossing the kernel's 16-step chunks, a width that is not a multiple of 16 lanes (E·D = 2 · 11),
# convolutions wider than the shortest history
@pytest.mark.parametrize("d_model,d_conv,bias", [(11, 4, False), (11, 1, True), (16, 2, True), (16, 4, False)])
def test_fused_forward_last_matches_the_torch_path(d_model, d_conv, bias):
    fast, ref = _mamba_pair(d_model, d_conv, bias, seed=d_model + d_conv)
    x = torch.randn(6, 41, d_model, dtype=torch.float64)
    index = torch.tensor([40, 0, 15, 16, 17, 2])
    with torch.no_grad():
        expected = ref(x)[torch.arange(6), index]
        assert rel_err(fast.forward_last(x, index), expected) <= 1e-12
        assert rel_err(ref.forward_last(x, index), expected) <= 1e-12
        fast32, ref32 = fast.float(), ref.float()
        got32 = fast32.forward_last(x.float(), index)
        assert got32.dtype == torch.float32 and rel_err(got32.double(), expected) <= 1e-5
        assert rel_err(got32.double(), ref32.forward_last(x.float(), index).double()) <= 1e-5
        # inputs at any row stride (a pooled or sliced sequence), read in place
        wide = torch.randn(6, 41, 2 * d_model)
        wide[..., :d_model] = x.float()
        assert rel_err(fast32.forward_last(wide[..., :d_model], index).double(), expected) <= 1e-5


def test_fused_forward_last_refuses_bad_input_and_leaves_nan_to_the_torch_path():
    fast, ref = _mamba_pair(8, 4, False, seed=3)
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        w, _ = fast._cpu_last_weights()
        with pytest.raises(ValueError, match=r"index must lie in \[0, 9\)"):
            cpu_scan.mamba_last_cpu(x, torch.tensor([0, 9, 1]), *w, None)
        with pytest.raises(ValueError, match="inconsistent shapes"):
            cpu_scan.mamba_last_cpu(x[..., :7], torch.tensor([0, 8, 1]), *w, None)
        fast.A_log[2, 1] = float("nan")  # a diverged model: its NaN reaches the output, as on the torch path
        assert fast.forward_last(x, torch.tensor([8, 0, 4])).isnan().all()
        with pytest.raises(FloatingPointError, match="A holds a NaN"):
            cpu_scan.mamba_last_cpu(x, torch.tensor([8, 0, 4]), *fast._cpu_last_weights()[0], None)


def test_inputs_read_in_place_from_wider_rows():
    # the Mamba block passes column slices (x, z of in_proj's output; B, C of x_proj's): the kernel reads them at their
    # row stride; other layouts (here a time-major tensor) are copied
    b, d, n, L = 3, 5, 4, 19
    x = make_inputs(b, d, n, L, seed=5)
    wide = torch.randn(b, L, 2 * d + 2 * n + 3, dtype=torch.float64)
    u, z = wide[..., :d].transpose(1, 2), wide[..., d:2 * d].transpose(1, 2)  # (b, d, L) views, row stride 2d+2n+3
    B, C = wide[..., 2 * d:2 * d + n].transpose(1, 2), wide[..., 2 * d + n:2 * d + 2 * n].transpose(1, 2)
    delta = torch.randn(L, b, d, dtype=torch.float64).permute(1, 2, 0)  # time-major memory
    args = dict(u=u, delta=delta, A=x["A"], B=B, C=C, D=x["D"], z=z, delta_bias=x["delta_bias"], delta_softplus=True)
    y = selective_scan_cpu(**args)
    assert rel_err(y, selective_scan_ref(**args)) <= 1e-12
    index = torch.tensor([0, 18, 7])
    h = selective_scan_state_cpu(u, delta, x["A"], B, index, delta_bias=x["delta_bias"], delta_softplus=True)
    assert rel_err(h, states_per_step(u, delta, x["A"], B, x["delta_bias"], True)[torch.arange(3), index]) <= 1e-12


def conv_silu_reference(x, weight, bias):
    """conv1d with padding K-1, cropped to seqlen, then SiLU, as Mamba's block computes it; x (b, L, d)."""
    K, L = weight.shape[1], x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=K - 1, groups=x.shape[2])[..., :L]
    return F.silu(y).transpose(1, 2)


@pytest.mark.parametrize("L,K", [(1, 4), (3, 4), (4, 4), (25, 4), (9, 1), (9, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_silu_matches_conv1d(L, K, with_bias):
    g = torch.Generator().manual_seed(L * 10 + K)
    wide = torch.randn(3, L, 13, generator=g, dtype=torch.float64)
    x = wide[..., 2:9].requires_grad_()  # a column slice, row stride 13
    assert x.stride() == (L * 13, 13, 1)
    weight = torch.randn(7, K, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, weight, bias) if t is not None]
    y = causal_conv1d_silu_cpu(x, weight, bias)
    y_ref = conv_silu_reference(x, weight, bias)
    assert rel_err(y, y_ref) <= 1e-12
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        assert rel_err(a, b) <= 1e-12
    y32 = causal_conv1d_silu_cpu(x.float(), weight.float(), None if bias is None else bias.float())
    assert y32.dtype == torch.float32 and rel_err(y32.double(), y_ref) <= 1e-6
    with pytest.raises(ValueError, match=r"weight \(dim, K\)"):
        causal_conv1d_silu_cpu(x, weight[:3])


def test_mamba_block_cpu_backend_equals_torch_backend():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, backend="cpu").double()
    m_torch = Mamba(16, d_state=8, backend="torch").double()
    m_torch.load_state_dict(m.state_dict())
    x = torch.randn(4, 21, 16, dtype=torch.float64, requires_grad=True)
    y, y_t = m(x), m_torch(x)
    torch.testing.assert_close(y, y_t, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(y, params, g)
    grads_t = torch.autograd.grad(y_t, [x, *m_torch.parameters()], g)
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    index = torch.tensor([20, 0, 9, 13])
    with torch.no_grad():
        torch.testing.assert_close(m.forward_last(x, index), y[torch.arange(4), index], rtol=1e-10, atol=1e-12)


def test_auto_uses_it_and_falls_back_without_a_compiler(monkeypatch, tmp_path, caplog):
    x = torch.randn(1, 5, 16)
    mamba_module._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="m2rec"):
        Mamba(16, backend="auto")(x)
    assert [r.getMessage() for r in caplog.records if r.name == "m2rec"] == ["Mamba backend: cpu (auto; the compiled "
                                                                             "CPU scan)"]
    # a machine without g++: an empty cache and a compiler that does not exist
    monkeypatch.setenv("M2REC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    cpu_scan._library.cache_clear()
    mamba_module._log_once.cache_clear()
    caplog.clear()
    try:
        assert "no-such-g++" in cpu_scan.cpu_kernels_unavailable()
        with caplog.at_level(logging.INFO, logger="m2rec"):
            y = Mamba(16, backend="auto")(x)
        (msg,) = [r.getMessage() for r in caplog.records if r.name == "m2rec"]
        assert msg.startswith("Mamba backend: torch") and "no-such-g++" in msg and torch.isfinite(y).all()
        with pytest.raises(RuntimeError, match="Mamba\\(backend='cpu'\\): building cpu_kernels.cpp"):
            Mamba(16, backend="cpu")(x)
    finally:
        monkeypatch.undo()
        cpu_scan._library.cache_clear()
        mamba_module._log_once.cache_clear()
    assert cpu_scan.cpu_kernels_unavailable() is None


@pytest.mark.parametrize("where", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
def test_nan_in_any_input_reaches_the_output(where):
    # the kernels are compiled with -ffast-math; a NaN must still propagate (the module's finiteness checks rely on it)
    x = {k: v.float() for k, v in make_inputs(2, 3, 4, 6, seed=9).items()}
    x[where] = x[where].clone()
    x[where].view(-1)[0] = float("nan")
    y = selective_scan_cpu(**x, delta_softplus=True)
    y_ref = selective_scan_ref(**x, delta_softplus=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()
    if where in ("u", "delta", "B"):
        h = selective_scan_state_cpu(x["u"], x["delta"], x["A"], x["B"], torch.tensor([5, 5]),
                                     delta_bias=x["delta_bias"], delta_softplus=True)
        assert h.isnan().any()
    conv_in = torch.randn(2, 6, 3)
    conv_in[0, 2, 1] = float("nan")
    assert causal_conv1d_silu_cpu(conv_in, torch.randn(3, 4)).isnan().sum() > 0


def test_loading_the_library_leaves_the_float_environment_alone():
    # a library linked with -ffast-math sets flush-to-zero for the whole process when it loads: denormals would
    # become 0 in every later torch operation
    cpu_scan._library.cache_clear()
    assert cpu_scan.cpu_kernels_unavailable() is None
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0 and (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() > 0


def test_a_failing_build_reports_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("M2REC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_scan, "SOURCE", bad)
    cpu_scan._library.cache_clear()
    try:
        why = cpu_scan.cpu_kernels_unavailable()
        assert why.startswith("building broken.cpp with") and "error" in why
        assert list((tmp_path / "cache").iterdir()) == []  # no half-built library is left for the next process
    finally:
        monkeypatch.undo()
        cpu_scan._library.cache_clear()


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_dropout_keeps_each_element_with_probability_1_minus_p(p):
    from m2rec_lightning.ops.cpu_kernels import dropout_cpu

    x = torch.randn(1000, 1001)  # an odd size: the last pair has one element
    y = dropout_cpu(x, p)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # neighbours come from one hash (low and high halves): their keeps must be independent; a 2x2 table's chi-square
    a, b = kept.flatten()[:-1:2].float(), kept.flatten()[1::2].float()
    both = (a * b).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel())
    # and rows of a 2-D tensor are not copies of each other
    assert not torch.equal(kept[0], kept[1])


def test_dropout_gradient_reproducibility_and_checks():
    from m2rec_lightning.ops.cpu_kernels import dropout_cpu

    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = dropout_cpu(x, 0.3)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * (y != 0) / 0.7)
    torch.manual_seed(3)
    assert torch.equal(dropout_cpu(x, 0.3), y)  # seeded from torch's generator
    assert not torch.equal(dropout_cpu(x, 0.3), y)  # and the generator moved on
    assert dropout_cpu(torch.ones(1), 0.5).shape == (1,)
    with pytest.raises(ValueError, match="float32 or float64"):
        dropout_cpu(torch.ones(3, dtype=torch.bfloat16), 0.5)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
        dropout_cpu(torch.ones(3), 1.0)


def test_dropout_module_uses_the_kernel_in_training_only():
    from m2rec_lightning.models.encoder import Dropout

    d = Dropout(0.4)
    x = torch.randn(64, 50)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    from m2rec_lightning.ops.cpu_kernels import dropout_cpu
    assert torch.equal(y, dropout_cpu(x, 0.4))
    d.eval()
    assert torch.equal(d(x), x)
    d.train()
    xb = x.bfloat16()  # another dtype: the uniform mask, same law
    assert ((d(xb) != 0).float().mean() - 0.6).abs() < 0.05


@pytest.mark.parametrize("L", [1, 7, 50, 70])
def test_direct_long_conv_matches_the_fft_convolution(L):
    # the Fourier filter's convolution computed directly (CPU, L <= DIRECT_MAX_LEN) against its FFT form, with gradients
    from m2rec_lightning.models.fourier import DIRECT_MAX_LEN, CausalFourierFilter, _CausalConv

    # d = 21: with AVX-512, a full 16-channel block and a masked one; L = 70 is not a multiple of the 4-row blocks
    g = torch.Generator().manual_seed(L)
    x = torch.randn(3, L, 21, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(L, 21, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, L, 21, generator=g, dtype=torch.float64)
    y, y_ref = cpu_scan.causal_long_conv_cpu(x, k), _CausalConv.apply(x, k)
    assert rel_err(y, y_ref) <= 1e-12
    grads_ref = torch.autograd.grad(y_ref, [x, k], gy)
    for a, b in zip(torch.autograd.grad(y, [x, k], gy), grads_ref):
        assert rel_err(a, b) <= 1e-12
    x32, k32 = x.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    y32 = cpu_scan.causal_long_conv_cpu(x32, k32)
    assert y32.dtype == torch.float32 and rel_err(y32.double(), y_ref) <= 1e-5
    for a, b in zip(torch.autograd.grad(y32, [x32, k32], gy.float()), grads_ref):
        assert rel_err(a.double(), b) <= 1e-5
    filt = CausalFourierFilter(21, max_len=300).double()  # the direct path up to DIRECT_MAX_LEN, FFTs beyond
    long = torch.randn(2, 280, 21, dtype=torch.float64)
    assert DIRECT_MAX_LEN < 280
    for h in (x, long):
        torch.testing.assert_close(filt(h), _CausalConv.apply(h, filt.kernel(h.size(1), torch.float64)), rtol=1e-10,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="one float dtype"):
        cpu_scan.causal_long_conv_cpu(x, k.float())


@pytest.mark.parametrize("n", [2, 3])
def test_compiled_stream_gate_matches_the_ops(n):
    # StreamGate's softmax fusion in one compiled pass (what it runs on CPU) against the same fusion as torch ops
    from m2rec_lightning.models.gate import StreamGate

    gate = StreamGate(7, n).double()
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g))
        gate.proj.bias.copy_(torch.randn(n, generator=g))
    streams = [torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    gout = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)

    def ops(s, weight, bias):  # the fusion as the ops StreamGate runs elsewhere
        alpha = torch.nn.functional.linear(torch.cat(s, -1), weight, bias).softmax(-1)
        return sum(alpha[..., i:i + 1] * s[i] for i in range(n))

    leaves = [*streams, gate.proj.weight, gate.proj.bias]
    y, y_ref = gate(streams), ops(streams, gate.proj.weight, gate.proj.bias)
    assert rel_err(y, y_ref) <= 1e-12
    for a, b in zip(torch.autograd.grad(y, leaves, gout), torch.autograd.grad(y_ref, leaves, gout)):
        assert rel_err(a, b) <= 1e-12
    y32 = cpu_scan.stream_gate_cpu([t.float() for t in streams], gate.proj.weight.float(), gate.proj.bias.float())
    assert y32.dtype == torch.float32 and rel_err(y32.double(), y_ref) <= 1e-5
    with pytest.raises(ValueError, match="weight \\(n, n·d\\)"):
        cpu_scan.stream_gate_cpu(streams, gate.proj.weight[:, 1:], gate.proj.bias)
