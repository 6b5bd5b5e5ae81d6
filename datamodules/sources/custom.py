"""Your own data: an interaction table (CSV / TSV / Parquet), or a small subclass of SequentialDataModule.

A new dataset needs a ``name`` (its folder under ``data_dir``), ``raw_files`` (their contents key the cache) and
``read_interactions``; ``download`` and ``read_item_text`` are optional. Everything else (sorting, k-core, id maps,
leave-one-out, caching, loaders) comes from the base class. Example, for the Retailrocket ``events.csv``
(``timestamp,visitorid,event,itemid,transactionid``) keeping only views (this code is run by
tests/test_data_custom.py)::

    from pathlib import Path

    import pandas as pd

    from datamodules import Interactions, SequentialDataModule
    from datamodules.parsing import require_file


    class RetailrocketViews(SequentialDataModule):
        '''Retailrocket product views.

        Args:
            event: which event type counts as an interaction.
            **kwargs: SequentialDataModule options.
        '''

        def __init__(self, event: str = "view", **kwargs):
            super().__init__(**kwargs)
            self.event = event

        @property
        def name(self) -> str:
            return "retailrocket"

        def raw_files(self) -> list[Path]:
            return [self.raw_dir / "events.csv"]

        def download(self) -> None:
            require_file(self.raw_files()[0], f"Get events.csv from Kaggle (retailrocket) into {self.raw_dir}.")

        def read_interactions(self) -> Interactions:
            events = pd.read_csv(self.raw_files()[0], usecols=["timestamp", "visitorid", "event", "itemid"])
            keep = (events["event"] == self.event).to_numpy()
            return Interactions(events["visitorid"].to_numpy()[keep], events["itemid"].to_numpy()[keep],
                                events["timestamp"].to_numpy()[keep],
                                notes={"other_events_skipped": int((~keep).sum())})

Use it like any datamodule: ``RetailrocketViews(data_dir="data").num_items`` or, in YAML,
``data: {class_path: my_module.RetailrocketViews, init_args: {max_len: 50}}``. Counts passed in ``notes`` appear in
``stats``, so a documented filter stays visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..item_tables import TableFormat, read_table, table_format
from ..parsing import DataFormatError, ids_from_strings, read_text, split_lines
from ..preprocess import Interactions
from .local_files import LocalFiles


def _out_of_range(numbers: np.ndarray) -> np.ndarray:
    """Mask of timestamps that are not finite or do not fit int64: cast to int64 they would wrap to -2**63 (or
    another wrong value) and silently move the interaction to the start of the user's history."""
    if numbers.dtype.kind == "i":
        return np.zeros(len(numbers), dtype=bool)
    if numbers.dtype.kind == "u":
        return numbers > np.iinfo(np.int64).max
    floats = numbers.astype(np.float64)
    # float64(2**63 - 1) rounds up to 2**63, so the bound is exclusive; every float below it converts exactly
    return ~np.isfinite(floats) | (floats >= 2.0**63) | (floats < -(2.0**63))


def _check_range(numbers: np.ndarray, shown: pd.Series, path: Path, row_to_line) -> None:
    bad = _out_of_range(numbers)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataFormatError(path, f"timestamp {str(shown.iloc[row])!r} is not a finite number that fits a 64-bit "
                                    f"integer (|t| < 2**63)", row_to_line(row))


