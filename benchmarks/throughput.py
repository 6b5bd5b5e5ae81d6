"""Training-step and full-ranking inference throughput (sequences/s) and peak memory of M2Rec, Mamba4Rec and SASRec
against sequence length L, at the same width d and, at each L, the same batch for all three models.

What one measurement is:
  * train: one optimiser step of the real module: encoder forward over (B, L), `SequentialRecommender.loss`
    (full-softmax cross-entropy at all B·L positions against all N items), backward, and the step of the module's own
    optimizer (`configure_optimizers`: fused Adam; a per-tensor Adam would add a dozen small ops per parameter).
  * infer: one evaluation batch as `validation_step` runs it: the encoder's `forward_last` (hidden state at the last
    position only), (B, N+1) scores in one matmul against the item table, masking and `pessimistic_rank` (a comparison
    and a sum per row, no sort), under inference_mode. Like the module, it builds the item table (with M2Rec's text
    projection of every item) once, not per batch; that one-off cost per evaluation epoch is not in the timings.
  * infer_full (optional mode): the same with every position encoded and the last one read, the path before
    `forward_last`; with both modes the table adds the speed-up of one over the other.
Inputs are random item ids filling all L positions (no padding), so every model does its full work. The models are
the repository's configs: M2Rec = configs/models/m2rec.yaml (scales 1/2/4, causal Fourier filter, a random frozen
text table of `--text-dim` columns on input and output side, softmax gate), Mamba4Rec = mamba4rec.yaml, SASRec =
sasrec.yaml (2 layers, 2 heads), all d=64, N = Beauty's 12,101 items by default; the recorded CPU run uses
MovieLens-1M's 3,706 (`--num-items 3706`), the catalogue of the efficiency issue's targets. The record states N.

Timing: one warm-up call per model and mode, then `--reps` rounds in which every (model, mode) pair runs once, so
load from other processes hits all of them alike, in an order shuffled per round (a fixed order always ran the same
pair right after another model's training step, with its caches cold); the table reports medians and the ratios of
medians. `--clock cpu`
times the process's CPU time instead of wall-clock time: on a CPU shared with other jobs it leaves out the waits for
a core, which otherwise dominate the spread (medians twice the minima at a load average of 6 on 2 CPUs). Memory: on
CUDA, `torch.cuda.max_memory_allocated` over one step (after a reset); on CPU, the peak resident set during one step
minus the resident set just before it, sampled every 0.2 ms by a thread after `malloc_trim` returns freed heap to the
OS (so it is the step's working set: activations, gradients, temporaries; an estimate that can miss short spikes
between samples).

    python benchmarks/throughput.py --quick                       # B=32, L in {50, 200}: ~1 min on 2 CPUs
    python benchmarks/throughput.py --lengths 50 200 800 3200 --batch-for 50=32 200=32 800=8 3200=2 --reps 21 \
        --threads 1 --num-items 3706 --clock cpu --out benchmarks/results/throughput   # the recorded CPU run
    python benchmarks/throughput.py --device cuda --lengths 50 200 800 3200 --batch 256

Batch per L defaults to 256 at L <= 200, 64 at L = 800 and 16 at L = 3200 on CPU (SASRec's (B, heads, L, L)
attention alone is 0.65 GB per layer at B=16, L=3200); pass `--batch-for 3200=32` etc. to change it.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from m2rec_lightning.metrics import pessimistic_rank  # noqa: E402
from m2rec_lightning.models.m2rec import M2RecEncoder  # noqa: E402
from m2rec_lightning.models.sasrec import SASRecEncoder  # noqa: E402
from m2rec_lightning.module import SequentialRecommender  # noqa: E402

MODELS = ("m2rec", "mamba4rec", "sasrec")
BEAUTY_ITEMS = 12101
ML1M_ITEMS = 3706
DEFAULT_BATCH = {50: 256, 200: 256, 800: 64, 3200: 16}


def encoder_factory(name: str, max_len: int, mamba_backend: str = "auto"):
    """The encoder class with the options of configs/models/<name>.yaml (d=64), as `encoder(num_items, text_dim)`."""
    if name == "m2rec":
        return functools.partial(M2RecEncoder, hidden_size=64, n_layers=1, d_state=32, d_conv=4, expand=2,
                                 dropout=0.2, scales=[1, 2, 4], fourier=True, semantic=True, gate="softmax",
                                 residual=True, max_len=max_len, mamba_backend=mamba_backend)
    if name == "mamba4rec":
        return functools.partial(M2RecEncoder, hidden_size=64, n_layers=1, d_state=32, d_conv=4, expand=2,
                                 dropout=0.2, scales=[1], fourier=False, semantic=False,
                                 residual=False, max_len=max_len, mamba_backend=mamba_backend)
    if name == "sasrec":
        return functools.partial(SASRecEncoder, hidden_size=64, n_layers=2, n_heads=2, inner_size=256, dropout=0.5,
                                 attn_dropout=0.5, max_len=max_len)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def build_model(name: str, max_len: int, num_items: int, text_dim: int, device: str,
                mamba_backend: str = "auto", seed: int = 0, **module_options) -> SequentialRecommender:
    """A SequentialRecommender with `name`'s encoder; M2Rec gets a random (num_items+1, text_dim) text table.
    `module_options` go to SequentialRecommender (e.g. length_groups)."""
    torch.manual_seed(seed)
    model = SequentialRecommender(encoder_factory(name, max_len, mamba_backend), num_items=num_items,
                                  text_dim=text_dim if name == "m2rec" else 0, **module_options)
    if model.encoder.uses_text:
        table = torch.nn.functional.normalize(torch.randn(num_items + 1, text_dim), dim=1)
        table[0] = 0
        model.encoder.set_text_table(table)
    return model.to(device)


def timed_train_step(model: SequentialRecommender, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """Seconds of one CPU training step on a datamodule batch, as training runs it: `encode` (length groups
    included), full-softmax loss at every target, backward, optimiser step."""
    start = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model.loss(model.encode(batch["input_ids"]), batch["target_ids"]).backward()
    optimizer.step()
    return time.perf_counter() - start


def set_mode(model: torch.nn.Module, training: bool) -> None:
    """model.train(training) unless it is in that mode already. `measure_length` switches modes outside the timed
    calls: a switch walks every submodule (0.5 ms for M2Rec), which a fit does once per epoch, not per step."""
    if model.training != training:
        model.train(training)


def make_steps(model: SequentialRecommender, batch: int, length: int, device: str, compile_model: bool = False):
    """Zero-argument callables: "train" runs one training step, "infer" one evaluation batch as the module runs it
    (the encoder's forward_last), "infer_full" the same batch with every position encoded and the last one read."""
    num_items = model.hparams.num_items
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, num_items + 1, (batch, length + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (B, L) each
    eval_target = ids[:, -1].contiguous()  # (B,)
    optimizer = model.configure_optimizers()  # what `m2rec fit` steps: fused Adam over the weight-decay groups
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    encoder = torch.compile(model.encoder) if compile_model else model.encoder
    encode_last = torch.compile(model.encoder.forward_last) if compile_model else model.encoder.forward_last

    def train_step():
        set_mode(model, training=True)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(encoder(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss

    # The module builds the output-side table once per evaluation epoch (SequentialRecommender.item_table); rebuilding
    # it per batch would charge M2Rec its text projection of every item on every batch.
    model.eval()
    with torch.inference_mode():
        eval_table = model.encoder.item_embeddings()  # (N+1, d)

    def ranked(last_hidden):  # (B, d) -> (B,) ranks
        scores = last_hidden @ eval_table.T  # (B, N+1)
        scores[:, 0] = float("-inf")  # what mask_scores does, without its copy
        return pessimistic_rank(scores.float(), eval_target)

    def infer_step():
        set_mode(model, training=False)
        with torch.inference_mode():
            return ranked(encode_last(inputs))  # every position is real here: the last one is L-1

    def infer_full_step():
        set_mode(model, training=False)
        with torch.inference_mode():
            return ranked(encoder(inputs)[:, -1])  # every position encoded, then the last one read

    return {"train": train_step, "infer": infer_step, "infer_full": infer_full_step}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# wall-clock, or the process's CPU time: on a CPU shared with other jobs the latter leaves out the time spent waiting
# for a core (not their contention for caches and memory bandwidth)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, device: str, clock=time.perf_counter) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline then includes cached free memory and the peak reads low
        pass


def peak_memory(fn, device: str) -> float:
    """Bytes one call of `fn` needs at its peak (CUDA: allocator peak; CPU: sampled RSS growth, see the docstring)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated() - before)
    _malloc_trim()
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return float(peak[0] - before)


def measure_length(models: list[str], length: int, batch: int, reps: int, modes: list[str], num_items: int,
                   text_dim: int, device: str, mamba_backend: str = "auto", compile_model: bool = False,
                   clock: str = "wall", log=print) -> list[dict]:
    """All models at one L: interleaved timings (medians) and one memory measurement per (model, mode)."""
    built = {m: build_model(m, length, num_items, text_dim, device, mamba_backend) for m in models}
    steps = {m: make_steps(built[m], batch, length, device, compile_model) for m in models}
    rows = []
    times = {(m, mode): [] for mode in modes for m in models}
    for m, mode in times:
        set_mode(built[m], training=mode == "train")
        timed(steps[m][mode], device, CLOCKS[clock])  # warm-up: first-touch allocations, autotuning, compilation
    pairs = list(times)
    for rep in range(reps):  # interleaved over modes and models, so changing load hits every pair alike; in an order
        # shuffled per round, so no pair always runs right after the same one (after another model's training step
        # its weights and activations have left the caches: a fixed order made that the first inference step each time)
        for m, mode in random.Random(rep).sample(pairs, len(pairs)):
            set_mode(built[m], training=mode == "train")
            times[m, mode].append(timed(steps[m][mode], device, CLOCKS[clock]))
    for mode in modes:
        for m in models:
            set_mode(built[m], training=mode == "train")
            memory = peak_memory(steps[m][mode], device)
            median = statistics.median(times[m, mode])
            rows.append(dict(model=m, mode=mode, length=length, batch=batch, median_s=median,
                             min_s=min(times[m, mode]), times=times[m, mode], seq_per_s=batch / median,
                             peak_mem_mb=memory / 2**20))
            log(f"L={length:5d} B={batch:4d} {mode:10s} {m:9s} {median * 1e3:9.1f} ms/step  "
                f"{batch / median:9.1f} seq/s  peak {memory / 2**20:8.1f} MB")
    del built, steps
    return rows


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, load average {os.getloadavg()[0]:.1f} at the end")


def ratio_lines(rows: list[dict]) -> list[str]:
    """M2Rec and Mamba4Rec against SASRec, then M2Rec against Mamba4Rec, at each L: time ratios of medians (train)
    and throughput ratios (infer)."""
    out = ["| L | batch | M2Rec / SASRec train time | Mamba4Rec / SASRec train time | "
           "M2Rec / SASRec inference seq/s | Mamba4Rec / SASRec inference seq/s | "
           "M2Rec / Mamba4Rec train time | M2Rec / Mamba4Rec inference seq/s |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    get = {(r["model"], r["mode"], r["length"]): r for r in rows}
    pairs = [("m2rec", "sasrec"), ("mamba4rec", "sasrec")]
    for length in sorted({r["length"] for r in rows}):
        cells = []
        for mode, key in (("train", "median_s"), ("infer", "seq_per_s")):
            for m, base in pairs:
                a, b = get.get((m, mode, length)), get.get((base, mode, length))
                cells.append(f"{a[key] / b[key]:.2f}" if a and b else "-")
        for mode, key in (("train", "median_s"), ("infer", "seq_per_s")):
            a, b = get.get(("m2rec", mode, length)), get.get(("mamba4rec", mode, length))
            cells.append(f"{a[key] / b[key]:.2f}" if a and b else "-")
        batch = next(r["batch"] for r in rows if r["length"] == length)
        out.append(f"| {length} | {batch} | " + " | ".join(cells) + " |")
    return out


def last_position_lines(rows: list[dict]) -> list[str]:
    """Per model and L: inference seq/s reading only the last position (forward_last) over encoding every position."""
    get = {(r["model"], r["mode"], r["length"]): r for r in rows}
    pairs = sorted({(r["length"], r["model"]) for r in rows if r["mode"] == "infer_full"},
                   key=lambda lm: (lm[0], MODELS.index(lm[1])))
    out = ["| L | model | infer seq/s (forward_last) | infer_full seq/s (every position) | speed-up |",
           "| ---: | --- | ---: | ---: | ---: |"]
    for length, m in pairs:
        last, full = get.get((m, "infer", length)), get[(m, "infer_full", length)]
        if last:
            out.append(f"| {length} | {m} | {last['seq_per_s']:.1f} | {full['seq_per_s']:.1f} | "
                       f"{last['seq_per_s'] / full['seq_per_s']:.2f}x |")
    return out if len(out) > 2 else []


def markdown(rows: list[dict], command: str, device: str, reps: int, num_items: int, text_dim: int,
             clock: str = "wall") -> str:
    lines = ["# Throughput and peak memory against sequence length", "",
             f"Command: `{command}`", "",
             f"Machine: {machine(device)}. The CPU is shared with other jobs, so absolute numbers are contended; "
             f"the models ran interleaved so the ratios are fairer than the absolutes. Medians of {reps} timed "
             "steps after one warm-up. d=64 for all; at each L all models use the same batch. "
             + ("Times are wall-clock." if clock == "wall" else
                "Times are the process's CPU time (`--clock cpu`): on this shared machine it leaves out the time "
                "spent waiting for a core, though not the other jobs' contention for caches and memory bandwidth."),
             "",
             f"Catalogue: N = {num_items:,} items"
             + {BEAUTY_ITEMS: " (Beauty's)", ML1M_ITEMS: " (MovieLens-1M's)"}.get(num_items, "")
             + f"; M2Rec's random frozen text table is {text_dim} wide.", "",
             "| L | batch | mode | model | median ms/step | min ms | sequences/s | peak memory MB |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["length"], r["mode"] != "train", MODELS.index(r["model"]))):
        lines.append(f"| {r['length']} | {r['batch']} | {r['mode']} | {r['model']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['min_s'] * 1e3:.1f} | {r['seq_per_s']:.1f} | {r['peak_mem_mb']:.0f} |")
    lines += ["", "Ratios (train: time per step, lower = faster than SASRec; inference: sequences/s, higher = faster):",
              ""] + ratio_lines(rows)
    if any(r["mode"] == "infer_full" for r in rows):
        lines += ["", "Reading only the last position (infer = the module's path: `forward_last`, the last block / "
                  "layer at that position alone) against encoding every position (infer_full):", ""]
        lines += last_position_lines(rows)
    lines += ["", "train = forward + full-softmax loss at all B·L positions + backward + Adam step; infer = the "
              "encoder's forward_last + (B, N+1) scores + pessimistic rank (no sort). Peak memory on CPU = sampled RSS growth during one step "
              "(see the script's docstring)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, colour in zip(MODELS, ("tab:red", "tab:blue", "tab:gray")):
        for ax, mode in zip(axes[:2], ("train", "infer")):
            pts = sorted((r["length"], 1e3 * r["median_s"] / r["batch"]) for r in rows
                         if r["model"] == m and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, label=m)
        pts = sorted((r["length"], r["peak_mem_mb"] / r["batch"]) for r in rows if r["model"] == m and r["mode"] == "train")
        if pts:
            axes[2].plot(*zip(*pts), "o-", color=colour, label=m)
    for ax, title in zip(axes, ("training step: ms per sequence", "full-ranking inference: ms per sequence",
                                "training peak memory: MB per sequence")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # a run without training rows leaves the memory panel empty
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_batch_for(items: list[str]) -> dict[int, int]:
    out = {}
    for item in items:
        length, _, batch = item.partition("=")
        if not length.isdigit() or not batch.isdigit():
            raise SystemExit(f"--batch-for expects L=B pairs such as 3200=16, got {item!r}")
        out[int(length)] = int(batch)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800, 3200])
    p.add_argument("--batch", type=int, default=None, help="one batch for every L (default: per-L table above)")
    p.add_argument("--batch-for", nargs="*", default=[], help="per-L batch overrides, e.g. 3200=16")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer", "infer_full"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--num-items", type=int, default=BEAUTY_ITEMS,
                   help=f"catalogue size N (Beauty: {BEAUTY_ITEMS}, MovieLens-1M: {ML1M_ITEMS})")
    p.add_argument("--text-dim", type=int, default=384, help="M2Rec's text table width (all-MiniLM-L6-v2: 384)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mamba-backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"])
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a CPU shared with other jobs, 1 thread avoids "
                        "OpenMP workers spinning while their partner is descheduled (3-4x faster here)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall: wall-clock time; cpu: the process's CPU time, steadier on a CPU shared with other jobs "
                        "(with one thread the two agree on an idle machine; CPU only)")
    p.add_argument("--quick", action="store_true", help="B=32, L in {50, 200}, 2 reps")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.png")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.batch, args.reps = [50, 200], 32, 2
    if args.clock == "cpu" and args.device.startswith("cuda"):
        raise SystemExit("--clock cpu counts CPU time only, not the GPU's: use --clock wall with --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_for = parse_batch_for(args.batch_for)
    rows = []
    for length in args.lengths:
        batch = batch_for.get(length, args.batch or DEFAULT_BATCH.get(length, 256))
        rows += measure_length(args.models, length, batch, args.reps, args.modes, args.num_items, args.text_dim,
                               args.device, args.mamba_backend, args.compile, args.clock)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, command.strip(), args.device, args.reps, args.num_items, args.text_dim, args.clock)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
