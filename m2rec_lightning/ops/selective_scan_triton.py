"""Selective scan in Triton: the GPU fast path that needs no compiler toolchain at install time.

Same arguments, semantics and result as :func:`m2rec_lightning.ops.selective_scan.selective_scan_ref`. One program runs
the recurrence of one batch row and a block of channels, all states of those channels in registers:

    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,    y_t = (C_t . h_t + D u_t) silu(z_t)

Forward keeps the state at the start of every chunk of CHUNK steps when a gradient is needed; backward walks the
chunks in reverse, recomputes a chunk's states from its start into a per-program scratch buffer, then runs the adjoint
recurrence G_t = gy_t C_t + exp(delta_{t+1} A) G_{t+1} through it (as mamba_ssm's CUDA kernel does). B and C are
shared by all channels, so their gradients (and those of A, D and the bias, shared by the batch) are summed across
programs with atomic adds.

Runs on CUDA tensors; the tests run the same kernels on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1). Inputs may be any strided views: the Mamba block passes (batch, dim, seqlen) views of
(batch, seqlen, dim) memory, which makes every per-step load of a channel block contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .selective_scan import _check_inputs, _check_state_inputs, _scan_dtype

CHUNK = 16  # steps per chunk: backward keeps one state per chunk and recomputes the rest into scratch


@triton.jit
def _step_inputs(u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                 su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS: tl.constexpr):
    """u_t, delta_t after bias and softplus (BLOCK_D,), B_t (BLOCK_N,), and delta_t before the softplus."""
    u = tl.load(u_ptr + offs_d * su_d + t * su_t, mask=mask_d, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + offs_d * sdt_d + t * sdt_t, mask=mask_d, other=0.0).to(tl.float32) + bias
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    bt = tl.load(b_ptr + offs_n * sb_n + t * sb_t, mask=mask_n, other=0.0).to(tl.float32)
    return u, dt, bt, raw


@triton.jit
def _advance(h, a2, u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
             su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS: tl.constexpr):
    """One step of the recurrence, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t; returns h_t, u_t and delta_t."""
    u, dt, bt, raw = _step_inputs(u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                                  su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS)
    return tl.exp2(dt[:, None] * a2) * h + (dt * u)[:, None] * bt[None, :], u, dt


@triton.jit
def _channel_tile(pid_d, dim, dstate, a_ptr, sa_d, sa_n, bias_ptr, d_ptr,
                  HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels and states: offsets and masks, A (BLOCK_D, BLOCK_N), the Δ bias and D (BLOCK_D,)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a = tl.load(a_ptr + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    d_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        d_skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, mask_dn, a, bias, d_skip


@triton.jit
def _forward_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, y_ptr, h0_ptr,
    seqlen, dim, dstate,
    su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sa_d, sa_n, sb_b, sb_n, sb_t, sc_b, sc_n, sc_t, sz_b, sz_d, sz_t,
    sy_b, sy_d, sy_t, sh_k, sh_b, sh_d, sh_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d, offs_n, mask_d, mask_n, mask_dn, a, bias, d_skip = _channel_tile(
        tl.program_id(1), dim, dstate, a_ptr, sa_d, sa_n, bias_ptr, d_ptr, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
    a2 = a * 1.4426950408889634  # exp(x A) = exp2(x A log2(e)); exp2 is the cheaper instruction
    u_ptr += pid_b * su_b
    dt_ptr += pid_b * sdt_b
    b_ptr += pid_b * sb_b
    c_ptr += pid_b * sc_b
    z_ptr += pid_b * sz_b
    y_ptr += pid_b * sy_b
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for t in range(seqlen):
        if SAVE_STATES:
            if t % CHUNK == 0:
                h_at = h0_ptr + (t // CHUNK) * sh_k + pid_b * sh_b + offs_d[:, None] * sh_d + offs_n[None, :] * sh_n
                tl.store(h_at, h, mask=mask_dn)
        h, u, dt = _advance(h, a2, u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                            su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS)
        ct = tl.load(c_ptr + offs_n * sc_n + t * sc_t, mask=mask_n, other=0.0).to(tl.float32)
        y = tl.sum(h * ct[None, :], axis=1) + d_skip * u
        if HAS_Z:
            z = tl.load(z_ptr + offs_d * sz_d + t * sz_t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + offs_d * sy_d + t * sy_t, y, mask=mask_d)


@triton.jit
def _state_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, bias_ptr, index_ptr, out_ptr,
    dim, dstate,
    su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sa_d, sa_n, sb_b, sb_n, sb_t, so_b, so_d, so_n,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d, offs_n, mask_d, mask_n, mask_dn, a, bias, d_skip = _channel_tile(
        tl.program_id(1), dim, dstate, a_ptr, sa_d, sa_n, bias_ptr, a_ptr, HAS_BIAS, False, BLOCK_D, BLOCK_N)
    a2 = a * 1.4426950408889634
    u_ptr += pid_b * su_b
    dt_ptr += pid_b * sdt_b
    b_ptr += pid_b * sb_b
    stop = tl.load(index_ptr + pid_b) + 1
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for t in range(stop):
        h, u, dt = _advance(h, a2, u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                            su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS)
    tl.store(out_ptr + pid_b * so_b + offs_d[:, None] * so_d + offs_n[None, :] * so_n, h, mask=mask_dn)


@triton.jit
def _backward_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, h0_ptr, gy_ptr, scratch_ptr,
    gu_ptr, gdt_ptr, ga_ptr, gb_ptr, gc_ptr, gd_ptr, gz_ptr, gbias_ptr,
    seqlen, dim, dstate, n_dblocks,
    su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sa_d, sa_n, sb_b, sb_n, sb_t, sc_b, sc_n, sc_t, sz_b, sz_d, sz_t,
    sh_k, sh_b, sh_d, sh_n, sg_b, sg_d, sg_t, sgb_b, sgb_n, sgb_t, sgc_b, sgc_n, sgc_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # gy and the gradients of u, delta, z share the strides sg_* of a (b, d, t) layout; gB, gC (b, n, t) have sgb_*,
    # sgc_*; gA (dim, dstate), gD, gbias (dim,) are contiguous.
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d, offs_n, mask_d, mask_n, mask_dn, a, bias, d_skip = _channel_tile(
        pid_d, dim, dstate, a_ptr, sa_d, sa_n, bias_ptr, d_ptr, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
    a2 = a * 1.4426950408889634
    u_ptr += pid_b * su_b
    dt_ptr += pid_b * sdt_b
    b_ptr += pid_b * sb_b
    c_ptr += pid_b * sc_b
    z_ptr += pid_b * sz_b
    gy_ptr += pid_b * sg_b
    gu_ptr += pid_b * sg_b
    gdt_ptr += pid_b * sg_b
    gz_ptr += pid_b * sg_b
    gb_ptr += pid_b * sgb_b
    gc_ptr += pid_b * sgc_b
    # this program's CHUNK states, (CHUNK, BLOCK_D, BLOCK_N) contiguous
    scratch_ptr += (pid_b * n_dblocks + pid_d) * CHUNK * BLOCK_D * BLOCK_N
    scratch_dn = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # exp(dt_{t+1} A) dL/dh_{t+1}
    ga = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    gd = tl.zeros([BLOCK_D], dtype=tl.float32)
    gbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(seqlen, CHUNK)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        t0 = k * CHUNK
        t1 = tl.minimum(t0 + CHUNK, seqlen)
        h_start = tl.load(h0_ptr + k * sh_k + pid_b * sh_b + offs_d[:, None] * sh_d + offs_n[None, :] * sh_n,
                          mask=mask_dn, other=0.0)
        h = h_start
        for t in range(t0, t1):
            h, u, dt = _advance(h, a2, u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                                su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS)
            tl.store(scratch_ptr + (t - t0) * BLOCK_D * BLOCK_N + scratch_dn, h)
        tl.debug_barrier()
        for tt in range(t1 - t0):
            t = t1 - 1 - tt
            u, dt, bt, raw = _step_inputs(u_ptr, dt_ptr, b_ptr, bias, offs_d, offs_n, mask_d, mask_n, t,
                                          su_d, su_t, sdt_d, sdt_t, sb_n, sb_t, SOFTPLUS)
            ct = tl.load(c_ptr + offs_n * sc_n + t * sc_t, mask=mask_n, other=0.0).to(tl.float32)
            h_t = tl.load(scratch_ptr + (t - t0) * BLOCK_D * BLOCK_N + scratch_dn)
            if t > t0:
                h_prev = tl.load(scratch_ptr + (t - 1 - t0) * BLOCK_D * BLOCK_N + scratch_dn)
            else:
                h_prev = h_start
            gy = tl.load(gy_ptr + offs_d * sg_d + t * sg_t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + offs_d * sz_d + t * sz_t, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                pre = tl.sum(h_t * ct[None, :], axis=1) + d_skip * u
                tl.store(gz_ptr + offs_d * sg_d + t * sg_t, gy * pre * sig * (1.0 + z * (1.0 - sig)), mask=mask_d)
                gy = gy * z * sig
            gd += gy * u
            grad_h = carry + gy[:, None] * ct[None, :]  # dL/dh_t
            dtu = dt * u
            tl.atomic_add(gc_ptr + offs_n * sgc_n + t * sgc_t,
                          tl.sum(tl.where(mask_dn, gy[:, None] * h_t, 0.0), axis=0), mask=mask_n)
            tl.atomic_add(gb_ptr + offs_n * sgb_n + t * sgb_t,
                          tl.sum(tl.where(mask_dn, grad_h * dtu[:, None], 0.0), axis=0), mask=mask_n)
            g_dtu = tl.sum(grad_h * bt[None, :], axis=1)
            decay = tl.exp2(dt[:, None] * a2)
            q = grad_h * h_prev * decay  # dL/d(dt_t A)
            ga += q * dt[:, None]
            g_dt = g_dtu * u + tl.sum(q * a, axis=1)
            if SOFTPLUS:
                g_dt = g_dt * tl.sigmoid(raw)
            gbias += g_dt
            tl.store(gu_ptr + offs_d * sg_d + t * sg_t, g_dtu * dt + gy * d_skip, mask=mask_d)
            tl.store(gdt_ptr + offs_d * sg_d + t * sg_t, g_dt, mask=mask_d)
            carry = grad_h * decay
        tl.debug_barrier()
    tl.atomic_add(ga_ptr + offs_d[:, None] * dstate + offs_n[None, :], ga, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(gd_ptr + offs_d, gd, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(gbias_ptr + offs_d, gbias, mask=mask_d)


def _blocks(dim: int, dstate: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(dstate)
    # a (BLOCK_D, BLOCK_N) float32 tile per live tensor: keep it near 1024 elements per program
    block_d = max(1, min(triton.next_power_of_2(dim), 1024 // block_n))
    return block_d, block_n


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, save_states: bool):
        # u, delta, z: (b, d, L); B, C: (b, n, L); A: (d, n); D, delta_bias: (d,); float32, any strides
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        block_d, block_n = _blocks(dim, dstate)
        save = save_states and any(ctx.needs_input_grad)
        y = torch.empty(batch, seqlen, dim, device=u.device, dtype=torch.float32).transpose(1, 2)  # (b, d, L)
        n_chunks = triton.cdiv(seqlen, CHUNK)
        h0s = torch.empty((n_chunks, batch, dim, dstate) if save else (1, 1, 1, 1), device=u.device,
                          dtype=torch.float32)
        zz = z if z is not None else u
        grid = (batch, triton.cdiv(dim, block_d))
        _forward_kernel[grid](
            u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, y, h0s,
            seqlen, dim, dstate,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
            *h0s.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            SAVE_STATES=save, CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
        )
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0s)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u, delta, A, B, C, D, z, delta_bias, h0s = ctx.saved_tensors
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        block_d, block_n = _blocks(dim, dstate)
        n_dblocks = triton.cdiv(dim, block_d)
        f32 = dict(device=u.device, dtype=torch.float32)
        # g_u, g_delta, g_z and a copy of gy, (b, d, L) views of (b, L, d) memory, one layout for all four
        grads = torch.empty(4, batch, seqlen, dim, **f32).transpose(2, 3)
        grads[3].copy_(gy)
        gB, gC = (torch.zeros(batch, seqlen, dstate, **f32).transpose(1, 2) for _ in range(2))  # (b, n, L)
        gA = torch.zeros(dim, dstate, **f32)
        gD, g_bias = torch.zeros(dim, **f32), torch.zeros(dim, **f32)
        scratch = torch.empty(batch * n_dblocks * CHUNK * block_d * block_n, **f32)
        zz = z if z is not None else u
        _backward_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, h0s,
            grads[3], scratch, grads[0], grads[1], gA, gB, gC, gD, grads[2], g_bias,
            seqlen, dim, dstate, n_dblocks,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(),
            *h0s.stride(), *grads[0].stride(), *gB.stride(), *gC.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
        )
        return (grads[0], grads[1], gA, gB, gC, gD if D is not None else None, grads[2] if z is not None else None,
                g_bias if delta_bias is not None else None, None, None)


def _float(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False) -> Tensor:
    """The selective scan in Triton kernels (forward and backward); same arguments, shapes and result as
    :func:`~m2rec_lightning.ops.selective_scan.selective_scan_ref`. The recurrence runs in float32."""
    B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if _scan_dtype(u) == torch.float64:
        raise NotImplementedError("selective_scan_triton runs in float32; use selective_scan for float64")
    dtype_in = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        f = torch.float32
        # forward runs with grad mode off, so the caller's mode decides whether to keep states for backward
        y = _SelectiveScanTriton.apply(u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f), _float(D, f), _float(z, f),
                                       _float(delta_bias, f), delta_softplus, torch.is_grad_enabled())
    return y.to(dtype_in)


@torch.no_grad()
def selective_scan_state_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, index: Tensor,
                                delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """:func:`~m2rec_lightning.ops.selective_scan.selective_scan_state` in a Triton kernel: the state at step index[i]
    of each row, (batch, dim, dstate) float32; each program stops at its own row's index."""
    B = _check_state_inputs("selective_scan_state_triton", u, delta, A, B, index, delta_bias)
    batch, dim, seqlen = u.shape
    f = torch.float32
    u, delta, A, B, delta_bias = u.to(f), delta.to(f), A.to(f), B.to(f), _float(delta_bias, f)
    dstate = A.shape[1]
    block_d, block_n = _blocks(dim, dstate)
    out = torch.empty(batch, dim, dstate, device=u.device, dtype=f)
    _state_kernel[(batch, triton.cdiv(dim, block_d))](
        u, delta, A, B, delta_bias if delta_bias is not None else u, index.to(torch.int64).contiguous(), out,
        dim, dstate,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *out.stride(),
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return out
