"""Selective scan (the S6 recurrence of Mamba-1) in pure PyTorch.

Same signature and semantics as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` for the case
Mamba-1 uses: real diagonal ``A`` and input-dependent ("variable") ``B`` and ``C``.

    delta = softplus(delta + delta_bias)              (each part optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (batch, dim, dstate), h_{-1} = 0
    y_t   = C_t . h_t + D * u_t
    y     = y * silu(z)

``selective_scan_ref`` is the one-step-at-a-time reference; ``selective_scan`` is the fast path;
``selective_scan_state`` gives only the state h at one step per batch row (inference at the last real position), and
``selective_scan_last`` the output y there.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, Tensor]:
    """Raise on arguments the scan does not support; return B and C as (batch, dstate, seqlen), with mamba_ssm's
    one-group form (batch, 1, dstate, seqlen) squeezed before its shape is checked."""
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported (Mamba-1 uses a real A)")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, dim, seqlen), got "
                         f"{tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, seqlen = u.shape
    if seqlen == 0:
        raise ValueError("selective_scan: seqlen must be at least 1, got an empty sequence")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, dstate), got {tuple(A.shape)}")
    dstate = A.shape[1]
    checked = []
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 3:
            raise NotImplementedError(
                f"selective_scan: {name} must be input-dependent, (batch, dstate, seqlen); got shape "
                f"{tuple(t.shape)} (time-invariant or grouped {name} is not supported)")
        if t.shape != (batch, dstate, seqlen):
            raise ValueError(f"selective_scan: {name} must be (batch={batch}, dstate={dstate}, "
                             f"seqlen={seqlen}), got {tuple(t.shape)}")
        checked.append(t)
    if D is not None and D.shape != (dim,):
        raise ValueError(f"selective_scan: D must be (dim={dim},), got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (dim,):
        raise ValueError(f"selective_scan: delta_bias must be (dim={dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    return checked[0], checked[1]


def _check_state_inputs(name: str, u, delta, A, B, index, delta_bias, index_range: bool = True) -> Tensor:
    """The checks of the state-only scans: the scan's own, and index (batch,) integers in [0, seqlen) (the range
    unless index_range is False: the compiled kernel checks it itself, see _index_range_error); returns B as
    (batch, dstate, seqlen)."""
    B, _ = _check_inputs(u, delta, A, B, B, None, None, delta_bias)
    batch, _, seqlen = u.shape
    if index.shape != (batch,) or index.dtype.is_floating_point:
        raise ValueError(f"{name}: index must be (batch={batch},) integers, got {tuple(index.shape)} {index.dtype}")
    if index_range and batch and (index.min() < 0 or index.max() >= seqlen):
        raise _index_range_error(name, index, seqlen)
    return B


def _index_range_error(name: str, index: Tensor, seqlen: int) -> ValueError:
    return ValueError(f"{name}: index must lie in [0, {seqlen}), got [{int(index.min())}, {int(index.max())}]")


def _scan_dtype(u: Tensor) -> torch.dtype:
    # The recurrence runs in float32 (float64 if given float64), as mamba_ssm's kernel does.
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """Reference selective scan, one time step at a time, differentiable by autograd.

    Args:
        u: input, (batch, dim, seqlen).
        delta: step sizes before bias/softplus, (batch, dim, seqlen).
        A: state matrix diagonal, real, (dim, dstate).
        B: input-dependent input matrix, (batch, dstate, seqlen).
        C: input-dependent output matrix, (batch, dstate, seqlen).
        D: skip connection, (dim,).
        z: gate, (batch, dim, seqlen); the output is multiplied by silu(z).
        delta_bias: added to delta before the softplus, (dim,).
        delta_softplus: apply softplus to delta (after the bias).

    Returns:
        y, (batch, dim, seqlen), in u's dtype.
    """
    B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _scan_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(dtype)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, dim, dstate)
        ys = []
        for t in range(u.shape[2]):
            dA = torch.exp(delta[:, :, t, None] * A)  # (batch, dim, dstate)
            dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # (batch, dim, dstate)
            h = dA * h + dBu
            ys.append((h * C[:, None, :, t]).sum(-1))  # (batch, dim)
        y = torch.stack(ys, dim=2)  # (batch, dim, seqlen)
        if D is not None:
            y = y + D.to(dtype)[:, None] * u
        if z is not None:
            y = y * F.silu(z.to(dtype))
    return y.to(dtype_in)


_LOG2E = 1.4426950408889634
_SLAB_CELLS = 1 << 19  # chunk·slab·dim·dstate per work buffer (2 MiB in float32): stays in cache


class _SelectiveScanFn(torch.autograd.Function):
    """The whole selective scan with a hand-written backward, batch slab by batch slab, chunk by chunk.

    The inputs come time-major, (L, b, ·), so one step and one chunk of a slab are blocks of rows, and forward and
    backward read them in place; the output and the gradients are written batch-major, (b, L, ·), the layout of
    the Mamba block around the scan.
    Forward keeps only the state at each chunk start; backward recomputes the states inside a chunk from it
    (as mamba_ssm's kernel does), so memory is O(batch·dim·dstate·(L/chunk)) plus a few (batch, dim, L)
    tensors, instead of O(batch·dim·dstate·L). The per-cell work is a few flops, so memory traffic, page
    faults and per-op overhead set the speed: slab and chunk are sized for the cache, the buffers are
    allocated once per call, and the bias/softplus, D skip and z gate are applied per slab while it is hot.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, slab: int | None):
        # u, delta, z: (L, b, d); B, C: (L, b, n); A: (d, n); D, delta_bias: (d,); all contiguous
        L, b, d = u.shape
        n = A.shape[1]
        chunk = max(1, min(chunk, L))
        if slab is None:  # on a GPU there is no cache to fit, only kernel launches to save
            slab = b if u.is_cuda else _SLAB_CELLS // (chunk * d * n)
        slab = max(1, min(slab, b))
        A2 = A * _LOG2E  # exp(x A) = exp2(x A log2 e); exp2 is the cheaper kernel
        h0s = u.new_empty((L + chunk - 1) // chunk, b, d, n)  # state entering each chunk
        out = u.new_empty(b, L, d)
        # C.h + D u, the gate's input: needed for z's gradient
        pre_gate = u.new_empty(L, b, d) if z is not None and ctx.needs_input_grad[6] else None
        ws = _Workspace(u, chunk, slab, d, n, 2)
        for s0 in range(0, b, slab):
            s = slice(s0, min(s0 + slab, b))
            u_s, dt_s, B_s, C_s, z_s = _slab_inputs(s, u, delta, B, C, z, delta_bias, delta_softplus)
            y = _forward_slab(u_s, dt_s, A2, B_s, C_s, h0s[:, s], chunk, ws)  # (L, bs, d)
            if D is not None:
                y.addcmul_(u_s, D)
            if z is not None:
                if pre_gate is not None:
                    pre_gate[:, s] = y
                y.mul_(F.silu(z_s))
            out[s] = y.transpose(0, 1)
        ctx.delta_softplus, ctx.chunk, ctx.slab = delta_softplus, chunk, slab
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0s, pre_gate)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, h0s, pre_gate = ctx.saved_tensors
        chunk, slab = ctx.chunk, ctx.slab
        L, b, d = u.shape
        A2 = A * _LOG2E
        # batch-major gradients, handed back as (L, b, ·) views
        g_u, g_delta, gB, gC = (t.new_empty(b, L, t.shape[2]) for t in (u, delta, B, C))
        gz = z.new_empty(b, L, d) if pre_gate is not None else None
        gA = torch.zeros_like(A)
        gD = torch.zeros_like(D) if D is not None else None
        ws = _Workspace(u, chunk, slab, d, A.shape[1], 3)
        for s0 in range(0, b, slab):
            s = slice(s0, min(s0 + slab, b))
            u_s, dt_s, B_s, C_s, z_s = _slab_inputs(s, u, delta, B, C, z, delta_bias, ctx.delta_softplus)
            gy = gout[s].transpose(0, 1).contiguous()  # (L, bs, d); may alias gout, so no in-place writes
            if z is not None:
                sig = torch.sigmoid(z_s)
            if gz is not None:  # d silu(z)/dz = sig (1 + z (1 - sig))
                gz[s] = (gy * pre_gate[:, s] * sig * (1 + z_s * (1 - sig))).transpose(0, 1)
            if z is not None:
                gy = gy * z_s * sig
            if D is not None:
                gD += (gy * u_s).sum((0, 1))
            g_dtu, g_dt, gB_s, gC_s = _backward_slab(dt_s, A, A2, u_s, B_s, C_s, h0s[:, s], gy, gA, chunk, ws)
            g_u_s = g_dtu * dt_s
            if D is not None:
                g_u_s.addcmul_(gy, D)
            g_dt.addcmul_(g_dtu, u_s)  # now dL/d(delta after bias and softplus)
            if ctx.delta_softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                g_dt.mul_(torch.expm1(-dt_s).neg_())
            g_u[s], g_delta[s] = g_u_s.transpose(0, 1), g_dt.transpose(0, 1)
            gB[s], gC[s] = gB_s.transpose(0, 1), gC_s.transpose(0, 1)
        g_bias = g_delta.sum((0, 1)) if delta_bias is not None else None
        tm = lambda t: None if t is None else t.transpose(0, 1)  # noqa: E731
        return tm(g_u), tm(g_delta), gA, tm(gB), tm(gC), gD, tm(gz), g_bias, None, None, None


