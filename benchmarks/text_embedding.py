"""Item-text embedding benchmark.

Default mode embeds the Beauty titles (12,101 items) and the ML-1M movies (title, year, genres) with the default
model into a cache, then calls again to time a cache hit:

    python benchmarks/text_embedding.py [--data-dir ../shared/data] [--cache-dir DIR] [--device cpu] [--threads 2]

``--catalogue N`` embeds N synthetic Amazon-like items (title, brand, categories; generated, deterministic) in
resumable shards, each build in a child process: an uninterrupted build (items/s, peak RSS), then a build killed
(SIGKILL) once ``--kill-after`` shard files exist and restarted, which must compute only the remaining shards and
give the identical table; ``--ddp-items M`` adds the same M-item build as a Lightning predict job in 1 and 2 CPU
processes (``datamodules.text_embedding_job``, DDP over gloo):

    python benchmarks/text_embedding.py --catalogue 20000 --kill-after 2 --ddp-items 4000 --threads 2

``--llm-cost`` instead times the encoder on synthetic texts of fixed token length for the default model and for
Qwen2.5-shaped decoders (0.5B, 1.5B, 7B) with random weights: the same shapes cost the same time and memory, and
no download is needed. It needs the packaged MiniLM only for its tokenizer. Meant for a GPU:

    python benchmarks/text_embedding.py --llm-cost --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datamodules.text_embeddings as te  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Qwen2.5 decoder shapes (hidden, layers, heads, kv heads, ffn, vocab) from the published configs.
QWEN_SHAPES = {
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064),
}


def beauty_items(path: Path) -> tuple[list[str], list[dict]]:
    """Raw ids (s3rec_item_id, checked to be 1..N) and {"title": ...} per item of beauty_items.tsv."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    col_id, col_title = header.index("s3rec_item_id"), header.index("title")
    ids = [r[col_id] for r in body]
    if ids != [str(i) for i in range(1, len(ids) + 1)]:
        raise ValueError(f"{path}: s3rec_item_id is not 1..N in order")
    return ids, [{"title": r[col_title]} for r in body]


def movielens_items(path: Path) -> tuple[list[str], list[dict]]:
    """MovieIDs and {"title", "year", "genres"} per line of movies.dat (Latin-1)."""
    ids, fields = [], []
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        parts = line.split("::")
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected MovieID::Title (Year)::Genres, got {line!r}")
        title, year = parts[1], None
        if m := re.fullmatch(r"(.*) \((\d{4})\)", title.strip()):
            title, year = m.group(1), int(m.group(2))
        ids.append(parts[0])
        fields.append({"title": title, "year": year, "genres": parts[2].split("|")})
    return ids, fields


