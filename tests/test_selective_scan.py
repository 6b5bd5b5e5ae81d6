import math

import pytest
import torch
import torch.nn.functional as F

from m2rec_lightning.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_state

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, n, L, dtype=torch.float64, seed=0, realistic=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if realistic:
        # what a Mamba block at initialisation feeds the scan: A = -(1..n), softplus(bias) in [1e-3, 0.1]
        A = -torch.arange(1, n + 1, dtype=dtype).repeat(d, 1)
        dt0 = torch.exp(torch.rand(d, generator=g, dtype=dtype) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        delta_bias = dt0 + torch.log(-torch.expm1(-dt0))
        delta = 0.5 * r(b, d, L)
    else:
        A = -torch.rand(d, n, generator=g, dtype=dtype) * 4
        delta_bias = r(d)
        delta = 0.5 * r(b, d, L)
    return dict(u=r(b, d, L), delta=delta, A=A, B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L),
                delta_bias=delta_bias)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_both(inputs, use, softplus, **fast_kw):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    args = {k: (leaves[k] if k in use or k in ("u", "delta", "A", "B", "C") else None) for k in NAMES}
    ys = []
    grads = []
    g = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(inputs["u"].dtype)
    for fn, kw in ((selective_scan, fast_kw), (selective_scan_ref, {})):
        y = fn(**args, delta_softplus=softplus, **kw)
        used = [k for k in NAMES if args[k] is not None]
        grads.append(dict(zip(used, torch.autograd.grad(y, [leaves[k] for k in used], g))))
        ys.append(y)
    return ys, grads


@pytest.mark.parametrize("L", [1, 2, 7, 37])
@pytest.mark.parametrize("use", [("D", "z", "delta_bias"), ("D",), ("z",), ("delta_bias",), ()])
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_reference_float64(L, use, softplus):
    inputs = make_inputs(3, 5, 4, L)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a raw delta is a step size, keep it positive
    # chunk 4 / slab 2 with 3 batch rows: lengths not divisible by the chunk, a ragged last slab
    (y, y_ref), (g, g_ref) = run_both(inputs, use, softplus, chunk=4, slab=2)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) <= 1e-5
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) <= 1e-5, k


@pytest.mark.parametrize("chunk,slab", [(1, 1), (3, 5), (16, 8), (64, 64)])
def test_chunk_and_slab_sizes_do_not_change_result(chunk, slab):
    inputs = make_inputs(6, 3, 5, 33, seed=2)
    (y, y_ref), (g, g_ref) = run_both(inputs, ("D", "z", "delta_bias"), True, chunk=chunk, slab=slab)
    assert rel_err(y, y_ref) <= 1e-5
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) <= 1e-5, k


@pytest.mark.parametrize("delta_scale", [0.5, 3.0])
def test_float32_close_to_float64_reference(delta_scale):
    # Mamba's ranges: A = -(1..16), softplus(bias) in [1e-3, 0.1], raw delta up to a few units; L = 200.
    # Measured max errors are 1e-7 to 4e-7 of the largest value; the bound leaves 10x room.
    inputs = make_inputs(4, 16, 16, 200, seed=3, realistic=True)
    inputs["delta"] *= delta_scale / 0.5
    (y, _), (g, _) = run_both({k: v.float() for k, v in inputs.items()}, ("D", "z", "delta_bias"), True)
    (_, y_ref), (_, g_ref) = run_both(inputs, ("D", "z", "delta_bias"), True)
    assert y.dtype == torch.float32
    assert rel_err(y.double(), y_ref) <= 5e-6
    for k in g_ref:
        assert rel_err(g[k].double(), g_ref[k]) <= 5e-6, k


def test_reference_matches_hand_computed_recurrence():
    # one channel, one state: h_t = exp(dt_t a) h_{t-1} + dt_t b_t u_t, y_t = (c_t h_t + D u_t) silu(z_t)
    u, dt, b, c, z = [0.5, -1.0, 2.0], [0.1, 0.7, 0.3], [1.0, 2.0, -1.0], [0.3, -0.5, 2.0], [0.2, -1.0, 3.0]
    a, D = -1.5, 0.25
    h, expected = 0.0, []
    for t in range(3):
        h = math.exp(dt[t] * a) * h + dt[t] * b[t] * u[t]
        expected.append((c[t] * h + D * u[t]) * z[t] / (1 + math.exp(-z[t])))
    T = lambda x: torch.tensor(x, dtype=torch.float64).view(1, 1, -1)  # noqa: E731
    args = (T(u), T(dt), torch.tensor([[a]], dtype=torch.float64), T(b), T(c), torch.tensor([D], dtype=torch.float64))
    for fn in (selective_scan_ref, selective_scan):
        y = fn(*args, z=T(z))
        assert torch.allclose(y.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0), fn


@pytest.mark.parametrize("L", [1, 9])
def test_inputs_and_upstream_gradient_are_not_modified(L):
    # with L = 1 or a single-row slab the internal time-major views can alias the caller's tensors
    x = {k: v.requires_grad_() for k, v in make_inputs(1, 3, 4, L).items()}
    before = {k: v.detach().clone() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, slab=1)
    g = torch.randn_like(y)
    g_before = g.clone()
    y.backward(g)
    for k in x:
        assert torch.equal(x[k].detach(), before[k]), k
    assert torch.equal(g, g_before)


