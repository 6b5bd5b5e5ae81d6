"""Amazon review datasets, 2014 and 2018 releases (McAuley et al.): 5-core review files + item metadata."""

from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from ..base import SequentialDataModule
from ..download import download_file
from ..parsing import DataFormatError, iter_text_lines, require_file
from ..preprocess import Interactions

AMAZON2014_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
AMAZON2018_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"


def read_review_lines(path: str | Path, user: str, item: str, time: str) -> Interactions:
    """JSON-lines reviews -> interactions (every review counts, whatever its rating).

    Args:
        path: .json / .jsonl, optionally gzipped.
        user, item, time: field names of the user id, item id and integer timestamp.
    """
    path = Path(path)
    schema = pa.schema([(user, pa.string()), (item, pa.string()), (time, pa.int64())])
    try:
        table = pa_json.read_json(
            path,
            read_options=pa_json.ReadOptions(block_size=1 << 24),
            parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        _first_bad_review(path, user, item, time)
        raise DataFormatError(path, f"unreadable JSON lines: {e}") from e
    except OSError as e:  # pyarrow's report of a truncated or corrupt .gz
        raise DataFormatError(path, f"cannot read the file ({e}); a truncated or corrupt download? delete it and "
                                    "fetch it again") from e
    if table.num_rows == 0:
        raise DataFormatError(path, "file is empty")
    if any(table[c].null_count for c in (user, item, time)):
        _first_bad_review(path, user, item, time)
    return Interactions(
        table[user].to_numpy(zero_copy_only=False),
        table[item].to_numpy(zero_copy_only=False),
        table[time].to_numpy(),
    )


def _first_bad_review(path: Path, user: str, item: str, time: str) -> None:
    """Slow path after the fast reader failed: find and report the first offending line."""
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataFormatError(path, f"not valid JSON ({e})", number) from None
        if not isinstance(record, dict):
            raise DataFormatError(path, "expected a JSON object", number)
        for field in (user, item, time):
            if record.get(field) is None:
                raise DataFormatError(path, f"field {field!r} is missing", number)
        if not isinstance(record[time], int):
            raise DataFormatError(path, f"field {time!r} is not an integer: {record[time]!r}", number)
        if not -(2**63) <= record[time] < 2**63:
            raise DataFormatError(path, f"field {time!r} does not fit a 64-bit integer: {record[time]!r}", number)
        for field in (user, item):
            if not isinstance(record[field], str):
                raise DataFormatError(path, f"field {field!r} is not a string: {record[field]!r}", number)


def read_metadata_lines(
    path: str | Path,
    wanted: set[str],
    id_field: str,
    parse: Callable[[str], dict],
    fields: Callable[[dict], dict],
) -> dict[str, dict]:
    """Stream a (possibly huge) metadata file and fully parse only the lines of wanted items.

    A regex finds each line's id first, so the slow per-line parser runs only for items that survived filtering.

    Args:
        path: metadata file, one record per line, optionally gzipped.
        wanted: raw item ids to keep.
        id_field: the id's field name.
        parse: line -> record (``json.loads`` or ``ast.literal_eval``).
        fields: record -> text fields.

    Returns:
        {item id: text fields}; the first record wins when an id repeats.
    """
    pattern = re.compile(rf"""["']{re.escape(id_field)}["']\s*:\s*["']([^"']+)["']""")
    table: dict[str, dict] = {}
    for number, line in iter_text_lines(path):
        match = pattern.search(line)
        if match is None or match.group(1) not in wanted or match.group(1) in table:
            continue
        try:
            record = parse(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataFormatError(path, f"cannot parse the record of {match.group(1)}: {e}", number) from None
        if not isinstance(record, dict):
            raise DataFormatError(path, "expected one record (a dict) per line", number)
        table[match.group(1)] = fields(record)
    return table


def _text(value) -> str | None:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    if value is None:
        return None
    value = html.unescape(str(value)).strip()
    return value or None


def _flat_unique(values) -> list[str] | None:
    """Category paths (a list of lists in 2014, a list in 2018/2023) -> distinct names in first-seen order."""
    out: list[str] = []
    stack = list(values) if isinstance(values, list) else []
    for value in stack:
        for name in (value if isinstance(value, list) else [value]):
            name = html.unescape(str(name)).strip()
            if name and name not in out:
                out.append(name)
    return out or None


def _price(value) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}" if value == value else None
    value = _text(value)
    # 2018 price fields sometimes hold scraped HTML/CSS; keep only things that look like a price
    return value if value and re.fullmatch(r"\$?\s?[\d,]+(\.\d+)?(\s?-\s?\$?\s?[\d,]+(\.\d+)?)?", value) else None


def _drop_empty(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v}


def amazon2014_fields(record: dict) -> dict:
    return _drop_empty({
        "title": _text(record.get("title")),
        "brand": _text(record.get("brand")),
        "categories": _flat_unique(record.get("categories")),
        "description": _text(record.get("description")),
        "price": _price(record.get("price")),
    })


def amazon2018_fields(record: dict) -> dict:
    return _drop_empty({
        "title": _text(record.get("title")),
        "brand": _text(record.get("brand")),
        "categories": _flat_unique(record.get("category")),
        "description": _text(record.get("description")),
        "price": _price(record.get("price")),
    })


class _AmazonReviews(SequentialDataModule):
    """Shared download / read logic; subclasses give the file layout and the metadata format."""

    text_template = "amazon"

    release: str
    meta_parse: Callable[[str], dict]
    meta_fields: Callable[[dict], dict]

    def __init__(self, category: str, base_url: str, with_text: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.category, self.base_url, self.with_text = category, base_url.rstrip("/") + "/", with_text

    @property
    def name(self) -> str:
        return f"amazon{self.release}-{self.category}"

    def remote_files(self) -> dict[str, str]:
        """{local file name: URL relative to base_url} for reviews (first) and metadata."""
        raise NotImplementedError

    def raw_files(self) -> list[Path]:
        names = list(self.remote_files())
        return [self.raw_dir / n for n in (names if self.with_text else names[:1])]

    def download(self) -> None:
        for path, relative in zip(self.raw_files(), self.remote_files().values()):
            if not path.is_file():
                download_file(self.base_url + relative, path)

    def _require(self, path: Path) -> Path:
        return require_file(path, f"Download {self.base_url}{self.remote_files()[path.name]} into {self.raw_dir}.")

    def read_interactions(self) -> Interactions:
        return read_review_lines(self._require(self.raw_files()[0]), "reviewerID", "asin", "unixReviewTime")

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict] | None:
        if not self.with_text:
            return None
        path = self._require(self.raw_files()[1])
        return read_metadata_lines(path, set(raw_item_ids.tolist()), "asin", type(self).meta_parse,
                                   type(self).meta_fields)


class Amazon2014(_AmazonReviews):
    """Amazon 2014 5-core reviews of one category (the S3Rec / RecBole "Beauty", "Sports", "Toys" benchmarks).

    Files: ``reviews_{category}_5.json.gz`` (JSON lines) and ``meta_{category}.json.gz`` (one Python dict literal per
    line), downloaded into ``data_dir/amazon2014-{category}/``. With 5-core filtering: Beauty 22,363 users / 12,101
    items / 198,502 interactions; Sports_and_Outdoors 35,598 / 18,357 / 296,337; Toys_and_Games 19,412 / 11,924 /
    167,597. Timestamps have day resolution; same-day reviews keep the file's order. Item text: title, brand,
    categories (all category paths flattened, distinct), description, price.

    Args:
        category: e.g. ``Beauty``, ``Sports_and_Outdoors``, ``Toys_and_Games``.
        base_url: folder URL holding the files (the SNAP original, or the UCSD mirror
            ``https://mcauleylab.ucsd.edu/public_datasets/data/amazon/categoryFiles/``).
        with_text: also fetch and read the metadata file for item text.
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    release = "2014"
    meta_parse = staticmethod(ast.literal_eval)
    meta_fields = staticmethod(amazon2014_fields)

    def __init__(self, category: str = "Beauty", base_url: str = AMAZON2014_URL, with_text: bool = True, **kwargs):
        super().__init__(category, base_url, with_text, **kwargs)

    def remote_files(self) -> dict[str, str]:
        return {f"reviews_{self.category}_5.json.gz": f"reviews_{self.category}_5.json.gz",
                f"meta_{self.category}.json.gz": f"meta_{self.category}.json.gz"}


class Amazon2018(_AmazonReviews):
    """Amazon 2018 ("amazon_v2") 5-core reviews of one category, with JSON-lines metadata.

    Files: ``categoryFilesSmall/{category}_5.json.gz`` and ``metaFiles2/meta_{category}.json.gz``, downloaded into
    ``data_dir/amazon2018-{category}/``. 2018 has ``All_Beauty`` and ``Luxury_Beauty`` but no plain ``Beauty``.
    Item text: title, brand, categories, description (paragraphs joined), price (only when it looks like one).

    Args:
        category: e.g. ``All_Beauty``, ``Sports_and_Outdoors``, ``Toys_and_Games``.
        base_url: the ``amazon_v2`` folder URL.
        with_text: also fetch and read the metadata file for item text.
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    release = "2018"
    meta_parse = staticmethod(json.loads)
    meta_fields = staticmethod(amazon2018_fields)

    def __init__(self, category: str = "All_Beauty", base_url: str = AMAZON2018_URL, with_text: bool = True,
                 **kwargs):
        super().__init__(category, base_url, with_text, **kwargs)

    def remote_files(self) -> dict[str, str]:
        return {f"{self.category}_5.json.gz": f"categoryFilesSmall/{self.category}_5.json.gz",
                f"meta_{self.category}.json.gz": f"metaFiles2/meta_{self.category}.json.gz"}
