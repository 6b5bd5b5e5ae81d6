"""Item-text tables for datasets whose interactions come without metadata (TSV / CSV / Parquet / movies.dat)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .parsing import DataFormatError, decode, parse_delimited, read_bytes

log = logging.getLogger(__name__)

TableFormat = Literal["auto", "tsv", "csv", "parquet", "movielens"]


def table_format(path: str | Path, format: TableFormat) -> str:
    """Resolve ``auto`` from the extension (.tsv/.tab/.txt, .csv, .parquet/.pq, .dat = MovieLens; .gz allowed)."""
    if format != "auto":
        return format
    name = Path(path).name.lower().removesuffix(".gz")
    for suffixes, resolved in (((".tsv", ".tab", ".txt"), "tsv"), ((".csv",), "csv"),
                               ((".parquet", ".pq"), "parquet"), ((".dat",), "movielens")):
        if name.endswith(suffixes):
            return resolved
    raise ValueError(f"cannot tell the format of {path} from its extension; pass the format argument "
                     f"(tsv, csv, parquet or movielens)")


def read_table(path: str | Path, format: str, columns: list[str], int_columns: list[str] = (),
               encoding: str = "utf-8") -> pd.DataFrame:
    """A headed TSV / CSV / Parquet table with the given required (non-empty) columns."""
    path = Path(path)
    if format == "parquet":
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise DataFormatError(path, f"not a readable Parquet file ({err})") from None
        if frame.empty:
            raise DataFormatError(path, "table is empty")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataFormatError(path, f"missing column(s) {missing}; the table has {list(frame.columns)}")
        for column in columns:
            empty = frame[column].isna().to_numpy()
            if empty.any():
                raise DataFormatError(path, f"row {int(np.argmax(empty))}: column {column!r} is empty")
        return frame
    sep, quoting = {"tsv": ("\t", csv.QUOTE_NONE), "csv": (",", csv.QUOTE_MINIMAL)}[format]
    text = decode(read_bytes(path), path, encoding)
    return parse_delimited(text, path, sep=sep, columns=columns, int_columns=int_columns, header=True,
                           quoting=quoting)


def _clean(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return items or None
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


def read_item_table(
    path: str | Path,
    format: TableFormat = "auto",
    id_column: str | None = None,
    text_columns: list[str] | None = None,
    encoding: str | None = None,
) -> dict[str, dict]:
    """Read an item-text table.

    Args:
        path: the table.
        format: tsv / csv (with a header line), parquet, movielens (``MovieID::Title (Year)::Genres``), or auto.
        id_column: column holding the raw item id (default: the first column; ignored for movielens).
        text_columns: columns to keep as text fields (default: every other column; ignored for movielens).
        encoding: text encoding (default utf-8; latin-1 for movielens, as in the official files).

    Returns:
        {str(raw item id): {column: text}}; empty cells are left out of an item's dict. A repeated id keeps its
        first row (the number of repeats is logged).
    """
    format = table_format(path, format)
    if format == "movielens":
        from .sources.movielens import read_movies_dat

        return read_movies_dat(path, encoding or "latin-1")
    if format not in ("tsv", "csv", "parquet"):
        raise ValueError(f"unknown item table format {format!r}")
    frame = read_table(path, format, [id_column] if id_column else [], encoding=encoding or "utf-8")
    if id_column is None:
        id_column = str(frame.columns[0])
        empty = frame[id_column].isna().to_numpy()
        if empty.any():
            raise DataFormatError(path, f"id column {id_column!r} is empty in data row {int(np.argmax(empty)) + 1}")
    if text_columns is None:
        text_columns = [c for c in frame.columns if c != id_column]
    missing = [c for c in text_columns if c not in frame.columns]
    if missing:
        raise DataFormatError(path, f"missing text column(s) {missing}; the table has {list(frame.columns)}")
    ids = frame[id_column].astype(str).str.strip()
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        log.warning("%s: %d repeated item ids; keeping the first row of each", path, int(repeated.sum()))
    table = {}
    columns = {c: frame[c].tolist() for c in text_columns}
    for row, item in enumerate(ids.tolist()):
        if repeated[row]:
            continue
        fields = {c: v for c in text_columns if (v := _clean(columns[c][row])) is not None}
        table[item] = fields
    return table