def _time_major(x: Tensor) -> Tensor:
    """(b, ·, L) -> contiguous (L, b, ·), one copy; may return x itself when that is already the layout."""
    return x.permute(2, 0, 1).contiguous()


def _slab_inputs(s, u, delta, B, C, z, delta_bias, delta_softplus):
    """Batch rows s of the time-major (L, b, ·) inputs, with the step size made final.

    All but the step size are views of the inputs, and so is the step size without bias and softplus: never write
    into them.
    """
    dt = delta[:, s]
    if delta_bias is not None:
        dt = dt + delta_bias
    if delta_softplus:
        dt = F.softplus(dt)
    return u[:, s], dt, B[:, s], C[:, s], z[:, s] if z is not None else None


class _Workspace:
    """Flat buffers of (chunk+1)·slab·d·n cells, viewed as (c, bs, d, n) for any c <= chunk+1, bs <= slab.

    Views and their per-step slices are made once per shape: at a few microseconds per indexing op, making
    them afresh for every step would cost as much as the step's arithmetic.
    """

    def __init__(self, like: Tensor, chunk: int, slab: int, d: int, n: int, count: int):
        self.flat = like.new_empty(count, (chunk + 1) * slab * d * n)
        self.d, self.n = d, n
        self.views = {}

    def __call__(self, i: int, c: int, bs: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        key = (i, c, bs)
        if key not in self.views:
            v = self.flat[i, :c * bs * self.d * self.n].view(c, bs, self.d, self.n)
            self.views[key] = v, v.unbind(0)
        return self.views[key]


def _chunk_states(dt, A2, dtu, B, h0, dA, dA_t, hs, hs_t):
    """Run the recurrence over one chunk of c steps, in place.

    dt, dtu: (c, bs, d); A2 = A·log2(e): (d, n); B: (c, bs, n); h0: (bs, d, n).
    Fills dA, (c, bs, d, n), with exp(dt A) and hs, (c, bs, d, n), with h_t (dA_t, hs_t: their steps).
    """
    torch.mul(dt[..., None], A2, out=dA).exp2_()
    torch.mul(dtu[..., None], B[:, :, None, :], out=hs)
    hs_t[0].addcmul_(dA_t[0], h0)
    for t in range(1, len(hs_t)):
        hs_t[t].addcmul_(dA_t[t], hs_t[t - 1])


def _contract_n(x: Tensor, v: Tensor | None, out: Tensor) -> Tensor:
    """out[..., d] = sum_n x[..., d, n] v[..., n] (v=None: 1), overwriting x. x: (c, bs, d, n), contiguous.

    A multiply then one matrix-vector product with ones: batched (d, n) @ (n, 1) products and sum(-1) are
    several times slower on CPU.
    """
    if v is not None:
        x.mul_(v)
    return torch.mv(x.view(-1, x.shape[-1]), x.new_ones(x.shape[-1]), out=out.view(-1))


def _forward_slab(u, dt, A2, B, C, h0s, chunk, ws):
    """y_t = C_t . h_t for one slab: u, dt (L, bs, d), B, C (L, bs, n); fills h0s (n_chunks, bs, d, n)."""
    L, bs, d = u.shape
    dtu = dt * u
    y = u.new_empty(L, bs, d)
    h0s[0].zero_()
    for k, t0 in enumerate(range(0, L, chunk)):
        t1 = min(t0 + chunk, L)
        (dA, dA_t), (hs, hs_t) = ws(0, t1 - t0, bs), ws(1, t1 - t0, bs)
        _chunk_states(dt[t0:t1], A2, dtu[t0:t1], B[t0:t1], h0s[k], dA, dA_t, hs, hs_t)
        if k + 1 < h0s.shape[0]:
            h0s[k + 1] = hs_t[-1]
        _contract_n(hs, C[t0:t1, :, None, :], y[t0:t1])
    return y


def _backward_slab(dt, A, A2, u, B, C, h0s, gy, gA, chunk, ws):
    """Gradients of sum(gy · y) for one slab (shapes as in _forward_slab).

    Returns dL/d(dt·u) and the decay part of dL/d(dt), (L, bs, d), and dL/dB, dL/dC, (L, bs, n); adds dL/dA
    into gA.
    """
    L, bs, d = u.shape
    dtu = dt * u
    g_dtu, g_dt, gB, gC = (t.new_empty(t.shape) for t in (u, dt, B, C))
    carry = u.new_zeros(bs, d, A.shape[1])  # exp(dt_{t1} A) dL/dh_{t1}: what the next chunk sends into h_{t1-1}
    for k in reversed(range(h0s.shape[0])):
        t0 = k * chunk
        t1 = min(t0 + chunk, L)
        c = t1 - t0
        (dA, dA_t), (G, G_t) = ws(0, c, bs), ws(2, c, bs)
        hs_all, hs_all_t = ws(1, c + 1, bs)  # hs_all[0] = h_{t0-1}, hs_all[1:] = h_{t0..t1-1}
        hs_all_t[0].copy_(h0s[k])
        _chunk_states(dt[t0:t1], A2, dtu[t0:t1], B[t0:t1], h0s[k], dA, dA_t, hs_all[1:], hs_all_t[1:])
        torch.matmul(gy[t0:t1, :, None, :], hs_all[1:], out=gC[t0:t1, :, None, :])
        # G_t = dL/dh_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1}
        torch.mul(gy[t0:t1, :, :, None], C[t0:t1, :, None, :], out=G)
        G_t[-1].add_(carry)
        for t in range(c - 2, -1, -1):
            G_t[t].addcmul_(dA_t[t + 1], G_t[t + 1])
        torch.mul(dA_t[0], G_t[0], out=carry)
        # through the input term dtu_t B_t
        torch.matmul(dtu[t0:t1, :, None, :], G, out=gB[t0:t1, :, None, :])
        # through the decay exp(dt_t A): q = dL/d(dt_t A) = G_t h_{t-1} exp(dt_t A), kept in dA's buffer
        q = dA.mul_(G).mul_(hs_all[:-1])
        _contract_n(G, B[t0:t1, :, None, :], g_dtu[t0:t1])
        _contract_n(torch.mul(q, A, out=G), None, g_dt[t0:t1])
        gA += q.mul_(dt[t0:t1, :, :, None]).sum((0, 1))
    return g_dtu, g_dt, gB, gC


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   chunk: int = 16, slab: int | None = None) -> Tensor:
    """Fast selective scan; same arguments, shapes and result as :func:`selective_scan_ref`.

    Args:
        chunk: time steps per chunk; the backward pass keeps one state per chunk and recomputes the rest.
        slab: batch rows processed together; None = as many as keep a chunk's work buffers near 2 MiB
            (on CUDA: the whole batch).
    """
    B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _scan_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        tm = lambda t: None if t is None else _time_major(t.to(dtype))  # noqa: E731
        vec = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
        y = _SelectiveScanFn.apply(tm(u), tm(delta), vec(A), tm(B), tm(C), vec(D), tm(z), vec(delta_bias),
                                   delta_softplus, chunk, slab)  # (b, L, d)
    return y.transpose(1, 2).to(dtype_in)


