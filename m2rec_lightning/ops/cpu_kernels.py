"""CPU kernels in compiled C++: Mamba's selective scan and causal depthwise conv + SiLU, Mamba's forward_last before
out_proj fused into one call, the serving steps (a Mamba step, a whole M2Rec block step), the Fourier filter's
convolution and its value at one step, the stream gate, the cross-entropy's passes over a chunk of logits, and
dropout.

Each has the PyTorch path it replaces as its reference (:func:`.selective_scan.selective_scan`,
:func:`.selective_scan.selective_scan_state`, :func:`.selective_scan.selective_scan_last`, the conv + SiLU of the
Mamba block, the PyTorch steps, the FFT convolution, the gate's ops, the chunked cross-entropy's tensor ops) and is
checked against it and, for the scans, against the float64 one-step reference.

Why: the PyTorch scan is bound by memory traffic (about four passes over the (batch, dim, dstate) state per step)
and by per-op dispatch; the conv pays a padded copy, a layout change and a separate activation pass. cpu_kernels.cpp
keeps one sequence's state in cache and does one vector exp2 and three multiply-adds per state cell, with the step
size's bias and softplus, the D skip and the silu(z) gate fused in, one OpenMP thread per sequence, and reads the
x/z halves of in_proj's output and the B/C columns of x_proj's in place. Forward keeps the state entering every chunk
of steps; backward recomputes a chunk's states from it, as mamba_ssm's CUDA kernel does. Dropout: ATen draws CPU
masks one element at a time from a Mersenne twister (bernoulli_ is vectorised only through MKL on Intel CPUs);
here a counter-based hash draws them in vector lanes, seeded from torch's generator.

The library is compiled on first use with the machine's g++ (about 3 s) into a cache folder, ``$M2REC_KERNEL_CACHE``
or ``~/.cache/m2rec/kernels``, under a name that hashes the source, the flags and the CPU, so a changed source or a
different machine builds anew. It is built with ``-march=native``: it is made for the machine that runs it.
:func:`cpu_kernels_unavailable` says why it cannot be used (no compiler, a failed build); Mamba's ``backend="auto"``
then falls back to the PyTorch paths.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from m2rec_lightning.ops.selective_scan import (
    _check_inputs,
    _check_state_inputs,
    _index_range_error,
    _scan_dtype,
    selective_scan,
    selective_scan_state,
)

SOURCE = Path(__file__).with_suffix(".cpp")
# Compiled with -ffast-math (vectorised min/max clamps and reassociated sums; NaN is still propagated, see fast_exp2
# and keep_nan), but linked without it: linking with -ffast-math adds a constructor that sets flush-to-zero for the
# whole process when the library loads, which would change every float operation of torch and of the user's code.
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17", "-c"]
LINK = ["-shared", "-fopenmp"]
CHUNK = 16  # steps per chunk: backward recomputes a chunk's states, (chunk+1)·dim·dstate values per thread


def _cpu_signature() -> str:
    """The CPU model and feature flags (a library built with -march=native runs only where they match)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return "\n".join([line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2])


