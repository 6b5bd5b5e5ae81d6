"""HTTP load on `m2rec serve`: requests per second and p50 / p99 latency against the number of concurrent clients.

Two kinds of request, each client sending one after another for `--duration` seconds (asyncio + httpx in this
process; the server is started here as a subprocess, `m2rec serve --config ... --ckpt_path ...`):
  * append:    POST /users {"user": "bench-<client>", "append": [one random item]}: the live recurrent state of
               that user is carried one item forward and its top-K returned. Each client is its own user, starting
               from nothing, so its history grows by one item per request.
  * stateless: POST /recommend {"items": [--history random items]}: the whole history encoded anew per request.
Then a soak: `--soak-clients` clients appending for `--soak-duration` seconds, every answer checked (status 200,
k items). Latency is measured by the client (request sent -> answer read), so it includes HTTP, queueing, dynamic
batching and the model. The load generator shares the machine with the server: on this 2-core CPU the two compete.

    python benchmarks/serve_load.py --config configs/beauty.yaml --config configs/shared/beauty.yaml \
        --ckpt_path best --out benchmarks/results/serve_load
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(configs: list[str], ckpt_path: str, port: int, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    """`m2rec serve` on the port, once /health answers; the process and its log file."""
    cmd = [sys.executable, "-m", "m2rec_lightning.cli", "serve", *[a for c in configs for a in ("--config", c)],
           "--ckpt_path", ckpt_path, "--port", str(port), *extra]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"m2rec-serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (log: {log.name})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, Path(log.name)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become healthy in 600 s (log: {log.name})")
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def load(url: str, kind: str, clients: int, duration: float, items: list, history: int, k: int,
               seed: int, run: str) -> dict:
    """`clients` concurrent clients sending `kind` requests for `duration` seconds; latencies and failures."""
    latencies, failures = [], {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def client(c: int) -> None:
            rng = random.Random(seed * 1000 + c)
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                if kind == "append":
                    body = {"user": f"bench-{run}-{c}", "append": [rng.choice(items)], "k": k}
                    path = "/users"
                else:
                    body = {"items": rng.choices(items, k=history), "k": k}
                    path = "/recommend"
                start = time.perf_counter()
                try:
                    r = await http.post(path, json=body)
                    ok = r.status_code == 200 and len(r.json()["items"]) == k
                    why = None if ok else f"status {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as err:
                    why = f"{type(err).__name__}: {err}"
                if why is None:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures[why] = failures.get(why, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else None

    return {"kind": kind, "clients": clients, "duration_s": elapsed, "requests": len(latencies),
            "errors": sum(failures.values()), "failures": failures, "rps": len(latencies) / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": statistics.fmean(ordered) * 1e3 if ordered else None}


def catalogue(configs: list[str]) -> list:
    """The raw item ids of the config's dataset (its prepared cache)."""
    from datamodules.stats import load_datamodule

    return load_datamodule(configs).item_ids[1:].tolist()


