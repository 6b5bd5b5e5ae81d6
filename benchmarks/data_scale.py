"""Data preparation at scale: a synthetic Amazon Reviews 2023 review file of 10^5 .. 10^7 interactions, prepared by
the `Amazon2023` datamodule (read -> duplicates -> (user, time) sort -> k-core -> id maps -> cache), with the wall
time and peak resident set of that preparation.

    python benchmarks/data_scale.py generate --interactions 10000000 --out /tmp/amazon2023_synth
    python benchmarks/data_scale.py prepare --path /tmp/amazon2023_synth
    python benchmarks/data_scale.py sweep --sizes 100000 1000000 10000000 --workdir /tmp/data_scale \\
        --out benchmarks/results/data_scale.md                    # generate + prepare each size, write the record

The table (never committed; written where ``--out`` says): ``<out>/amazon2023-Synthetic/Synthetic.jsonl.gz``, the
file `Amazon2023(category="Synthetic", data_dir=<out>)` reads from its local folder (with ``with_text=False`` it
downloads nothing once the file is there), one JSON object per line in the release's schema: ``rating``, ``title``,
``text``, ``images``, ``asin``, ``parent_asin``, ``user_id`` (28 characters), ``timestamp`` (13-digit
milliseconds), ``helpful_vote``, ``verified_purchase``. ``--format parquet`` writes the same columns (no text) to
``<out>/Synthetic.parquet`` for `InteractionTable` instead.

The law: user and item of each interaction are drawn independently, p(rank r) ∝ (r + q)^-s (Zipf-Mandelbrot,
s = 1 by default) over 0.27 N user ranks and 0.055 N item ranks; the offset q is set so the most active user draws
10^-3 of all interactions and the most popular item 4.5 * 10^-3 (with q = 0 one user would hold ~7 %). At
N = 10^7 that leaves ~1.57M distinct users and ~520k distinct items (~0.16-0.21 N and ~0.05 N at every size);
ranks map to ids through a random permutation. Each user's timestamps are uniform over
a random span of up to three years, sorted, and a fraction (``--tie-fraction``, 5 %) repeats the user's previous
timestamp exactly (ties); the file lists the rows in a random order, so the datamodule has to sort them.

`prepare` runs the datamodule in a FRESH subprocess (its processed folder and digest memo deleted first, so it builds
from the raw file) and reads that child's peak resident set from `wait4` (``ru_maxrss``: it includes the
torch/Lightning import, ~0.7 GB; on Linux it also starts at the parent's resident set at fork time, so `sweep`
generates each table in a child as well and its own process stays small). The child also records the time and the
running peak RSS after each step it can see from outside the datamodule (hashing the raw file, reading,
preprocessing, writing and verifying the cache).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CATEGORY = "Synthetic"
RESULT_TAG = "DATA_SCALE_RESULT "
GB = 1e9
MS_2012 = 1_325_376_000_000  # 2012-01-01 in ms
MS_2023 = 1_672_531_200_000  # 2023-01-01 in ms
THREE_YEARS_MS = 3 * 365 * 86_400_000

_WORDS = ("great product works well love it the quality is fine would buy again not as described smells nice "
          "skin feels soft arrived quickly packaging was damaged color matches picture too small for me").split()


# ---- generation -----------------------------------------------------------------------------------------------------

def zipf_offset(ranks: int, exponent: float, top_share: float) -> float:
    """The offset q of p(r) ∝ (r + q)^-exponent, r = 1..ranks, that gives rank 1 the probability ``top_share``
    (bisection; 0 when even q = 0 gives less)."""
    def share(q: float) -> float:
        weights = (np.arange(1, ranks + 1, dtype=np.float64) + q) ** -exponent
        return weights[0] / weights.sum()

    lo, hi = 0.0, float(ranks)
    if share(lo) <= top_share:
        return 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) > top_share else (lo, mid)
    return hi


def zipf_draw(rng: np.random.Generator, n: int, ranks: int, exponent: float, offset: float) -> np.ndarray:
    """n draws of a rank in 0..ranks-1 with p(r) ∝ (r + 1 + offset)^-exponent (inverse CDF, vectorised)."""
    weights = (np.arange(1, ranks + 1, dtype=np.float64) + offset) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    draws = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(draws, ranks - 1)


def _id_bytes(rng: np.random.Generator, count: int, prefix: bytes, width: int, alphabet: bytes) -> np.ndarray:
    """(count, width) uint8 distinct ids: ``prefix`` + random characters + the index in base len(alphabet).

    The index digits make every id distinct; a random permutation of the index hides the rank order."""
    base = len(alphabet)
    digits = 1
    while base**digits < count:
        digits += 1
    free = width - len(prefix) - digits
    if free < 0:
        raise ValueError(f"{count} ids do not fit {width} characters")
    table = np.frombuffer(alphabet, dtype=np.uint8)
    out = np.empty((count, width), dtype=np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    out[:, len(prefix): len(prefix) + free] = table[rng.integers(0, base, size=(count, free))]
    index = rng.permutation(count).astype(np.int64)
    for k in range(digits):
        out[:, width - 1 - k] = table[index % base]
        index //= base
    return out


def synth_interactions(n: int, seed: int = 0, user_ranks: int | None = None, item_ranks: int | None = None,
                       user_exponent: float = 1.0, item_exponent: float = 1.0, user_top_share: float = 1e-3,
                       item_top_share: float = 4.5e-3, tie_fraction: float = 0.05) -> dict:
    """The interactions in file order as integer arrays: user and item indices, timestamps (ms), ratings.

    Returns:
        dict with ``user`` (n,) int64 user index, ``item`` (n,) int64 item index, ``timestamp`` (n,) int64,
        ``rating`` (n,) int8 1..5, ``helpful`` (n,) int8 0..9, ``verified`` (n,) bool, ``num_users``, ``num_items``
        (index ranges).
    """
    rng = np.random.default_rng(seed)
    user_ranks = user_ranks or max(10, round(0.27 * n))
    item_ranks = item_ranks or max(10, round(0.055 * n))
    users = zipf_draw(rng, n, user_ranks, user_exponent, zipf_offset(user_ranks, user_exponent, user_top_share))
    items = zipf_draw(rng, n, item_ranks, item_exponent, zipf_offset(item_ranks, item_exponent, item_top_share))
    users = rng.permutation(user_ranks)[users]  # rank -> user index
    items = rng.permutation(item_ranks)[items]

    # timestamps: per user, sorted uniform draws over [start, start + span), then ties copy the previous one
    start = rng.integers(MS_2012, MS_2023, size=user_ranks)
    span = rng.integers(86_400_000, THREE_YEARS_MS, size=user_ranks)
    stamps = start[users] + (rng.random(n) * span[users]).astype(np.int64)
    by_user = np.lexsort((stamps, users))
    sorted_users, sorted_stamps = users[by_user], stamps[by_user]
    tie = rng.random(n) < tie_fraction
    tie[0] = False
    tie[1:] &= sorted_users[1:] == sorted_users[:-1]
    source = np.where(tie, 0, np.arange(n))
    np.maximum.accumulate(source, out=source)
    sorted_stamps = sorted_stamps[source]
    stamps[by_user] = sorted_stamps
    del by_user, sorted_users, sorted_stamps, source, tie

    order = rng.permutation(n)  # the file order
    return {
        "user": users[order],
        "item": items[order],
        "timestamp": stamps[order],
        "rating": rng.choice(np.arange(1, 6, dtype=np.int8), size=n, p=[0.08, 0.06, 0.1, 0.16, 0.6]),
        "helpful": np.minimum(rng.geometric(0.6, size=n) - 1, 9).astype(np.int8),
        "verified": rng.random(n) < 0.9,
        "num_users": user_ranks,
        "num_items": item_ranks,
    }


def _texts(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    """(count, width) uint8: sentences of words, cut or padded with spaces to exactly ``width`` characters."""
    out = np.full((count, width), ord(" "), dtype=np.uint8)
    for row in range(count):
        words = " ".join(rng.choice(_WORDS, size=width // 3)).encode()[:width]
        out[row, : len(words)] = np.frombuffer(words, dtype=np.uint8)
    return out


class _Line:
    """A fixed-width JSON line template: every row has the same length, so rows are built as one uint8 matrix."""

    def __init__(self, title_width: int, text_width: int):
        parts = [
            ('{"rating": ', None), ("rating", 1), (".0, \"title\": \"", None), ("title", title_width),
            ('", "text": "', None), ("text", text_width), ('", "images": [], "asin": "', None), ("asin", 10),
            ('", "parent_asin": "', None), ("parent_asin", 10), ('", "user_id": "', None), ("user_id", 28),
            ('", "timestamp": ', None), ("timestamp", 13), (', "helpful_vote": ', None), ("helpful_vote", 1),
            (', "verified_purchase": ', None), ("verified", 5), ("}\n", None),
        ]
        template, self.slots, position = b"", {}, 0
        for text, width in parts:
            if width is None:
                template += text.encode()
                position += len(text)
            else:
                template += b" " * width
                self.slots[text] = slice(position, position + width)
                position += width
        self.template = np.frombuffer(template, dtype=np.uint8)
        self.width = len(template)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n,) non-negative int64 -> (n, width) uint8 ASCII digits, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers[None, :]) % 10 + ord("0")).astype(np.uint8)


def generate(n: int, out: Path, seed: int = 0, format: str = "jsonl", text_width: int = 160,
             chunk: int = 250_000, compresslevel: int = 1, **law) -> dict:
    """Write the synthetic table; returns its manifest (also written to ``<out>/manifest.json``)."""
    start = time.perf_counter()
    data = synth_interactions(n, seed, **law)
    rng = np.random.default_rng(seed + 1)
    user_ids = _id_bytes(rng, data["num_users"], b"A", 28, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    item_ids = _id_bytes(rng, data["num_items"], b"B0", 10, b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    out.mkdir(parents=True, exist_ok=True)
    if format == "jsonl":
        path = out / f"amazon2023-{CATEGORY}" / f"{CATEGORY}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, data, user_ids, item_ids, rng, text_width, chunk, compresslevel)
    elif format == "parquet":
        path = out / f"{CATEGORY}.parquet"
        _write_parquet(path, data, user_ids, item_ids, chunk * 4)
    else:
        raise ValueError(f"format must be jsonl or parquet, got {format!r}")
    users, items = np.unique(data["user"]), np.unique(data["item"])
    manifest = {
        "path": str(path), "format": format, "interactions": n, "seed": seed, "law": law,
        "distinct_users": len(users), "distinct_items": len(items),
        "max_user_interactions": int(np.bincount(data["user"]).max()),
        "max_item_interactions": int(np.bincount(data["item"]).max()),
        "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_jsonl(path: Path, data: dict, user_ids: np.ndarray, item_ids: np.ndarray, rng: np.random.Generator,
                 text_width: int, chunk: int, compresslevel: int) -> None:
    line = _Line(24, text_width)
    titles, texts = _texts(rng, 32, 24), _texts(rng, 256, text_width)
    verified = np.frombuffer(b"true false", dtype=np.uint8).reshape(2, 5)
    n = len(data["user"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as f:
        for lo in range(0, n, chunk):
            rows = slice(lo, min(lo + chunk, n))
            m = rows.stop - rows.start
            block = np.empty((m, line.width), dtype=np.uint8)
            block[:] = line.template
            s = line.slots
            block[:, s["rating"]] = (data["rating"][rows] + ord("0")).astype(np.uint8)[:, None]
            block[:, s["title"]] = titles[rng.integers(0, len(titles), size=m)]
            block[:, s["text"]] = texts[rng.integers(0, len(texts), size=m)]
            parent = item_ids[data["item"][rows]]
            block[:, s["parent_asin"]] = parent
            asin = parent.copy()  # a variant of the product family for ~20 % of the reviews
            variant = rng.random(m) < 0.2
            asin[variant, -1] = np.frombuffer(b"XYZ", dtype=np.uint8)[rng.integers(0, 3, size=int(variant.sum()))]
            block[:, s["asin"]] = asin
            block[:, s["user_id"]] = user_ids[data["user"][rows]]
            block[:, s["timestamp"]] = _digits(data["timestamp"][rows], 13)
            block[:, s["helpful_vote"]] = (data["helpful"][rows] + ord("0")).astype(np.uint8)[:, None]
            block[:, s["verified"]] = verified[(~data["verified"][rows]).astype(np.int64)]
            f.write(block.data)
    os.replace(tmp, path)


def _write_parquet(path: Path, data: dict, user_ids: np.ndarray, item_ids: np.ndarray, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(ids: np.ndarray, index: np.ndarray) -> pa.Array:
        return pa.array(ids[index].view(f"S{ids.shape[1]}").ravel()).cast(pa.string())

    schema = pa.schema([("user_id", pa.string()), ("parent_asin", pa.string()), ("timestamp", pa.int64()),
                        ("rating", pa.float64()), ("helpful_vote", pa.int64()), ("verified_purchase", pa.bool_())])
    n = len(data["user"])
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(0, n, row_group):
            rows = slice(lo, min(lo + row_group, n))
            writer.write_table(pa.table([
                strings(user_ids, data["user"][rows]), strings(item_ids, data["item"][rows]),
                pa.array(data["timestamp"][rows]), pa.array(data["rating"][rows].astype(np.float64)),
                pa.array(data["helpful"][rows].astype(np.int64)), pa.array(data["verified"][rows]),
            ], schema=schema))
    os.replace(tmp, path)


# ---- preparation, in a fresh child process --------------------------------------------------------------------------

def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_datamodule(path: Path, format: str, **options):
    """The datamodule over a generated folder, no item text: Amazon2023 over the JSON-lines file (``jsonl``), the same
    file through Hugging Face ``datasets`` (``datasets``: converted once into an Arrow cache beside it, then
    memory-mapped), or InteractionTable (parquet)."""
    from datamodules import Amazon2023

    if format == "jsonl":
        return Amazon2023(CATEGORY, with_text=False, data_dir=str(path), **options)
    if format == "datasets":
        review = path / f"amazon2023-{CATEGORY}" / f"{CATEGORY}.jsonl.gz"
        return Amazon2023(CATEGORY, source="datasets", review_dataset=str(review), with_text=False,
                          data_dir=str(path), **options)
    from datamodules import InteractionTable

    return InteractionTable(str(path / f"{CATEGORY}.parquet"), item_column="parent_asin", data_dir=str(path / "data"),
                            **options)


def _child(args: argparse.Namespace) -> None:
    """Build the cache once, timing the steps the base class calls (wrapped here, not changed)."""
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from datamodules import base

    steps: list[dict] = []

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            result = fn(*a, **k)
            steps.append({"step": name(result) if callable(name) else name,
                          "seconds": round(time.perf_counter() - t, 2), "peak_rss": _maxrss()})
            return result
        return wrapper

    import_seconds, import_rss = time.perf_counter() - start, _maxrss()
    base.file_digests = timed("hash raw file", base.file_digests)
    base.preprocess = timed("preprocess", base.preprocess)
    base.save_cache = timed("write cache", base.save_cache)
    base.load_cache = timed(lambda r: "cache lookup (miss)" if r is None else "load + verify cache", base.load_cache)
    dm = make_datamodule(Path(args.path), args.format, min_user_interactions=args.min_user,
                         min_item_interactions=args.min_item)
    dm.read_interactions = timed("read", dm.read_interactions)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    eval_users = len(dm.eval_dataset("test"))
    train_samples = len(dm.train_dataset())
    prepare_seconds = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    stats = dm.stats
    result = {
        "import_seconds": round(import_seconds, 2), "import_rss": import_rss,
        "prepare_seconds": round(prepare_seconds, 2), "steps": steps,
        "raw_interactions": stats["raw_interactions"], "raw_users": stats["raw_users"],
        "raw_items": stats["raw_items"], "duplicates": stats["duplicates"],
        "kcore_rounds": len(stats["kcore"]["rounds"]), "users": stats["users"], "items": stats["items"],
        "interactions": stats["interactions"], "tied_interactions": stats.get("tied_interactions"),
        "eval_users": eval_users, "train_samples": train_samples,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def prepare(path: Path, format: str = "jsonl", min_user: int = 5, min_item: int = 5, profile: bool = False,
            keep_cache: bool = False) -> dict:
    """Prepare the generated table in a fresh subprocess; its wall time and peak RSS (wait4's ru_maxrss)."""
    data_dir = path / f"amazon2023-{CATEGORY}" if format in ("jsonl", "datasets") else path / "data" / CATEGORY
    if not keep_cache:
        shutil.rmtree(data_dir / "processed", ignore_errors=True)  # build from the raw file, hashing included
    command = [sys.executable, str(Path(__file__).resolve()), "_child", "--path", str(path), "--format", format,
               "--min-user", str(min_user), "--min-item", str(min_item)] + (["--profile"] if profile else [])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"preparation failed (exit {proc.returncode}):\n{output[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result.update(wall_seconds=round(wall, 2), peak_rss=usage.ru_maxrss * 1024, path=str(path), format=format,
                  load_before=load_before, load_after=os.getloadavg()[0])
    return result