def _cache_dir() -> Path:
    return Path(os.environ.get("M2REC_KERNEL_CACHE") or Path.home() / ".cache" / "m2rec" / "kernels")


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why it is unavailable). Builds it when the cache has none."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *COMPILE, *LINK]).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # build under a temporary name, then rename: concurrent processes (test workers) never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        obj = tmp[:-3] + ".o"
        try:
            for step in ([*COMPILE, "-o", obj, str(SOURCE)], [*LINK, "-o", tmp, obj]):
                result = subprocess.run([compiler, *step], capture_output=True, text=True)
                if result.returncode != 0:
                    return None, f"building {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-2000:]}"
            os.replace(tmp, path)
        except OSError as e:
            return None, f"building {SOURCE.name} failed: cannot run the compiler {compiler!r} ({e}); install g++ " \
                         f"or name one in $CXX"
        finally:
            for leftover in (tmp, obj):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e!r}"
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    dims = [c_int, i64, i64, i64, i64]  # is_double, batch, seqlen, dim, dstate (or conv width)
    lib.scan_forward.argtypes = [*dims, *[ptr] * 9, c_int, ptr, ptr, i64, c_int]
    lib.scan_state.argtypes = [*dims, *[ptr] * 6, c_int, ptr, ptr, c_int]
    lib.scan_backward.argtypes = [*dims, *[ptr] * 9, c_int, ptr, i64, *[ptr] * 9, c_int]
    lib.conv_forward.argtypes = [*dims, ptr, i64, ptr, ptr, ptr, c_int]
    lib.conv_backward.argtypes = [*dims, ptr, i64, *[ptr] * 6, c_int]
    lib.dropout_forward.argtypes = [c_int, ctypes.c_uint64, i64, ctypes.c_uint32, ctypes.c_double, ptr, ptr, ptr,
                                    c_int]
    for fn in (lib.scan_forward, lib.scan_backward, lib.conv_forward, lib.conv_backward, lib.dropout_forward,
               lib.causal_filter_last, lib.long_conv_forward, lib.long_conv_backward, lib.gate_forward,
               lib.gate_backward, lib.ce_chunk_forward, lib.ce_chunk_backward):
        fn.restype = None
    lib.mamba_last.argtypes = [c_int, *[i64] * 7, ptr, i64, i64, *[ptr] * 11, ptr, c_int]
    lib.causal_filter_last.argtypes = [c_int, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, c_int]
    lib.long_conv_forward.argtypes = [c_int, i64, i64, i64, ptr, ptr, ptr, c_int]
    lib.long_conv_backward.argtypes = [c_int, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.gate_forward.argtypes = [c_int, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.gate_backward.argtypes = [c_int, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.ce_chunk_forward.argtypes = [c_int, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
    f64 = ctypes.c_double
    lib.ce_chunk_backward.argtypes = [c_int, i64, i64, ptr, ptr, ptr, f64, f64, f64, c_int]
    for fn in (lib.scan_state, lib.mamba_last):
        fn.restype = c_int  # 0, or why nothing was written (see cpu_kernels.cpp)
    return lib, None


def cpu_kernels_unavailable() -> str | None:
    """None when the compiled kernels can run here, else why not (they are built on the first call)."""
    return _library()[1]


def _require(name: str) -> ctypes.CDLL:
    lib, why = _library()
    if why:
        raise RuntimeError(f"{name}: {why}")
    return lib


def _traced(name: str):
    """record_function(name) while torch.profiler records, where a ctypes call would be invisible otherwise; else a
    no-op context (record_function costs about 6 µs even with no profiler running)."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(batch: int) -> int:
    return max(1, min(torch.get_num_threads(), batch))


def _rows(t: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, int]:
    """A batch-major (b, L, k) tensor as the kernels read it: (t itself, its row stride) when its last dimension is
    contiguous and its rows (b, L) lie at one stride, e.g. a column slice of a (b, L, ·) matmul output; else a
    contiguous copy."""
    if t is None:
        return None, 0
    t = t.to(dtype)
    b, L, k = t.shape
    rs = t.stride(0) if L == 1 else t.stride(1)
    if (t.stride(2) == 1 or k == 1) and (b == 1 or L == 1 or t.stride(0) == L * rs):
        return t, rs
    t = t.contiguous()
    return t, k


class _SelectiveScanCpu(torch.autograd.Function):
    """Batch-major inputs: u, delta, z (b, L, d), B, C (b, L, n), each with its row stride in `strides`; A transposed,
    (n, d), contiguous; D, bias (d,). Returns y (b, L, d), contiguous."""

    @staticmethod
    def forward(ctx, u, delta, A_t, B, C, D, z, bias, strides: Tensor, delta_softplus: bool):
        b, L, d = u.shape
        n = A_t.shape[0]
        out = u.new_empty(b, L, d)
        # forward runs with autograd off: needs_input_grad says whether a backward will come
        hsave = u.new_empty(b, -(-L // CHUNK), n, d) if any(ctx.needs_input_grad) else None
        with _traced("selective_scan_cpu"):
            _library()[0].scan_forward(u.dtype == torch.float64, b, L, d, n, _ptr(u), _ptr(delta), _ptr(A_t),
                                       _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(bias), _ptr(strides), delta_softplus,
                                       _ptr(out), _ptr(hsave), CHUNK, _threads(b))
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A_t, B, C, D, z, bias, strides, hsave)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        u, delta, A_t, B, C, D, z, bias, strides, hsave = ctx.saved_tensors
        b, L, d = u.shape
        n = A_t.shape[0]
        gout = gout.contiguous()
        g_u, g_delta = u.new_empty(b, L, d), u.new_empty(b, L, d)
        g_z = u.new_empty(b, L, d) if z is not None else None
        gB, gC = u.new_empty(b, L, n), u.new_empty(b, L, n)
        gA_t = torch.zeros_like(A_t)
        gD = torch.zeros_like(D) if D is not None else None
        g_bias = torch.zeros_like(bias) if bias is not None else None
        with _traced("selective_scan_cpu_backward"):
            _library()[0].scan_backward(
                u.dtype == torch.float64, b, L, d, n, _ptr(u), _ptr(delta), _ptr(A_t), _ptr(B), _ptr(C), _ptr(D),
                _ptr(z), _ptr(bias), _ptr(strides), ctx.delta_softplus, _ptr(hsave), CHUNK, _ptr(gout), _ptr(g_u),
                _ptr(g_delta), _ptr(g_z), _ptr(gB), _ptr(gC), _ptr(gA_t), _ptr(gD), _ptr(g_bias), _threads(b))
        return g_u, g_delta, gA_t, gB, gC, gD, g_z, g_bias, None, None


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None or (t.dtype == dtype and t.is_contiguous()):  # (the checks cost a tenth of two no-op calls)
        return t
    return t.to(dtype).contiguous()


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """The selective scan of :func:`~m2rec_lightning.ops.selective_scan.selective_scan_ref` (same arguments, shapes
    and result), compiled, on CPU tensors. Differentiable in every input. y: (batch, dim, seqlen) in u's dtype; the
    recurrence runs in float32 (float64 for float64 inputs). Inputs that are transposed views of batch-major
    (batch, seqlen, ·) tensors, as the Mamba block passes them, are read in place. A NaN in A (a diverged model) is
    left to the PyTorch scan, which propagates it: the kernel's exp does not look for NaN."""
    _require("selective_scan_cpu")
    B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda:
        raise ValueError("selective_scan_cpu: CPU tensors only; on a GPU use the cuda or triton backend")
    if A.isnan().any():
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype_in, dtype = u.dtype, _scan_dtype(u)
    with torch.autocast("cpu", enabled=False):
        (u, su), (delta, sdelta), (B, sB), (C, sC), (z, sz) = (_rows(None if t is None else t.transpose(1, 2), dtype)
                                                              for t in (u, delta, B, C, z))
        strides = torch.tensor([su, sdelta, sB, sC, sz], dtype=torch.int64)
        y = _SelectiveScanCpu.apply(u, delta, A.to(dtype).t().contiguous(), B, C, _vector(D, dtype), z,
                                    _vector(delta_bias, dtype), strides, delta_softplus)  # (b, L, d)
    return y.transpose(1, 2).to(dtype_in)


@torch.no_grad()
def selective_scan_state_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, index: Tensor,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """:func:`~m2rec_lightning.ops.selective_scan.selective_scan_state`, compiled: the state h at step index[i] of each
    row i, (batch, dim, dstate), float32 (float64 for float64 inputs). Each row runs only up to its own index. The
    kernel checks the index range and A for NaN itself (no tensor reductions or host syncs per call); a NaN in A goes
    to the PyTorch scan, as in :func:`selective_scan_cpu`."""
    _require("selective_scan_state_cpu")
    B = _check_state_inputs("selective_scan_state_cpu", u, delta, A, B, index, delta_bias, index_range=False)
    batch, dim, seqlen = u.shape
    dtype = _scan_dtype(u)
    out = u.new_empty(batch, dim, A.shape[1], dtype=dtype)
    if batch == 0:
        return out
    with torch.autocast("cpu", enabled=False):
        (u_, su), (delta_, sdelta), (B_, sB) = (_rows(t.transpose(1, 2), dtype) for t in (u, delta, B))
        strides = torch.tensor([su, sdelta, sB, 0, 0], dtype=torch.int64)
        A_t, bias = A.to(dtype).t().contiguous(), _vector(delta_bias, dtype)
        index = index.to(torch.int64).contiguous()
        with _traced("selective_scan_state_cpu"):
            status = _library()[0].scan_state(dtype == torch.float64, batch, seqlen, dim, A.shape[1], _ptr(u_),
                                              _ptr(delta_), _ptr(A_t), _ptr(B_), _ptr(bias), _ptr(strides),
                                              delta_softplus, _ptr(index), _ptr(out), _threads(batch))
    if status == 1:
        raise _index_range_error("selective_scan_state_cpu", index, seqlen)
    if status == 2:  # a NaN in A (a diverged model): the PyTorch scan propagates it
        return selective_scan_state(u, delta, A, B, index, delta_bias, delta_softplus)
    return out


@torch.no_grad()
def mamba_last_cpu(hidden: Tensor, index: Tensor, w_x: Tensor, b_x: Tensor | None, conv_w: Tensor,
                   conv_b: Tensor | None, x_proj: Tensor, dt_proj: Tensor, dt_bias: Tensor, A: Tensor,
                   D: Tensor | None, z: Tensor | None) -> Tensor:
    """A Mamba block's forward_last before out_proj, in one compiled call: in_proj's x half, the causal conv and SiLU,
    x_proj, dt_proj, softplus and the state-only scan over each row's steps 0 .. index[i], then the output there,
    ``(C·h + D·u)·silu(z)``, with C from x_proj at the index alone. The same as Mamba's `_last_inputs` followed by
    :func:`~m2rec_lightning.ops.selective_scan.selective_scan_last`, without their (batch, seqlen, ·) tensors.

    Args:
        hidden: (batch, seqlen, d_model) the block's inputs.
        index: (batch,) integer step of each row, in [0, seqlen).
        w_x, b_x: (d_model, E·D) in_proj's x rows transposed, and their bias (E·D,) or None.
        conv_w, conv_b: (K, E·D) the depthwise conv's taps (tap K-1 meets the current step), bias (E·D,) or None.
        x_proj: (E·D, R + 2N) x_proj's weight transposed (rows: Δ's rank-R input, B, C).
        dt_proj, dt_bias: (R, E·D) dt_proj's weight transposed, and its bias (E·D,).
        A, D: (E·D, N) and (E·D,) or None, as the scan takes them.
        z: (batch, E·D) the gate's input (in_proj's z half) at each row's index, or None.

    Returns:
        (batch, E·D) float32 (float64 for a float64 `hidden`). Weights in another dtype or not contiguous are
        converted (Mamba keeps them converted: see Mamba._cpu_last_weights); their layouts are the caller's to give.
    """
    _require("mamba_last_cpu")
    batch, seqlen, d_model = hidden.shape
    dim, n = A.shape
    rank = x_proj.shape[1] - 2 * n
    dtype = _scan_dtype(hidden)
    if w_x.shape != (d_model, dim) or conv_w.dim() != 2 or conv_w.shape[1] != dim or x_proj.shape[0] != dim \
            or rank < 1 or dt_proj.shape != (rank, dim) or index.shape != (batch,):
        raise ValueError(f"mamba_last_cpu: inconsistent shapes: hidden {tuple(hidden.shape)}, w_x {tuple(w_x.shape)}, "
                         f"conv_w {tuple(conv_w.shape)}, x_proj {tuple(x_proj.shape)}, dt_proj {tuple(dt_proj.shape)}, "
                         f"A {tuple(A.shape)}, index {tuple(index.shape)}")
    if z is not None and z.shape != (batch, dim):
        raise ValueError(f"mamba_last_cpu: z must be (batch={batch}, E·D={dim}), got {tuple(z.shape)}")
    y = hidden.new_empty(batch, dim, dtype=dtype)
    if batch == 0:
        return y
    hidden = hidden.to(dtype)
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    w_x, conv_w, x_proj, dt_proj, A = (_vector(t, dtype) for t in (w_x, conv_w, x_proj, dt_proj, A))
    b_x, conv_b, dt_bias, D, z = (_vector(t, dtype) for t in (b_x, conv_b, dt_bias, D, z))
    index = index.to(torch.int64).contiguous()
    with _traced("mamba_last_cpu"):
        status = _library()[0].mamba_last(
            dtype == torch.float64, batch, seqlen, d_model, dim, n, rank, conv_w.shape[0], _ptr(hidden),
            hidden.stride(0), hidden.stride(1), _ptr(w_x), _ptr(b_x), _ptr(conv_w), _ptr(conv_b), _ptr(x_proj),
            _ptr(dt_proj), _ptr(dt_bias), _ptr(A), _ptr(D), _ptr(z), _ptr(index), _ptr(y), _threads(batch))
    if status == 1:
        raise _index_range_error("mamba_last_cpu", index, seqlen)
    if status == 2:
        raise FloatingPointError("mamba_last_cpu: A holds a NaN; use the PyTorch path, which propagates it")
    return y


@torch.no_grad()
def causal_filter_last_cpu(h: Tensor, kernel: Tensor, index: Tensor) -> Tensor:
    """The causal long convolution y_t = sum_{s <= t} kernel[t - s] h_s (channel-wise) at t = index[i] of each row:
    h (batch, seqlen, d), kernel (>= seqlen, d), index (batch,) in [0, seqlen) -> (batch, d), in h's dtype (float32 or
    float64). CausalFourierFilter.forward_last's sum, without its (batch, seqlen, d) gather of the kernel."""
    _require("causal_filter_last_cpu")
    batch, seqlen, d = h.shape
    if kernel.dim() != 2 or kernel.shape[0] < seqlen or kernel.shape[1] != d or index.shape != (batch,):
        raise ValueError(f"causal_filter_last_cpu: h (batch, seqlen, d), kernel (>= seqlen, d), index (batch,); got "
                         f"{tuple(h.shape)}, {tuple(kernel.shape)}, {tuple(index.shape)}")
    if h.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"causal_filter_last_cpu: float32 or float64 inputs, got {h.dtype}")
    if batch and (int(index.min()) < 0 or int(index.max()) >= seqlen):
        raise _index_range_error("causal_filter_last_cpu", index, seqlen)
    if h.stride(2) != 1:
        h = h.contiguous()
    kernel, index = _vector(kernel, h.dtype), index.to(torch.int64).contiguous()
    y = h.new_empty(batch, d)
    with _traced("causal_filter_last_cpu"):
        _library()[0].causal_filter_last(h.dtype == torch.float64, batch, seqlen, d, _ptr(h), h.stride(0),
                                         h.stride(1), _ptr(kernel), _ptr(index), _ptr(y), _threads(batch))
    return y


class _LongConvCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor) -> Tensor:  # (b, L, d), (L, d), contiguous, one dtype
        batch, length, d = x.shape
        y = torch.empty_like(x)
        with _traced("causal_long_conv_cpu"):
            _library()[0].long_conv_forward(x.dtype == torch.float64, batch, length, d, _ptr(x), _ptr(k), _ptr(y),
                                            _threads(batch))
        ctx.save_for_backward(x, k)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, k = ctx.saved_tensors
        batch, length, d = x.shape
        gy = gy.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        with _traced("causal_long_conv_cpu_backward"):
            _library()[0].long_conv_backward(x.dtype == torch.float64, batch, length, d, _ptr(x), _ptr(k), _ptr(gy),
                                             _ptr(gx), _ptr(gk), _threads(batch))
        return gx, gk


def causal_long_conv_cpu(x: Tensor, k: Tensor) -> Tensor:
    """y[t] = sum_{j <= t} k[j] x[t-j] along time, channel-wise: x (batch, L, d), k (L, d) -> (batch, L, d), float32 or
    float64 (the two alike), differentiable in both. The causal Fourier filter's convolution, computed directly: at
    L = 50 (B=32, d=64, one thread) forward and backward take a fraction of the FFT path's time."""
    _require("causal_long_conv_cpu")
    if x.dim() != 3 or k.shape != x.shape[1:] or x.dtype != k.dtype or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"causal_long_conv_cpu: x (batch, L, d) and k (L, d) of one float dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(k.shape)} {k.dtype}")
    return _LongConvCpu.apply(x.contiguous(), k.contiguous())


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


class _StreamGateCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, *streams: Tensor) -> Tensor:  # (n, n d), (n,), n x (P, d)
        P, d = streams[0].shape
        n = len(streams)
        out, alpha = streams[0].new_empty(P, d), streams[0].new_empty(P, n)
        with _traced("stream_gate_cpu"):
            _library()[0].gate_forward(out.dtype == torch.float64, P, n, d, _pointers(streams), _ptr(weight),
                                       _ptr(bias), _ptr(out), _ptr(alpha), _threads(P))
        ctx.save_for_backward(weight, alpha, *streams)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor):
        weight, alpha, *streams = ctx.saved_tensors
        P, d = streams[0].shape
        n = len(streams)
        gout = gout.contiguous()
        gs = [torch.empty_like(t) for t in streams]
        gW, gb = torch.empty_like(weight), weight.new_empty(n)
        with _traced("stream_gate_cpu_backward"):
            _library()[0].gate_backward(gout.dtype == torch.float64, P, n, d, _pointers(streams), _ptr(weight),
                                        _ptr(alpha), _ptr(gout), _pointers(gs), _ptr(gW), _ptr(gb), _threads(P))
        return (gW, gb, *gs)