def test_no_grad_and_partial_requires_grad():
    x = make_inputs(2, 3, 4, 10)
    y_ref = selective_scan_ref(**x, delta_softplus=True)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan(**x, delta_softplus=True), y_ref, rtol=1e-12, atol=1e-12)
    u = x["u"].clone().requires_grad_()  # only u needs a gradient; z's gradient path is skipped
    (gu,) = torch.autograd.grad(selective_scan(**{**x, "u": u}, delta_softplus=True).sum(), u)
    u2 = x["u"].clone().requires_grad_()
    (gu_ref,) = torch.autograd.grad(selective_scan_ref(**{**x, "u": u2}, delta_softplus=True).sum(), u2)
    torch.testing.assert_close(gu, gu_ref, rtol=1e-10, atol=1e-12)


def test_delta_bias_and_softplus_are_applied_before_the_scan():
    x = make_inputs(2, 3, 4, 5)
    explicit = selective_scan(x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"], x["B"], x["C"])
    fused = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_bias=x["delta_bias"],
                           delta_softplus=True)
    assert torch.allclose(explicit, fused, rtol=1e-12, atol=1e-12)


def test_grouped_B_C_with_one_group_is_accepted():
    x = make_inputs(2, 3, 4, 6)
    y3 = selective_scan(x["u"], x["delta"].abs(), x["A"], x["B"], x["C"])
    y4 = selective_scan(x["u"], x["delta"].abs(), x["A"], x["B"][:, None], x["C"][:, None])
    assert torch.equal(y3, y4)


def test_bfloat16_inputs_scan_in_float32():
    x = make_inputs(2, 8, 4, 20, dtype=torch.float32, seed=4)
    xb = {k: v.bfloat16() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**xb, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    y32 = selective_scan_ref(**{k: v.float() for k, v in xb.items()}, delta_softplus=True)
    # only the final rounding to bfloat16 separates them
    assert torch.allclose(y.float(), y32, rtol=2 ** -7, atol=1e-6)


def test_rejects_unsupported_and_malformed_inputs():
    x = make_inputs(2, 3, 4, 5)
    with pytest.raises(NotImplementedError, match="complex A"):
        selective_scan(x["u"], x["delta"], torch.complex(x["A"], x["A"]), x["B"], x["C"])
    with pytest.raises(NotImplementedError, match="input-dependent"):
        selective_scan(x["u"], x["delta"], x["A"], torch.randn(3, 4, dtype=torch.float64), x["C"])
    with pytest.raises(ValueError, match=r"C must be \(batch=2, dstate=4, seqlen=5\)"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"][..., :4])
    with pytest.raises(ValueError, match=r"B must be \(batch=2, dstate=4, seqlen=5\), got \(2, 4, 4\)"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][:, None, :, :4], x["C"])  # the one-group form is checked too
    with pytest.raises(ValueError, match="delta_bias"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x["u"], x["delta"], x["A"][:2], x["B"], x["C"])


def states_per_step(u, delta, A, B, delta_bias, softplus):
    """Every state h_t, (b, L, d, n), by the recurrence one step at a time in float64."""
    dt = delta.double() + delta_bias.double()[:, None]
    dt = F.softplus(dt) if softplus else dt
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    states = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A.double()) * h + (dt[:, :, t] * u[:, :, t].double())[:, :, None] \
            * B[:, None, :, t].double()
        states.append(h)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("L,chunk,slab", [(1, 16, None), (7, 3, 2), (37, 16, None), (37, 5, 3), (40, 8, 1)])
@pytest.mark.parametrize("softplus", [True, False])
def test_state_at_index_matches_per_step_states(L, chunk, slab, softplus):
    x = make_inputs(6, 5, 4, L, seed=L)
    g = torch.Generator().manual_seed(7)
    index = torch.randint(0, L, (6,), generator=g)
    index[0], index[-1] = 0, L - 1
    args = (x["u"], x["delta"], x["A"], x["B"])
    before = [t.clone() for t in args]
    h = selective_scan_state(*args, index, delta_bias=x["delta_bias"], delta_softplus=softplus, chunk=chunk,
                             slab=slab)
    assert all(torch.equal(a, b) for a, b in zip(args, before)), "the inputs were modified"
    expected = states_per_step(*args, x["delta_bias"], softplus)[torch.arange(6), index]
    assert h.dtype == torch.float64 and rel_err(h, expected) <= 1e-12
    # C . h + D u at the index is the fast scan's output there
    rows = torch.arange(6)
    y = selective_scan(*args, x["C"], x["D"], delta_bias=x["delta_bias"], delta_softplus=softplus)[rows, :, index]
    y_state = (h * x["C"][rows, :, index][:, None, :]).sum(-1) + x["D"] * x["u"][rows, :, index]
    assert rel_err(y_state, y) <= 1e-12


def test_state_in_float32_and_its_argument_checks():
    x = make_inputs(4, 8, 16, 50, dtype=torch.float32, realistic=True)
    index = torch.tensor([49, 0, 20, 33])
    args = (x["u"], x["delta"], x["A"], x["B"])
    h = selective_scan_state(*args, index, delta_bias=x["delta_bias"], delta_softplus=True)
    expected = states_per_step(*args, x["delta_bias"], True)[torch.arange(4), index]
    assert h.dtype == torch.float32 and rel_err(h.double(), expected) <= 1e-5
    with pytest.raises(ValueError, match=r"index must lie in \[0, 50\), got \[0, 50\]"):
        selective_scan_state(*args, torch.tensor([50, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"index must be \(batch=4,\) integers"):
        selective_scan_state(*args, torch.zeros(4))
