"""Multi-scale Mamba: one Mamba per time scale s, run on the sequence averaged over non-overlapping windows of s steps.

Causal alignment (windows start at position 0): window k covers positions k·s .. k·s+s-1, so its coarse output is
known only once position k·s+s-1 has been seen. Position t therefore reads the output of the last complete window
ending at or before t, window (t+1)//s - 1; positions t < s-1 read zeros. For s = 2, L = 5:
    position   0    1    2    3    4
    reads      0    w0   w0   w1   w1       (w0 = positions 0-1, w1 = positions 2-3; position 4 opens no window)
A trailing incomplete window is never read, so it is not computed. With right padding, a window that holds padding
ends after the last real item and is only read at padding positions.

Step by step (`step`, for serving), scale s keeps the sum and count of its open window; when the window completes, its
mean is one step of the scale's Mamba, whose output the scale then repeats until the next window completes. The
scales' states are stacked and all scales step together, each kept only where its window completes (see `step`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.mamba import Mamba, step_stacked, step_weights
from .state import MultiScaleState, step_constant


def pool_windows(h: Tensor, scale: int) -> Tensor:
    """Mean over the complete windows of `scale` steps: (B, L, d) -> (B, L // scale, d)."""
    batch, length, d = h.shape
    n = length // scale
    return h[:, : n * scale].reshape(batch, n, scale, d).mean(dim=2)


def broadcast_windows(z: Tensor, scale: int, length: int) -> Tensor:
    """Position t gets window (t+1)//scale - 1 of z, zeros before the first complete window: (B, n, d) -> (B, L, d)."""
    batch, n, d = z.shape
    # each window repeated scale times, then shifted right by scale-1 behind zeros: position t reads repeat
    # t-scale+1, window (t+1)//scale - 1. A copy and a cat, whose backward is a sum over the repeats, where an
    # index of the zero-prefixed windows (and its scatter-add backward) took 40% longer at L=200 on CPU.
    repeated = z[:, :, None].expand(batch, n, scale, d).reshape(batch, n * scale, d)
    return torch.cat([z.new_zeros(batch, scale - 1, d), repeated[:, : length - scale + 1]], dim=1)


class MultiScaleMamba(nn.Module):
    """T = sum_s w_s · Up_s(Mamba_s(Pool_s(h))), with w = softmax over learned per-scale logits.

    With a single scale 1 this is exactly one Mamba (no pooling, no weights), the Mamba4Rec mixer.

    Args:
        hidden_size: model width d.
        scales: window lengths, e.g. [1, 2, 4]; distinct positive integers.
        d_state: Mamba SSM state size.
        d_conv: Mamba causal convolution width.
        expand: Mamba inner width factor.
        mamba_backend: Mamba implementation ("auto" picks the CUDA kernels when available).
    """

    def __init__(
        self,
        hidden_size: int,
        scales: list[int],
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        mamba_backend: Literal["auto", "torch", "cpu", "cuda", "triton"] = "auto",
    ) -> None:
        super().__init__()
        if not scales or any(s < 1 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct positive integers, got {scales}")
        self.scales = list(scales)
        self.mambas = nn.ModuleList(
            Mamba(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand, backend=mamba_backend) for _ in scales
        )
        self.scale_logits = None
        if len(scales) > 1:
            self.scale_logits = nn.Parameter(torch.zeros(len(scales)))  # equal weights at init
            self.scale_logits._no_weight_decay = True  # decay would pull the mix towards uniform, not towards 0

    def scale_weights(self) -> Tensor:
        """The mixing weights w_s, (n_scales,), summing to 1."""
        if self.scale_logits is None:
            return torch.ones(1, device=next(self.parameters()).device)
        return self.scale_logits.softmax(dim=0)

    def paths(self, h: Tensor) -> list[Tensor]:
        """Each scale's causal output Up_s(Mamba_s(Pool_s(h))), each (B, L, d)."""
        out = []
        for scale, mamba in zip(self.scales, self.mambas):
            if scale == 1:
                out.append(mamba(h))
            elif h.size(1) < scale:  # no complete window yet anywhere
                out.append(torch.zeros_like(h))
            else:
                out.append(broadcast_windows(mamba(pool_windows(h, scale)), scale, h.size(1)))
        return out

    def forward(self, h: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        return self.mix(self.paths(h))

    def forward_last(self, h: Tensor, index: Tensor) -> Tensor:  # (B, L, d), (B,) -> (B, d)
        """The output at position index[i] of each row i, each scale's Mamba run only as far as that needs."""
        paths = []
        for scale, mamba in zip(self.scales, self.mambas):
            if scale == 1:
                paths.append(mamba.forward_last(h, index))
                continue
            window = (index + 1) // scale - 1  # (B,) the last complete window at index; -1 = none yet
            if h.size(1) < scale:
                paths.append(h.new_zeros(h.size(0), h.size(2)))
                continue
            out = mamba.forward_last(pool_windows(h, scale), window.clamp(min=0))  # (B, d)
            paths.append(torch.where((window >= 0)[:, None], out, 0.0))
        return self.mix(paths)

    def mix(self, paths: list[Tensor]) -> Tensor:
        """sum_s w_s · path_s (the single path itself with one scale)."""
        if self.scale_logits is None:
            return paths[0]
        w = self.scale_weights().to(paths[0].dtype)
        out = paths[0] * w[0]
        for w_s, p in zip(w[1:], paths[1:]):  # fused multiply-adds, and no 0 + ... copy as sum() would start with
            out = torch.addcmul(out, p, w_s)
        return out

    def init_state(self, batch_size: int) -> MultiScaleState:
        """The state before the first input: empty windows, each Mamba's initial state, zero outputs."""
        empty = self.mambas[0].init_state(batch_size)
        n, w = len(self.scales), self.mambas[0].in_proj.weight
        return MultiScaleState(
            window_sum=w.new_zeros(batch_size, n, w.size(0)),
            window_count=torch.zeros(batch_size, n, dtype=torch.long, device=w.device),
            conv=empty.conv[:, None].repeat(1, n, 1, 1), ssm=empty.ssm[:, None].repeat(1, n, 1, 1),
            output=w.new_zeros(batch_size, n, w.size(1)),
        )

    def _step_constants(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, object]:
        """(in_proj / s of all scales stacked and transposed (d, S·2·E·D), its biases / s or None, window lengths s
        (S,), mixing weights (S,) or None with one scale, the Mambas' StepWeights)."""
        def compute():
            in_proj = [m.in_proj for m in self.mambas]
            scales = torch.tensor(self.scales, device=in_proj[0].weight.device)
            weight = torch.cat([p.weight / s for p, s in zip(in_proj, self.scales)]).T.contiguous()
            bias = torch.cat([p.bias / s for p, s in zip(in_proj, self.scales)]) if in_proj[0].bias is not None else None
            mix = self.scale_weights().to(weight.dtype) if self.scale_logits is not None else None
            return weight, bias, scales, mix, step_weights(list(self.mambas))

        return step_constant(self, "_step_constants_kept", [self], [], compute)

    def step(self, state: MultiScaleState, h: Tensor) -> tuple[MultiScaleState, Tensor]:
        """One more input per row: h (B, d) = input t -> (new state, (B, d) output at position t, as forward's).

        Every scale's Mamba steps on its open window's mean, and the result is kept only in the rows and scales whose
        window completes at t (always, for scale 1; the others step with Δ = 0, which leaves their scan state as it
        was): S Mamba steps as one cost less at small batches than stepping each scale on its own where needed, and
        need no host-side test of which windows complete. Inference: call it without autograd (M2RecEncoder.step
        does)."""
        weight, bias, scales, mix, mambas = self._step_constants()
        mean = torch.addmm(state.window_sum.flatten(1), h, weight).view_as(state.window_sum)  # (B, S, 2·E·D)
        if bias is not None:
            mean = mean + bias.view_as(mean[0])
        if max(self.scales) == 1:  # every window completes at every step
            window, ssm, out = step_stacked(mambas, state.conv, state.ssm, mean)
            new = MultiScaleState(state.window_sum, state.window_count, window[..., 1:], ssm, out)
        else:
            count = state.window_count + 1  # (B, S)
            complete = count == scales  # (B, S)
            done = complete.unsqueeze(-1)  # (B, S, 1)
            window, ssm, out = step_stacked(mambas, state.conv, state.ssm, mean, steps=done.to(mean.dtype))
            new = MultiScaleState(
                window_sum=mean.masked_fill(done, 0.0), window_count=count.masked_fill(complete, 0),
                conv=torch.where(done.unsqueeze(-1), window[..., 1:], state.conv), ssm=ssm,
                output=torch.where(done, out, state.output),
            )
        return new, new.output[:, 0] if mix is None else torch.matmul(mix, new.output)

    @torch.no_grad()
    def prefill(self, h: Tensor, lengths: Tensor) -> tuple[MultiScaleState, Tensor]:
        """The state after the first lengths[i] inputs of each row, and the output at position lengths[i] - 1:
        h (B, L, d), lengths (B,) in [1, L] -> (state, (B, d)). Any L: each Mamba reads the whole prefix."""
        sums, counts, convs, ssms, outs = [], [], [], [], []
        positions = torch.arange(h.size(1), device=h.device)  # (L,)
        for scale, mamba in zip(self.scales, self.mambas):
            windows = lengths // scale  # (B,) complete windows; the output at lengths-1 is the last one's
            state, out = mamba.prefill(h if scale == 1 else pool_windows(h, scale), windows)  # zero if no window
            start = windows * scale  # (B,) first position of the open window
            open_window = (positions >= start[:, None]) & (positions < lengths[:, None])  # (B, L)
            count = lengths - start  # (B,)
            # in_proj over the open window, summed and divided by s: (W · (sum of the inputs) + count · b) / s
            total = F.linear((h * open_window[:, :, None]).sum(dim=1), mamba.in_proj.weight)
            if mamba.in_proj.bias is not None:
                total = total + count[:, None] * mamba.in_proj.bias
            sums.append(total / scale)
            counts.append(count)
            convs.append(state.conv)
            ssms.append(state.ssm)
            outs.append(out)
        state = MultiScaleState(*(torch.stack(parts, dim=1) for parts in (sums, counts, convs, ssms, outs)))
        return state, self.mix(outs)
