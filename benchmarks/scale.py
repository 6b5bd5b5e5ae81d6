"""Catalogue size N against memory and time: one training step and one full-ranking evaluation batch of M2Rec and
SASRec at N = 10^4 .. 10^7 items, with the dense, the chunked (exact) and a sampled (approximate) softmax loss.

What one measurement is (each in a FRESH worker process, so its peak resident set is its own):
  * train: one optimiser step of the real module: `SequentialRecommender.training_loss` (encode over (B, L), the loss
    at all B·L positions: every position real, M = B·L targets), backward, the module's own optimiser
    (`configure_optimizers`: fused Adam, lr 1e-3). The loss:
      - dense:   `dense_cross_entropy` swapped in for the cross-entropy that `module.loss` calls
                 (`m2rec_lightning.module.chunked_cross_entropy`): the reference, (M, N) logits and F.cross_entropy;
      - chunked: the module as it is: `chunked_cross_entropy`, exact, O(M·chunk) scores at a time;
      - sampled: the module option `SampledSoftmax(--negatives, --sampler)`: in-batch targets plus negatives drawn per
        step from the items' popularity (the Zipf law the ids are drawn from) with logQ correction: an APPROXIMATION
        of the training loss, not the same objective.
    Time: the median of `steps` timed steps after one warm-up step (`default_warmup`: none at 10^7 items).
  * eval: one evaluation batch of `--eval-batch` users under inference_mode: `module.rank_and_top_k(batch, target,
    k)` (chunked: two passes over item chunks, no (B, N+1) matrix) against the dense path, `module.score` (the
    (B, N+1) masked scores) + `pessimistic_rank` + topk.
  * ratio (optional, where the dense loss fits): dense and chunked training steps alternated on one model in one
    process, so the machine's changing load hits both alike; the fairest chunked/dense time ratio.

Peak memory is the worker's peak resident set, `ru_maxrss` as `wait4` returns it for that child: it counts
everything the process held, i.e. the Python + torch + Lightning import (about 0.6 GB here), the data, the model, its
gradients and Adam's two state tensors, and the step's transients. Each worker runs under `RLIMIT_AS` =
`--mem-cap-gb`, so a point that needs more fails to allocate (recorded with the size it asked for) instead of
exhausting the machine. A thread in the worker also samples the resident set every 2 ms and keeps the peak per phase
of the last step (encode, loss, each autograd node of the backward, optimiser), which is where the memory
breakdown comes from (short spikes between samples can be missed; ru_maxrss cannot miss them).

Inputs: item ids drawn from a Zipf law (p(rank r) ∝ r^-1 by default) over a fixed random permutation of the ids, so
popular items are spread over the catalogue (and over the item chunks); no item text (M2Rec's semantic stream off).
Models: M2Rec with the released widths (d=64, d_state 32, d_conv 4, expand 2, scales 1/2/4, Fourier filter, softmax
gate, residual, one block, max_len 50, the PyTorch Mamba scan); SASRec with its defaults (2 layers, 2 heads, inner
256, max_len 50). GB here = 10^9 bytes.

    python benchmarks/scale.py --quick                                   # N in {10^3, 10^4}: ~2 min on 2 CPUs
    python benchmarks/scale.py --out benchmarks/results/scale            # the recorded run (.md, .json, .png)
    python benchmarks/scale.py --from-json benchmarks/results/scale.json --out benchmarks/results/scale  # re-render
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import m2rec_lightning.module as module_impl  # noqa: E402
from m2rec_lightning.metrics import pessimistic_rank  # noqa: E402
from m2rec_lightning.models.m2rec import M2RecEncoder  # noqa: E402
from m2rec_lightning.models.sasrec import SASRecEncoder  # noqa: E402
from m2rec_lightning.module import SequentialRecommender  # noqa: E402
from m2rec_lightning.ops.chunked_softmax import dense_cross_entropy  # noqa: E402
from m2rec_lightning.sampled_softmax import SampledSoftmax  # noqa: E402

MODELS = ("m2rec", "sasrec")
LOSSES = ("dense", "chunked", "sampled")
EVAL_PATHS = ("chunked", "dense")
SIZES = (10**4, 10**5, 10**6, 10**7)
GB = 1e9
RESULT_TAG = "SCALE_RESULT "
_PAGE = os.sysconf("SC_PAGE_SIZE")


def default_steps(num_items: int) -> int:
    """Timed training steps per point (after one warm-up): fewer where one step takes minutes."""
    return 5 if num_items <= 10**5 else 3 if num_items <= 10**6 else 1


def default_warmup(num_items: int) -> int:
    """Untimed steps before the timed ones: none beyond 10^6 items, where one step takes minutes on one thread; the
    timed step is then also the first, which allocates Adam's state, so its time is an upper bound (its peak memory
    is the same: the state is allocated before the step's own peak, in the optimiser step)."""
    return 1 if num_items <= 10**6 else 0


def default_eval_reps(num_items: int) -> int:
    return 5 if num_items <= 10**6 else 2