@torch.no_grad()
def selective_scan_state(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, index: Tensor,
                         delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         chunk: int = 4, slab: int | None = None) -> Tensor:
    """The scan state h_t at t = index[i] of each batch row i, without the outputs y: (batch, dim, dstate).

    Inference only (no autograd). It runs the recurrence as the fast path does, but only up to the largest index,
    and skips the C contraction, the skip term and the gate at every step: the caller applies them once, at index.
    A row's steps after its own index get step size 0, so exp(0·A) = 1 and no input: its state stays, bit for bit,
    the state at its index, and every row is read once, at the end.

    Args:
        u, delta, A, B, delta_bias, delta_softplus: as in :func:`selective_scan_ref`.
        index: (batch,) integer step of each row, in [0, seqlen).
        chunk, slab: as in :func:`selective_scan`. With no states kept for a backward, short chunks are cheaper here:
            the 2 MiB buffers then hold more rows, so one op per step covers more of the batch.

    Returns:
        (batch, dim, dstate) in float32 (float64 for float64 inputs), the dtype the recurrence runs in.
    """
    B = _check_state_inputs("selective_scan_state", u, delta, A, B, index, delta_bias)
    batch, dim, seqlen = u.shape
    dtype = _scan_dtype(u)
    n = A.shape[1]
    with torch.autocast(u.device.type, enabled=False):
        stop = int(index.max()) + 1 if batch else 1  # no row needs the steps after the largest index
        # (b, ·, L) -> time-major (stop, b, ·); with L = 1 that can be the input itself: never write into it
        u, dt, B = (_time_major(t.to(dtype)[..., :stop]) for t in (u, delta, B))
        if delta_bias is not None:
            dt = dt + delta_bias.to(dtype)
        if delta_softplus:
            dt = F.softplus(dt)
        dt = dt * (torch.arange(stop, device=u.device)[:, None, None] <= index[None, :, None])  # (stop, b, d)
        dtu = dt * u
        A2 = A.to(dtype) * _LOG2E
        chunk = max(1, min(chunk, stop))
        if slab is None:
            slab = batch if u.is_cuda else _SLAB_CELLS // (chunk * dim * n)
        slab = max(1, min(slab, batch))
        out = u.new_empty(batch, dim, n)
        ws = _Workspace(u, chunk, slab, dim, n, 2)
        for s0 in range(0, batch, slab):
            s = slice(s0, min(s0 + slab, batch))
            h = out[s].zero_()
            for t0 in range(0, stop, chunk):
                t1 = min(t0 + chunk, stop)
                (dA, dA_t), (hs, hs_t) = ws(0, t1 - t0, s.stop - s0), ws(1, t1 - t0, s.stop - s0)
                _chunk_states(dt[t0:t1, s], A2, dtu[t0:t1, s], B[t0:t1, s], h, dA, dA_t, hs, hs_t)
                h.copy_(hs_t[-1])  # the next chunk overwrites hs before reading its initial state
    return out


