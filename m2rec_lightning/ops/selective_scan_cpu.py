"""Selective scan for the CPU in compiled C++: same signature and result as :mod:`.selective_scan`'s PyTorch scan.

The PyTorch scan is bound by memory traffic (about four passes over the (batch, dim, dstate) state per step) and by
per-op dispatch. selective_scan_cpu.cpp keeps one batch row's state in L1 and does one vector exp and three
multiply-adds per state cell, with the bias/softplus of the step size, the D skip and the silu(z) gate fused in, one
OpenMP thread per batch row. Forward keeps the state entering every chunk of steps; backward recomputes the chunk's
states from it, as mamba_ssm's CUDA kernel does.

The library is compiled on first use with the machine's g++ (about 3 s) into a cache folder, ``$M2REC_KERNEL_CACHE``
or ``~/.cache/m2rec/kernels``, under a name that hashes the source, the flags and the CPU, so a changed source or a
different machine builds anew. It is built with ``-march=native``: it is made for the machine that runs it.
:func:`cpu_scan_unavailable` says why it cannot be used (no compiler, a failed build); Mamba's ``backend="auto"`` then
falls back to the PyTorch scan.
"""

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

from m2rec_lightning.ops.selective_scan import _check_inputs, _check_state_inputs, _scan_dtype

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
CHUNK = 16  # steps per chunk: backward recomputes a chunk's states, (chunk+1)·dim·dstate values per thread


def _cpu_signature() -> str:
    """The CPU model and feature flags (a library built with -march=native runs only where they match)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _cache_dir() -> Path:
    return Path(os.environ.get("M2REC_KERNEL_CACHE") or Path.home() / ".cache" / "m2rec" / "kernels")


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why it is unavailable). Builds it when the cache has none."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"selective_scan_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # build under a temporary name, then rename: concurrent processes (test workers) never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if result.returncode != 0:
                return None, f"building {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-2000:]}"
            os.replace(tmp, path)
        except OSError as e:
            return None, f"building {SOURCE.name} failed: cannot run the compiler {compiler!r} ({e}); install g++ " \
                         f"or name one in $CXX"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e!r}"
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.scan_forward.argtypes = [c_int, i64, i64, i64, i64, *[ptr] * 8, c_int, ptr, ptr, i64, c_int]
    lib.scan_state.argtypes = [c_int, i64, i64, i64, i64, *[ptr] * 5, c_int, ptr, ptr, c_int]
    lib.scan_backward.argtypes = [c_int, i64, i64, i64, i64, *[ptr] * 8, c_int, ptr, i64, *[ptr] * 9, c_int]
    for fn in (lib.scan_forward, lib.scan_state, lib.scan_backward):
        fn.restype = None
    return lib, None


def cpu_scan_unavailable() -> str | None:
    """None when the compiled scan can run here, else why not (it is built on the first call)."""
    return _library()[1]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(batch: int) -> int:
    return max(1, min(torch.get_num_threads(), batch))


class _SelectiveScanCpu(torch.autograd.Function):
    """Inputs batch-major and contiguous: u, delta, z (b, L, d); B, C (b, L, n); A transposed, (n, d); D, bias (d,)."""

    @staticmethod
    def forward(ctx, u, delta, A_t, B, C, D, z, bias, delta_softplus: bool):
        b, L, d = u.shape
        n = A_t.shape[0]
        lib = _library()[0]
        out = torch.empty_like(u)
        # forward runs with autograd off: needs_input_grad says whether a backward will come
        hsave = u.new_empty(b, -(-L // CHUNK), n, d) if any(ctx.needs_input_grad) else None
        lib.scan_forward(u.dtype == torch.float64, b, L, d, n, _ptr(u), _ptr(delta), _ptr(A_t), _ptr(B), _ptr(C),
                         _ptr(D), _ptr(z), _ptr(bias), delta_softplus, _ptr(out), _ptr(hsave), CHUNK, _threads(b))
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A_t, B, C, D, z, bias, hsave)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        u, delta, A_t, B, C, D, z, bias, hsave = ctx.saved_tensors
        b, L, d = u.shape
        n = A_t.shape[0]
        gout = gout.contiguous()
        g_u, g_delta = torch.empty_like(u), torch.empty_like(delta)
        g_z = torch.empty_like(z) if z is not None else None
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA_t = torch.zeros_like(A_t)
        gD = torch.zeros_like(D) if D is not None else None
        g_bias = torch.zeros_like(bias) if bias is not None else None
        _library()[0].scan_backward(
            u.dtype == torch.float64, b, L, d, n, _ptr(u), _ptr(delta), _ptr(A_t), _ptr(B), _ptr(C), _ptr(D),
            _ptr(z), _ptr(bias), ctx.delta_softplus, _ptr(hsave), CHUNK, _ptr(gout), _ptr(g_u), _ptr(g_delta),
            _ptr(g_z), _ptr(gB), _ptr(gC), _ptr(gA_t), _ptr(gD), _ptr(g_bias), _threads(b))
        return g_u, g_delta, gA_t, gB, gC, gD, g_z, g_bias, None


def _require() -> None:
    why = cpu_scan_unavailable()
    if why:
        raise RuntimeError(f"selective_scan_cpu: {why}")


def _batch_major(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(b, ·, L) -> contiguous (b, L, ·): no copy when t is already a transposed view of that layout."""
    return None if t is None else t.to(dtype).transpose(1, 2).contiguous()


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """The selective scan of :func:`~m2rec_lightning.ops.selective_scan.selective_scan_ref` (same arguments, shapes
    and result), compiled, on CPU tensors. Differentiable in every input. y: (batch, dim, seqlen) in u's dtype; the
    recurrence runs in float32 (float64 for float64 inputs)."""
    _require()
    B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda:
        raise ValueError("selective_scan_cpu: CPU tensors only; on a GPU use the cuda or triton backend")
    dtype_in, dtype = u.dtype, _scan_dtype(u)
    with torch.autocast("cpu", enabled=False):
        bm = lambda t: _batch_major(t, dtype)  # noqa: E731
        y = _SelectiveScanCpu.apply(bm(u), bm(delta), A.to(dtype).t().contiguous(), bm(B), bm(C),
                                    _vector(D, dtype), bm(z), _vector(delta_bias, dtype), delta_softplus)  # (b, L, d)
    return y.transpose(1, 2).to(dtype_in)


@torch.no_grad()
def selective_scan_state_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, index: Tensor,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """:func:`~m2rec_lightning.ops.selective_scan.selective_scan_state`, compiled: the state h at step index[i] of each
    row i, (batch, dim, dstate), float32 (float64 for float64 inputs). Each row runs only up to its own index."""
    _require()
    B = _check_state_inputs("selective_scan_state_cpu", u, delta, A, B, index, delta_bias)
    batch, dim, seqlen = u.shape
    dtype = _scan_dtype(u)
    n = A.shape[1]
    out = u.new_empty(batch, dim, n, dtype=dtype)
    if batch == 0:
        return out
    with torch.autocast("cpu", enabled=False):
        u_, delta_, B_ = (_batch_major(t, dtype) for t in (u, delta, B))
        A_t, bias = A.to(dtype).t().contiguous(), _vector(delta_bias, dtype)
        index = index.to(torch.int64).contiguous()
        _library()[0].scan_state(dtype == torch.float64, batch, seqlen, dim, n, _ptr(u_), _ptr(delta_), _ptr(A_t),
                                 _ptr(B_), _ptr(bias), delta_softplus, _ptr(index), _ptr(out), _threads(batch))
    return out
