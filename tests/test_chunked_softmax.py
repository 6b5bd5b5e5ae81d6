"""The chunked full-softmax loss and ranking (ops/chunked_softmax.py) against their dense references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from m2rec_lightning.metrics import mask_scores, seen_items
from m2rec_lightning.ops.chunked_softmax import (
    chunked_cross_entropy,
    chunked_rank_and_top_k,
    default_chunk_size,
    dense_cross_entropy,
    dense_rank_and_top_k,
    sampled_softmax_loss,
)


def make_loss_inputs(M, N, d, K=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, d, generator=g, dtype=dtype)
    table = torch.randn(N, d, generator=g, dtype=dtype)
    targets = torch.randint(N, (M,), generator=g)
    seen = torch.randint(-1, N, (M, K), generator=g)  # -1 = padding
    seen[-1, : K // 2] = seen[-1, -1] = targets[-1]  # repeats, and the target itself seen
    if M > 1:
        seen[0] = -1  # a row that has seen nothing
    weight = torch.tensor(0.7, dtype=dtype)
    return hidden, table, targets, seen, weight


def loss_and_grads(fn, hidden, table, targets, seen, weight, eps, use_seen, **kw):
    leaves = [hidden.clone().requires_grad_(), table.clone().requires_grad_(), weight.clone().requires_grad_()]
    h, t, w = leaves
    loss = fn(h, t, targets, eps, seen if use_seen else None, w if use_seen else None, **kw)
    used = leaves if use_seen else leaves[:2]
    return loss, torch.autograd.grad(loss, used)


# (M, N, d, chunk): chunks that do not divide N, N below one chunk, M = 1, chunk 1, the default
SHAPES = [(5, 53, 8, 10), (5, 53, 8, 64), (1, 40, 4, 7), (9, 256, 16, 64), (6, 30, 8, 1), (7, 3000, 8, None)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("use_seen", [False, True])
def test_cross_entropy_and_gradients_match_dense_float64(shape, seed, eps, use_seen):
    M, N, d, chunk = shape
    inputs = make_loss_inputs(M, N, d, seed=seed)
    loss, grads = loss_and_grads(chunked_cross_entropy, *inputs, eps, use_seen, chunk_size=chunk)
    ref, ref_grads = loss_and_grads(dense_cross_entropy, *inputs, eps, use_seen)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_gradcheck_with_seen_score_and_smoothing():
    hidden, table, targets, seen, weight = make_loss_inputs(3, 11, 4, K=4, seed=5)
    args = [x.clone().requires_grad_() for x in (hidden, table, weight)]
    fn = lambda h, t, w: chunked_cross_entropy(h, t, targets, 0.2, seen, w, chunk_size=4)
    assert torch.autograd.gradcheck(fn, args)


def test_gradients_only_for_inputs_that_require_them():
    hidden, table, targets, seen, weight = make_loss_inputs(4, 30, 8, seed=3)
    w = weight.clone().requires_grad_()
    loss = chunked_cross_entropy(hidden, table, targets, 0.1, seen, w, chunk_size=7)
    (gw,) = torch.autograd.grad(loss, [w])
    _, ref = loss_and_grads(dense_cross_entropy, hidden, table, targets, seen, weight, 0.1, True)
    torch.testing.assert_close(gw, ref[2])
    t = table.clone().requires_grad_()
    (gt,) = torch.autograd.grad(chunked_cross_entropy(hidden, t, targets, chunk_size=7), [t])
    torch.testing.assert_close(gt, loss_and_grads(dense_cross_entropy, hidden, table, targets, seen, weight, 0.0,
                                                  False)[1][1])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_are_close_to_float64(dtype, tol):
    hidden, table, targets, seen, weight = make_loss_inputs(16, 500, 32, seed=4)
    hidden, table = hidden / 4, table / 4  # logits of a few units, as a trained model's
    low = [x.to(dtype) for x in (hidden, table)]
    loss, grads = loss_and_grads(chunked_cross_entropy, *low, targets, seen, weight.float(), 0.2, True, chunk_size=96)
    ref, ref_grads = loss_and_grads(dense_cross_entropy, *(x.double() for x in low), targets, seen, weight, 0.2, True)
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())
    # against the dense path in the same dtype: the same bf16/fp32 logits, only the summation order differs
    same, same_grads = loss_and_grads(dense_cross_entropy, *low, targets, seen, weight.float(), 0.2, True)
    torch.testing.assert_close(loss, same, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, same_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


def test_autocast_bf16_matches_dense_under_autocast():
    hidden, table, targets, seen, weight = (x.float() if x.is_floating_point() else x
                                            for x in make_loss_inputs(8, 300, 16, seed=6))
    results = []
    for fn in (chunked_cross_entropy, dense_cross_entropy):
        h, t, w = (x.clone().requires_grad_() for x in (hidden, table, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, t, targets, 0.1, seen, w)
        results.append((loss, *torch.autograd.grad(loss, [h, t, w])))
    assert results[0][1].dtype == torch.float32  # gradients reach the float32 leaves
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_bad_inputs_raise():
    hidden, table, targets, seen, _ = make_loss_inputs(4, 20, 8)
    with pytest.raises(ValueError, match="targets must lie"):
        chunked_cross_entropy(hidden, table, targets + 20)
    with pytest.raises(ValueError, match="go together"):
        chunked_cross_entropy(hidden, table, targets, seen=seen)
    with pytest.raises(ValueError, match="share d"):
        chunked_cross_entropy(hidden, table[:, :3], targets)


def test_default_chunk_size_is_aligned_and_bounded():
    assert default_chunk_size(512, 10**7) == 32768  # 2^24 cells / 512 rows
    assert default_chunk_size(10**6, 10**7) == 1024  # the floor
    assert default_chunk_size(3, 500) == 500  # never more than N
    assert default_chunk_size(300, 10**7) % 256 == 0


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns, forward and backward."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_detector_sees_the_dense_matrix_in_forward_and_backward():
    hidden, table, targets, seen, weight = make_loss_inputs(64, 5000, 16, dtype=torch.float32)
    h = hidden.requires_grad_()
    loss = dense_cross_entropy(h, table, targets, 0.1, seen, weight)
    with LargestTensor() as mode:  # backward only: its ops are seen too
        loss.backward()
    assert mode.largest >= 64 * 5000


def test_chunked_never_holds_an_m_by_n_tensor():
    M, N, d = 512, 200_000, 64
    hidden, table, targets, seen, weight = make_loss_inputs(M, N, d, K=20, dtype=torch.float32)
    leaves = [x.requires_grad_() for x in (hidden, table, weight)]
    saved = []
    with (torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
          LargestTensor() as mode):
        loss = chunked_cross_entropy(hidden, table, targets, 0.1, seen, weight)
        grads = torch.autograd.grad(loss, leaves)
    assert mode.largest < M * N // 4, mode.largest  # (M, default chunk) = 512 x 32768 and (N, d) are the largest
    assert max(saved) == N * d  # the table; no logits, probabilities or masks
    assert all(torch.isfinite(g).all() for g in grads)


# ---- ranking -----------------------------------------------------------------------------------------------------------
def make_rank_inputs(B, N, d, K=5, seed=0, dtype=torch.float64):
    """Integer-valued embeddings: every score is exact whatever the summation order, so chunked and dense scores agree
    bit for bit on any BLAS, and many scores tie."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (B, d), generator=g).to(dtype)
    table = torch.randint(-3, 4, (N + 1, d), generator=g).to(dtype)
    target = torch.randint(1, N + 1, (B,), generator=g)
    twins = torch.randint(1, N + 1, (B,), generator=g)
    table[twins] = table[target]  # planted ties with the target
    seen = torch.randint(0, N + 1, (B, K), generator=g)
    seen[0] = 0  # nothing seen
    seen[-1, :2] = seen[-1, 2]  # a repeat
    exclude = torch.randint(0, N + 1, (B, K), generator=g)
    exclude[:, 0] = target  # the target is never excluded
    exclude[1 % B, 1] = twins[1 % B]
    return hidden, table, target, seen, torch.tensor(0.5, dtype=dtype), exclude