# ---- the record -----------------------------------------------------------------------------------------------------

def machine() -> str:
    import pandas
    import pyarrow
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{cpu}, {os.cpu_count()} cores, {memory / GB:.1f} GB RAM, Python {platform.python_version()}, "
            f"numpy {np.__version__}, pandas {pandas.__version__}, pyarrow {pyarrow.__version__}, "
            f"torch {torch.__version__}")


def render(rows: list[dict], command: str) -> str:
    lines = [
        "# Data preparation at scale (synthetic Amazon Reviews 2023)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        "",
        ("Each row: one synthetic review file (`benchmarks/data_scale.py generate`; Zipf-Mandelbrot users and "
         "items, s = 1, random file order, 5 % tied timestamps), prepared by `Amazon2023(category=\"Synthetic\", "
         "with_text=False)` with the default 5-core filter, in a fresh process from the raw file (digest, read, "
         "preprocess, cache write and verification). Prepare = `prepare_data()` + `setup(\"fit\")` + building the "
         "train and test datasets in the child; wall = the child's whole run including the torch/Lightning import; "
         "peak RSS = the child's `ru_maxrss` (wait4). GB = 10^9 bytes. Load average: the machine's 1-minute "
         "load before -> after the preparation (other jobs on this machine slow every step when it is above the "
         "core count)."),
        "",
        ("| interactions | file (GB, gz) | generate (s) | raw users | raw items | kept users | kept items "
         "| kept interactions | k-core rounds | prepare (s) | wall (s) | peak RSS (GB) "
         "| hash / read / preprocess / cache (s) | load average (1 min) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        by = {s["step"]: s["seconds"] for s in r["steps"]}
        cache = by.get("write cache", 0) + by.get("load + verify cache", 0)
        lines.append(
            f"| {r['raw_interactions']:,} | {r['file_bytes'] / GB:.2f} | {r['generate_seconds']:.0f} "
            f"| {r['raw_users']:,} | {r['raw_items']:,} "
            f"| {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {r['kcore_rounds']} "
            f"| {r['prepare_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['peak_rss'] / GB:.2f} "
            f"| {by.get('hash raw file', 0):.2f} / {by.get('read', 0):.2f} / {by.get('preprocess', 0):.2f} / "
            f"{cache:.2f} | {r['load_before']:.1f} -> {r['load_after']:.1f} |")
    lines.append("")
    lines.append("Peak RSS after each step (GB, running maximum of the child):")
    lines.append("")
    lines.append("| interactions | after import | " + " | ".join(s["step"] for s in rows[0]["steps"]) + " |")
    lines.append("|---:|---:|" + "---:|" * len(rows[0]["steps"]))
    for r in rows:
        lines.append(f"| {r['raw_interactions']:,} | {r['import_rss'] / GB:.2f} | "
                     + " | ".join(f"{s['peak_rss'] / GB:.2f}" for s in r["steps"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic table")
    gen.add_argument("--interactions", type=int, required=True)
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    gen.add_argument("--text-width", type=int, default=160, help="characters of review text per line")
    gen.add_argument("--user-exponent", type=float, default=1.0)
    gen.add_argument("--item-exponent", type=float, default=1.0)
    gen.add_argument("--user-top-share", type=float, default=1e-3)
    gen.add_argument("--item-top-share", type=float, default=4.5e-3)
    gen.add_argument("--tie-fraction", type=float, default=0.05)
    prep = sub.add_parser("prepare", help="prepare a generated table in a fresh process; print time and peak RSS")
    prep.add_argument("--path", type=Path, required=True, help="the folder `generate --out` wrote")
    prep.add_argument("--profile", action="store_true", help="print the child's cProfile (cumulative) to stderr")
    sweep = sub.add_parser("sweep", help="generate + prepare several sizes and write the markdown record")
    sweep.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    sweep.add_argument("--workdir", type=Path, required=True, help="where the tables go (deleted after each size)")
    sweep.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_scale.md")
    sweep.add_argument("--keep", action="store_true", help="keep the generated tables")
    prep.add_argument("--format", choices=("jsonl", "datasets", "parquet"), default="jsonl",
                      help="datasets: the jsonl file through Amazon2023(source='datasets'); run it twice to time the "
                           "Arrow conversion, then a preparation from the Arrow cache")
    sweep.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    for p in (prep, sweep):
        p.add_argument("--min-user", type=int, default=5)
        p.add_argument("--min-item", type=int, default=5)
    child = sub.add_parser("_child")
    child.add_argument("--path", required=True)
    child.add_argument("--format", default="jsonl")
    child.add_argument("--min-user", type=int, default=5)
    child.add_argument("--min-item", type=int, default=5)
    child.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "_child":
        _child(args)
    elif args.command == "generate":
        law = {"user_exponent": args.user_exponent, "item_exponent": args.item_exponent,
               "user_top_share": args.user_top_share, "item_top_share": args.item_top_share,
               "tie_fraction": args.tie_fraction}
        print(json.dumps(generate(args.interactions, args.out, args.seed, args.format, args.text_width, **law),
                         indent=1))
    elif args.command == "prepare":
        result = prepare(args.path, args.format, args.min_user, args.min_item, args.profile)
        print(json.dumps(result, indent=1))
    else:
        rows = []
        for n in args.sizes:
            folder = args.workdir / f"n{n}"
            # generated in a child too: a forked child's ru_maxrss starts at the parent's resident set, so the
            # parent must never hold a table
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "generate", "--interactions", str(n),
                            "--out", str(folder), "--format", args.format], check=True, stdout=subprocess.DEVNULL)
            manifest = json.loads((folder / "manifest.json").read_text())
            print(f"generated {n:,} interactions in {manifest['seconds']} s: {manifest['path']}", flush=True)
            result = prepare(folder, args.format, args.min_user, args.min_item)
            result.update(file_bytes=manifest["bytes"], generate_seconds=manifest["seconds"])
            rows.append(result)
            print(json.dumps(result), flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        command = "python benchmarks/data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(rows, command))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