def stream_gate_cpu(streams: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
    """StreamGate's softmax fusion, compiled: streams n x (..., d), weight (n, n·d), bias (n,) -> (..., d) =
    sum_i alpha_i s_i with alpha = softmax(weight [s_1; ...; s_n] + bias) per position; float32 or float64 (all alike),
    differentiable in everything."""
    _require("stream_gate_cpu")
    shape, d, n = streams[0].shape, streams[0].shape[-1], len(streams)
    dtype = streams[0].dtype
    if any(t.shape != shape or t.dtype != dtype for t in streams) or weight.shape != (n, n * d) \
            or bias.shape != (n,) or dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stream_gate_cpu: n streams of one shape (..., d) and float dtype, weight (n, n·d), bias "
                         f"(n,); got {[tuple(t.shape) for t in streams]}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    flat = [t.reshape(-1, d).contiguous() for t in streams]
    out = _StreamGateCpu.apply(weight.to(dtype).contiguous(), bias.to(dtype).contiguous(), *flat)
    return out.view(shape)


def ce_chunk_forward_cpu(z: Tensor, target: Tensor, run_max: Tensor, run_sum: Tensor, target_logit: Tensor,
                         logit_sum: Tensor | None) -> None:
    """One chunk of chunked_cross_entropy's forward, in place: z (M, C) the chunk's logits (overwritten: scratch),
    target (M,) each row's target index in the chunk or -1; run_max, run_sum (M,) logsumexp's running max and sum of
    exp(z - max), updated with the chunk; target_logit (M,) set where the target lies in it; logit_sum (M,) or None,
    the logits' sum added. All contiguous, float32 or float64 (one dtype)."""
    with _traced("ce_chunk_forward_cpu"):
        _library()[0].ce_chunk_forward(z.dtype == torch.float64, z.size(0), z.size(1), _ptr(z), _ptr(target),
                                       _ptr(run_max), _ptr(run_sum), _ptr(target_logit), _ptr(logit_sum),
                                       _threads(z.size(0)))


def ce_chunk_backward_cpu(z: Tensor, target: Tensor, lse: Tensor, eps_over_n: float, target_term: float,
                          scale: float) -> None:
    """One chunk of chunked_cross_entropy's backward, in place: z (M, C) <- scale · (exp(z - lse) - eps_over_n), plus
    scale · target_term at each row's target index in the chunk (target (M,), -1 where it is not)."""
    with _traced("ce_chunk_backward_cpu"):
        _library()[0].ce_chunk_backward(z.dtype == torch.float64, z.size(0), z.size(1), _ptr(z), _ptr(target),
                                        _ptr(lse), eps_over_n, target_term, scale, _threads(z.size(0)))


class _CausalConvSiluCpu(torch.autograd.Function):
    """x (b, L, d) with row stride `stride`; w (K, d), bias (d,) contiguous. Returns silu(conv(x)), (b, L, d)."""

    @staticmethod
    def forward(ctx, x, w, bias, stride: int):
        b, L, d = x.shape
        y = x.new_empty(b, L, d)
        with _traced("causal_conv1d_silu_cpu"):
            _library()[0].conv_forward(x.dtype == torch.float64, b, L, d, w.shape[0], _ptr(x), stride, _ptr(w),
                                       _ptr(bias), _ptr(y), _threads(b))
        ctx.stride = stride
        ctx.save_for_backward(x, w, bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w, bias = ctx.saved_tensors
        b, L, d = x.shape
        gx, gw = x.new_empty(b, L, d), torch.zeros_like(w)
        g_bias = torch.zeros_like(bias) if bias is not None else None
        with _traced("causal_conv1d_silu_cpu_backward"):
            _library()[0].conv_backward(x.dtype == torch.float64, b, L, d, w.shape[0], _ptr(x), ctx.stride, _ptr(w),
                                        _ptr(bias), _ptr(gy.contiguous()), _ptr(gx), _ptr(gw), _ptr(g_bias),
                                        _threads(b))
        return gx, gw, g_bias, None


def causal_conv1d_silu_cpu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """silu of the causal depthwise convolution, channels last: x (batch, seqlen, dim), weight (dim, K) (tap K-1 meets
    the current step), bias (dim,) -> (batch, seqlen, dim), y_t = silu(bias + sum_j weight[:, j] x_{t-K+1+j}) with
    zeros before the start; what Mamba's conv1d with padding K-1, cropped to seqlen, then SiLU compute. Differentiable
    in x, weight and bias; x may be a column slice of a larger (batch, seqlen, ·) tensor (read in place)."""
    _require("causal_conv1d_silu_cpu")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d_silu_cpu: x must be (batch, seqlen, dim) and weight (dim, K), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"causal_conv1d_silu_cpu: bias must be (dim={x.shape[2]},), got {tuple(bias.shape)}")
    if x.is_cuda:
        raise ValueError("causal_conv1d_silu_cpu: CPU tensors only")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast("cpu", enabled=False):
        x_, stride = _rows(x, dtype)
        y = _CausalConvSiluCpu.apply(x_, weight.to(dtype).t().contiguous(), _vector(bias, dtype), stride)
    return y.to(x.dtype)


class _DropoutCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        x = x.contiguous()
        y, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
        scale = 1.0 / (1.0 - p)
        seed = int(torch.randint(0, 2**62, ()))  # from torch's generator: seeded runs repeat their masks
        threshold = min(round(p * 2**32), 2**32 - 1)  # keep when a uniform 32-bit draw >= threshold
        with _traced("dropout_cpu"):
            _library()[0].dropout_forward(x.dtype == torch.float64, seed, x.numel(), threshold, scale, _ptr(x),
                                          _ptr(y), _ptr(keep), torch.get_num_threads())
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        (keep,) = ctx.saved_tensors
        return gy * keep * ctx.scale, None


def dropout_cpu(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout of a float32 or float64 CPU tensor: each element kept with probability 1 - p (to 2^-32)
    and scaled by 1 / (1 - p), independently; the same law as ``F.dropout(x, p, training=True)``, drawn by the
    compiled kernel. The mask is stored as one byte per element for the backward."""
    _require("dropout_cpu")
    if x.is_cuda or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dropout_cpu: float32 or float64 CPU tensors only, got {x.dtype} on {x.device}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_cpu: p must lie in [0, 1), got {p}")
    return _DropoutCpu.apply(x, p)


# Serving steps (cpu_kernels.cpp, "Serving steps"): one more input per row in one call, where a step in PyTorch is
# dozens of small ops whose dispatch, at a server's small batches, costs more than their arithmetic.

_i64, _void_p = ctypes.c_int64, ctypes.c_void_p


class MambaStepWeights(ctypes.Structure):
    """S Mambas' step constants (ops/mamba.py StepWeights) as mamba_step reads them; `tensors` keeps their memory."""

    _fields_ = [*((name, _i64) for name in ("stack", "d_model", "inner", "dstate", "width")),
                *((name, _void_p) for name in ("conv_weight", "conv_bias", "x_proj", "dt_bias", "A", "D", "out_proj",
                                               "out_bias"))]


class BlockStepWeights(ctypes.Structure):
    """One M2Rec block's step constants as m2rec_block_step reads them (the BlockStep of cpu_kernels.cpp says what
    each is); `tensors` keeps their memory."""

    _fields_ = [("mamba", MambaStepWeights), ("in_proj", _void_p), ("in_bias", _void_p), ("scales", _void_p),
                ("mix", _void_p), ("taps", _i64), ("kernel", _void_p), ("streams", _i64), ("gate", ctypes.c_int),
                ("gate_weight", _void_p), ("gate_bias", _void_p), ("residual", ctypes.c_int),
                ("skip_weight", _void_p), ("skip_bias", _void_p), ("norm_weight", _void_p), ("norm_bias", _void_p),
                ("norm_eps", ctypes.c_double), ("ffn_inner", _i64), ("w1", _void_p), ("b1", _void_p),
                ("w2", _void_p), ("b2", _void_p), ("ffn_norm_weight", _void_p), ("ffn_norm_bias", _void_p),
                ("ffn_norm_eps", ctypes.c_double)]


@functools.cache
def _step_library() -> ctypes.CDLL:
    lib = _require("the compiled serving step")
    lib.mamba_step.argtypes = [ctypes.c_int, ctypes.POINTER(MambaStepWeights), _i64, *[_void_p] * 7, ctypes.c_int]
    lib.m2rec_block_step.argtypes = [ctypes.c_int, ctypes.POINTER(BlockStepWeights), _i64, *[_void_p] * 15,
                                     ctypes.c_int]
    lib.mamba_step.restype = lib.m2rec_block_step.restype = None
    return lib


def _pack(struct: type[ctypes.Structure], dtype: torch.dtype, sizes: dict, tensors: dict[str, Tensor | None],
          **rest) -> ctypes.Structure:
    """struct with sizes, rest and pointers to tensors, made contiguous, the floating-point ones in dtype."""
    tensors = {k: None if t is None else (t.detach().to(dtype) if t.is_floating_point() else t).contiguous()
               for k, t in tensors.items()}
    packed = struct(**sizes, **rest, **{k: _ptr(t) for k, t in tensors.items()})
    packed.dtype, packed.tensors = dtype, tensors
    return packed


def pack_mamba_step(conv_weight: Tensor, conv_bias: Tensor | None, x_proj: Tensor, dt_bias: Tensor, A: Tensor,
                    D: Tensor, out_proj: Tensor, out_bias: Tensor | None) -> MambaStepWeights | None:
    """The step constants of S stacked Mambas (StepWeights' fields and shapes) for :func:`mamba_step_cpu`, or None
    where the compiled step does not apply: the kernels do not build here, the weights are not float32/float64 CPU
    tensors, or A holds a NaN (a diverged model, left to PyTorch, which propagates it: see selective_scan_cpu)."""
    dtype = x_proj.dtype
    if cpu_kernels_unavailable() or x_proj.is_cuda or dtype not in (torch.float32, torch.float64) \
            or A.dtype != dtype or A.isnan().any():
        return None
    stack, inner, width = conv_weight.shape
    sizes = dict(stack=stack, d_model=out_proj.shape[-1], inner=inner, dstate=A.shape[-1], width=width)
    return _pack(MambaStepWeights, dtype, sizes, dict(conv_weight=conv_weight, conv_bias=conv_bias, x_proj=x_proj,
                                                      dt_bias=dt_bias, A=A, D=D, out_proj=out_proj, out_bias=out_bias))


def pack_block_step(mamba: MambaStepWeights, scales: Tensor, semantic: bool, gate: int, residual: int,
                    norm_eps: float, ffn_norm_eps: float, **tensors: Tensor | None) -> BlockStepWeights:
    """One M2Rec block's step constants for :func:`m2rec_block_step_cpu`: mamba from :func:`pack_mamba_step`, scales
    (S,) int64 window lengths, whether a semantic stream comes in, gate 0/1/2 (none, sum, softmax), residual 0/1/2
    (none, plain, gated), the LayerNorms' epsilons, and as tensors every matrix (in, out) and vector that BlockStep
    names (absent ones None; kernel (taps, d) or None without the Fourier stream)."""
    taps = 0 if tensors["kernel"] is None else tensors["kernel"].shape[0]
    streams = 1 + (taps > 0) + semantic
    packed = _pack(BlockStepWeights, mamba.dtype, dict(taps=taps, streams=streams, ffn_inner=tensors["b1"].shape[0]),
                   dict(scales=scales, **tensors), mamba=mamba, gate=gate, residual=residual, norm_eps=norm_eps,
                   ffn_norm_eps=ffn_norm_eps)
    packed.tensors["mamba"] = mamba  # the copy in the struct points into mamba's tensors
    return packed


def _contiguous(t: Tensor, name: str, shape: tuple, dtype: torch.dtype) -> Tensor:
    if t.shape != shape or t.dtype != dtype or t.is_cuda:
        raise ValueError(f"compiled step: {name} must be a {dtype} CPU tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")
    return t.contiguous()


def mamba_step_cpu(weights: MambaStepWeights, conv: Tensor, ssm: Tensor, xz: Tensor,
                   steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~m2rec_lightning.ops.mamba.step_stacked`, compiled (same arguments, shapes and results, in the weights'
    dtype): conv (B, S, E·D, d_conv-1), ssm (B, S, E·D, N), xz (B, S, 2·E·D), steps (B, S, 1) of 1 and 0 or None ->
    (window (B, S, E·D, d_conv), ssm, y (B, S, d_model))."""
    w, dtype = weights, weights.dtype
    batch = xz.shape[0]
    conv = _contiguous(conv, "conv", (batch, w.stack, w.inner, w.width - 1), dtype)
    ssm = _contiguous(ssm, "ssm", (batch, w.stack, w.inner, w.dstate), dtype)
    xz = _contiguous(xz, "xz", (batch, w.stack, 2 * w.inner), dtype)
    steps = None if steps is None else _contiguous(steps, "steps", (batch, w.stack, 1), dtype)
    window, h, y = xz.new_empty(batch, w.stack, w.inner, w.width), torch.empty_like(ssm), xz.new_empty(
        batch, w.stack, w.d_model)
    with _traced("mamba_step_cpu"):
        _step_library().mamba_step(dtype == torch.float64, ctypes.byref(w), batch, _ptr(conv), _ptr(ssm), _ptr(xz),
                                   _ptr(steps), _ptr(window), _ptr(h), _ptr(y), _threads(batch * w.stack))
    return window, h, y


def m2rec_block_step_cpu(weights: BlockStepWeights, h: Tensor, semantic: Tensor | None, window_sum: Tensor,
                         window_count: Tensor, conv: Tensor, ssm: Tensor, output: Tensor,
                         fourier: Tensor | None) -> tuple[tuple[Tensor, ...], Tensor]:
    """M2RecBlock.step, compiled: h (B, d) the block's input, semantic (B, d) or None, and the block's state (the
    fields of MultiScaleState, then the Fourier history (B, taps, d) or None) -> (the new state, fields in that order,
    (B, d) the block's output). The state passed in is not changed."""
    w, m, dtype = weights, weights.mamba, weights.dtype
    batch, d = h.shape[0], m.d_model
    state = [_contiguous(t, name, shape, dtype if name != "window_count" else torch.int64) for t, name, shape in (
        (window_sum, "window_sum", (batch, m.stack, 2 * m.inner)), (window_count, "window_count", (batch, m.stack)),
        (conv, "conv", (batch, m.stack, m.inner, m.width - 1)), (ssm, "ssm", (batch, m.stack, m.inner, m.dstate)),
        (output, "output", (batch, m.stack, d)), *([(fourier, "fourier", (batch, w.taps, d))] if w.taps else []))]
    h = _contiguous(h, "h", (batch, d), dtype)
    semantic = None if semantic is None else _contiguous(semantic, "semantic", (batch, d), dtype)
    new = [torch.empty_like(t) for t in state]
    y = h.new_empty(batch, d)
    fourier_in, fourier_out = (state[5], new[5]) if w.taps else (None, None)
    with _traced("m2rec_block_step_cpu"):
        _step_library().m2rec_block_step(
            dtype == torch.float64, ctypes.byref(w), batch, _ptr(h), _ptr(semantic), *map(_ptr, state[:5]),
            _ptr(fourier_in), *map(_ptr, new[:5]), _ptr(fourier_out), _ptr(y), _threads(batch))
    return (*new[:5], fourier_out), y
