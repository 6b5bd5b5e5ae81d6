"""Full-softmax cross-entropy and full ranking over N items without ever holding the (rows, N) score matrix.

The dense path scores every item at once: (M, N) logits for M targets, plus an (M, N+1) bool seen-item mask, so memory
grows as B·L·N. Here items are visited in chunks of C and only (M, C) scores live at a time.

Cross-entropy needs logsumexp_j z_j over all items. It is kept online, chunk by chunk, as a running max m and a running
sum s = sum_j exp(z_j - m): a new chunk with max c gives m' = max(m, c), s' = s·exp(m - m') + sum exp(z - m'), and at
the end lse = m + log s. Subtracting the running max keeps every exp() <= 1, so no overflow, and the sums run in float32
(float64 for float64 inputs) whatever the matmul dtype. The target's logit and, for label smoothing, the sum of all
logits are picked up on the way.

The backward needs softmax(z) = exp(z - lse) for every item. Storing it would be the (M, N) matrix again, so only the
inputs and lse (M,) are saved and each chunk's logits are recomputed: one more matmul per chunk, the price of O(M·C)
memory (as in flash attention).

Ranking needs the target's score before any other item can be compared with it, so it takes two passes (see
`chunked_rank_and_top_k`). `dense_cross_entropy` and `dense_rank_and_top_k` are the references with the same signatures:
today's behaviour, for tests and small N. `sampled_softmax_loss` is an approximate training loss (sampled negatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..metrics import mask_scores, pessimistic_rank, seen_items
from .cpu_kernels import ce_chunk_backward_cpu, ce_chunk_forward_cpu, cpu_kernels_unavailable

# Default chunk: 2^24 cells of (rows, chunk) scores, 64 MiB in float32. A chunk step holds a few such buffers (scores,
# a mask, the matmul output), so the transient peak is a few hundred MB whatever N is, small beside the (N, d) table, its
# gradient and the optimiser state; and each chunk matmul, (rows × d) @ (d × 2^24/rows), is big enough to keep an
# accelerator busy. The floor keeps per-chunk overhead (about 15 kernel launches) small when rows are many. Chunks are a
# multiple of 256 items so their edges fall on GEMM tile edges: with MKL in float32 the chunk matmuls then give the
# dense matmul's scores bit for bit (measured here; at a width of 1000, 4 in 10^5 scores differ in the last bit).
_CHUNK_CELLS = 1 << 24
_MIN_CHUNK = 1024
_ALIGN = 256


def default_chunk_size(rows: int, num_items: int) -> int:
    """Items per chunk: _CHUNK_CELLS / rows rounded down to a multiple of _ALIGN, at least _MIN_CHUNK, at most
    num_items."""
    chunk = max(_MIN_CHUNK, _CHUNK_CELLS // max(rows, 1)) // _ALIGN * _ALIGN
    return max(1, min(num_items, chunk))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax sums and scores in float32 (as the dense path's .float()); float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_dtype(hidden: Tensor, table: Tensor) -> torch.dtype:
    """The dtype `hidden @ table.T` would have here: autocast's (bf16/fp16) when it is on and the inputs are not
    float64, which autocast leaves alone; else the promoted input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (hidden.dtype, table.dtype):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, table.dtype)


def _distinct(ids: Tensor) -> Tensor:
    """(R, K) ids -> (R, K) the same ids with each row's repeats replaced by -1 (an id no chunk holds), so a repeated
    seen item gets the seen score once, as in the dense bool mask."""
    ids = ids.sort(dim=1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, -1)


