"""Reading raw text files with errors that name the file and line.

Every parser here has a vectorised fast path (pandas' C reader) and, only when that fails, a slow line-by-line
scan whose sole job is to find the first bad line and say what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

_CORRUPT_GZIP = "truncated or corrupt gzip data (an interrupted download?); delete the file and fetch it again"


class DataFormatError(ValueError):
    """A raw data file that cannot be parsed. The message reads ``<file>:<line>: <what is wrong>``."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = Path(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class MissingFileError(FileNotFoundError):
    """A data file that is not where the configuration says; the message says how to get it."""


def require_file(path: str | Path, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise MissingFileError (a FileNotFoundError) saying how to get it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found. {hint}")
    return path


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz; an empty file is an error."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(path, f"{_CORRUPT_GZIP} ({e})") from None
    if not data.strip():
        raise DataFormatError(path, "file is empty")
    return data


def decode(data: bytes, path: str | Path, encoding: str) -> str:
    """Decode strictly; a bad byte is reported with its line and a hint to pass another encoding."""
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataFormatError(path, f"unknown text encoding {encoding!r}; pass a codec name such as utf-8 or "
                                    "latin-1") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(
            path,
            f"byte 0x{data[e.start]:02x} at column {column} is not valid {encoding}; "
            f"if the file uses another encoding, pass it (e.g. encoding='latin-1')",
            line,
        ) from None


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    return decode(read_bytes(path), path, encoding)


def ids_from_strings(values) -> np.ndarray:
    """Raw ids as int64 when every value is a canonical integer ("12", not "012" or "+12"), else as str.

    The integer form is used only when it round-trips exactly, so raw ids such as ISBN-like ASINs with leading
    zeros are never altered. Only the distinct values are inspected, so this is cheap for long id columns.
    """
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    strings = np.asarray(uniques, dtype=object).astype(str)
    if strings.size == 0:
        return strings
    canonical = np.strings.isdigit(strings) & (
        (np.strings.str_len(strings) == 1) | ~np.strings.startswith(strings, "0")
    )
    canonical &= np.strings.str_len(strings) <= 18  # fits int64 without overflow
    return (strings.astype(np.int64) if canonical.all() else strings)[codes]


def split_lines(text: str, sep: str | None = None) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line; with `sep`, a line of whitespace that holds the separator
    counts too, since pandas reads it as a row of empty fields."""
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip() or (sep and sep in line)]


def parse_delimited(
    text: str,
    path: str | Path,
    *,
    sep: str,
    columns: Sequence[str],
    int_columns: Iterable[str] = (),
    header: bool = False,
    quoting: int = csv.QUOTE_NONE,
    shown_sep: str | None = None,
) -> pd.DataFrame:
    """Parse a delimited table.

    Args:
        text: the decoded file.
        path: file name, for error messages.
        sep: single-character delimiter (callers translate multi-character ones such as ``::`` first).
        columns: without ``header``, the exact fields of every line; with it, the columns that must be present
            and non-empty (other columns are kept and may be empty).
        int_columns: columns (among ``columns``) that must hold integers; returned as int64.
        header: whether the first line names the columns.
        quoting: csv quoting mode; ``QUOTE_NONE`` for formats where a ``"`` is ordinary text.
        shown_sep: the file's real delimiter when the caller translated it to ``sep`` (for error messages).

    Returns:
        A DataFrame; non-integer columns are strings, empty cells NaN.
    """
    columns, int_columns = list(columns), list(int_columns)

    def first_bad_line() -> None:
        _raise_first_bad_line(text, path, sep, columns, int_columns, header, quoting, shown_sep or sep)

    if header:
        names = [n.strip() for n in next(csv.reader(io.StringIO(text), delimiter=sep, quoting=quoting), [])]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataFormatError(path, f"missing column(s) {missing}; the header has {names}", 1)
        dtype = {n: (np.int64 if n in int_columns else str) for n in names}
    else:
        names = columns
        dtype = {i: (np.int64 if c in int_columns else str) for i, c in enumerate(columns)}
    try:
        with warnings.catch_warnings():
            # pandas only warns when a line has more fields than the header, and drops them: make it fatal
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=0 if header else None,
                names=names if header else None,
                index_col=False,
                dtype=dtype,
                quoting=quoting,
                keep_default_na=False,
                na_values=[""],
                engine="c",
            )
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError, OverflowError) as e:
        first_bad_line()
        raise DataFormatError(path, str(e)) from e
    if frame.shape[1] != len(names):
        first_bad_line()
    frame.columns = names
    if frame[columns].isna().to_numpy().any():
        first_bad_line()
    return frame


def _raise_first_bad_line(text, path, sep, columns, int_columns, header, quoting, shown_sep) -> None:
    """Slow path: scan lines with the csv module and raise at the first one the fast reader choked on."""
    lines = split_lines(text, sep)
    if header:
        names = [n.strip() for n in next(csv.reader([lines[0][1]], delimiter=sep, quoting=quoting))]
        lines = lines[1:]
    else:
        names = columns
    required = {names.index(c): c for c in columns}
    for number, line in lines:
        fields = next(csv.reader([line], delimiter=sep, quoting=quoting), [])
        line = line.replace(sep, shown_sep)
        if len(fields) != len(names):
            raise DataFormatError(
                path, f"expected {len(names)} {shown_sep!r}-separated fields {names}, found {len(fields)}: {line!r}",
                number,
            )
        for index, column in required.items():
            value = fields[index].strip()
            if not value:
                raise DataFormatError(path, f"field {column!r} is empty: {line!r}", number)
            if column in int_columns and not re.fullmatch(r"[+-]?[0-9]+", value):
                raise DataFormatError(path, f"field {column!r} is not an integer: {value!r}", number)
            # the digit count goes first: int() refuses strings of more than 4300 digits
            if column in int_columns and (len(value.lstrip("+-").lstrip("0")) > 19
                                          or not -(2**63) <= int(value) < 2**63):
                raise DataFormatError(path, f"field {column!r} does not fit a 64-bit integer: {value!r}", number)


def iter_text_lines(path: str | Path, encoding: str = "utf-8"):
    """Yield (line number, decoded line) of a possibly gzipped text file, streaming (for multi-GB metadata)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise DataFormatError(
                        path, f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid {encoding}", number
                    ) from None
                yield number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(path, f"{_CORRUPT_GZIP} ({e})", number + 1) from None
