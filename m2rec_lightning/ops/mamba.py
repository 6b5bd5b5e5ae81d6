"""Mamba-1 block with the parameter names, shapes and initialisation of ``mamba_ssm.modules.mamba_simple.Mamba``.

A state dict moves unchanged between this block and mamba_ssm's. The scan runs in mamba_ssm's CUDA kernels
(``backend="cuda"``), the Triton scan (``"triton"``), the compiled CPU kernels of :mod:`.cpu_kernels` (``"cpu"``)
or the pure-PyTorch scan of :mod:`.selective_scan` (``"torch"``), all with one signature.
"""

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2rec_lightning.models.state import MambaState, step_constant
from m2rec_lightning.ops.cpu_kernels import (
    MambaStepWeights,
    causal_conv1d_silu_cpu,
    cpu_kernels_unavailable,
    mamba_last_cpu,
    mamba_step_cpu,
    pack_mamba_step,
    selective_scan_cpu,
    selective_scan_state_cpu,
)
from m2rec_lightning.ops.selective_scan import _scan_dtype, selective_scan, selective_scan_last, selective_scan_state

log = logging.getLogger("m2rec")


def _fp32(t: Tensor) -> Tensor:
    """At least float32 (half/bfloat16 parameters are upcast; a float64 model stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@functools.cache
def _triton_scan() -> tuple[object | None, object | None, str | None]:
    """(selective_scan_triton, selective_scan_state_triton, why unavailable)."""
    try:
        from m2rec_lightning.ops.selective_scan_triton import selective_scan_state_triton, selective_scan_triton
    except (ImportError, OSError, RuntimeError) as e:
        return None, None, f"triton is not importable ({e!r}); pip install triton"
    return selective_scan_triton, selective_scan_state_triton, None


def _state_scan(backend: str):
    """The state-only scan of a backend. mamba_ssm has none: its backends use the PyTorch one, which runs on CUDA too."""
    return {"cpu": selective_scan_state_cpu, "triton": _triton_scan()[1]}.get(backend, selective_scan_state)


@functools.cache
def _mamba_ssm_kernels() -> tuple[object | None, object | None, str | None]:
    """(selective_scan_fn, mamba_inner_fn or None, why unavailable). mamba_inner_fn needs causal_conv1d."""
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    except (ImportError, OSError, RuntimeError) as e:  # a CUDA build mismatch surfaces as OSError/RuntimeError
        return None, None, f"mamba_ssm is not importable ({e!r}); install the extra: pip install 'm2rec[cuda]'"
    try:
        import causal_conv1d  # noqa: F401  (mamba_inner_fn calls its CUDA kernels)
    except (ImportError, OSError, RuntimeError):
        return selective_scan_fn, None, None
    return selective_scan_fn, mamba_inner_fn, None


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: Literal["random", "constant"] = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: Literal["auto", "torch", "cpu", "cuda", "triton"] = "auto",
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Mamba-1 selective state-space block, (batch, seqlen, d_model) -> (batch, seqlen, d_model), causal.

        Args:
            d_model: model width D.
            d_state: SSM state size N per channel.
            d_conv: width of the causal depthwise convolution.
            expand: inner width E·D = expand · d_model.
            dt_rank: rank of the Δ projection; "auto" = ceil(d_model / 16).
            dt_min: smallest initial Δ (after softplus).
            dt_max: largest initial Δ (after softplus).
            dt_init: "random" (uniform ±dt_rank^-0.5·dt_scale) or "constant" initialisation of dt_proj.weight.
            dt_scale: scale of the dt_proj.weight initialisation.
            dt_init_floor: lower clamp of the initial Δ.
            conv_bias: give the depthwise convolution a bias.
            bias: give in_proj and out_proj a bias.
            backend: "cuda" = mamba_ssm's fused kernels (needs mamba_ssm, and causal_conv1d for the fused
                conv, and CUDA tensors); "triton" = the Triton scan of selective_scan_triton.py (needs triton and
                CUDA tensors, no compiled extension; checked against the PyTorch scan on a GPU, but not yet what
                "auto" picks); "cpu" = the compiled CPU scan and conv of cpu_kernels.py (built with g++ on first
                use, CPU tensors); "torch" = the pure-PyTorch scan; "auto" = cuda when mamba_ssm imports and the input
                is on CUDA, else cpu on CPU tensors when the compiled scan builds here, else torch.
            layer_idx: index of this layer in a stack (kept for mamba_ssm parity).
            device: device of the parameters.
            dtype: dtype of the parameters (A_log and D stay float32, as in mamba_ssm).
        """
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if backend not in ("auto", "torch", "cpu", "cuda", "triton"):
            raise ValueError(f"Mamba: backend must be 'auto', 'torch', 'cpu', 'cuda' or 'triton', got {backend!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        # Depthwise; padding d_conv-1 on both sides, the right part is cropped in forward to stay causal.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # Keep Δ's variance at initialisation independent of dt_rank.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        # Bias = softplus^-1(Δ0) with Δ0 log-uniform in [dt_min, dt_max], so softplus(bias) starts in that range.
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True  # model-level init that zeroes Linear biases must skip this one

        # S4D-real initialisation A = -(1..N) per channel, stored as log, float32 whatever dtype is.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (E·D, N)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # (E·D,)
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def _resolve_backend(self, hidden_states: Tensor) -> str:
        """'torch', 'cpu', 'triton', 'cuda' (mamba_ssm scan, PyTorch conv) or 'cuda-fused' (mamba_inner_fn)."""
        if self.backend == "torch":
            _log_once("Mamba backend: torch (requested)")
            return "torch"
        if self.backend == "cpu":
            why = cpu_kernels_unavailable()
            if why:
                raise RuntimeError(f"Mamba(backend='cpu'): {why}")
            if hidden_states.is_cuda:
                raise ValueError("Mamba(backend='cpu') needs CPU tensors, got input on "
                                 f"{hidden_states.device}; use backend='auto', 'cuda' or 'triton' on a GPU")
            _log_once("Mamba backend: cpu (requested)")
            return "cpu"
        if self.backend == "triton":
            why = _triton_scan()[2]
            if why:
                raise ImportError(f"Mamba(backend='triton'): {why}")
            if not hidden_states.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"Mamba(backend='triton') needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
                                 f"in Triton's interpreter), got input on {hidden_states.device}")
            _log_once("Mamba backend: triton (requested)")
            return "triton"
        scan_fn, inner_fn, why = _mamba_ssm_kernels()
        if self.backend == "cuda":
            if scan_fn is None:
                raise ImportError(f"Mamba(backend='cuda'): {why}")
            if not hidden_states.is_cuda:
                raise ValueError(f"Mamba(backend='cuda') needs CUDA tensors, got input on {hidden_states.device}")
        elif not hidden_states.is_cuda and not cpu_kernels_unavailable():
            _log_once("Mamba backend: cpu (auto; the compiled CPU scan)")
            return "cpu"
        elif scan_fn is None or not hidden_states.is_cuda:
            reasons = [r for r in (why, None if hidden_states.is_cuda else cpu_kernels_unavailable()) if r]
            _log_once(f"Mamba backend: torch (auto; input on {hidden_states.device}"
                      + (f"; {'; '.join(reasons)})" if reasons else ")"))
            return "torch"
        if inner_fn is None:
            _log_once("Mamba backend: cuda (mamba_ssm selective_scan_fn; causal_conv1d missing, so PyTorch conv)")
            return "cuda"
        _log_once("Mamba backend: cuda (mamba_ssm mamba_inner_fn with causal_conv1d)")
        return "cuda-fused"

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states (batch, seqlen, d_model) -> (batch, seqlen, d_model); output t sees inputs 0..t only."""
        batch, seqlen, _ = hidden_states.shape
        backend = self._resolve_backend(hidden_states)
        A = -torch.exp(_fp32(self.A_log))  # (E·D, N)

        if backend == "cuda-fused":
            inner_fn = _mamba_ssm_kernels()[1]
            # One matmul gives xz already in the (batch, 2·E·D, seqlen) layout with unit stride in time.
            xz = (self.in_proj.weight @ hidden_states.reshape(batch * seqlen, -1).t())  # (2·E·D, batch·seqlen)
            xz = xz.view(-1, batch, seqlen).transpose(0, 1)  # (batch, 2·E·D, seqlen)
            if self.in_proj.bias is not None:
                xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]
            return inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, _fp32(self.D),
                delta_bias=_fp32(self.dt_proj.bias), delta_softplus=True,
            )

        x, z, dt, B, C = self._scan_inputs(hidden_states, backend)
        scan = {"torch": selective_scan, "cpu": selective_scan_cpu, "triton": _triton_scan()[0]}.get(backend) \
            or _mamba_ssm_kernels()[0]
        y = scan(
            x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
            _fp32(self.D), z=z.transpose(1, 2), delta_bias=_fp32(self.dt_proj.bias), delta_softplus=True,
        )  # (batch, E·D, seqlen)
        return self.out_proj(y.transpose(1, 2))

    def _scan_inputs(self, hidden_states: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (batch, E·D, seqlen) after the causal conv; z, dt (batch, seqlen, E·D), dt without its bias (the scan adds
        it); B, C (batch, seqlen, N)."""
        xz = self.in_proj(hidden_states)  # (batch, seqlen, 2·E·D)
        x, z = xz.chunk(2, dim=-1)  # (batch, seqlen, E·D) each
        x = self._conv_silu(x, backend)  # (batch, seqlen, E·D)
        x_dbl = self.x_proj(x)  # (batch, seqlen, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # x stays (batch, seqlen, E·D) in memory: the scan reads it time-step by time-step
        return x.transpose(1, 2), z, F.linear(dt, self.dt_proj.weight), B, C

    def _conv_silu(self, x: Tensor, backend: str) -> Tensor:
        """silu(causal depthwise conv(x)), (batch, seqlen, E·D) -> (batch, seqlen, E·D); the compiled kernel on the cpu
        backend (it reads x, a column slice of in_proj's output, in place), else conv1d's convolution then SiLU."""
        if backend == "cpu":
            return causal_conv1d_silu_cpu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
        return self.act(self._conv(x))

    def _conv(self, x: Tensor) -> Tensor:
        """conv1d's causal depthwise convolution, (batch, seqlen, E·D) -> (batch, seqlen, E·D), in that layout."""
        if torch.is_grad_enabled():
            return _CausalDepthwiseConv.apply(x, self.conv1d.weight, self.conv1d.bias)
        # without autograd: the conv's own zero padding on both sides and its first seqlen outputs, no padded copy of
        # x (half the time at (32, 200, 128); with autograd the copy pays: the backward reads it)
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), self.conv1d.weight.unsqueeze(2), self.conv1d.bias,
                     padding=(0, self.d_conv - 1), groups=self.d_inner)  # (batch, E·D, 1, seqlen+K-1)
        return y.squeeze(2).transpose(1, 2)[:, : x.size(1)]

    def forward_last(self, hidden_states: Tensor, index: Tensor) -> Tensor:
        """The output at position index[i] of each row i: (batch, seqlen, d_model), (batch,) -> (batch, d_model).

        Equal to ``self(hidden_states)[arange(batch), index]``. Without autograd on the torch, cpu and triton backends
        it runs the recurrence only up to each row's index and forms C·h + D·u, the gate and out_proj at the index
        alone: on cpu the whole path before out_proj is one compiled call (mamba_last_cpu), on torch and triton the
        projections are matmuls and the scan selective_scan_last with the backend's state-only scan; otherwise it is
        that expression.
        """
        backend = self._resolve_backend(hidden_states)
        rows = torch.arange(hidden_states.size(0), device=hidden_states.device)
        if torch.is_grad_enabled() or backend not in ("torch", "cpu", "triton"):
            return self(hidden_states)[rows, index]
        if backend == "cpu":
            weights, a_nan = step_constant(self, "_cpu_last_weights_kept", [self], [], self._cpu_last_weights)
            if not a_nan:  # (a NaN in A, a diverged model, takes the PyTorch scan, which propagates it)
                _, w_z = self.in_proj.weight.chunk(2)
                b_z = self.in_proj.bias.chunk(2)[1] if self.in_proj.bias is not None else None
                z = F.linear(hidden_states[rows, index], w_z, b_z)  # (batch, E·D)
                y = mamba_last_cpu(hidden_states, index, *weights, z)  # (batch, E·D), float32
                return self.out_proj(y.to(hidden_states.dtype))
            backend = "torch"
        x, z, dt, B, C = self._last_inputs(hidden_states, index)
        y = selective_scan_last(
            x, dt.transpose(1, 2), -torch.exp(_fp32(self.A_log)), B.transpose(1, 2), C, index, _fp32(self.D), z,
            delta_bias=_fp32(self.dt_proj.bias), delta_softplus=True, state_scan=_state_scan(backend),
        )  # (batch, E·D), float32
        return self.out_proj(y.to(hidden_states.dtype))

    def _cpu_last_weights(self) -> tuple[tuple[Tensor | None, ...], bool]:
        """(forward_last's weights in mamba_last_cpu's layouts and the scan's dtype, whether A holds a NaN)."""
        dtype = _scan_dtype(self.in_proj.weight)
        w_x = self.in_proj.weight[: self.d_inner]
        b_x = self.in_proj.bias[: self.d_inner] if self.in_proj.bias is not None else None
        A = -torch.exp(self.A_log.to(dtype))
        parts = (w_x.t(), b_x, self.conv1d.weight[:, 0].t(), self.conv1d.bias, self.x_proj.weight.t(),
                 self.dt_proj.weight.t(), self.dt_proj.bias, A, self.D)
        return tuple(None if t is None else t.to(dtype).contiguous() for t in parts), bool(A.isnan().any())

    def init_state(self, batch_size: int) -> MambaState:
        """The state before the first input: zero conv inputs (the conv's padding) and h = 0."""
        w = self.in_proj.weight
        return MambaState(
            conv=w.new_zeros(batch_size, self.d_inner, self.d_conv - 1),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, dtype=_scan_dtype(w), device=w.device),
        )

    @torch.no_grad()
    def step(self, state: MambaState, u: Tensor) -> tuple[MambaState, Tensor]:
        """One more input per row: state after t inputs, u (batch, d_model) = input t -> (state after t+1 inputs,
        (batch, d_model) output t), equal to forward's output at position t on the whole sequence. Inference only."""
        weights = step_constant(self, "_step_weights", [self], [], lambda: step_weights([self]))
        xz = F.linear(u, self.in_proj.weight, self.in_proj.bias)[:, None]  # (batch, 1, 2·E·D)
        window, h, y = step_stacked(weights, state.conv[:, None], state.ssm[:, None], xz)
        return MambaState(conv=window[:, 0, :, 1:], ssm=h[:, 0]), y[:, 0]

    @torch.no_grad()
    def prefill(self, hidden_states: Tensor, lengths: Tensor) -> tuple[MambaState, Tensor]:
        """The state after the first lengths[i] inputs of each row, and the output at position lengths[i] - 1:
        (batch, seqlen, d_model), (batch,) in [0, seqlen] -> (state, (batch, d_model)). A row of length 0 gets the
        initial state and a zero output. The scan runs once, to each row's last input (as forward_last does)."""
        batch, seqlen, _ = hidden_states.shape
        if seqlen == 0:
            return self.init_state(batch), hidden_states.new_zeros(batch, self.d_model)
        rows = torch.arange(batch, device=hidden_states.device)
        index = (lengths - 1).clamp(min=0)  # (batch,)
        started = (lengths > 0)[:, None]  # (batch, 1)
        backend = self._resolve_backend(hidden_states)
        x, z, dt, B, C = self._scan_inputs(hidden_states, backend)
        h = _state_scan(backend)(
            x, dt.transpose(1, 2), -torch.exp(_fp32(self.A_log)), B.transpose(1, 2), index,
            delta_bias=_fp32(self.dt_proj.bias), delta_softplus=True,
        )  # (batch, E·D, N)
        h = h * started[:, :, None]
        u = x[rows, :, index]  # (batch, E·D), after the conv
        y = (h * C[rows, index, None, :].to(h.dtype)).sum(-1) + _fp32(self.D).to(h.dtype) * u.to(h.dtype)
        y = y * F.silu(z[rows, index].to(h.dtype))
        y = self.out_proj(y.to(hidden_states.dtype)) * started
        # the conv's memory: pre-conv inputs at positions lengths-d_conv+1 .. lengths-1, zeros before position 0
        source = lengths[:, None] - self.d_conv + 1 + torch.arange(self.d_conv - 1, device=lengths.device)
        tail = hidden_states[rows[:, None], source.clamp(min=0)]  # (batch, d_conv-1, d_model)
        conv = self.in_proj(tail)[..., : self.d_inner] * (source >= 0)[:, :, None]  # (batch, d_conv-1, E·D)
        return MambaState(conv=conv.transpose(1, 2), ssm=h), y

    def _last_inputs(self, hidden_states: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """_scan_inputs for forward_last on the torch and triton backends: x, dt and B at every position (the recurrence
        reads them), but z (batch, E·D) and C (batch, N) at index only, so in_proj's z half and x_proj's C rows run on
        one position per row."""
        rows = torch.arange(hidden_states.size(0), device=hidden_states.device)
        w_x, w_z = self.in_proj.weight.chunk(2)  # (E·D, d_model) each
        b_x, b_z = self.in_proj.bias.chunk(2) if self.in_proj.bias is not None else (None, None)
        x = self.act(self._conv(F.linear(hidden_states, w_x, b_x)))  # (batch, seqlen, E·D)
        z = F.linear(hidden_states[rows, index], w_z, b_z)  # (batch, E·D)
        w_dt_b, w_c = self.x_proj.weight.split([self.dt_rank + self.d_state, self.d_state])
        dt, B = F.linear(x, w_dt_b).split([self.dt_rank, self.d_state], dim=-1)  # (batch, seqlen, ·)
        C = F.linear(x[rows, index], w_c)  # (batch, N)
        return x.transpose(1, 2), z, F.linear(dt, self.dt_proj.weight), B, C


class _CausalDepthwiseConv(torch.autograd.Function):
    """y[b, t, c] = bias[c] + sum_k w[c, k] x[b, t-K+1+k, c] (zeros before t = 0): conv1d's causal depthwise
    convolution on x (batch, seqlen, E·D) in that layout, with a hand-written backward.

    conv1d wants (batch, E·D, seqlen): a transpose in and out, each a copy on CPU. The same convolution as a conv2d
    over the left-padded input seen as a channels-last (batch, E·D, 1, K-1+seqlen) image needs neither (oneDNN runs
    channels-last natively). Its input gradient is the same convolution of the right-padded output gradient with the
    taps reversed, and the weight gradient is K sums of products; autograd's convolution_backward of this depthwise
    conv2d takes twice as long on CPU (fwd+bwd at (32, 200, 128), one thread: 6.7 ms with it, 2.8 ms here).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # (b, L, C), (C, 1, K), (C,)
        taps = weight.size(-1)
        padded = F.pad(x, (0, 0, taps - 1, 0))  # (b, K-1+L, C)
        ctx.save_for_backward(padded, weight)
        return _depthwise(padded, weight, bias)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        padded, weight = ctx.saved_tensors
        taps, length = weight.size(-1), gy.size(1)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # dx[s] = sum_k w[k] dy[s+K-1-k]: the causal conv of the reversed taps, anti-causal
            gx = _depthwise(F.pad(gy, (0, 0, 0, taps - 1)), weight.flip(-1).to(gy.dtype), None)
        if ctx.needs_input_grad[1]:  # dw[k] = sum_{b,t} dy[b,t] x_padded[b,t+k], the products in one reused buffer
            products, gw = torch.empty_like(gy), gy.new_empty(taps, gy.size(2))  # (b, L, C), (K, C)
            for k in range(taps):
                torch.sum(torch.mul(gy, padded[:, k:k + length], out=products), (0, 1), out=gw[k])
            gw = gw.t().contiguous()[:, None].to(weight.dtype)  # (C, 1, K)
        if ctx.needs_input_grad[2]:
            gb = gy.sum((0, 1)).to(weight.dtype)
        return gx, gw, gb


def _depthwise(padded: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The valid depthwise convolution along time of padded (b, K-1+L, C) with weight (C, 1, K) -> (b, L, C)."""
    y = F.conv2d(padded.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, groups=weight.size(0))
    return y.squeeze(2).transpose(1, 2)  # (b, C, 1, L) channels-last -> (b, L, C)


@dataclass
class StepWeights:
    """The constants of a step of S Mambas of the same sizes, stacked in dim 0 (see `step_weights`)."""

    conv_weight: Tensor  # (S, E·D, d_conv)
    conv_bias: Tensor | None  # (S, E·D)
    x_proj: Tensor  # (S, E·D, E·D + 2N): x -> [Δ before its bias, B, C], dt_proj folded into x_proj's Δ rows
    dt_bias: Tensor  # (S, E·D), in the scan's dtype
    A: Tensor  # (S, E·D, N), in the scan's dtype
    D: Tensor  # (S, E·D), in the scan's dtype
    out_proj: Tensor  # (S, E·D, d_model)
    out_bias: Tensor | None  # (S, d_model)
    compiled: MambaStepWeights | None = None  # the same for the compiled step, where the Mambas run on the cpu backend


def step_weights(mambas: Sequence[Mamba]) -> StepWeights:
    """The step constants of these Mambas (same sizes, biases alike). dt_proj · x_proj's Δ rows is one (E·D, E·D)
    matrix, multiplied in float64 once: one matmul less per step, and no rounding of the rank-R intermediate. Where
    the Mambas run on the cpu backend, `compiled` packs them for the compiled step as well."""
    first = mambas[0]
    dtype, scan = first.in_proj.weight.dtype, _scan_dtype(first.in_proj.weight)

    def stack(part) -> Tensor | None:
        parts = [part(m) for m in mambas]
        return None if parts[0] is None else torch.stack(parts)

    def x_proj(m: Mamba) -> Tensor:  # (E·D, E·D + 2N)
        w_dt, w_bc = m.x_proj.weight.split([m.dt_rank, 2 * m.d_state])  # (R, E·D), (2N, E·D)
        folded = (m.dt_proj.weight.double() @ w_dt.double()).to(dtype)  # (E·D, E·D)
        return torch.cat([folded, w_bc]).T

    weights = StepWeights(
        conv_weight=stack(lambda m: m.conv1d.weight[:, 0]),
        conv_bias=stack(lambda m: m.conv1d.bias),
        x_proj=stack(x_proj),
        dt_bias=stack(lambda m: m.dt_proj.bias.to(scan)),
        A=stack(lambda m: -torch.exp(_fp32(m.A_log)).to(scan)),
        D=stack(lambda m: m.D.to(scan)),
        out_proj=stack(lambda m: m.out_proj.weight.T),
        out_bias=stack(lambda m: m.out_proj.bias),
    )
    weight = first.in_proj.weight
    if first.backend in ("auto", "cpu") and not weight.is_cuda and first._resolve_backend(weight) == "cpu":
        weights.compiled = pack_mamba_step(weights.conv_weight, weights.conv_bias, weights.x_proj, weights.dt_bias,
                                           weights.A, weights.D, weights.out_proj, weights.out_bias)
    return weights


def step_stacked(weights: StepWeights, conv: Tensor, ssm: Tensor, xz: Tensor,
                 steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One more input for S Mambas on B rows, equal to their forward at that position: conv (B, S, E·D, d_conv-1) and
    ssm (B, S, E·D, N) the states, xz (B, S, 2·E·D) in_proj of the inputs -> (window (B, S, E·D, d_conv) the conv's
    inputs t-d_conv+1 .. t, whose last d_conv-1 are the next conv state; ssm; y (B, S, d_model) the outputs).

    steps (B, S, 1), 1 or 0: where 0, ssm comes back unchanged, exactly (a step with Δ = 0: exp(0·A) = 1 and
    0·B·x = 0), cheaper than selecting the old state afterwards; y and window are then to be ignored.

    At batch 1 each op's dispatch costs more than its arithmetic, so the S Mambas run as one: per-Mamba weights are
    batched matmuls over S, and the recurrence uses fused and in-place ops; at larger batches the (B, S, E·D, N)
    tensors are large, and each one allocated costs more than the arithmetic on it, so the recurrence allocates one.
    With weights.compiled, the compiled step of cpu_kernels.py does it all in one call."""
    if weights.compiled is not None:
        return mamba_step_cpu(weights.compiled, conv, ssm, xz, steps)
    n = weights.A.size(-1)
    x, z = xz.chunk(2, dim=-1)  # (B, S, E·D) each
    window = torch.cat([conv, x.unsqueeze(-1)], dim=-1)  # (B, S, E·D, d_conv)
    x = torch.linalg.vecdot(window, weights.conv_weight)  # the depthwise conv at t alone
    if weights.conv_bias is not None:
        x = x + weights.conv_bias
    x = F.silu(x)
    dtb = torch.bmm(x.transpose(0, 1), weights.x_proj).transpose(0, 1)  # (B, S, E·D + 2N)
    if ssm.dtype != x.dtype:  # the recurrence runs in float32 for a half-precision model (no-op .to()s cost too)
        x, z, dtb = x.to(ssm.dtype), z.to(ssm.dtype), dtb.to(ssm.dtype)
    dt, B, C = dtb.split([x.size(-1), n, n], dim=-1)
    dt = F.softplus(dt + weights.dt_bias)  # (B, S, E·D)
    if steps is not None:
        dt = dt * steps
    # h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t . h_t + D x_t  (unsqueeze: cheaper than [..., None])
    h = torch.mul(dt.unsqueeze(-1), weights.A).exp_().mul_(ssm)  # (B, S, E·D, N)
    h.addcmul_((dt * x).unsqueeze(-1), B.unsqueeze(-2))
    y = torch.addcmul(torch.linalg.vecdot(h, C.unsqueeze(-2)), weights.D, x)
    y = (y * F.silu(z)).to(xz.dtype)  # (B, S, E·D)
    y = torch.bmm(y.transpose(0, 1), weights.out_proj).transpose(0, 1)  # (B, S, d_model)
    if weights.out_bias is not None:
        y = y + weights.out_bias
    return window, h, y
