"""Preprocessed sequence files as papers ship them: S3Rec / FMLP-Rec ``user item item ...``, SASRec ``user item``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import numpy as np

from ..item_tables import TableFormat
from ..parsing import DataFormatError, ids_from_strings, read_text, split_lines
from ..preprocess import Interactions
from .local_files import LocalFiles


def read_user_items(path: str | Path, encoding: str = "utf-8") -> Interactions:
    """One user per line, ``user item item ...`` (whitespace-separated), items oldest first.

    A line with a user and no items contributes nothing (counted as ``users_without_items``). A user on several
    lines gets the lines' items concatenated in file order.
    """
    path = Path(path)
    rows = [line.split() for _, line in split_lines(read_text(path, encoding))]
    lengths = np.fromiter((len(r) - 1 for r in rows), dtype=np.int64, count=len(rows))
    users = np.repeat(ids_from_strings([r[0] for r in rows]), lengths)
    items = list(itertools.chain.from_iterable(r[1:] for r in rows))
    if len(items) == 0:
        raise DataFormatError(path, "no interactions: expected lines of the form 'user item item ...'")
    return Interactions(users, ids_from_strings(items), None,
                        notes={"users_without_items": int((lengths == 0).sum())})


def read_user_item_pairs(path: str | Path, encoding: str = "utf-8") -> Interactions:
    """One interaction per line, ``user item`` (whitespace-separated), in time order per user (SASRec format)."""
    path = Path(path)
    lines = split_lines(read_text(path, encoding))
    if not lines:
        raise DataFormatError(path, "file is empty")
    tokens = [line.split() for _, line in lines]
    width = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    if (width != 2).any():
        number, line = lines[int(np.argmax(width != 2))]
        raise DataFormatError(path, f"expected 2 whitespace-separated fields 'user item', found "
                                    f"{len(line.split())}: {line!r}", number)
    pairs = np.array(tokens)
    return Interactions(ids_from_strings(pairs[:, 0]), ids_from_strings(pairs[:, 1]), None)


class SequenceFile(LocalFiles):
    """Interactions from a preprocessed sequence file, with an optional item-text table.

    Time order is the file order (these files carry no timestamps). Raw ids are kept as integers when every id is
    a plain integer, else as strings. With the default 5-core filter, ``Beauty.txt`` gives 22,363 users / 12,101
    items / 198,502 interactions and ``ml-1m.seq.txt`` 6,040 / 3,416 / 999,611.

    Example (YAML ``data:`` section)::

        class_path: datamodules.SequenceFile
        init_args:
          path: ../shared/data/beauty/Beauty.txt
          item_text_path: ../shared/data/beauty/beauty_items.tsv
          item_id_column: s3rec_item_id
          item_text_columns: [title]

    Args:
        path: the interaction file.
        format: ``user_items``: one user per line, ``user item item ...`` (S3Rec, FMLP-Rec, ...);
            ``user_item_pairs``: one interaction per line, ``user item`` (SASRec).
        item_text_path: optional item-text table whose ids match the file's item ids.
        item_text_format: ``auto`` (from the extension), ``tsv``, ``csv``, ``parquet`` or ``movielens`` (movies.dat).
        item_id_column: id column of the table (default: its first column).
        item_text_columns: text columns to keep (default: all other columns).
        item_text_encoding: encoding of the table (default utf-8; latin-1 for movielens).
        encoding: encoding of the interaction file.
        name: folder name under ``data_dir`` for the cache (default: the file's name without extension).
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    missing_hint = ("Pass the path of an existing sequence file (SequenceFile(path=...), --data.init_args.path on the "
                    "command line).")

    def __init__(
        self,
        path: str,
        format: Literal["user_items", "user_item_pairs"] = "user_items",
        item_text_path: str | None = None,
        item_text_format: TableFormat = "auto",
        item_id_column: str | None = None,
        item_text_columns: list[str] | None = None,
        item_text_encoding: str | None = None,
        encoding: str = "utf-8",
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if format not in ("user_items", "user_item_pairs"):
            raise ValueError(f"format must be 'user_items' or 'user_item_pairs', got {format!r}")
        self._set_files(path, name, item_text_path, item_text_format, item_id_column, item_text_columns,
                        item_text_encoding)
        self.format = format
        self.encoding = encoding

    def read_interactions(self) -> Interactions:
        reader = read_user_items if self.format == "user_items" else read_user_item_pairs
        return reader(self.path, self.encoding)