def check_top_k(scores, top_scores, top_items, k):
    """The documented rule: the dense top-k scores; each id really has its score; sorted by score, equal scores by id;
    every item above the k-th score is there."""
    dense_top = scores.topk(k, dim=1).values
    torch.testing.assert_close(top_scores, dense_top, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(scores.gather(1, top_items), top_scores, rtol=0, atol=0, equal_nan=True)
    assert all(row.unique().numel() == k for row in top_items)  # no id twice
    same = top_scores[:, 1:] == top_scores[:, :-1]
    assert (top_items[:, 1:][same] > top_items[:, :-1][same]).all()
    above = scores > dense_top[:, -1:]
    for row in range(scores.size(0)):
        assert set(above[row].nonzero()[:, 0].tolist()) <= set(top_items[row].tolist())


def dense_masked(hidden, table, target, seen, weight, exclude):
    scores = hidden @ table.T + (weight * seen_items(seen, table.size(0)) if seen is not None else 0)
    return mask_scores(scores, target, exclude)


@pytest.mark.parametrize("B, N, chunk", [(6, 53, 8), (6, 53, 100), (1, 40, 7), (8, 256, 64), (5, 30, 1), (4, 90, None)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("options", ["plain", "exclude", "seen", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_and_top_k_match_dense_with_ties(B, N, chunk, seed, options, dtype):
    hidden, table, target, seen, weight, exclude = make_rank_inputs(B, N, 6, seed=seed, dtype=dtype)
    kw = {}
    if options in ("seen", "both"):
        kw.update(seen=seen, seen_weight=weight)
    if options in ("exclude", "both"):
        kw["exclude"] = exclude
    k = min(10, N + 1)
    rank, top_scores, top_items = chunked_rank_and_top_k(hidden, table, target, k, chunk_size=chunk, **kw)
    ref_rank, _, _ = dense_rank_and_top_k(hidden, table, target, k, **kw)
    assert torch.equal(rank, ref_rank)
    assert top_scores.dtype == dtype and top_items.dtype == torch.long
    scores = dense_masked(hidden, table, target, kw.get("seen"), weight, kw.get("exclude"))
    check_top_k(scores, top_scores, top_items, k)
    # prediction: no target, every excluded id masked
    none_rank, p_scores, p_items = chunked_rank_and_top_k(hidden, table, None, k, chunk_size=chunk, **kw)
    assert none_rank is None
    check_top_k(dense_masked(hidden, table, None, kw.get("seen"), weight, kw.get("exclude")), p_scores, p_items, k)


@pytest.mark.parametrize("chunk", [None, 1000, 257])
def test_rank_and_top_k_on_gaussian_float32(chunk):
    g = torch.Generator().manual_seed(7)
    hidden, table = torch.randn(16, 32, generator=g), torch.randn(3001, 32, generator=g)
    target = torch.randint(1, 3001, (16,), generator=g)
    rank, top_scores, top_items = chunked_rank_and_top_k(hidden, table, target, 20, chunk_size=chunk)
    ref_rank, ref_scores, ref_items = dense_rank_and_top_k(hidden, table, target, 20)
    assert torch.equal(rank, ref_rank)
    torch.testing.assert_close(top_scores, ref_scores)
    assert torch.equal(top_items, ref_items)  # no ties among Gaussian scores


def test_nan_score_counts_against_the_target_unless_excluded():
    hidden, table, target, _, _, exclude = make_rank_inputs(4, 50, 6, seed=3)
    bad = int(exclude[2, 3]) or 1
    table[bad] = float("nan")
    table[target] = 1.0  # the targets' scores stay finite
    for kw in ({}, {"exclude": exclude}):
        rank, top_scores, _ = chunked_rank_and_top_k(hidden, table, target, 5, chunk_size=16, **kw)
        ref_rank, ref_scores, _ = dense_rank_and_top_k(hidden, table, target, 5, **kw)
        assert torch.equal(rank, ref_rank)
        torch.testing.assert_close(top_scores, ref_scores, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(chunked_rank_and_top_k(hidden, table, target, 5, chunk_size=16)[0],
                           chunked_rank_and_top_k(hidden, table, target, 5, chunk_size=16, exclude=exclude)[0])


def test_non_finite_target_score_raises_and_k_is_checked():
    hidden, table, target, *_ = make_rank_inputs(3, 20, 4)
    table[target[1]] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite score for a target"):
        chunked_rank_and_top_k(hidden, table, target, 3, chunk_size=6)
    with pytest.raises(ValueError, match="k must be"):
        chunked_rank_and_top_k(hidden, table, None, 22)


# ---- sampled softmax ---------------------------------------------------------------------------------------------------
def test_sampled_softmax_with_every_item_and_uniform_q_is_the_full_cross_entropy():
    hidden, table, targets, *_ = make_loss_inputs(6, 40, 8, seed=8)
    uniform = torch.full((40,), -math.log(40), dtype=torch.float64)
    for log_q in (None, uniform):
        loss, grads = loss_and_grads(lambda h, t, y, *a, q=log_q: sampled_softmax_loss(h, t, y, 40, q),
                                     hidden, table, targets, None, torch.tensor(0.0), 0.0, False)
        ref, ref_grads = loss_and_grads(dense_cross_entropy, hidden, table, targets, None, torch.tensor(0.0), 0.0,
                                        False)
        torch.testing.assert_close(loss, ref)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)
    popularity = torch.rand(40, dtype=torch.float64).log()
    torch.testing.assert_close(sampled_softmax_loss(hidden, table, targets, 10**6, popularity),
                               F.cross_entropy(hidden @ table.T - popularity, targets))


def test_sampled_softmax_scores_in_batch_targets_and_draws_from_q():
    hidden, table, targets, *_ = make_loss_inputs(8, 1000, 8, seed=9)
    log_q = torch.full((1000,), -1e4, dtype=torch.float64)  # exp() underflows: never drawn
    log_q[[3, 7]] = 0.0
    loss = sampled_softmax_loss(hidden, table, targets, 50, log_q, generator=torch.Generator().manual_seed(0))
    candidates = torch.unique(torch.cat([targets, torch.tensor([3, 7])]))
    ref = F.cross_entropy(hidden @ table[candidates].T - log_q[candidates], torch.searchsorted(candidates, targets))
    torch.testing.assert_close(loss, ref)
    # uniform draws: deterministic per generator, and a loss that trains both sides
    h, t = hidden.clone().requires_grad_(), table.clone().requires_grad_()
    runs = [sampled_softmax_loss(h, t, targets, 64, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0].item() == runs[1].item() and torch.isfinite(runs[0])
    gh, gt = torch.autograd.grad(runs[0], [h, t])
    assert gh.abs().sum() > 0 and gt.abs().sum() > 0


def test_compiled_chunk_passes_match_the_tensor_ops_and_keep_nan():
    # on CPU a chunk's passes after its matmul run compiled (ce_chunk_forward_cpu / ce_chunk_backward_cpu); the same
    # loss and gradients as the tensor ops, over several chunks with label smoothing, and a NaN logit still gives NaN
    import m2rec_lightning.ops.chunked_softmax as cs

    if cs.cpu_kernels_unavailable():
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 8, generator=g, requires_grad=True)
    table = torch.randn(300, 8, generator=g, requires_grad=True)
    targets = torch.randint(1, 300, (37,), generator=g)
    results = []
    for compiled in (True, False):
        cs_compiled, cs._compiled = cs._compiled, (lambda h, flag=compiled: flag)
        try:
            loss = chunked_cross_entropy(hidden, table, targets, 0.1, chunk_size=64, first_item=1)
            results.append((loss, *torch.autograd.grad(loss, [hidden, table])))
        finally:
            cs._compiled = cs_compiled
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    bad = table.detach().clone()
    bad[150, 0] = float("nan")
    assert chunked_cross_entropy(hidden.detach(), bad, targets, chunk_size=64, first_item=1).isnan()
    bad[150, 0] = float("inf")
    assert not chunked_cross_entropy(hidden.detach(), bad, targets, chunk_size=64, first_item=1).isfinite()
