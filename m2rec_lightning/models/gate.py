"""The learnable gate that fuses the temporal, frequency and semantic streams at each position."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..ops.cpu_kernels import cpu_kernels_unavailable, stream_gate_cpu


class StreamGate(nn.Module):
    """Per-position fusion of n streams of width d.

    - "softmax": alpha = softmax(W [s_1; ...; s_n] + b) over the streams, one scalar weight per stream and position;
      the output is sum_i alpha_i · s_i (a convex combination).
    - "sum": sum_i s_i, no parameters (the ablation without a learned gate).

    Args:
        hidden_size: width d of every stream.
        n_streams: number of streams n (>= 2).
        mode: "softmax" or "sum".
    """

    def __init__(self, hidden_size: int, n_streams: int, mode: Literal["softmax", "sum"] = "softmax") -> None:
        super().__init__()
        if n_streams < 2:
            raise ValueError(f"a gate needs at least 2 streams, got {n_streams}")
        if mode not in ("softmax", "sum"):
            raise ValueError(f"gate mode must be 'softmax' or 'sum', got {mode!r}")
        self.hidden_size = hidden_size
        self.n_streams = n_streams
        self.mode = mode
        self.proj = nn.Linear(n_streams * hidden_size, n_streams) if mode == "softmax" else None

    def weights(self, streams: list[Tensor]) -> Tensor:
        """Gate values for streams (..., d): (..., n, 1) for "softmax", ones (n, 1) for "sum"."""
        if len(streams) != self.n_streams:
            raise ValueError(f"StreamGate built for {self.n_streams} streams got {len(streams)}")
        if self.proj is None:
            return streams[0].new_ones(self.n_streams, 1)
        return self.proj(torch.cat(streams, dim=-1)).softmax(dim=-1).unsqueeze(-1)  # (..., n, 1)

    def forward(self, streams: list[Tensor]) -> Tensor:  # n × (..., d) -> (..., d), e.g. (B, L, d) or (B, d)
        if self.proj is None:
            return sum(streams[1:], streams[0])
        if streams[0].device.type == "cpu" and streams[0].dtype in (torch.float32, torch.float64) \
                and not cpu_kernels_unavailable():
            # one compiled pass per position, forward and backward (a quarter of the time of the ops below at
            # B=32, L=200, d=64 on one thread)
            return stream_gate_cpu(streams, self.proj.weight, self.proj.bias)
        # a multiply-add per stream: stacking the streams into (..., n, d) copies them, and the product and its
        # gradients are then n times the size of the output (the gate's forward+backward took twice as long)
        alpha = self.weights(streams)  # (..., n, 1)
        out = streams[0] * alpha[..., 0, :]
        for i in range(1, self.n_streams):
            out = torch.addcmul(out, streams[i], alpha[..., i, :])
        return out
