"""The compiled serving steps (cpu_kernels.cpp, "Serving steps") against their PyTorch references: `step_stacked` and
M2RecBlock.step. Float64 to 1e-12, float32 to a few rounding errors of the sums, states included."""
import dataclasses

import pytest
import torch

from m2rec_lightning.models.state import map_state
from m2rec_lightning.ops.cpu_kernels import cpu_kernels_unavailable, m2rec_block_step_cpu, mamba_step_cpu
from m2rec_lightning.ops.mamba import Mamba, step_stacked, step_weights
from tests.test_serving_state import M2REC_OPTIONS, N_ITEMS, histories, make_m2rec

pytestmark = pytest.mark.skipif(cpu_kernels_unavailable() is not None,
                                reason=f"the CPU kernels do not build here: {cpu_kernels_unavailable()}")

TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def make_mambas(stack: int, dtype: torch.dtype, bias: bool, d_conv: int, backend: str = "cpu") -> list[Mamba]:
    torch.manual_seed(stack + d_conv)
    mambas = [Mamba(16, d_state=4, d_conv=d_conv, bias=bias, conv_bias=bias, backend=backend) for _ in range(stack)]
    with torch.no_grad():  # away from the init: A, D, Δ's bias and the biases all shape the result
        for m in mambas:
            for name, p in m.named_parameters():
                if name in ("A_log", "D") or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
    return [m.to(dtype) for m in mambas]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stack", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_conv", [4, 1])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_mamba_step_equals_the_pytorch_step(dtype, stack, bias, d_conv, batch, masked):
    weights = step_weights(make_mambas(stack, dtype, bias, d_conv))
    assert weights.compiled is not None
    reference = dataclasses.replace(weights, compiled=None)
    gen = torch.Generator().manual_seed(batch)
    conv = torch.randn(batch, stack, 32, d_conv - 1, generator=gen, dtype=torch.float64).to(dtype)
    ssm = torch.randn(batch, stack, 32, 4, generator=gen, dtype=torch.float64).to(dtype)
    xz = torch.randn(batch, stack, 64, generator=gen, dtype=torch.float64).to(dtype)
    steps = torch.randint(0, 2, (batch, stack, 1), generator=gen).to(dtype) if masked else None
    if masked:
        steps[0, 0] = 0
        steps[-1, -1] = 1
    got, expected = step_stacked(weights, conv, ssm, xz, steps), step_stacked(reference, conv, ssm, xz, steps)
    for name, g, e in zip(("window", "ssm", "y"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        torch.testing.assert_close(g, e, **TOLERANCE[dtype], msg=name)
    if masked:  # a step of 0 leaves the scan state exactly as it was
        assert torch.equal(got[1][steps[..., 0] == 0], ssm[steps[..., 0] == 0])


def test_compiled_mamba_step_refuses_inputs_of_another_shape_or_dtype():
    weights = step_weights(make_mambas(2, torch.float32, False, 4)).compiled
    conv, ssm, xz = torch.zeros(1, 2, 32, 3), torch.zeros(1, 2, 32, 4), torch.zeros(1, 2, 64)
    mamba_step_cpu(weights, conv, ssm, xz)
    with pytest.raises(ValueError, match=r"ssm must be a torch.float32 CPU tensor of shape \(1, 2, 32, 4\)"):
        mamba_step_cpu(weights, conv, ssm[:, :1], xz)
    with pytest.raises(ValueError, match="xz must be a torch.float32"):
        mamba_step_cpu(weights, conv, ssm, xz.double())


def test_the_step_runs_compiled_only_where_it_applies():
    assert step_weights(make_mambas(1, torch.float32, False, 4)).compiled is not None
    assert step_weights(make_mambas(1, torch.float32, False, 4, backend="torch")).compiled is None
    assert step_weights(make_mambas(1, torch.bfloat16, False, 4)).compiled is None
    diverged = make_mambas(1, torch.float32, False, 4)
    with torch.no_grad():
        diverged[0].A_log[0, 0] = float("nan")
    assert step_weights(diverged).compiled is None  # PyTorch propagates the NaN
    encoder = make_m2rec(dict(), backend="cpu")
    assert encoder.blocks[0]._compiled_step() is not None
    assert make_m2rec(dict()).blocks[0]._compiled_step() is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", M2REC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_compiled_block_step_equals_the_pytorch_step(options, dtype):
    compiled, reference = make_m2rec(options, backend="cpu").to(dtype), make_m2rec(options).to(dtype)
    gen = torch.Generator().manual_seed(3)
    ids, _ = histories(gen, batch=3, length=9)
    state, _ = reference.encode_state(ids)
    for item in torch.randint(1, N_ITEMS + 1, (6, 3), generator=gen):  # through complete and open windows
        got_state, got = compiled.step(state, item)
        state, expected = reference.step(state, item)
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
        map_state(lambda g, e: torch.testing.assert_close(g, e, **TOLERANCE[dtype]), got_state, state)


def test_compiled_block_step_refuses_a_state_of_another_shape_or_dtype():
    encoder = make_m2rec(dict(), backend="cpu")
    block = encoder.blocks[0]
    state = block.init_state(2)
    h = torch.zeros(2, 16, dtype=torch.float64)
    t = state.temporal
    with pytest.raises(ValueError, match=r"window_count must be a torch.int64 CPU tensor of shape \(2, 3\)"):
        m2rec_block_step_cpu(block._compiled_step(), h, h, t.window_sum, t.window_count[:, :2], t.conv, t.ssm,
                             t.output, state.fourier)
    with pytest.raises(ValueError, match="fourier must be a torch.float64"):
        m2rec_block_step_cpu(block._compiled_step(), h, h, t.window_sum, t.window_count, t.conv, t.ssm, t.output,
                             state.fourier.float())