def parse_timestamps(values: pd.Series, path: Path, row_to_line) -> np.ndarray:
    """Numbers as they are (int64 or float64); datetimes and ISO 8601 strings as int64 nanoseconds since the epoch.
    Numbers must be finite and within int64's range.

    Args:
        values: the timestamp column.
        path: file name, for errors.
        row_to_line: maps a 0-based data row to the position to report.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = values
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.to_numpy()
        if np.isnan(numbers.astype(np.float64)).any():
            row = int(np.argmax(np.isnan(numbers.astype(np.float64))))
            raise DataFormatError(path, "timestamp is empty", row_to_line(row))
        _check_range(numbers, values, path, row_to_line)
        return numbers.astype(np.int64) if numbers.dtype.kind in "iu" else numbers.astype(np.float64)
    else:
        text = values.astype(str).str.strip()
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.notna().all():
            _check_range(numbers.to_numpy(), text, path, row_to_line)
            exact = (numbers == numbers.round()).all()
            return numbers.to_numpy().astype(np.int64 if exact else np.float64)
        stamps = pd.to_datetime(text, errors="coerce", format="ISO8601", utc=True)
        bad = (stamps.isna() & numbers.isna()).to_numpy()
        if bad.any() or numbers.notna().any():
            row = int(np.argmax(bad)) if bad.any() else int(np.argmax(numbers.notna().to_numpy()))
            raise DataFormatError(path, f"timestamp {text.iloc[row]!r} is not a number or an ISO 8601 date "
                                        f"(all rows must use one of the two)", row_to_line(row))
    try:
        stamps = pd.to_datetime(stamps, utc=True)
        return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(nanoseconds=1)).to_numpy(dtype=np.int64)
    except (pd.errors.OutOfBoundsDatetime, OverflowError):
        raise DataFormatError(path, "timestamp is outside the dates that int64 nanoseconds hold (1677-2262)",
                              row_to_line(_first_out_of_range(stamps))) from None


def _first_out_of_range(stamps: pd.Series) -> int:
    """The first row whose date int64 nanoseconds cannot hold (the error path only: one row at a time)."""
    for row, stamp in enumerate(stamps):
        try:
            pd.Timestamp(stamp).as_unit("ns")
        except (pd.errors.OutOfBoundsDatetime, OverflowError):
            return row
    return 0


def read_interaction_table(path: str | Path, user_column: str, item_column: str, timestamp_column: str | None,
                           format: str, encoding: str = "utf-8") -> Interactions:
    """Read user/item(/timestamp) columns of a headed CSV / TSV or a Parquet file."""
    path = Path(path)
    columns = [user_column, item_column] + ([timestamp_column] if timestamp_column else [])
    frame = read_table(path, format, columns, encoding=encoding)

    def row_to_line(row: int) -> int | str:
        if format == "parquet":
            return f"row {row}"
        return split_lines(read_text(path, encoding))[row + 1][0]  # +1 skips the header

    timestamps = parse_timestamps(frame[timestamp_column], path, row_to_line) if timestamp_column else None
    ids = [frame[c] if pd.api.types.is_integer_dtype(frame[c]) else ids_from_strings(frame[c].astype(str).str.strip())
           for c in (user_column, item_column)]
    return Interactions(np.asarray(ids[0]), np.asarray(ids[1]), timestamps)


class InteractionTable(LocalFiles):
    """Interactions from a table with user, item and (optionally) timestamp columns.

    Rows are sorted by timestamp per user (stable: equal timestamps keep the file order); without a timestamp
    column the file order is the time order. Timestamps may be integers, floats, datetimes (Parquet) or ISO 8601
    strings. Other columns are ignored.

    Args:
        path: .csv, .tsv (.gz allowed) or .parquet file with a header.
        user_column: user id column.
        item_column: item id column.
        timestamp_column: timestamp column, or null to use the file order.
        format: ``auto`` (from the extension), ``csv``, ``tsv`` or ``parquet``.
        encoding: text encoding of a CSV/TSV file.
        item_text_path: optional item-text table (TSV / CSV / Parquet / movies.dat) whose ids match ``item_column``.
        item_text_format: ``auto``, ``tsv``, ``csv``, ``parquet`` or ``movielens``.
        item_id_column: id column of the item-text table (default: its first column).
        item_text_columns: text columns to keep (default: all other columns).
        item_text_encoding: encoding of the item-text table (default utf-8; latin-1 for movielens).
        name: folder name under ``data_dir`` for the cache (default: the file's name without extension).
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    missing_hint = "Pass the path of an existing table (InteractionTable(path=...))."

    def __init__(
        self,
        path: str,
        user_column: str = "user_id",
        item_column: str = "item_id",
        timestamp_column: str | None = "timestamp",
        format: Literal["auto", "csv", "tsv", "parquet"] = "auto",
        encoding: str = "utf-8",
        item_text_path: str | None = None,
        item_text_format: TableFormat = "auto",
        item_id_column: str | None = None,
        item_text_columns: list[str] | None = None,
        item_text_encoding: str | None = None,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._set_files(path, name, item_text_path, item_text_format, item_id_column, item_text_columns,
                        item_text_encoding)
        self.format = table_format(path, format)
        if self.format not in ("csv", "tsv", "parquet"):
            raise ValueError(f"interaction tables are csv, tsv or parquet; {path} looks like {self.format}")
        self.user_column, self.item_column, self.timestamp_column = user_column, item_column, timestamp_column
        self.encoding = encoding

    def read_interactions(self) -> Interactions:
        return read_interaction_table(self.path, self.user_column, self.item_column, self.timestamp_column,
                                      self.format, self.encoding)