def cache_run(args: argparse.Namespace) -> None:
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="m2rec-text-emb-"))
    datasets = {
        "beauty": (beauty_items(args.data_dir / "beauty" / "beauty_items.tsv"), "amazon"),
        "ml-1m": (movielens_items(args.data_dir / "ml-1m" / "movies.dat"), "movielens"),
    }
    print(f"cache: {cache_dir}  device: {args.device}  threads: {torch.get_num_threads()}  batch: {args.batch_size}")
    print("| dataset | items | no text | truncated | dim | first call (s) | items/s | second call (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ((ids, fields), template) in datasets.items():
        kw = dict(template=template, device=args.device, batch_size=args.batch_size, dtype=args.dtype)
        start = time.perf_counter()
        built = te.load_or_build_text_embeddings(cache_dir, ids, fields, **kw)
        first = time.perf_counter() - start
        te._hash_files.cache_clear()  # time the second call as a new process would do it: hash the model again
        start = time.perf_counter()
        again = te.load_or_build_text_embeddings(cache_dir, ids, fields, **kw)
        second = time.perf_counter() - start
        assert torch.equal(built.table, again.table) and built.key == again.key
        print(f"| {name} | {len(ids)} | {built.num_missing} | {built.num_truncated} | {built.table.shape[1]} | "
              f"{first:.2f} | {len(ids) / first:.0f} | {second:.3f} |")


def synthetic_texts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n texts of whole vocabulary words that tokenize to exactly ``tokens`` tokens with [CLS]/[SEP]."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(words), (n, tokens - 2), generator=g).tolist()
    return [" ".join(words[i] for i in row) for row in picks]


def llm_cost(args: argparse.Namespace) -> None:
    import transformers

    base = te.TextEncoder(device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_length=512)
    print(f"device: {base.device} ({torch.cuda.get_device_name() if base.device.type == 'cuda' else 'cpu'}), "
          f"dtype {args.dtype}, batch {args.batch_size}, {args.n} texts per point")
    print("| model | pooling | params (M) | tokens/text | s per 10k texts | texts/s | peak GPU mem (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        if name in QWEN_SHAPES:
            hidden, layers, heads, kv, ffn, vocab = QWEN_SHAPES[name]
            config = transformers.Qwen2Config(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=4096,
            )
            with torch.device(base.device):
                model = transformers.Qwen2Model._from_config(config, dtype=getattr(torch, args.dtype))
            base.model, base.pooling = model.eval(), "last"
        params = sum(p.numel() for p in base.model.parameters()) / 1e6
        for tokens in args.tokens:
            texts = synthetic_texts(base.tokenizer, args.n, tokens)
            base.encode(texts[: args.batch_size])  # warm-up
            if base.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = base.encode(texts)
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - start
            assert out.shape[0] == args.n and torch.isfinite(out).all()
            mem = torch.cuda.max_memory_allocated() / 2**30 if base.device.type == "cuda" else float("nan")
            print(f"| {name} | {base.pooling} | {params:.0f} | {tokens} | {secs * 10_000 / args.n:.1f} | "
                  f"{args.n / secs:.0f} | {mem:.1f} |")
        base.model = None
        if base.device.type == "cuda":
            torch.cuda.empty_cache()


BRANDS = ["Acme", "Glow Co", "Luxe Labs", "PureSkin", "Nova", "Urban Root", "Maple & Pine", "Kizen", "Solara",
          "Bright Theory", "Hollow Oak", "Vireo", "Tidewater", "Northbound", "Copperline"]
ADJECTIVES = ["Hydrating", "Waterproof", "Organic", "Lightweight", "Professional", "Travel Size", "Long Lasting",
              "Fragrance Free", "Stainless Steel", "Rechargeable", "Ultra Soft", "Heavy Duty", "Vegan", "Compact"]
PRODUCTS = ["Face Serum", "Lipstick", "Shampoo", "Hair Dryer", "Yoga Mat", "Water Bottle", "Phone Case",
            "Running Shoes", "Backpack", "Desk Lamp", "Coffee Grinder", "Board Game", "Bluetooth Speaker", "Sunscreen"]
DETAILS = ["with Vitamin C", "for Sensitive Skin", "for Men and Women", "with USB-C Charging", "BPA Free",
           "for Kids 8+", "Non-Slip", "Dishwasher Safe", "with Carrying Case", "SPF 50", "2-Pack", "Matte Finish"]
CATEGORIES = [["Beauty & Personal Care", "Skin Care"], ["Beauty & Personal Care", "Makeup"], ["Sports & Outdoors"],
              ["Electronics", "Accessories"], ["Home & Kitchen"], ["Toys & Games"], ["Clothing, Shoes & Jewelry"]]


def synthetic_catalogue(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """n Amazon-like items: ids ``S0000001``.. and {"title", "brand", "categories"}, the same for the same seed."""
    rng = random.Random(seed)
    ids, fields = [], []
    for i in range(n):
        title = " ".join([rng.choice(BRANDS), rng.choice(ADJECTIVES), rng.choice(PRODUCTS),
                          *rng.sample(DETAILS, rng.randint(0, 3)),
                          f"{rng.randint(1, 64) * 5} {rng.choice(['ml', 'oz', 'g', 'pcs'])}", f"Model {rng.randint(100, 99999)}"])
        ids.append(f"S{i:07d}")
        fields.append({"title": title, "brand": rng.choice(BRANDS), "categories": rng.choice(CATEGORIES)})
    return ids, fields


def catalogue_child(args: argparse.Namespace) -> None:
    """One build in this process (the parent measures it): one-process, or a Lightning job over --devices."""
    ids, fields = synthetic_catalogue(args.catalogue)
    if args.devices > 1:  # the ranks share the cores one process would have
        torch.set_num_threads(max(1, torch.get_num_threads() // args.devices))
    kw = dict(template="amazon", batch_size=args.batch_size, shard_size=args.shard_size)
    start = time.perf_counter()
    if args.devices:
        from datamodules.text_embedding_job import build_text_embeddings

        table, writer = build_text_embeddings(
            dict(cache_dir=args.cache_dir, item_ids=ids, texts=fields, **kw), devices=args.devices,
            accelerator="cpu", strategy="ddp" if args.devices > 1 else "auto", shard_size=args.shard_size,
            progress=False)
        if table is None:  # ranks > 0 report nothing
            return
    else:
        table = te.load_or_build_text_embeddings(args.cache_dir, ids, fields, device="cpu", progress=False, **kw)
    print(json.dumps({"seconds": time.perf_counter() - start, "path": str(table.path)}))


def run_child(args: argparse.Namespace, n: int, cache_dir: Path, devices: int = 0,
              kill_after: int | None = None) -> dict:
    """Run one build as a child process; with ``kill_after``, SIGKILL it once that many shard files exist.
    Returns wall seconds, the child's peak RSS (GB) and its JSON line (absent when killed)."""
    cmd = [sys.executable, __file__, "--catalogue", str(n), "--child", "--cache-dir", str(cache_dir),
           "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--devices", str(devices)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if kill_after is not None:
        while child.poll() is None and len(list(cache_dir.glob("*.shards/shard-*.safetensors"))) < kill_after:
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    out, err = child.stdout.read(), child.stderr.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    if kill_after is None and child.returncode != 0:
        raise RuntimeError(f"child failed ({child.returncode}): {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1]) if kill_after is None else {}
    return result | {"wall": wall, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "killed": kill_after is not None,
                     "reused_shards": err.count("reusing finished shard"),
                     "rank_shards": re.findall(r"rank (\d): embedded (\d+) shards, reused (\d+)", err)}


def catalogue_run(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    n, root = args.catalogue, Path(args.cache_dir or tempfile.mkdtemp(prefix="m2rec-text-scale-"))
    ids, fields = synthetic_catalogue(n)
    encoder = te.TextEncoder(device="cpu", max_length=256)
    rendered = [te.render_item_text(f, "amazon") for f in fields]
    tokens = [len(t) for t in encoder.tokenize(rendered)[0]]
    shards = -(-n // args.shard_size)
    print(f"{n:,} synthetic items, {sum(tokens) / n:.1f} tokens per text on average (max {max(tokens)}), "
          f"{shards} shards of {args.shard_size}; threads {args.threads or torch.get_num_threads()}, batch "
          f"{args.batch_size}; load average before: {os.getloadavg()[0]:.1f}")
    print("| run | items | wall (s) | build (s) | items/s | peak RSS (GB) | shards computed | shards reused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    full = run_child(args, n, root / "uninterrupted")
    print(f"| uninterrupted | {n:,} | {full['wall']:.1f} | {full['seconds']:.1f} | {n / full['seconds']:.1f} | "
          f"{full['rss_gb']:.2f} | {shards} | 0 |")
    killed = run_child(args, n, root / "resumed", kill_after=args.kill_after)
    left = len(list((root / "resumed").glob("*.shards/shard-*.safetensors")))
    print(f"| killed (SIGKILL once {args.kill_after} shard files existed) | {n:,} | {killed['wall']:.1f} | - | - | "
          f"{killed['rss_gb']:.2f} | {left} | 0 |")
    resumed = run_child(args, n, root / "resumed")
    print(f"| restarted | {n:,} | {resumed['wall']:.1f} | {resumed['seconds']:.1f} | "
          f"{(n - resumed['reused_shards'] * args.shard_size) / resumed['seconds']:.1f} | {resumed['rss_gb']:.2f} | "
          f"{shards - resumed['reused_shards']} | {resumed['reused_shards']} |")
    same = torch.equal(load_file(full["path"])["embeddings"], load_file(resumed["path"])["embeddings"])
    print(f"\nrestarted table == uninterrupted table (torch.equal): {same}; load average after: "
          f"{os.getloadavg()[0]:.1f}")
    if args.ddp_items:
        m = args.ddp_items
        print(f"\nLightning predict job, {m:,} of the items, {-(-m // args.shard_size)} shards:\n")
        print("| processes | wall (s) | build (s) | items/s | peak RSS of rank 0 (GB) | shards per rank (embedded, reused) |")
        print("|---:|---:|---:|---:|---:|---|")
        tables = []
        for devices in (1, 2):
            job = run_child(args, m, root / f"ddp{devices}", devices=devices)
            tables.append(load_file(job["path"])["embeddings"])
            ranks = ", ".join(f"rank {r}: {e}, {u}" for r, e, u in job["rank_shards"])
            print(f"| {devices} | {job['wall']:.1f} | {job['seconds']:.1f} | {m / job['seconds']:.1f} | "
                  f"{job['rss_gb']:.2f} | {ranks} |")
        print(f"\n2-process table == 1-process table (torch.equal): {torch.equal(*tables)}; max abs difference "
              f"{(tables[0] - tables[1]).abs().max().item():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DATA, help="folder with beauty/ and ml-1m/")
    p.add_argument("--cache-dir", help="cache folder (default: a new temporary folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--llm-cost", action="store_true", help="time bigger encoder shapes on synthetic texts")
    p.add_argument("--n", type=int, default=2000, help="--llm-cost: texts per measurement")
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 256], help="--llm-cost: tokens per text")
    p.add_argument("--models", nargs="+", default=["all-MiniLM-L6-v2", *QWEN_SHAPES],
                   choices=["all-MiniLM-L6-v2", *QWEN_SHAPES], help="--llm-cost: the default model must come first")
    p.add_argument("--catalogue", type=int, help="embed this many synthetic Amazon-like items in resumable shards")
    p.add_argument("--shard-size", type=int, default=4096, help="--catalogue: items per shard")
    p.add_argument("--kill-after", type=int, default=2, help="--catalogue: kill the second build at this many shards")
    p.add_argument("--ddp-items", type=int, help="--catalogue: also time a job of this many items in 1 and 2 processes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.child else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.catalogue:
        catalogue_child(args) if args.child else catalogue_run(args)
    else:
        llm_cost(args) if args.llm_cost else cache_run(args)


if __name__ == "__main__":
    main()