# ---- model and data ------------------------------------------------------------------------------------------------
def encoder_factory(name: str, max_len: int):
    """The encoder as `encoder(num_items, text_dim)`: M2Rec with the released widths and no text, SASRec defaults."""
    if name == "m2rec":
        return functools.partial(M2RecEncoder, hidden_size=64, n_layers=1, d_state=32, d_conv=4, expand=2,
                                 dropout=0.2, scales=[1, 2, 4], fourier=True, semantic=False, gate="softmax",
                                 residual=True, max_len=max_len, mamba_backend="torch")
    if name == "sasrec":
        return functools.partial(SASRecEncoder, hidden_size=64, n_layers=2, n_heads=2, inner_size=256, dropout=0.5,
                                 attn_dropout=0.5, max_len=max_len)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def build_model(name: str, num_items: int, max_len: int, seed: int = 0,
                sampled: SampledSoftmax | None = None) -> SequentialRecommender:
    torch.manual_seed(seed)
    return SequentialRecommender(encoder_factory(name, max_len), num_items=num_items, sampled_softmax=sampled)


class Zipf:
    """Item ids 1..N with p(rank r) ∝ r^-exponent; rank r is item perm[r-1] + 1 for a fixed random permutation."""

    def __init__(self, num_items: int, exponent: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        weights = torch.arange(1, num_items + 1, dtype=torch.float64).pow_(-exponent)  # by rank
        self.cdf = weights.cumsum(0)
        self.perm = torch.randperm(num_items, generator=generator)  # rank - 1 -> id - 1
        self.num_items = num_items
        self._log_weights = weights.div_(self.cdf[-1]).log_().float()

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(shape, dtype=torch.float64, generator=generator) * self.cdf[-1]
        rank = torch.searchsorted(self.cdf, u.flatten()).clamp_(max=self.num_items - 1)
        return (self.perm[rank] + 1).view(shape)

    def log_q(self) -> torch.Tensor:
        """(N,) log probability of items 1..N (index = id - 1)."""
        out = torch.empty(self.num_items)
        out[self.perm] = self._log_weights
        return out


@contextlib.contextmanager
def use_loss(loss: str):
    """Within the block `SequentialRecommender.loss` computes `loss` in place of the chunked cross-entropy it calls:
    "dense" swaps in `dense_cross_entropy` (the reference); "chunked" and "sampled" (a module option, see
    `build_model`) leave the module as it is. Restored on exit."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    saved = module_impl.chunked_cross_entropy
    if loss == "dense":
        module_impl.chunked_cross_entropy = dense_cross_entropy
    try:
        yield
    finally:
        module_impl.chunked_cross_entropy = saved


# ---- resident-set sampling -----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class PhaseSampler:
    """A thread that samples the resident set every `interval` s and keeps the peak per phase label."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.phase, self.peaks = interval, "setup", {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.note()
            time.sleep(self.interval)

    def note(self) -> None:
        phase, rss = self.phase, rss_bytes()
        if rss > self.peaks.get(phase, 0):
            self.peaks[phase] = rss

    def set(self, phase: str) -> None:
        self.note()  # the end of the previous phase
        self.phase = phase
        self.note()

    def reset(self) -> None:
        self.peaks = {}

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def label_backward_nodes(loss: torch.Tensor, sampler: PhaseSampler) -> None:
    """Before each autograd node of `loss`'s graph runs, set the sampler's phase to "backward:<node name>"."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        label = f"backward:{node.name()}"
        with contextlib.suppress(RuntimeError, AttributeError):
            node.register_prehook(lambda grads, label=label: sampler.set(label))
        stack.extend(next_node for next_node, _ in node.next_functions)


# ---- workers -------------------------------------------------------------------------------------------------------
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _alloc_failure(error: BaseException) -> dict | None:
    """The requested bytes of an allocation failure, or None when `error` is not one."""
    text = str(error)
    if isinstance(error, MemoryError) or "can't allocate memory" in text or "Cannot allocate memory" in text:
        match = re.search(r"allocate (\d+) bytes", text)
        return {"requested_bytes": int(match.group(1)) if match else None, "message": text.strip().splitlines()[0]}
    return None


def _data(spec: dict):
    zipf = Zipf(spec["num_items"], spec.get("zipf", 1.0), spec.get("seed", 0))
    generator = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    return zipf, generator


def train_point(spec: dict, sampler: PhaseSampler | None = None) -> dict:
    """One training configuration: build, warm up, time `steps` steps; resident-set phases of the last step."""
    own_sampler = sampler is None
    sampler = sampler or PhaseSampler()
    out = {"status": "ok", "times": [], "losses": [], "rss_after_import": rss_bytes()}
    try:
        num_items, batch, length = spec["num_items"], spec["batch"], spec["length"]
        zipf, generator = _data(spec)
        ids = zipf.sample((batch, length + 1), generator)  # every position real
        inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        sampled = None
        if spec["loss"] == "sampled":
            sampled = SampledSoftmax(spec.get("negatives", 1000), spec.get("sampler", "popularity"))
            # counts in the Zipf proportions, large enough that SampledSoftmax's add-one changes no probability much
            weights = zipf.log_q().double().exp()
            sampled.set_item_counts(torch.cat([torch.zeros(1), weights * (1000 / weights.min())]))
        del zipf
        sampler.set("build")
        model = build_model(spec["model"], num_items, length, spec.get("seed", 0), sampled)
        model.train()
        optimizer = model.configure_optimizers()
        out["rss_after_build"] = rss_bytes()
        out["item_table_bytes"] = _nbytes([model.encoder.item_embedding.weight])
        out["param_bytes"] = _nbytes(model.parameters())
        torch.manual_seed(spec.get("seed", 0) + 2)  # the sampled loss draws from the global generator
        with use_loss(spec["loss"]):
            for step in range(spec.get("warmup", 1) + spec["steps"]):
                last = step == spec.get("warmup", 1) + spec["steps"] - 1
                if last:
                    sampler.reset()
                start = time.perf_counter()
                out["failed_in"] = "zero_grad"
                optimizer.zero_grad(set_to_none=True)
                if last:
                    out["rss_before_last_step"] = rss_bytes()
                sampler.set("forward")
                out["failed_in"] = "forward"
                loss = model.training_loss({"input_ids": inputs, "target_ids": targets})
                label_backward_nodes(loss, sampler)
                sampler.set("backward")
                out["failed_in"] = "backward"
                loss.backward()
                sampler.set("optimizer")
                out["failed_in"] = "optimizer"
                optimizer.step()
                sampler.set("idle")
                elapsed = time.perf_counter() - start
                out.pop("failed_in")
                out["losses"].append(loss.item())
                del loss
                if step >= spec.get("warmup", 1):
                    out["times"].append(elapsed)
                print(f"  step {step}: {elapsed:.2f} s{' (warm-up)' if step < spec.get('warmup', 1) else ''}",
                      file=sys.stderr, flush=True)
        out["grad_bytes"] = _nbytes(p.grad for p in model.parameters())
        out["adam_state_bytes"] = _nbytes(v for state in optimizer.state.values() for v in state.values()
                                          if torch.is_tensor(v))
        out["median_s"] = statistics.median(out["times"])
    except (RuntimeError, MemoryError) as error:
        failure = _alloc_failure(error)
        if failure is None:
            raise
        out.update(status="oom", **failure)
        out["phase_at_failure"] = sampler.phase
    finally:
        sampler.set("done")
        out["phase_peaks"] = dict(sampler.peaks)
        if own_sampler:
            sampler.stop()
    out["peak_rss_self"] = max_rss_bytes()
    return out


def eval_point(spec: dict) -> dict:
    """One evaluation batch: chunked `rank_and_top_k` or the dense `score` + `pessimistic_rank` + topk."""
    out = {"status": "ok", "times": [], "rss_after_import": rss_bytes()}
    try:
        zipf, generator = _data(spec)
        ids = zipf.sample((spec["batch"], spec["length"] + 1), generator)
        del zipf
        batch, target = {"input_ids": ids[:, :-1].contiguous()}, ids[:, -1].contiguous()
        model = build_model(spec["model"], spec["num_items"], spec["length"], spec.get("seed", 0))
        model.eval()
        out["rss_after_build"] = rss_bytes()
        k = spec.get("k", 20)

        def chunked():
            return model.rank_and_top_k(batch, target, k)

        def dense():
            scores = model.score(batch, target)  # (B, N+1) masked
            rank = pessimistic_rank(scores, target)
            top_scores, top_items = scores.topk(k, dim=1)
            return rank, top_scores, top_items

        run = {"chunked": chunked, "dense": dense}[spec["path"]]
        with torch.inference_mode():
            for rep in range(1 + spec["reps"]):
                start = time.perf_counter()
                rank, top_scores, _ = run()
                elapsed = time.perf_counter() - start
                if rep:
                    out["times"].append(elapsed)
                print(f"  eval {rep}: {elapsed:.2f} s{'' if rep else ' (warm-up)'}", file=sys.stderr, flush=True)
        out["median_s"] = statistics.median(out["times"])
        out["rank_sum"] = int(rank.sum())
        out["top_score_sum"] = float(top_scores[:, 0].sum())
    except (RuntimeError, MemoryError) as error:
        failure = _alloc_failure(error)
        if failure is None:
            raise
        out.update(status="oom", **failure)
    out["peak_rss_self"] = max_rss_bytes()
    return out


def ratio_point(spec: dict) -> dict:
    """Dense and chunked training steps alternated on one model: `rounds` timed pairs after one warm-up each."""
    zipf, generator = _data(spec)
    ids = zipf.sample((spec["batch"], spec["length"] + 1), generator)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    model = build_model(spec["model"], spec["num_items"], spec["length"], spec.get("seed", 0))
    model.train()
    optimizer = model.configure_optimizers()
    times = {"dense": [], "chunked": []}
    for rnd in range(1 + spec["rounds"]):
        for loss_name in ("dense", "chunked"):
            with use_loss(loss_name):
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                model.training_loss({"input_ids": inputs, "target_ids": targets}).backward()
                optimizer.step()
                if rnd:
                    times[loss_name].append(time.perf_counter() - start)
    dense, chunked = statistics.median(times["dense"]), statistics.median(times["chunked"])
    return {"status": "ok", "times": times, "dense_median_s": dense, "chunked_median_s": chunked,
            "ratio": chunked / dense}


def worker_main(spec: dict) -> None:
    """Entry point of a worker process: cap the address space, fix the threads, run one point, print its result."""
    cap = int(spec["mem_cap_gb"] * GB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(spec.get("threads", 1))
    run = {"train": train_point, "eval": eval_point, "ratio": ratio_point}[spec["kind"]]
    try:
        result = run(spec)
    except BaseException as error:  # anything else: reported, not hidden
        failure = _alloc_failure(error)
        result = {"status": "oom", **failure} if failure else {"status": "error", "message": repr(error)[:500]}
        result["peak_rss_self"] = max_rss_bytes()
    result["torch_threads"] = torch.get_num_threads()
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_point(spec: dict, timeout: float = 3600.0) -> dict:
    """Run one point in a fresh worker process; its peak resident set from `wait4`'s rusage of that child."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), MKL_NUM_THREADS=str(spec.get("threads", 1)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=None, env=env, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith(RESULT_TAG)]
    result = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {}
    if not lines:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        result = {"status": "crashed", "message": f"worker {how} without a result"
                  + (f" (timeout {timeout:.0f} s)" if time.perf_counter() - start >= timeout else "")}
    result.update(spec=spec, peak_rss=usage.ru_maxrss * 1024, wall_s=time.perf_counter() - start,
                  returncode=proc.returncode)
    return result


# ---- report --------------------------------------------------------------------------------------------------------
def gb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GB:.3f}" if abs(value) < GB else f"{value / GB:.2f}"


