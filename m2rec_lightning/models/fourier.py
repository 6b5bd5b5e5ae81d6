"""Causal Fourier filter: a global filter learned in the frequency domain, applied as a causal long convolution.

FMLP-Rec learns a complex response per frequency bin and channel and multiplies it with a *circular* FFT of the
sequence, which lets every position see the whole (padded) sequence, future items included. Here the learned
response defines a real kernel k of length max_len in time, and the filter is the linear (not circular) convolution
    y[t] = sum_{j=0..t} k[j] · h[t-j]
computed with FFTs zero-padded to 2L, so y[t] depends on h[0..t] only.

A history longer than max_len (read through the recurrent state of `step`, or by `convolve`) keeps the same
max_len taps: y[t] = sum_{j=0..min(t, max_len-1)} k[j] · h[t-j], the last max_len inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.cpu_kernels import causal_filter_last_cpu, causal_long_conv_cpu, cpu_kernels_unavailable
from .state import step_constant

# Up to this length the CPU computes the filter's convolution directly (compiled, O(L^2 d)) rather than by FFTs: at
# B=32, d=64, one thread, forward + backward took 0.47 ms against 1.9-2.2 ms at L=50, 6.5 against 8.5-9.2 ms at
# L=200, 10.5 against 11.3-11.8 ms at L=256 and 15.5 against 13.5-14.6 ms at L=320 (load average 4).
DIRECT_MAX_LEN = 256


class CausalFourierFilter(nn.Module):
    """Learnable causal global filter, per channel.

    The response `weight` lives on the max_len + 1 bins of a length-2·max_len real FFT; its inverse FFT, truncated to
    the first max_len taps, is the causal kernel. Sequences shorter than max_len use the first L taps (taps beyond L
    never reach an output). Longer sequences are rejected: the kernel has only max_len taps, so the filter would
    silently lose context, and the rest of the model is configured for max_len.

    There is no residual or LayerNorm inside (FMLP-Rec has both): in the M2Rec block the filter output is one gated
    stream and the block adds the residual and LayerNorm once, after the gate.

    Args:
        hidden_size: number of channels d.
        max_len: the longest sequence the filter accepts; the kernel has this many taps.
    """

    def __init__(self, hidden_size: int, max_len: int) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.hidden_size = hidden_size
        self.max_len = max_len
        # (max_len + 1, d, 2): real and imaginary part of the response; FMLP-Rec's N(0, 0.02) init
        self.weight = nn.Parameter(torch.randn(max_len + 1, hidden_size, 2) * 0.02)

    def kernel(self, length: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The causal time-domain kernel (length, d), taps 0..length-1 (default all max_len taps)."""
        length = self.max_len if length is None else length
        response = torch.view_as_complex(self.weight.to(dtype).contiguous())  # (max_len + 1, d)
        k = torch.fft.irfft(response, n=2 * self.max_len, dim=0)  # (2·max_len, d)
        return k[:length]

    def _check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"CausalFourierFilter got a sequence of length {length} > max_len={self.max_len}; "
                "build the encoder with max_len >= the datamodule's max_len"
            )

    def forward_last(self, h: Tensor, index: Tensor) -> Tensor:  # (B, L, d), (B,) -> (B, d)
        """y[index[i]] of each row i, as the direct sum sum_{s<=t} k[t-s] h[s]: O(L·d) per row instead of an FFT (a
        compiled loop on CPU without autograd, where the (B, L, d) gather of the kernel below cost more than the
        sum)."""
        length = h.size(1)
        self._check_length(length)
        compute = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=h.device.type, enabled=False):
            if torch.is_grad_enabled():
                k = self.kernel(length, compute)  # (L, d)
            else:  # evaluation: one inverse FFT per change of the weights, not one per batch
                k = step_constant(self, f"_step_kernel_{compute}", [self], [],
                                  lambda: self.kernel(dtype=compute).contiguous())
                k = k[:length]
            if h.device.type == "cpu" and not torch.is_grad_enabled() and not cpu_kernels_unavailable():
                return causal_filter_last_cpu(h.to(compute), k, index).to(h.dtype)
            # the reversed kernel followed by zeros, R[m] = k[L-1-m] (0 for m >= L), read at m = L-1-t+s gives
            # k[t-s] for s <= t and 0 after t: rows of a (2L, d) table instead of a gather of h and a mask
            reversed_k = torch.cat([k.flip(0), k.new_zeros(length, k.size(1))])  # (2L, d)
            rows = (length - 1 - index)[:, None] + torch.arange(length, device=h.device)  # (B, L) in [0, 2L-1)
            y = (h.to(compute) * reversed_k[rows]).sum(dim=1)  # (B, d)
        return y.to(h.dtype)

    def forward(self, h: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        length = h.size(1)
        self._check_length(length)
        # FFTs in float32 (float64 stays float64): half-precision FFTs are inaccurate and limited to powers of two
        compute = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=h.device.type, enabled=False):
            if h.device.type == "cpu" and length <= DIRECT_MAX_LEN and not cpu_kernels_unavailable():
                y = causal_long_conv_cpu(h.to(compute), self.kernel(length, compute))  # (B, L, d)
            else:
                y = _CausalConv.apply(h.to(compute), self.kernel(length, compute))  # (B, L, d)
        return y.to(h.dtype)

    def convolve(self, h: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d), any L
        """y[t] = sum_{j <= min(t, max_len-1)} k[j] h[t-j] for a sequence of any length: forward without its length
        limit (equal to it for L <= max_len); longer sequences read their last max_len inputs at every position."""
        length = h.size(1)
        taps = min(length, self.max_len)
        compute = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=h.device.type, enabled=False):
            k = self.kernel(taps, compute)  # (taps, d)
            n = length + taps  # >= L + taps - 1: the circular wrap-around never reaches [0, L)
            y = torch.fft.irfft(torch.fft.rfft(h.to(compute), n=n, dim=1) * torch.fft.rfft(k, n=n, dim=0), n=n, dim=1)
        return y[:, :length].to(h.dtype)

    def init_state(self, batch_size: int) -> Tensor:
        """The input history before the first input: (B, max_len, d) zeros, newest first."""
        return self.weight.new_zeros(batch_size, self.max_len, self.hidden_size)

    def step(self, history: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One more input per row: history (B, max_len, d) of the inputs before t, newest first, and h (B, d) = input
        t -> (history including t, (B, d) y[t] = sum_j k[j] h[t-j]). A shift register, not a ring buffer: every row
        of a batch then reads tap j at the same slot whatever its history length, and the copy costs no more than
        the max_len·d multiply-adds of the output. Inference: call it without autograd (M2RecEncoder.step does; a
        no_grad of its own would cost a context switch per step)."""
        history = torch.cat([h[:, None], history[:, :-1]], dim=1)  # (B, max_len, d): history[:, j] = h[t-j]
        return history, self._apply_kernel(history)

    @torch.no_grad()
    def prefill(self, h: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The history after the first lengths[i] inputs of each row, and y at position lengths[i] - 1:
        h (B, L, d), lengths (B,) in [1, L] -> ((B, max_len, d), (B, d)). Any L."""
        source = lengths[:, None] - 1 - torch.arange(self.max_len, device=h.device)  # (B, max_len): input t - j
        history = h.gather(1, source.clamp(min=0)[:, :, None].expand(-1, -1, h.size(2)))  # (B, max_len, d)
        history = history * (source >= 0)[:, :, None]  # zeros before the first input
        return history, self._apply_kernel(history)

    def _apply_kernel(self, history: Tensor) -> Tensor:  # (B, max_len, d) newest first -> (B, d)
        compute = torch.float64 if history.dtype == torch.float64 else torch.float32
        # an inverse FFT of max_len+1 bins: once, not at every step; made contiguous, as irfft along dim 0 returns it
        # column-major, which makes the product below three times slower
        k = step_constant(self, f"_step_kernel_{compute}", [self], [],
                          lambda: self.kernel(dtype=compute).contiguous())  # (K, d)
        if history.dtype == compute:  # no no-op casts: at batch 1 each op's dispatch costs more than its arithmetic
            return torch.linalg.vecdot(history, k, dim=1)  # one op for the mul and sum
        return torch.linalg.vecdot(history.to(compute), k, dim=1).to(history.dtype)

class _CausalConv(torch.autograd.Function):
    """y[t] = sum_{j<=t} k[j] x[t-j] along time, x (B, L, d), k (L, d), by FFTs zero-padded to n = 2L, with a
    hand-written backward.

    n >= 2L - 1, so the circular wrap-around of the FFT never reaches [0, L): the result is the linear convolution.
    The adjoint of a causal convolution is the causal correlation, the same FFTs with a conjugated spectrum:
    dx[s] = sum_{t>=s} dy[t] k[t-s] and dk[j] = sum_{b,t} dy[b,t] x[b,t-j]. Autograd's backward of rfft/irfft
    reaches the same result through padding, copies and complex-to-complex FFTs, about twice as slow on CPU.
    The FFTs run along the last dimension of time-major (B, d, L) copies: along the strided time dimension of
    (B, L, d) they take ~15% longer on CPU, copies included (fwd+bwd at B=32, L=200, d=64: 12.1 -> 10.0 ms).
    """

    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor) -> Tensor:
        length = x.size(1)
        n = 2 * length
        X = torch.fft.rfft(x.transpose(1, 2).contiguous(), n=n)  # (B, d, n/2+1)
        K = torch.fft.rfft(k.t().contiguous(), n=n)  # (d, n/2+1)
        ctx.save_for_backward(X, K)
        return torch.fft.irfft(X * K, n=n)[..., :length].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        X, K = ctx.saved_tensors
        length = gy.size(1)
        n = 2 * length
        GY = torch.fft.rfft(gy.transpose(1, 2).contiguous(), n=n)  # (B, d, n/2+1)
        gx = gk = None
        if ctx.needs_input_grad[0]:
            gx = torch.fft.irfft(GY * K.conj(), n=n)[..., :length].transpose(1, 2).contiguous()
        if ctx.needs_input_grad[1]:
            gk = torch.fft.irfft((GY * X.conj()).sum(0), n=n)[..., :length].t()
        return gx, gk
