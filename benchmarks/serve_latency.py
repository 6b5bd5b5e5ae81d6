"""Serving latency.

`step_vs_reencode`: at batch 1, appending one interaction to a user's recurrent state (`encoder.step`) against
re-encoding the user's whole history (`encoder.forward_last`), for M2Rec with the ML-1M config's sizes (d=64,
d_state=32, d_conv=4, expand=2, scales [1, 2, 4], Fourier, 384-d item text) and an encoder max_len of at least the
history. Random weights: the work per call does not depend on their values. Both are timed interleaved in one run,
in eval mode under no_grad, on whatever device and torch thread count the caller set.

    python benchmarks/serve_latency.py --history 1000
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from m2rec_lightning.models.m2rec import M2RecEncoder  # noqa: E402

ML1M = dict(num_items=3416, text_dim=384, hidden_size=64, d_state=32, d_conv=4, expand=2, scales=[1, 2, 4])


def _median_s(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of fn(). On a shared machine the CPU time is the steadier of the two (it
    leaves out the time the process waits for a core)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


@torch.no_grad()
def step_vs_reencode(history: int = 1000, repeats: int = 50, rounds: int = 5, device: str = "cpu",
                     seed: int = 0, **options) -> dict:
    """Median seconds of `step` and of `forward_last` on the history (the step's item included), at batch 1.

    A step costs more when windows of the pooled scales complete (their Mamba steps then): "step" is the mean over
    lcm(scales) consecutive steps, one full cycle of windows, ending at the history's last item; "step_worst" is that
    last step alone (history a multiple of every scale: all windows complete there).

    Args:
        history: items in the user's history once the new one is appended; the encoder gets max_len = history.
        repeats: calls per round and side; the medians are over all rounds.
        rounds: step and re-encode alternate round by round, so both see the same machine load.
        device: torch device.
        seed: seed of the weights, text table and history.
        options: M2RecEncoder options overriding the ML-1M sizes (e.g. scales=[1], fourier=False).

    Returns:
        {"history", "options", "threads", "device", "cycle"; "step_s", "step_worst_s", "reencode_s", "prefill_s"
        (median wall seconds) and the same as "*_cpu_s" (process CPU seconds, all threads); "ratio" and "ratio_cpu"
        (step / reencode)}.
    """
    torch.manual_seed(seed)
    config = {**ML1M, **options}
    encoder = M2RecEncoder(**config, max_len=max(history, max(config["scales"]))).to(device).eval()
    if encoder.uses_text:
        table = torch.randn(config["num_items"] + 1, config["text_dim"])
        table[0] = 0
        encoder.set_text_table(table.to(device))
    ids = torch.randint(1, config["num_items"] + 1, (1, history), device=device)
    cycle = math.lcm(*config["scales"])
    before_cycle, _ = encoder.encode_state(ids[:, :-cycle])
    before_last, _ = encoder.encode_state(ids[:, :-1])  # the user before the new item
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def step():
        state = before_cycle
        for t in range(history - cycle, history):
            state, _ = encoder.step(state, ids[:, t])
        sync()

    def step_worst():
        encoder.step(before_last, ids[:, -1])
        sync()

    def reencode():
        encoder.forward_last(ids)
        sync()

    def prefill():
        encoder.encode_state(ids)
        sync()

    sides = {"step": (step, repeats), "step_worst": (step_worst, repeats), "reencode": (reencode, repeats // 10 + 1),
             "prefill": (prefill, repeats // 10 + 1)}
    for fn, _ in sides.values():  # warm-up (and the step constants)
        fn()
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (fn, n) in sides.items():
            times[name].append(_median_s(fn, n))
    out = {"history": history, "options": options, "threads": torch.get_num_threads(), "device": device,
           "cycle": cycle}
    for name, rows in times.items():
        per_call = cycle if name == "step" else 1
        out[f"{name}_s"] = statistics.median(wall for wall, _ in rows) / per_call
        out[f"{name}_cpu_s"] = statistics.median(cpu for _, cpu in rows) / per_call
    out["ratio"] = out["step_s"] / out["reencode_s"]
    out["ratio_cpu"] = out["step_cpu_s"] / out["reencode_cpu_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=1000, help="history length after the new item")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = step_vs_reencode(args.history, args.repeats, args.rounds, args.device)
    print(f"M2Rec (ML-1M sizes), batch 1, {args.device}, {r['threads']} threads, history {r['history']}; "
          "median ms, wall (process CPU):")
    for name, label in (("step", f"step (mean of {r['cycle']})"), ("step_worst", "step (all windows complete)"),
                        ("reencode", "forward_last (re-encode all)"),
                        ("prefill", "encode_state (prefill)")):
        print(f"  {label:30s} {r[name + '_s'] * 1e3:8.3f} ({r[name + '_cpu_s'] * 1e3:.3f})")
    print(f"  step / re-encode = 1/{1 / r['ratio']:.0f} wall, 1/{1 / r['ratio_cpu']:.0f} CPU")

if __name__ == "__main__":
    main()
