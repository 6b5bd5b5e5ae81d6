"""Time dataset preparation (parse -> sort -> k-core -> remap -> cache) and loading a prepared cache.

    python benchmarks/data_prep.py [--shared-data ../shared/data]

Uses the licensed files in ../shared/data (never copied into the repo): ML-1M as ``ml-1m.seq.txt``, the same ratings
rewritten in the official ``ratings.dat`` format (into a temporary folder, with increasing timestamps, to time the
``::`` parser of MovieLens1M), and Beauty. Everything is written to a temporary folder that is deleted afterwards.
Import time of torch/lightning is excluded; the numbers are wall-clock seconds of one run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from datamodules import MovieLens1M, SequenceFile


def timed(label: str, make) -> float:
    start = time.perf_counter()
    dm = make()
    dm.num_items
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    again = make()
    again.num_items
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    text = again.item_text
    text_time = time.perf_counter() - start
    start = time.perf_counter()
    batches = sum(1 for _ in again.train_dataloader()) + sum(1 for _ in again.val_dataloader())
    epoch = time.perf_counter() - start
    print(f"{label:<28} users {dm.num_users:>6,} items {dm.num_items:>6,} interactions "
          f"{dm.stats['interactions']:>9,} | prepare {prepared:6.2f} s | load cache {loaded:5.3f} s | "
          f"item text {text_time:5.3f} s ({sum(t is not None for t in text or [])} items) | "
          f"train+val epoch of batches {epoch:5.2f} s ({batches} batches)")
    return prepared


def write_ratings_dat(seq_file: Path, folder: Path) -> None:
    """The ML-1M ratings as UserID::MovieID::Rating::Timestamp lines (rating 5, timestamps in sequence order)."""
    folder.mkdir(parents=True)
    with open(seq_file) as f, open(folder / "ratings.dat", "w") as out:
        stamp = 956703932
        for line in f:
            user, *items = line.split()
            out.writelines(f"{user}::{item}::5::{stamp + k}\n" for k, item in enumerate(items))
    shutil.copy(seq_file.parent / "movies.dat", folder / "movies.dat")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args(argv)
    shared = args.shared_data
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timed("ML-1M (ml-1m.seq.txt)", lambda: SequenceFile(
            str(shared / "ml-1m" / "ml-1m.seq.txt"), item_text_path=str(shared / "ml-1m" / "movies.dat"),
            data_dir=str(tmp / "seq"), max_len=200))
        write_ratings_dat(shared / "ml-1m" / "ml-1m.seq.txt", tmp / "ml" / "ml-1m")
        timed("ML-1M (ratings.dat format)", lambda: MovieLens1M(data_dir=str(tmp / "ml"), max_len=200))
        timed("Beauty (Beauty.txt + tsv)", lambda: SequenceFile(
            str(shared / "beauty" / "Beauty.txt"), item_text_path=str(shared / "beauty" / "beauty_items.tsv"),
            item_id_column="s3rec_item_id", item_text_columns=["title"], data_dir=str(tmp / "seq")))


if __name__ == "__main__":
    main()