def markdown(record: dict) -> str:
    m = record["meta"]
    lines = [
        "# `m2rec serve` under load: requests per second and latency against concurrent clients", "",
        f"Command: `{m['command']}`", "",
        f"Machine: {m['machine']}. Checkpoint: `{m['checkpoint']}` ({m['dataset']}, {m['num_items']:,} items). "
        f"Server: `m2rec serve --history {m.get('history_mode', 'whole')}"
        + "".join(f" {a}" for a in m.get("server_args", [])) + "` (dynamic batching up to "
        f"{m['max_batch_size']} requests within {m['batch_timeout'] * 1e3:g} ms), one inference worker per endpoint; "
        "the load generator (asyncio + httpx) runs on the same machine and competes with the server for its cores. "
        "Latency = client-side, request sent to answer read. append = POST /users with one new item for the client's "
        "own live user; stateless = "
        f"POST /recommend with a {m['history']}-item random history, encoded anew. k = {m['k']}. Each point ran "
        f"{m['duration']:g} s.", "",
        "| kind | clients | requests | errors | requests/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["points"]:
        lines.append(f"| {r['kind']} | {r['clients']} | {r['requests']:,} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    soak = record.get("soak")
    if soak:
        lines += ["", f"Soak: {soak['clients']} clients appending for {soak['duration_s']:.0f} s: "
                      f"{soak['requests']:,} answers, {soak['errors']} errors"
                      + (f" ({soak['failures']})" if soak["errors"] else "")
                      + f", {soak['rps']:.1f} requests/s, p50 {soak['p50_ms']:.1f} ms, p99 {soak['p99_ms']:.1f} ms."]
    ten = next((r for r in record["points"] if r["kind"] == "stateless" and r["clients"] == 10), None)
    if ten:
        lines += ["", f"Stateless {m['history']}-item histories at 10 clients: p99 {ten['p99_ms']:.1f} ms "
                      f"({'under' if ten['p99_ms'] < 100 else 'over'} the 100 ms target)."]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("append", "o-"), ("stateless", "s--")):
        rows = [r for r in record["points"] if r["kind"] == kind]
        clients = [r["clients"] for r in rows]
        ax1.plot(clients, [r["rps"] for r in rows], style, label=kind)
        ax2.plot(clients, [r["p99_ms"] for r in rows], style, label=f"{kind} p99")
        ax2.plot(clients, [r["p50_ms"] for r in rows], style, alpha=0.4, label=f"{kind} p50")
    for ax, label in ((ax1, "requests / s"), (ax2, "latency, ms")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax2.set_yscale("log")
    fig.suptitle(f"m2rec serve, {record['meta']['dataset']} checkpoint, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="the model's config(s), as for m2rec serve")
    p.add_argument("--ckpt_path", default="best")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50, 100])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    p.add_argument("--history", type=int, default=200, help="items per stateless request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--soak-clients", type=int, default=100)
    p.add_argument("--soak-duration", type=float, default=60.0, help="0 = no soak")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.002)
    p.add_argument("--history-mode", choices=["whole", "window"], default="whole",
                   help="the server's --history (whole: an append steps the recurrent state)")
    p.add_argument("--kinds", nargs="+", choices=["append", "stateless"], default=["append", "stateless"])
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to m2rec serve as is (e.g. --threads 2)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json and OUT.png")
    args = p.parse_args(argv)

    items = catalogue(args.config)
    port = free_port()
    proc, log = start_server(args.config, args.ckpt_path, port, ["--max_batch_size", str(args.max_batch_size),
                                                             "--batch_timeout", str(args.batch_timeout),
                                                             "--history", args.history_mode, *args.server_args])
    url = f"http://127.0.0.1:{port}"
    points, soak = [], None
    try:
        checkpoint = next((line.split("serving ")[1].split(" on http")[0]
                           for line in log.read_text().splitlines()
                           if line.startswith("serving ")), args.ckpt_path)
        for kind in args.kinds:
            asyncio.run(load(url, kind, 2, 2.0, items, args.history, args.k, 99, "warm"))  # warm-up
            for clients in args.clients:
                r = asyncio.run(load(url, kind, clients, args.duration, items, args.history, args.k, clients,
                                     f"{kind}{clients}"))
                print(f"{kind:9s} clients {clients:4d}: {r['rps']:7.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}", flush=True)
                points.append(r)
        if args.soak_duration > 0:
            soak = asyncio.run(load(url, "append", args.soak_clients, args.soak_duration, items, args.history,
                                    args.k, 7, "soak"))
            print(f"soak: {soak['requests']} answers, {soak['errors']} errors", flush=True)
    finally:
        stop_server(proc)
    import torch

    record = {"meta": {"command": "python benchmarks/serve_load.py " + " ".join(argv or sys.argv[1:]),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load "
                                  f"average {os.getloadavg()[0]:.1f} at the end",
                       "checkpoint": checkpoint, "dataset": Path(args.config[-1]).stem, "num_items": len(items),
                       "history": args.history, "k": args.k, "duration": args.duration,
                       "max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout,
                       "history_mode": args.history_mode, "server_args": args.server_args},
              "points": points, "soak": soak}
    text = markdown(record)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(text)
        plot(record, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