def _chunk_scores(hidden: Tensor, table: Tensor, start: int, chunk: int, seen: Tensor | None,
                  weight: Tensor | None, acc: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scores of items start..start+C-1: (R, C) in acc, plus the seen score added to each row's distinct seen items.

    Returns the scores and, with `seen`, the (R, K) local column of each seen id (clamped into the chunk) and whether
    it lies in the chunk, which the backward reads for the weight's gradient."""
    z = (hidden @ table[start:start + chunk].T).to(acc)  # (R, C); the same call the dense path makes, on a slice
    if seen is None:
        return z, None, None
    C = z.size(1)
    local = seen - start  # (R, K)
    inside = (local >= 0) & (local < C)
    local = local.clamp(0, C - 1)
    # ids outside the chunk add 0 to some column, which changes no score: no (R, C) mask is built
    z.scatter_add_(1, local, torch.where(inside, weight, 0.0).to(acc))
    return z, local, inside


def _compiled(hidden: Tensor) -> bool:
    """Whether a chunk's passes after its matmul run in the compiled CPU loops (ce_chunk_forward_cpu and
    ce_chunk_backward_cpu: one pass per row with an inlined exp, where the tensor ops make four or five over the (M, C)
    chunk with ATen's exp, 0.9 ns per element on this AMD CPU); on other devices, the tensor ops."""
    return hidden.device.type == "cpu" and not cpu_kernels_unavailable()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean full-softmax cross-entropy, item chunk by item chunk; saves the inputs and lse (M,) only."""

    @staticmethod
    def forward(ctx, hidden, full_table, targets, seen, weight, smoothing: float, chunk: int, first_item: int):
        # hidden (M, d), full_table (first_item + N, d) in one dtype, candidates its rows first_item..; targets (M,);
        # seen (M, K) distinct candidate indices or None; weight () or None
        table = full_table[first_item:]  # (N, d)
        M, N = hidden.size(0), table.size(0)
        acc = _acc_dtype(hidden.dtype)
        w = weight.detach().to(acc) if weight is not None else None
        run_max = hidden.new_full((M,), float("-inf"), dtype=acc)
        run_sum = hidden.new_zeros(M, dtype=acc)  # sum exp(z - run_max) so far
        target_logit = hidden.new_zeros(M, dtype=acc)
        logit_sum = hidden.new_zeros(M, dtype=acc)  # for label smoothing
        compiled = _compiled(hidden)
        for start in range(0, N, chunk):
            z, _, _ = _chunk_scores(hidden, table, start, chunk, seen, w, acc)  # (M, C)
            C = z.size(1)
            here = (targets >= start) & (targets < start + C)
            if compiled:  # the passes below in one, per row
                ce_chunk_forward_cpu(z, torch.where(here, targets - start, -1), run_max, run_sum, target_logit,
                                     logit_sum if smoothing else None)
                continue
            picked = z.gather(1, (targets - start).clamp(0, C - 1)[:, None])[:, 0]
            target_logit = torch.where(here, picked, target_logit)
            if smoothing:
                logit_sum += z.sum(1)
            new_max = torch.maximum(run_max, z.amax(1))
            run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(1)
            run_max = new_max
        lse = run_max + run_sum.log()  # (M,)
        # F.cross_entropy's smoothing: (1-eps)·(lse - z_t) + eps·(lse - mean_j z_j)
        loss = lse - (1 - smoothing) * target_logit - (smoothing / N) * logit_sum
        ctx.smoothing, ctx.chunk, ctx.first_item = smoothing, chunk, first_item
        ctx.save_for_backward(hidden, full_table, targets, seen, weight, lse)
        return loss.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, full_table, targets, seen, weight, lse = ctx.saved_tensors
        need_hidden, need_table, _, _, need_weight, _, _, _ = ctx.needs_input_grad
        smoothing, chunk, first_item = ctx.smoothing, ctx.chunk, ctx.first_item
        table = full_table[first_item:]
        M, N = hidden.size(0), table.size(0)
        acc = _acc_dtype(hidden.dtype)
        w = weight.detach().to(acc) if weight is not None else None
        scale = grad_loss.to(acc) / M  # d mean / d row loss
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=acc) if need_hidden else None  # (M, d)
        grad_full = None
        if need_table:  # written chunk by chunk; the whole table's, so a caller's row slice costs no copy
            grad_full = torch.empty_like(full_table)
            grad_full[:first_item] = 0
        grad_weight = hidden.new_zeros((), dtype=acc) if need_weight else None
        compiled = _compiled(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk):
                z, local, inside = _chunk_scores(hidden, table, start, chunk, seen, w, acc)  # (M, C)
                C = z.size(1)
                # dloss/dz = softmax(z) - (1-eps)·onehot(target) - eps/N, times scale
                here = (targets >= start) & (targets < start + C)
                if compiled:
                    dz = z
                    ce_chunk_backward_cpu(dz, torch.where(here, targets - start, -1), lse, smoothing / N,
                                          smoothing - 1.0, float(scale))
                else:
                    dz = z.sub_(lse[:, None]).exp_()
                    if smoothing:
                        dz.sub_(smoothing / N)
                    onehot = here.to(acc)[:, None] * (smoothing - 1.0)  # (M, 1); rows targeting elsewhere add 0
                    dz.scatter_add_(1, (targets - start).clamp(0, C - 1)[:, None], onehot)
                    dz.mul_(scale)
                if need_weight and seen is not None:
                    grad_weight += torch.where(inside, dz.gather(1, local), 0.0).sum()
                dz = dz.to(hidden.dtype)  # the dense path's logits.float() backward casts here too
                if need_hidden:
                    grad_hidden += (dz @ table[start:start + C]).to(acc)
                if need_table:
                    torch.mm(dz.T, hidden, out=grad_full[first_item + start:first_item + start + C])
        return (grad_hidden.to(hidden.dtype) if need_hidden else None, grad_full, None, None,
                grad_weight.to(weight.dtype) if need_weight else None, None, None, None)


def _check_loss_inputs(hidden, table, targets, seen, seen_weight, label_smoothing, first_item) -> None:
    if not 0 <= first_item < table.size(0):
        raise ValueError(f"first_item must be in [0, {table.size(0)}) (the table's rows), got {first_item}")
    table = table[first_item:]
    if hidden.dim() != 2 or table.dim() != 2 or hidden.size(1) != table.size(1):
        raise ValueError(f"hidden (M, d) and table (N, d) must share d, got {tuple(hidden.shape)}, {tuple(table.shape)}")
    if targets.shape != (hidden.size(0),) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be (M={hidden.size(0)},) integers, got {tuple(targets.shape)} {targets.dtype}")
    if (seen is None) != (seen_weight is None):
        raise ValueError("seen and seen_weight go together: pass both or neither")
    if seen is not None and (seen.dim() != 2 or seen.size(0) != hidden.size(0)):
        raise ValueError(f"seen must be (M={hidden.size(0)}, K) ids, got {tuple(seen.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # one host sync: an out-of-range target would otherwise silently get logit 0 instead of F.cross_entropy's error
    if targets.numel() and (targets.min() < 0 or targets.max() >= table.size(0)):
        raise ValueError(f"targets must lie in [0, {table.size(0)}), got [{int(targets.min())}, {int(targets.max())}]")


def chunked_cross_entropy(hidden: Tensor, table: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                          seen: Tensor | None = None, seen_weight: Tensor | None = None,
                          chunk_size: int | None = None, first_item: int = 0) -> Tensor:
    """Mean full-softmax cross-entropy over N items, as `dense_cross_entropy`, in O(M·chunk + N·d) memory.

    Args:
        hidden: (M, d) states at the positions with a target.
        table: (first_item + N, d) output embeddings; the candidates are its rows first_item.. (candidate i = row
            first_item + i). Passing the whole item table with first_item=1 (row 0 = padding) rather than the slice
            table[1:] saves the slice's backward, which would copy the (N, d) gradient into a fresh table-sized
            tensor: at 10^6 items and d=64 that is 256 MB more at the step's peak.
        targets: (M,) candidate indices in [0, N).
        label_smoothing: as F.cross_entropy's: eps/N on every item, 1-eps on the target.
        seen: (M, K) candidate indices in [0, N) row m has seen, -1 = padding, repeats allowed; each distinct one gets
            `seen_weight` added to its logit.
        seen_weight: the learned 0-dim seen score (`SeenItemScore.weight`).
        chunk_size: items per chunk; None = `default_chunk_size(M, N)`.
        first_item: the table's first candidate row.
    Returns:
        0-dim loss, float32 (float64 for float64 inputs); differentiable in hidden, table and seen_weight.
    """
    _check_loss_inputs(hidden, table, targets, seen, seen_weight, label_smoothing, first_item)
    dtype = _matmul_dtype(hidden, table)
    chunk = chunk_size or default_chunk_size(hidden.size(0), table.size(0) - first_item)
    distinct = _distinct(seen) if seen is not None else None
    # dtypes are fixed here, so forward and backward (which autocast does not reach) compute in the same one
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden.to(dtype), table.to(dtype), targets, distinct, seen_weight,
                                          float(label_smoothing), chunk, first_item)


def dense_cross_entropy(hidden: Tensor, table: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                        seen: Tensor | None = None, seen_weight: Tensor | None = None,
                        chunk_size: int | None = None, first_item: int = 0) -> Tensor:
    """Reference for `chunked_cross_entropy` (chunk_size is ignored): the (M, N) logits, the dense bool seen mask,
    F.cross_entropy; what `SequentialRecommender.loss` computed before the chunked loss."""
    table = table[first_item:]
    logits = hidden @ table.T  # (M, N)
    if seen is not None:
        mask = seen_items(seen + 1, table.size(0) + 1)[:, 1:]  # (M, N) bool; padding -1 lands in the dropped column
        logits = logits + seen_weight * mask
    return F.cross_entropy(logits.to(_acc_dtype(logits.dtype)), targets, label_smoothing=label_smoothing)


def chunked_rank_and_top_k(hidden: Tensor, table: Tensor, target: Tensor | None, k: int, seen: Tensor | None = None,
                           seen_weight: Tensor | None = None, exclude: Tensor | None = None,
                           chunk_size: int | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """Pessimistic rank of each target and the top k items, over all N+1 ids in O(B·chunk + N·d) memory.

    Each score is what `mask_scores` gives the dense (B, N+1) scores (float32, float64 for float64 inputs): padding
    id 0 and the `exclude` ids at -inf, the target never excluded. rank is `pessimistic_rank` of them: the number of
    other ids whose score is not below the target's (a NaN counts against the target; a non-finite target raises).

    The target's score must be known before a chunk can be counted, and must be bit-identical to the score its column
    gets when its chunk is counted (the count includes the target itself and subtracts 1). So a first pass scores only
    the chunks that hold some target, with exactly the call the second pass makes for that chunk; a separate dot
    product per target would be cheaper but may round differently from the chunk matmul and break exact ties. The cost
    is at most twice the scoring matmuls; with target None (prediction) there is one pass. Whether the chunk matmuls
    round like the dense (B, N+1) one is the BLAS's choice: with the default chunk (a multiple of 256) MKL float32 gives
    the same bits; where they differ, scores within rounding of the target's can rank differently than densely.

    Ties in top-k: of the items tied at the k-th score, which ones are kept is torch.topk's choice (unspecified, as for
    topk on the full row); the returned list is sorted by score, descending, equal scores by ascending id.

    Args:
        hidden: (B, d) user states.
        table: (N+1, d) output item table including row 0 (padding, never a candidate).
        target: (B,) ids in [1, N], or None (no rank).
        k: list length, at most N+1.
        seen, seen_weight: (B, K) ids in 0..N (0 = padding) and the 0-dim seen score added to each distinct one.
        exclude: (B, K) ids in 0..N to mask to -inf (the user's past items), or None.
        chunk_size: ids per chunk; None = `default_chunk_size(B, N+1)`.
    Returns:
        rank (B,) int64 or None, top_scores (B, k), top_items (B, k) int64.
    """
    if (seen is None) != (seen_weight is None):
        raise ValueError("seen and seen_weight go together: pass both or neither")
    B, num_ids = hidden.size(0), table.size(0)
    if not 0 <= k <= num_ids:
        raise ValueError(f"k must be in [0, {num_ids}], got {k}")
    chunk = chunk_size or default_chunk_size(B, num_ids)
    acc = _acc_dtype(_matmul_dtype(hidden, table))
    distinct = _distinct(seen) if seen is not None else None
    neg_inf = float("-inf")

    def scores(start: int) -> Tensor:  # (B, C) masked scores of ids start..start+C-1
        z, _, _ = _chunk_scores(hidden, table, start, chunk, distinct, seen_weight, acc)
        C = z.size(1)
        if start == 0:
            z[:, 0] = neg_inf
        if exclude is not None:
            local = exclude - start  # (B, K)
            hit = (local >= 0) & (local < C)
            if target is not None:
                hit &= exclude != target[:, None]
            # (B, C+1) bool: ids outside the chunk (or the target) land in the extra column, which is dropped
            mask = torch.zeros(B, C + 1, dtype=torch.bool, device=z.device)
            z.masked_fill_(mask.scatter_(1, torch.where(hit, local, C), True)[:, :C], neg_inf)
        return z

    with torch.no_grad():
        rank = None
        if target is not None:
            target_score = hidden.new_full((B,), float("nan"), dtype=acc)
            target_chunk = target // chunk
            for c in torch.unique(target_chunk).tolist():  # one host sync
                start = c * chunk
                z = scores(start)
                picked = z.gather(1, (target - start).clamp(0, z.size(1) - 1)[:, None])[:, 0]
                target_score = torch.where(target_chunk == c, picked, target_score)
            if not torch.isfinite(target_score).all():
                raise FloatingPointError("non-finite score for a target item: the model produced NaN/inf scores")
            rank = torch.full((B,), -1, dtype=torch.long, device=hidden.device)  # the target counts itself once
        top_scores = hidden.new_empty(B, 0, dtype=acc)
        top_items = torch.empty(B, 0, dtype=torch.long, device=hidden.device)
        for start in range(0, num_ids, chunk):
            z = scores(start)  # (B, C)
            if rank is not None:
                rank += (~(z < target_score[:, None])).sum(1)  # `not <`: as pessimistic_rank, NaN counts against
            s, i = z.topk(min(k, z.size(1)), dim=1)
            s, i = torch.cat([top_scores, s], 1), torch.cat([top_items, i + start], 1)  # (B, <= 2k)
            top_scores, pos = s.topk(min(k, s.size(1)), dim=1)
            top_items = i.gather(1, pos)
        # the documented order: by id, then a stable sort by score
        top_items, by_id = top_items.sort(dim=1)
        top_scores, by_score = top_scores.gather(1, by_id).sort(dim=1, descending=True, stable=True)
        return rank, top_scores, top_items.gather(1, by_score)


def dense_rank_and_top_k(hidden: Tensor, table: Tensor, target: Tensor | None, k: int, seen: Tensor | None = None,
                         seen_weight: Tensor | None = None, exclude: Tensor | None = None,
                         chunk_size: int | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """Reference for `chunked_rank_and_top_k` (chunk_size is ignored): the (B, N+1) scores, `mask_scores`,
    `pessimistic_rank` and torch.topk, as `SequentialRecommender.score`/`predict_step` compute them today."""
    scores = hidden @ table.T  # (B, N+1)
    scores = scores.to(_acc_dtype(scores.dtype))
    if seen is not None:
        scores = scores + seen_weight * seen_items(seen, table.size(0))
    scores = mask_scores(scores, target, exclude)
    rank = pessimistic_rank(scores, target) if target is not None else None
    top_scores, top_items = scores.topk(k, dim=1)
    return rank, top_scores, top_items


def sampled_softmax_loss(hidden: Tensor, table: Tensor, targets: Tensor, num_negatives: int,
                         item_log_q: Tensor | None = None, generator: torch.Generator | None = None,
                         first_item: int = 0) -> Tensor:
    """An APPROXIMATION of the training cross-entropy: softmax over in-batch targets plus sampled negatives.

    The candidates are the distinct items among all rows' targets (in-batch negatives) and `num_negatives` items drawn
    with replacement from q = exp(item_log_q) (uniform when None); every row is scored against all of them, so an
    item that is also a row's target is its positive, never a duplicate negative. The logQ correction subtracts
    log q(item) from each candidate's logit, undoing the sampler's bias toward frequent items (in-batch targets come
    at about the popularity rate, so pass log popularity for the best correction). With num_negatives >= N every item
    is a candidate and, with uniform q, the loss is the full cross-entropy. No label smoothing, no seen score.

    Args:
        hidden: (M, d); table: (first_item + N, d), the candidates its rows first_item.. (as `chunked_cross_entropy`);
            targets: (M,) candidate indices in [0, N).
        num_negatives: items drawn per step (shared by all rows).
        item_log_q: (N,) log sampling probability of each candidate (normalisation does not matter), or None.
        generator: for the draws (None: the global generator of hidden's device).
        first_item: the table's first candidate row.
    Returns:
        0-dim mean loss over the M rows.
    """
    N = table.size(0) - first_item
    device = hidden.device
    if num_negatives >= N:
        candidates = torch.arange(N, device=device)
    else:
        if item_log_q is None:
            drawn = torch.randint(N, (num_negatives,), device=device, generator=generator)
        else:  # inverse-CDF sampling: torch.multinomial caps the number of categories at 2^24
            cdf = (item_log_q.double() - item_log_q.max()).exp().cumsum(0)  # (N,)
            u = torch.rand(num_negatives, device=device, dtype=torch.float64, generator=generator) * cdf[-1]
            drawn = torch.searchsorted(cdf, u).clamp_(max=N - 1)
        candidates = torch.unique(torch.cat([targets, drawn]))  # (U,) sorted, distinct
    logits = hidden @ table[first_item + candidates].T  # (M, U)
    logits = logits.to(_acc_dtype(logits.dtype))
    if item_log_q is not None:
        logits = logits - item_log_q[candidates].to(logits.dtype)
    return F.cross_entropy(logits, torch.searchsorted(candidates, targets))
