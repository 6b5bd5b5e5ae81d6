"""Serving latency of the encoders alone, batch 1, CPU by default (the HTTP server: benchmarks/serve_load.py).

`latency_table`: for M2Rec and SASRec at history lengths 50, 200 and 1,000, the latency of one appended interaction
(`encoder.step` on the user's state: what `m2rec serve` does for POST /users) against a stateless call that encodes
the whole history (`encoder.encode_state`: what it does for POST /recommend), as p50 / p99 over many calls and calls
per second. M2Rec has the released widths with ML-1M's catalogue and a 384-d text table; SASRec RecBole's (2 layers,
2 heads, d=64) with a 1,000-position table, so its key/value cache holds every history here. Random weights: the work
per call does not depend on their values. Both models and both kinds take turns round by round, so all see the same
machine load.

`step_vs_reencode`: the M2Rec detail, one step against re-encoding with `forward_last`, with the cost of a step at
which every pooled scale's window completes.

`users_batch`: the server's side, a /users batch of 32 live users appending one item each (`Recommender.users_step`
with history "whole"), against `encoder.step` on the batch alone and the state bookkeeping around it: the state pool
the server keeps, and a state per user as it kept them before.

    python benchmarks/serve_latency.py --out benchmarks/results/serve_latency     # the recorded run (.md/.json/.png)
    python benchmarks/serve_latency.py --history 1000 --detail                    # step_vs_reencode only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from m2rec_lightning.models.m2rec import M2RecEncoder  # noqa: E402
from m2rec_lightning.models.sasrec import SASRecEncoder  # noqa: E402

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


def _encoder(name: str, max_len: int, seed: int = 0):
    torch.manual_seed(seed)
    if name == "sasrec":
        return SASRecEncoder(ML1M["num_items"], hidden_size=64, n_layers=2, n_heads=2, inner_size=256,
                             max_len=max_len).eval()
    encoder = M2RecEncoder(**ML1M, max_len=max_len).eval()
    table = torch.randn(ML1M["num_items"] + 1, ML1M["text_dim"])
    table[0] = 0
    encoder.set_text_table(table)
    return encoder


@torch.no_grad()
def latency_table(histories=(50, 200, 1000), models=("m2rec", "sasrec"), calls: int = 200, rounds: int = 5,
                  seed: int = 0) -> list[dict]:
    """Per (model, history): p50 / p99 / mean milliseconds (wall), p50 process CPU milliseconds and calls per second
    of `append` (one step on the state of the items before the last, at each of M2Rec's lcm(scales) last positions in
    turn) and `stateless` (encode_state of all history items), `calls` calls each; every model and kind of a history
    takes its turn in each of `rounds` rounds, so all see the same machine load."""
    encoders = {name: _encoder(name, max(histories), seed) for name in models}
    out = []
    for history in histories:
        ids = torch.randint(1, ML1M["num_items"] + 1, (1, history), generator=torch.Generator().manual_seed(seed))
        sides = {}
        for name, encoder in encoders.items():
            # appends at the last lcm(scales) positions in turn: M2Rec's pooled scales complete a window only at some
            # positions, so the positions of one cycle are the mix that steady traffic sees
            cycle = math.lcm(*ML1M["scales"]) if name == "m2rec" else 1
            befores = [encoder.encode_state(ids[:, :t])[0] for t in range(history - cycle, history)]
            sides[name, "append"] = [lambda e=encoder, b=b, t=t: e.step(b, ids[:, t])
                                     for b, t in zip(befores, range(history - cycle, history))]
            sides[name, "stateless"] = [lambda e=encoder: e.encode_state(ids)]
        for fns in sides.values():
            for fn in fns:
                fn()  # warm-up (and the step constants)
        times = {side: [] for side in sides}
        for _ in range(rounds):
            for side, fns in sides.items():
                for i in range(max(1, calls // rounds)):
                    fn = fns[i % len(fns)]
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fn()
                    times[side].append((time.perf_counter() - start, time.process_time() - start_cpu))
        for (name, kind), t in times.items():
            wall, cpu = sorted(w for w, _ in t), sorted(c for _, c in t)
            out.append({"model": name, "history": history, "kind": kind, "calls": len(t),
                        "p50_ms": wall[len(t) // 2] * 1e3, "p99_ms": wall[min(len(t) - 1, int(0.99 * len(t)))] * 1e3,
                        "mean_ms": statistics.fmean(wall) * 1e3, "per_s": 1 / statistics.fmean(wall),
                        "cpu_p50_ms": cpu[len(t) // 2] * 1e3})
    return sorted(out, key=lambda r: (models.index(r["model"]), r["history"]))


def users_batch(batch: int = 32, rounds: int = 50, seed: int = 0) -> dict:
    """The /users worker's batch of `batch` live users appending one item each (`Recommender.users_step`, history
    "whole", Beauty's sizes as `serve_load.py` serves them: 12,101 items, max_len 50, 50-item histories), against
    its parts: `encoder.step` on the batch's state alone, and the state bookkeeping around it, the pool's (gather the
    users' slots, step, scatter them back) and the one the server had before (cat the users' own states, step, select
    and clone each user's), timed round by round in turn.

    Returns: {"batch", "items", "max_len"; "<side>_ms" and "<side>_cpu_ms" (medians, wall and process CPU) for
    "users_step", "step", "pool", "per_user"}."""
    import numpy as np

    from m2rec_lightning import SequentialRecommender
    from m2rec_lightning.models.state import cat_states, map_state, select_state
    from m2rec_lightning.serve import Recommender, UserRequest

    torch.manual_seed(seed)
    n, max_len = 12_101, 50
    model = SequentialRecommender(lambda items, text: M2RecEncoder(items, text, max_len=max_len), num_items=n,
                                  text_dim=ML1M["text_dim"])
    table = torch.randn(n + 1, ML1M["text_dim"])
    table[0] = 0
    model.encoder.set_text_table(table)
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(1, n + 1, (batch, max_len), generator=gen).numpy()
    server = Recommender(model, np.arange(n + 1), np.arange(batch), lambda u: sequences[u], history="whole")
    encoder, items = server.encoder, torch.randint(1, n + 1, (batch,), generator=gen)

    def requests():
        return [server.query(UserRequest(user=u, append=[int(i)], k=10))
                for u, i in enumerate(torch.randint(1, n + 1, (batch,), generator=gen))]

    def pool(_):
        state, _ = server.pool.read(slots)
        server.pool.write(slots, list(encoder.step(state, items)))
        return server.pool.state[1].index_select(0, slots)

    def per_user(_):
        new, hidden = encoder.step(cat_states(own), items)
        own[:] = [map_state(lambda t: t.detach().clone(), select_state(new, slice(j, j + 1))) for j in range(batch)]
        return torch.stack([hidden[j] for j in range(batch)])

    with torch.inference_mode():  # as the server runs (its pool holds inference tensors)
        server.users_step(requests())  # every user's prefill
        slots = torch.tensor([server.users[str(u)].slot for u in range(batch)])
        state, _ = server.pool.read(slots)
        own = [map_state(lambda t: t[u: u + 1].clone(), state) for u in range(batch)]  # a state per user, as before
        sides = {"users_step": server.users_step, "step": lambda _: encoder.step(state, items), "pool": pool,
                 "per_user": per_user}
        times = {side: [] for side in sides}
        for _ in range(rounds):
            for side, fn in sides.items():
                queries = requests()  # decoded before the batch, as LitServe does
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(queries)
                times[side].append((time.perf_counter() - start, time.process_time() - start_cpu))
    out = {"batch": batch, "items": n, "max_len": max_len}
    for side, t in times.items():
        out[f"{side}_ms"] = statistics.median(wall for wall, _ in t) * 1e3
        out[f"{side}_cpu_ms"] = statistics.median(cpu for _, cpu in t) * 1e3
    return out


def markdown(record: dict) -> str:
    rows = record["rows"]
    lines = ["# Serving latency of the encoders: one appended interaction against re-encoding the history", "",
             f"Command: `{record['command']}`", "", f"Machine: {record['machine']}. Batch 1, eval mode, no_grad; "
             "append = `encoder.step` on the state of the history's first items, at M2Rec's last 4 positions in "
             "turn (its pooled scales step only where their windows complete), what `m2rec serve` does for POST "
             "/users; stateless = `encoder.encode_state` of the whole history (POST /recommend). M2Rec: released "
             "widths (d=64, d_state 32, scales 1/2/4, Fourier, 384-d text), 3,416 items; SASRec: 2 layers, 2 heads, "
             "d=64, a 1,000-position table. Both models and both kinds take turns in every round. p50 CPU = the "
             "process CPU time of a call, which leaves out waiting for a core on a shared machine.", "",
             "| model | history | kind | p50 ms | p99 ms | p50 CPU ms | calls/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['history']:,} | {r['kind']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['cpu_p50_ms']:.2f} | {r['per_s']:.0f} |")
    get = {(r["model"], r["history"], r["kind"]): r for r in rows}
    lines += ["", "| history | M2Rec append / stateless (p50) | M2Rec append p50 / SASRec append p50 | the same, CPU |",
              "| ---: | ---: | ---: | ---: |"]
    for h in sorted({r["history"] for r in rows}):
        m_a, m_s, s_a = get.get(("m2rec", h, "append")), get.get(("m2rec", h, "stateless")), get.get(
            ("sasrec", h, "append"))
        own = f"1/{m_s['p50_ms'] / m_a['p50_ms']:.0f}" if m_a and m_s else "-"
        vs = f"{m_a['p50_ms'] / s_a['p50_ms']:.2f}" if m_a and s_a else "-"
        vs_cpu = f"{m_a['cpu_p50_ms'] / s_a['cpu_p50_ms']:.2f}" if m_a and s_a else "-"
        lines.append(f"| {h:,} | {own} | {vs} | {vs_cpu} |")
    detail = record.get("detail")
    if detail:
        lines += ["", f"M2Rec detail at {detail['history']:,} items (`step_vs_reencode`): a step costs "
                      f"{detail['step_s'] * 1e3:.2f} ms on average over a cycle of {detail['cycle']} steps, "
                      f"{detail['step_worst_s'] * 1e3:.2f} ms when every pooled scale's window completes; re-encoding "
                      f"with `forward_last` costs {detail['reencode_s'] * 1e3:.2f} ms, so a step is "
                      f"1/{1 / detail['ratio']:.0f} of it (process CPU time: 1/{1 / detail['ratio_cpu']:.0f})."]
    batch = record.get("users_batch")
    if batch:
        lines += ["", f"A batch of {batch['batch']} live users appending one item each (`users_batch`: "
                      f"`Recommender.users_step`, history whole, Beauty's sizes: {batch['items']:,} items, max_len "
                      f"{batch['max_len']}, top-10 of the catalogue), median over rounds, and its parts; the state "
                      "bookkeeping is a side's time less `encoder.step` alone:", "",
                  "| | wall ms | CPU ms |", "| --- | ---: | ---: |"]
        for side, what in (("users_step", "`users_step` (the /users worker's batch)"),
                           ("step", "`encoder.step` on the batch's state alone"),
                           ("pool", "step with the state pool (gather the slots, step, scatter back)"),
                           ("per_user", "step with a state per user (cat them, step, select and clone each)")):
            lines.append(f"| {what} | {batch[side + '_ms']:.2f} | {batch[side + '_cpu_ms']:.2f} |")
        cells = {"pool": [], "per_user": []}
        for unit in ("ms", "cpu_ms"):
            pool, own = (batch[f"{side}_{unit}"] - batch[f"step_{unit}"] for side in ("pool", "per_user"))
            total = batch[f"users_step_{unit}"]
            cells["pool"].append(f"{pool:.2f} ({pool / total:.0%} of `users_step`)")
            cells["per_user"].append(f"{own:.2f} ({own / (total - pool + own):.0%} of a `users_step` with it)")
        lines.append(f"| state bookkeeping, pool | {' | '.join(cells['pool'])} |")
        lines.append(f"| state bookkeeping, a state per user | {' | '.join(cells['per_user'])} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, kind), style in {("m2rec", "append"): "o-", ("m2rec", "stateless"): "o--",
                                 ("sasrec", "append"): "s-", ("sasrec", "stateless"): "s--"}.items():
        rows = [r for r in record["rows"] if r["model"] == model and r["kind"] == kind]
        ax.plot([r["history"] for r in rows], [r["p50_ms"] for r in rows], style, label=f"{model} {kind}")
    ax.set(xscale="log", yscale="log", xlabel="history length", ylabel="p50 latency, ms (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, nargs="+", default=[50, 200, 1000], help="history lengths")
    parser.add_argument("--calls", type=int, default=200, help="calls per (model, history, kind)")
    parser.add_argument("--repeats", type=int, default=50, help="step_vs_reencode: calls per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds in which every side takes its turn")
    parser.add_argument("--batch", type=int, default=32, help="users_batch: live users in the /users batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="step_vs_reencode's device")
    parser.add_argument("--detail", action="store_true", help="only step_vs_reencode at the largest --history")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json and OUT.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    detail = step_vs_reencode(max(args.history), args.repeats, args.rounds, args.device)
    if args.detail:
        print(json.dumps(detail, indent=1))
        return
    record = {"command": "python benchmarks/serve_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} at the start",
              "rows": latency_table(args.history, calls=args.calls, rounds=args.rounds), "detail": detail,
              "users_batch": users_batch(args.batch, rounds=args.calls // 4)}
    record["machine"] += f", {os.getloadavg()[0]:.1f} at the end"  # the machine is shared: its load is part of it
    text = markdown(record)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(text)
        plot(record, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