@torch.no_grad()
def selective_scan_last(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, index: Tensor,
                        D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False,
                        state_scan: Callable[..., Tensor] = selective_scan_state) -> Tensor:
    """The scan's output y at t = index[i] of each batch row i, (batch, dim): ``selective_scan_ref(...)[rows, :,
    index]``, from the state there (`state_scan`: :func:`selective_scan_state`, or a backend's kernel of that
    signature), so C and the gate are formed at one step per row. Inference only.

    Args:
        u, delta, A, B, D, delta_bias, delta_softplus: as in :func:`selective_scan_ref`.
        C: (batch, dstate) C at each row's index.
        index: (batch,) integer step of each row, in [0, seqlen).
        z: (batch, dim) the gate's input at each row's index, or None.

    Returns:
        (batch, dim) in float32 (float64 for float64 inputs), the dtype the recurrence runs in.
    """
    batch, dim, _ = u.shape
    if C.dim() != 2 or C.shape[0] != batch:
        raise ValueError(f"selective_scan_last: C must be (batch={batch}, dstate), C at each row's index, got "
                         f"{tuple(C.shape)}")
    if z is not None and z.shape != (batch, dim):
        raise ValueError(f"selective_scan_last: z must be (batch={batch}, dim={dim}), z at each row's index, got "
                         f"{tuple(z.shape)}")
    h = state_scan(u, delta, A, B, index, delta_bias=delta_bias, delta_softplus=delta_softplus)  # (batch, dim, N)
    y = (h * C[:, None, :].to(h.dtype)).sum(-1)
    if D is not None:
        y = y + D.to(h.dtype) * u[torch.arange(u.size(0), device=u.device), :, index].to(h.dtype)
    return y if z is None else y * F.silu(z.to(h.dtype))
