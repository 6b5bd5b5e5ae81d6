"""Item-text embedding benchmark.

Default mode embeds the Beauty titles (12,101 items) and the ML-1M movies (title, year, genres) with the default
model into a cache, then calls again to time a cache hit:

    python benchmarks/text_embedding.py [--data-dir ../shared/data] [--cache-dir DIR] [--device cpu] [--threads 2]

``--llm-cost`` instead times the encoder on synthetic texts of fixed token length for the default model and for
Qwen2.5-shaped decoders (0.5B, 1.5B, 7B) with random weights: the same shapes cost the same time and memory, and
no download is needed. It needs the packaged MiniLM only for its tokenizer. Meant for a GPU:

    python benchmarks/text_embedding.py --llm-cost --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
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
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    llm_cost(args) if args.llm_cost else cache_run(args)


if __name__ == "__main__":
    main()
