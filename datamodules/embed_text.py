"""``python -m datamodules.embed_text --config cfg.yaml [--data.OPTION VALUE ...] [--devices N] [--accelerator A]
[--strategy S] [--shard_size K]``: build a dataset's item-text table across devices before training.

Reads the ``data:`` sections and ``--data...`` options as ``m2rec stats`` does (so it keys the same processed data
and the same text table ``m2rec fit`` then loads), prepares the data, and embeds the items' texts as a Lightning
predict job (``datamodules.text_embedding_job``): ``--devices 8 --accelerator gpu --strategy ddp`` gives each GPU
an eighth of the shard files. Interrupted, it resumes from the shards already written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from .stats import StatsUsageError, parse_datamodule
from .text_embedding_job import build_text_embeddings


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2rec embed-text", description=__doc__.split("\n\n")[0],
        epilog="Every other argument (--config, --data...) is read as by m2rec stats.")
    parser.add_argument("--devices", type=_devices, default=1, help="processes / devices (default 1), or 'auto'")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (default auto)")
    parser.add_argument("--strategy", default="auto", help="ddp for several devices (default auto)")
    parser.add_argument("--shard_size", type=int, default=4096,
                        help="items per resumable shard file (default 4096; keep it when resuming)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        parser.print_help()
        raise SystemExit(0)
    options, rest = parser.parse_known_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        datamodule = parse_datamodule(rest)
    except StatsUsageError as err:
        parser.error(str(err))
    if datamodule.text is None:
        parser.error(f"data.text is not set for {datamodule.name}: there is no text table to build")
    from m2rec_lightning.cli import user_errors  # the errors m2rec prints as one line

    start = time.perf_counter()
    try:
        table, writer = build_text_embeddings(
            datamodule.text_build_arguments(), devices=options.devices, accelerator=options.accelerator,
            strategy=options.strategy, shard_size=options.shard_size)
    except (*user_errors(), ValueError) as err:  # ValueError: a bad --shard_size or Trainer option
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if table is not None:
        shards = "" if writer is None else f" (rank 0 embedded {writer.embedded} shards, reused {writer.reused})"
        print(f"item-text table {tuple(table.table.shape)} at {table.path}{shards} in "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