def exponent(n: int) -> str:
    e = math.log10(n)
    return f"10^{round(e)}" if abs(e - round(e)) < 1e-9 else f"{n:,}"


def machine(threads: int) -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, {mem / GB:.1f} GB RAM, torch {torch.__version__}, "
            f"{threads} torch thread{'s' * (threads != 1)} per worker, load average {os.getloadavg()[0]:.1f} at the end")


def status_cell(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "oom":
        asked = r.get("requested_bytes")
        return (f"fails to allocate{f' {asked / GB:.2f} GB' if asked else ''} under the "
                f"{r['spec']['mem_cap_gb']:g} GB cap")
    return f"{r['status']}: {r.get('message', '')}"


def needed_at_least(r: dict) -> float | None:
    """Bytes a failed point needed at least: what it held after building the model plus the request that failed."""
    if r.get("requested_bytes") and r.get("rss_after_build"):
        return r["rss_after_build"] + r["requested_bytes"]
    return None


def memory_ratio(a: dict, b: dict) -> str:
    """Peak RSS of `a` (ran) over `b`'s: a bound when `b` failed to allocate."""
    if b["status"] == "ok":
        return f"{a['peak_rss'] / b['peak_rss']:.2f}"
    need = needed_at_least(b)
    return f"< {a['peak_rss'] / need:.2f} (dense needs > {gb(need)} GB)" if need else "- (dense failed)"


def _train_get(record: dict) -> dict:
    return {(r["spec"]["model"], r["spec"]["loss"], r["spec"]["num_items"]): r for r in record["train"]}


def _eval_get(record: dict) -> dict:
    return {(r["spec"]["path"], r["spec"]["num_items"]): r for r in record["eval"]}


def train_table(record: dict) -> list[str]:
    out = ["| N | model | loss | status | median s/step | timed steps | peak RSS GB | RSS before step GB | "
           "item table GB | grads GB | Adam state GB |",
           "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(record["train"], key=lambda r: (r["spec"]["num_items"], MODELS.index(r["spec"]["model"]),
                                                     LOSSES.index(r["spec"]["loss"]))):
        s = r["spec"]
        ok = r["status"] == "ok"
        out.append(f"| {exponent(s['num_items'])} | {s['model']} | {s['loss']} | {status_cell(r)} | "
                   f"{r['median_s']:.2f} | {len(r['times'])} | " if ok else
                   f"| {exponent(s['num_items'])} | {s['model']} | {s['loss']} | {status_cell(r)} | - | - | ")
        out[-1] += (f"{gb(r['peak_rss'])} | {gb(r.get('rss_before_last_step'))} | {gb(r.get('item_table_bytes'))} | "
                    f"{gb(r.get('grad_bytes'))} | {gb(r.get('adam_state_bytes'))} |")
    return out


