"""CPU speed and memory of our Mamba block and selective scan against mambapy's pscan and a naive per-step loop.

Ours twice: "compiled" = the cpu backend (the C++ kernels of ops/cpu_kernels.cpp), "ours" = the pure-PyTorch scan
(backend "torch"); the ratios are to "ours".

Times forward + backward of (a) the whole Mamba-1 block and (b) the selective scan alone, float32, at
B=256, L=200, d_model=64, d_state=32, expand=2 (E·D = 128) by default. Each measurement runs in its own
subprocess so that peak RSS (ru_maxrss) belongs to that implementation alone.

    python benchmarks/scan_vs_mambapy.py                      # full size, prints a markdown table
    python benchmarks/scan_vs_mambapy.py --quick              # B=32, L=50
    python benchmarks/scan_vs_mambapy.py --out benchmarks/results/scan_vs_mambapy.md   # appends the table
    python benchmarks/scan_vs_mambapy.py --threads 1 --rounds 2                         # steadier when shared
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("compiled", "ours", "mambapy", "naive")
PARTS = ("block", "scan")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(impl: str, part: str, batch: int, seqlen: int, d_model: int, d_state: int, expand: int,
           reps: int, threads: int | None) -> dict:
    """Run one (implementation, part) measurement in this process; returns timings and peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import m2rec_lightning.ops.mamba as ours_mamba
    from m2rec_lightning.ops.cpu_kernels import selective_scan_cpu
    from m2rec_lightning.ops.selective_scan import selective_scan, selective_scan_ref

    torch.manual_seed(0)
    d_inner = expand * d_model
    if part == "block":
        if impl == "mambapy":
            from mambapy.mamba import MambaBlock, MambaConfig

            model = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand,
                                           pscan=True))
        else:
            if impl == "naive":  # the same block, its scan swapped for the per-step loop under autograd
                ours_mamba.selective_scan = selective_scan_ref
            model = ours_mamba.Mamba(d_model, d_state=d_state, expand=expand,
                                     backend="cpu" if impl == "compiled" else "torch")
        x = torch.randn(batch, seqlen, d_model)
        grad = torch.randn(batch, seqlen, d_model)

        def step():
            model.zero_grad(set_to_none=True)
            model(x).backward(grad)
    else:
        # scan inputs as the block produces them: Δ after softplus around the init range, A = -(1..N)
        u = torch.randn(batch, d_inner, seqlen)
        delta = torch.nn.functional.softplus(torch.randn(batch, d_inner, seqlen) - 4.0)
        A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        B, C = torch.randn(batch, d_state, seqlen), torch.randn(batch, d_state, seqlen)
        D = torch.ones(d_inner)
        grad = torch.randn(batch, d_inner, seqlen)
        if impl == "mambapy":
            from mambapy.mamba import MambaBlock, MambaConfig

            blk = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand))
            # mambapy's scan takes (batch, seqlen, channels) layouts
            leaves = [t.transpose(1, 2).contiguous().requires_grad_() for t in (u, delta, B, C)]
            A_, D_ = A.clone().requires_grad_(), D.clone().requires_grad_()
            grad = grad.transpose(1, 2).contiguous()

            def step():
                u_, dt_, B_, C_ = leaves
                blk.selective_scan(u_, dt_, A_, B_, C_, D_).backward(grad)
        else:
            fn = {"compiled": selective_scan_cpu, "ours": selective_scan}.get(impl, selective_scan_ref)
            leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D)]

            def step():
                fn(*leaves).backward(grad)

    rss_before = _rss_mb()
    load_before = os.getloadavg()[0]
    step()  # warm-up (first-touch allocations)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(impl=impl, part=part, median_s=statistics.median(times), min_s=min(times), times=times,
                rss_before_mb=rss_before, peak_rss_mb=_rss_mb(), threads=torch.get_num_threads(),
                torch=torch.__version__, load=max(load_before, os.getloadavg()[0]))


def run_one(args, impl: str, part: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, part, "--batch", str(args.batch), "--seqlen",
           str(args.seqlen), "--d-model", str(args.d_model), "--d-state", str(args.d_state), "--expand",
           str(args.expand), "--reps", str(args.reps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(impl=impl, part=part, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| part | impl | fwd+bwd median s | min s | peak RSS MB | time vs ours | peak RSS vs ours | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for part in PARTS:
        rows = [r for r in results if r["part"] == part]
        ref = next((r for r in rows if r["impl"] == "ours" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {part} | {r['impl']} | error: {r['error']} | | | | | |")
                continue
            ratio_t = f"{r['median_s'] / ref['median_s']:.1f}x" if ref else "-"
            ratio_m = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.1f}x" if ref else "-"
            lines.append(f"| {part} | {r['impl']} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {ratio_t} | {ratio_m} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small size (B=32, L=50) for a smoke run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=200)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measurement this many times (interleaved); keep each one's lowest median")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, help="also append the command and table (markdown) to this file")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "PART"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.seqlen = 32, 50
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seqlen, args.d_model, args.d_state, args.expand,
                                args.reps, args.threads)))
        return

    best = {}
    for _ in range(args.rounds):
        for part in args.parts:
            for impl in args.impls:
                r = run_one(args, impl, part)
                print(f"# {part}/{impl}: " + json.dumps(r), file=sys.stderr, flush=True)
                old = best.get((part, impl))
                if old is None or "error" in old or ("error" not in r and r["median_s"] < old["median_s"]):
                    best[(part, impl)] = r
    results = list(best.values())
    size = (f"B={args.batch}, L={args.seqlen}, d_model={args.d_model}, d_state={args.d_state}, "
            f"expand={args.expand} (E·D={args.expand * args.d_model}), float32, forward+backward")
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    torch_v = next((r["torch"] for r in results if "torch" in r), "?")
    report = "\n".join([
        f"Size: {size}; {args.reps} timed runs after one warm-up, each implementation in its own process; "
        f"best of {args.rounds} interleaved round(s).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch_v}, {threads} threads.",
        "", table(results), "",
        "compiled = the cpu backend (C++ scan and conv of ops/cpu_kernels.cpp); "
        "ours = m2rec_lightning selective_scan (chunked, hand-written backward); mambapy = mambapy.pscan "
        "(MambaBlock, pscan=True); naive = per-step loop under autograd (selective_scan_ref). "
        "Peak RSS includes the Python/torch baseline of each process. load = 1-minute load average during "
        "the measurement: the 2 cores are shared, and above ~1 the timings are inflated (unevenly: OpenMP "
        "threads wait on each other when a core is taken).",
    ])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/scan_vs_mambapy.py " + " ".join(sys.argv[1:])
        with args.out.open("a") as f:  # appends, so runs with different settings collect in one file
            f.write(f"## `{cmd}`\n\n{report}\n\n")


if __name__ == "__main__":
    main()