def ratio_table(record: dict) -> list[str]:
    get = _train_get(record)
    interleaved = {(r["spec"]["model"], r["spec"]["num_items"]): r for r in record.get("ratio", [])
                   if r["status"] == "ok"}
    out = ["| N | model | chunked / dense step time | chunked / dense step time, interleaved | "
           "sampled / chunked step time | chunked / dense peak RSS | sampled / chunked peak RSS |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in sorted({k[2] for k in get}):
        for m in MODELS:
            d, c, s = (get.get((m, loss, n)) for loss in LOSSES)
            if c is None:
                continue

            def ratio(a, b, key):
                ok = a and b and a["status"] == "ok" and b["status"] == "ok"
                return f"{a[key] / b[key]:.2f}" if ok else "-"

            def mem_ratio(a, b):
                return memory_ratio(a, b) if a and b and a["status"] == "ok" else "-"

            inter = interleaved.get((m, n))
            inter_cell = f"{inter['ratio']:.2f}" if inter else "-"
            out.append(f"| {exponent(n)} | {m} | {ratio(c, d, 'median_s')} | {inter_cell} | "
                       f"{ratio(s, c, 'median_s')} | {mem_ratio(c, d)} | {ratio(s, c, 'peak_rss')} |")
    return out


def eval_table(record: dict) -> list[str]:
    get = _eval_get(record)
    out = ["| N | path | status | median s/batch | peak RSS GB | RSS after model build GB | peak over model GB | "
           "chunked / dense time | chunked / dense peak RSS |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in sorted({k[1] for k in get}):
        for path in EVAL_PATHS:
            r = get.get((path, n))
            if r is None:
                continue
            ok = r["status"] == "ok"
            ratios = "| |"
            other = get.get(("dense", n))
            if path == "chunked" and ok and other:
                t = f"{r['median_s'] / other['median_s']:.2f}" if other["status"] == "ok" else "-"
                m = memory_ratio(r, other)
                ratios = f"| {t} | {m} |"
            base = r.get("rss_after_build")
            median = f"{r['median_s']:.3f}" if ok else "-"
            out.append(f"| {exponent(n)} | {path} | {status_cell(r)} | {median} | {gb(r['peak_rss'])} | {gb(base)} | "
                       f"{gb(r['peak_rss'] - base) if base else '-'} {ratios}")
    return out


def largest_lines(record: dict) -> list[str]:
    get = _train_get(record)
    sizes = sorted({k[2] for k in get})
    out = [f"| model | loss | largest N that trains under the {record['meta']['mem_cap_gb']:g} GB cap | "
           "smallest N that fails |", "| --- | --- | ---: | ---: |"]
    for m in MODELS:
        for loss in LOSSES:
            ok = [n for n in sizes if (m, loss, n) in get and get[m, loss, n]["status"] == "ok"]
            bad = [n for n in sizes if (m, loss, n) in get and get[m, loss, n]["status"] != "ok"]
            if ok or bad:
                out.append(f"| {m} | {loss} | {exponent(max(ok)) if ok else 'none measured'} | "
                           f"{exponent(min(bad)) if bad else 'none measured'} |")
    return out


def targets(record: dict) -> list[dict]:
    """The project's targets, each with the measured value and whether it holds (None: not measured)."""
    get, ev = _train_get(record), _eval_get(record)
    inter = {(r["spec"]["model"], r["spec"]["num_items"]): r for r in record.get("ratio", []) if r["status"] == "ok"}
    rows = []

    def mem_target(name, r, limit):
        if r is None:
            rows.append(dict(target=name, measured="not measured", holds=None))
        elif r["status"] != "ok":
            rows.append(dict(target=name, measured=status_cell(r) + f" (peak RSS {gb(r['peak_rss'])} GB)", holds=False))
        else:
            rows.append(dict(target=name, measured=f"{gb(r['peak_rss'])} GB peak RSS", holds=r["peak_rss"] <= limit))

    mem_target("M2Rec training step, N=10^6, exact (chunked) loss: peak RSS <= 2 GB", get.get(("m2rec", "chunked", 10**6)),
               2 * GB)
    mem_target("M2Rec training step, N=10^7, exact (chunked) loss: peak RSS <= 12 GB",
               get.get(("m2rec", "chunked", 10**7)), 12 * GB)
    for m in MODELS:
        c, d = get.get((m, "chunked", 10**4)), get.get((m, "dense", 10**4))
        if c and d and c["status"] == d["status"] == "ok":
            ratio = c["median_s"] / d["median_s"]
            measured = f"{ratio:.2f}x (separate workers, medians)"
            i = inter.get((m, 10**4))
            holds = ratio <= 1.2
            if i:
                measured += f"; {i['ratio']:.2f}x interleaved in one process"
                holds = holds and i["ratio"] <= 1.2
            rows.append(dict(target=f"{m}: at N=10^4 chunked step time <= 1.2x dense", measured=measured,
                             holds=holds))
    mem_target("Evaluation batch of 256 users at N=10^6 (chunked rank_and_top_k): peak RSS < 2 GB",
               ev.get(("chunked", 10**6)), 2 * GB)
    return rows


def breakdown(record: dict, model: str = "m2rec", loss: str = "chunked") -> tuple[int, list[str]] | None:
    """Peak resident set per phase of the last step at the largest N where `model` × `loss` ran."""
    runs = [r for r in record["train"] if r["spec"]["model"] == model and r["spec"]["loss"] == loss
            and r["status"] == "ok" and r.get("phase_peaks")]
    if not runs:
        return None
    r = max(runs, key=lambda r: r["spec"]["num_items"])
    table, before = r["item_table_bytes"], r["rss_before_last_step"]
    out = [f"| phase of the last step | peak RSS GB | over RSS before the step GB | in item tables "
           f"({table / GB:.2f} GB) |", "| --- | ---: | ---: | ---: |"]
    peaks = r["phase_peaks"]

    def row(label, peak):
        return f"| {label} | {gb(peak)} | {gb(peak - before)} | {(peak - before) / table:.2f} |"

    for phase in ("encode", "loss", "forward"):  # records before training_loss have encode and loss apart
        if phase in peaks:
            out.append(row(phase, peaks[phase]))
    nodes = sorted((p for p in peaks if p.startswith("backward:")), key=lambda p: -peaks[p])
    for phase in nodes[:3]:
        out.append(row(phase, peaks[phase]))
    if nodes[3:]:
        out.append(row(f"the other {len(nodes) - 3} backward nodes (highest)", peaks[nodes[3]]))
    for phase in ("optimizer", "idle"):
        if phase in peaks:
            out.append(row(phase + (" (after the step)" if phase == "idle" else ""), peaks[phase]))
    return r["spec"]["num_items"], out


def markdown(record: dict) -> str:
    meta = record["meta"]
    lines = ["# Catalogue size: training-step and evaluation memory and time against N", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Each point ran in a fresh worker process with 1 torch thread (the CPU is "
             "shared with other jobs; one thread per worker avoids OpenMP workers spinning while their partner is "
             "descheduled), under an address-space cap (RLIMIT_AS) of "
             f"{meta['mem_cap_gb']:g} GB. GB = 10^9 bytes.", "",
             f"Setup: d=64, B={meta['batch']}, L={meta['length']}, every position real (M = {meta['batch'] * meta['length']:,} "
             f"targets per step), item ids Zipf(exponent {meta['zipf']:g}) over a random permutation of the catalogue, no "
             "item text. Training step = `module.training_loss` (encode + loss) + backward + the module's fused "
             "Adam step. dense = `dense_cross_entropy` swapped in for the cross-entropy `module.loss` calls ((M, N) "
             "logits, F.cross_entropy: the reference), chunked = the module as it is (`chunked_cross_entropy`, "
             f"exact), sampled = the module option `SampledSoftmax` with {meta['negatives']:,} "
             f"{meta['sampler']}-sampled negatives + in-batch targets and logQ correction (an APPROXIMATION of the "
             "training loss, a different objective). Step time = median of the timed steps after one warm-up step "
             "up to 10^6 items; at 10^7 the one timed step is the first, which also allocates Adam's state (its time "
             "is an upper bound; 'RSS before step' is then without that state). Fewer steps at large N: the 'timed "
             "steps' column; timings are noisy, other jobs shared the CPU. "
             "Peak RSS = the worker's ru_maxrss: it includes the Python/torch/Lightning import (about "
             f"{meta.get('import_rss_gb', 0.6):.1f} GB), the model, its gradients, Adam's two state tensors and the "
             "step's transients. 'RSS before step' = resident set at the start of the last step, after "
             "zero_grad(set_to_none=True): model + Adam state + import.", "",
             "## Training step", ""] + train_table(record)
    lines += ["", "Ratios (step time: ratio of medians; peak RSS: ratio of whole-process peaks; 'interleaved' = "
              "dense and chunked steps alternated on one model in one process, the fairest time ratio under "
              "changing load):", ""] + ratio_table(record)
    lines += ["", "Largest catalogue that trains on this machine (measured sizes only):", ""] + largest_lines(record)
    if record.get("eval"):
        lines += ["", f"## Evaluation batch ({meta['eval_batch']} users, full ranking, k={meta['k']})", "",
                  "chunked = `module.rank_and_top_k(batch, target, k)`; dense = `module.score(batch, target)` "
                  "((B, N+1) masked scores) + `pessimistic_rank` + topk; both under inference_mode, M2Rec. "
                  "Peak over model = peak RSS minus the resident set after building the model.", ""]
        lines += eval_table(record)
        same = [n for (p, n), r in _eval_get(record).items() if p == "chunked" and r["status"] == "ok"
                and _eval_get(record).get(("dense", n), {}).get("status") == "ok"]
        agree = [n for n in same if _eval_get(record)[("chunked", n)]["rank_sum"]
                 == _eval_get(record)[("dense", n)]["rank_sum"]]
        if same:
            lines += ["", f"Ranks: the sum of the 256 ranks is identical between the two paths at "
                      f"{', '.join(exponent(n) for n in sorted(agree)) or 'no N'} (of "
                      f"{', '.join(exponent(n) for n in sorted(same))} where both ran)."]
    rows = targets(record)
    lines += ["", "## Targets", "", "| target | measured | holds |", "| --- | --- | --- |"]
    for t in rows:
        lines.append(f"| {t['target']} | {t['measured']} | "
                     f"{'-' if t['holds'] is None else 'yes' if t['holds'] else 'NO'} |")
    found = breakdown(record)
    if found:
        n, table = found
        r = _train_get(record)[("m2rec", "chunked", n)]
        lines += ["", f"## Where the memory goes: M2Rec, chunked loss, N={exponent(n)}", "",
                  f"Sizes: item table {gb(r['item_table_bytes'])} GB ((N+1)×64 float32) of "
                  f"{gb(r['param_bytes'])} GB parameters; gradients {gb(r['grad_bytes'])} GB (dense, the whole "
                  f"table's); Adam state {gb(r['adam_state_bytes'])} GB (exp_avg and exp_avg_sq); RSS after the "
                  f"import {gb(r['rss_after_import'])} GB, after building the model {gb(r['rss_after_build'])} GB, "
                  f"at the start of the last step {gb(r['rss_before_last_step'])} GB; whole-process peak "
                  f"{gb(r['peak_rss'])} GB.", "",
                  "Peak resident set sampled every 2 ms in each phase of the last (steady-state) step; backward "
                  "phases are named by the autograd node that was running (the sampler's label switches when the "
                  "next node starts). Over-before = the peak minus the resident set at the start of the step.", ""]
        lines += table
        lines += ["", "Reading the rows: grads = one item table, so the +1.00 that stays from the loss's backward to "
                  "the end of the step is the item table's gradient; a row at +2.00 had a second table-sized buffer "
                  "alive beside it, and the optimizer row at +3.00 two more beside the gradient."]
    lines += ["", "## What it shows", "", meta.get("summary") or summary(record)]
    return "\n".join(lines) + "\n"


def summary(record: dict) -> str:
    """A short paragraph of measured facts only, generated from the record."""
    get, ev = _train_get(record), _eval_get(record)
    sizes = sorted({k[2] for k in get})
    cap = record["meta"]["mem_cap_gb"]
    parts = []
    for loss in LOSSES:
        said = {}
        for m in MODELS:
            ok = [n for n in sizes if (m, loss, n) in get and get[m, loss, n]["status"] == "ok"]
            bad = [n for n in sizes if (m, loss, n) in get and get[m, loss, n]["status"] != "ok"]
            if ok or bad:
                text = f"up to N={exponent(max(ok))}" if ok else "at no measured N"
                if bad:
                    r = get[m, loss, min(bad)]
                    asked = f", asking for {gb(r['requested_bytes'])} GB" if r.get("requested_bytes") else ""
                    text += f" and failed at {exponent(min(bad))}{asked}"
                said.setdefault(text, []).append(m)
        if said:
            parts.append(f"The {loss} loss{' (approximate)' if loss == 'sampled' else ''} trained "
                         + "; ".join(f"{' and '.join(ms)} {text}" for text, ms in said.items()) + ".")
    if parts:
        parts[0] = f"Under the {cap:g} GB address-space cap the" + parts[0][len("The"):]
    pts = [(n, get["m2rec", "chunked", n]) for n in sizes if get.get(("m2rec", "chunked", n), {}).get("status") == "ok"]
    if pts:
        parts.append("M2Rec's peak RSS with the chunked loss: "
                     + ", ".join(f"{gb(r['peak_rss'])} GB at {exponent(n)}" for n, r in pts) + ".")
    ratios = [get[m, "chunked", n]["median_s"] / get[m, "dense", n]["median_s"] for m in MODELS for n in sizes
              if all(get.get((m, loss, n), {}).get("status") == "ok" for loss in ("chunked", "dense"))]
    inter = [r["ratio"] for r in record.get("ratio", []) if r["status"] == "ok"]
    if ratios:
        text = f"Where both ran, chunked / dense step time was {min(ratios):.2f}-{max(ratios):.2f} (separate workers)"
        if inter:
            text += f" and {min(inter):.2f}-{max(inter):.2f} (interleaved)"
        parts.append(text + ".")
    for n in (10**6, 10**7):
        c, d = ev.get(("chunked", n)), ev.get(("dense", n))
        if c and d and c["status"] == "ok":
            dense = (f"{gb(d['peak_rss'])} GB and {d['median_s']:.2f} s" if d["status"] == "ok"
                     else f"failed to allocate {gb(d.get('requested_bytes'))} GB")
            parts.append(f"At N={exponent(n)} the chunked evaluation batch peaked at {gb(c['peak_rss'])} GB in "
                         f"{c['median_s']:.2f} s; the dense one {dense}.")
    found = breakdown(record)
    if found:
        n = found[0]
        r = get["m2rec", "chunked", n]
        peaks, table, before = r["phase_peaks"], r["item_table_bytes"], r["rss_before_last_step"]
        top = max(peaks, key=peaks.get)
        backward = max((p for p in peaks if p.startswith("backward")), key=peaks.get, default=None)
        text = (f"At N={exponent(n)} the M2Rec chunked training step held {gb(before)} GB at its start and peaked at {gb(peaks[top])} GB "
                f"in the {top} phase ({(peaks[top] - before) / table:.2f} item tables of {gb(table)} GB above the "
                "start)")
        if backward and backward != top:
            text += f"; its backward peaked at {(peaks[backward] - before) / table:.2f} tables above ({backward})"
        parts.append(text + ".")
    held = [t for t in targets(record) if t["holds"] is not None]
    if held:
        parts.append("Targets: " + "; ".join(f"{t['target']}: {'holds' if t['holds'] else 'does NOT hold'}"
                                             for t in held) + ".")
    return " ".join(parts)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dense": "tab:red", "chunked": "tab:blue", "sampled": "tab:green"}
    styles = {"m2rec": "-", "sasrec": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cap = record["meta"]["mem_cap_gb"]
    for m in MODELS:
        for loss in LOSSES:
            rows = sorted((r for r in record["train"] if r["spec"]["model"] == m and r["spec"]["loss"] == loss),
                          key=lambda r: r["spec"]["num_items"])
            ok = [r for r in rows if r["status"] == "ok"]
            bad = [r for r in rows if r["status"] != "ok"]
            label = f"{m} × {loss}" + (" (approx.)" if loss == "sampled" else "")
            if ok:
                axes[0].plot([r["spec"]["num_items"] for r in ok], [r["peak_rss"] / GB for r in ok],
                             styles[m], marker="o", color=colours[loss], label=label)
                axes[1].plot([r["spec"]["num_items"] for r in ok], [r["median_s"] for r in ok],
                             styles[m], marker="o", color=colours[loss], label=label)
            if bad:
                axes[0].plot([r["spec"]["num_items"] for r in bad], [r["peak_rss"] / GB for r in bad], "x",
                             color=colours[loss], markersize=10, mew=2)
    for path_name, colour in (("chunked", "tab:blue"), ("dense", "tab:red")):
        rows = sorted((r for r in record.get("eval", []) if r["spec"]["path"] == path_name),
                      key=lambda r: r["spec"]["num_items"])
        ok = [r for r in rows if r["status"] == "ok"]
        bad = [r for r in rows if r["status"] != "ok"]
        if ok:
            axes[2].plot([r["spec"]["num_items"] for r in ok], [r["peak_rss"] / GB for r in ok], "-o", color=colour,
                         label=f"eval {path_name}: peak RSS GB")
            axes[2].plot([r["spec"]["num_items"] for r in ok], [r["median_s"] for r in ok], ":s", color=colour,
                         label=f"eval {path_name}: s/batch")
        if bad:
            axes[2].plot([r["spec"]["num_items"] for r in bad], [r["peak_rss"] / GB for r in bad], "x",
                         color=colour, markersize=10, mew=2)
    for ax in (axes[0], axes[2]):
        ax.axhline(cap, color="k", lw=0.8, ls=":")
        ax.text(0.01, cap * 1.05, f"{cap:g} GB cap (RLIMIT_AS)", fontsize=8, transform=ax.get_yaxis_transform())
    for target in (2, 12):
        axes[0].axhline(target, color="tab:gray", lw=0.8, ls="-.")
        axes[0].text(0.01, target * 1.05, f"{target} GB target", fontsize=8, color="tab:gray",
                     transform=axes[0].get_yaxis_transform())
    titles = ("training step: peak RSS (GB); x = failed to allocate (RSS reached before it)",
              "training step: median seconds",
              f"evaluation batch of {record['meta']['eval_batch']} users (M2Rec): peak RSS GB, seconds")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue size N (items)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="catalogue sizes N for training")
    p.add_argument("--eval-sizes", type=int, nargs="*", default=None, help="N for the evaluation batch (default: "
                   "--sizes)")
    p.add_argument("--ratio-sizes", type=int, nargs="*", default=[10**4, 10**5],
                   help="N for the interleaved dense/chunked time ratio (only where the dense loss fits)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--k", type=int, default=20, help="top-k list length of the evaluation batch")
    p.add_argument("--negatives", type=int, default=1000, help="sampled loss: negatives per step")
    p.add_argument("--sampler", choices=["popularity", "uniform"], default="popularity")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the item ids")
    p.add_argument("--steps", type=int, default=None, help="timed steps per point (default: 5 / 3 / 1 by N)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved ratio: timed pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="RLIMIT_AS of each worker, GB (10^9 bytes)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument("--quick", action="store_true", help="N in {10^3, 10^4}, 2 timed steps, 2 rounds")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (after every point) and OUT.png")
    p.add_argument("--from-json", type=Path, default=None, help="re-render a record instead of measuring")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.from_json:
        record = json.loads(args.from_json.read_text())
    else:
        if args.quick:
            args.sizes, args.ratio_sizes, args.steps, args.rounds = [10**3, 10**4], [10**3], 2, 2
        eval_sizes = args.sizes if args.eval_sizes is None else args.eval_sizes
        command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        record = {"meta": dict(command=command.strip(), batch=args.batch, length=args.length,
                               eval_batch=args.eval_batch, k=args.k, negatives=args.negatives, sampler=args.sampler,
                               zipf=args.zipf, threads=args.threads, mem_cap_gb=args.mem_cap_gb),
                  "train": [], "eval": [], "ratio": []}
        base = dict(batch=args.batch, length=args.length, zipf=args.zipf, threads=args.threads,
                    mem_cap_gb=args.mem_cap_gb, seed=0)
        for n in sorted(set(args.sizes) | set(eval_sizes) | set(args.ratio_sizes)):
            todo = []
            if n in args.sizes:
                todo += [("train", dict(base, kind="train", model=m, loss=loss, num_items=n,
                                        warmup=default_warmup(n), steps=args.steps or default_steps(n),
                                        negatives=args.negatives, sampler=args.sampler))
                         for m in args.models for loss in args.losses]
            if n in eval_sizes:
                todo += [("eval", dict(base, kind="eval", model="m2rec", path=path, num_items=n,
                                       batch=args.eval_batch, k=args.k, reps=args.steps or default_eval_reps(n)))
                         for path in EVAL_PATHS]
            if n in args.ratio_sizes:
                todo += [("ratio", dict(base, kind="ratio", model=m, num_items=n, rounds=args.rounds))
                         for m in args.models]
            for section, spec in todo:
                label = " ".join(f"{k}={spec[k]}" for k in ("kind", "model", "loss", "path", "num_items") if k in spec)
                print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr, flush=True)
                result = run_point(spec, args.timeout)
                record[section].append(result)
                brief = (f"{result.get('median_s', result.get('ratio', float('nan'))):.3f}"
                         if result["status"] == "ok" else status_cell(result))
                print(f"    -> {result['status']}: {brief}, peak RSS {gb(result['peak_rss'])} GB, "
                      f"wall {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
                if args.out:
                    write(record, args.out)
        imports = [r["rss_after_import"] for r in record["train"] if r.get("rss_after_import")]
        record["meta"]["import_rss_gb"] = statistics.median(imports) / GB if imports else 0.6
        record["meta"]["machine"] = machine(args.threads)
    text = markdown(record)
    print(text)
    if args.out:
        write(record, args.out)
        args.out.with_suffix(".md").write_text(text)
        plot(record, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
