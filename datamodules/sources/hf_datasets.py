"""Hugging Face ``datasets`` as a raw source: load a table from the Hub or a local copy, read it as Arrow.

A loaded ``datasets.Dataset`` is a memory-mapped Arrow table in the ``datasets`` cache (or in a ``save_to_disk``
folder), so reading three columns of a 10^7-row review table touches those columns only; the rest (review text,
images) stays on disk. Errors are one line naming the datamodule option that points at the data.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..parsing import DataFormatError, MissingFileError
from ..text_embeddings import hub_offline_reason

# local file suffix (".gz" removed) -> the `datasets` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("source='datasets' needs the Hugging Face datasets package: pip install "
                          "'m2rec[datasets]' (or datasets)") from None
    datasets.disable_progress_bars()  # one bar per Arrow shard would flood the log of a big table
    return datasets


def load_local(location: str, option: str, cache_dir: Path):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder, or from JSON-lines / Parquet files (a path or a glob)
    read by ``load_dataset("json" | "parquet", data_files=...)`` into ``cache_dir``.

    Args:
        location: the folder, file or glob.
        option: the option that named it, for error messages (e.g. ``data.review_dataset``).
        cache_dir: the ``datasets`` cache for files that are not Arrow yet.
    """
    datasets = _datasets()
    path = Path(location).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            raise DataFormatError(path, f"{option}: a folder must be one written by datasets' save_to_disk "
                                        "(state.json or dataset_dict.json); for JSON-lines or Parquet files give "
                                        "the file or a glob")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            # the Hub release's configs have one split, "full"
            split = splits[0] if len(splits) == 1 else "full" if "full" in splits else None
            if split is None:
                raise DataFormatError(path, f"{option}: a DatasetDict with splits {splits}; save the one split "
                                            "to use (dataset_dict[name].save_to_disk(folder))")
            loaded = loaded[split]
        return loaded
    builder = BUILDERS.get(Path(path.name.lower().removesuffix(".gz")).suffix)
    if builder is None:
        raise DataFormatError(path, f"{option}: expected a save_to_disk folder or .jsonl / .json / .parquet files "
                                    "(optionally .gz)")
    if any(char in location for char in "*?["):
        files = sorted(glob.glob(str(path)))
        if not files:
            raise MissingFileError(f"{location}: no file matches ({option})")
    elif path.is_file():
        files = [str(path)]
    else:
        raise MissingFileError(f"{path} not found ({option})")
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache_dir))
    except StopIteration:  # the JSON builder's report of files without a single row
        raise DataFormatError(path, f"{option}: no rows") from None
    except (ValueError, TypeError, pa.ArrowException) as err:
        detail = " ".join(str(err).split())[:300]
        raise DataFormatError(path, f"{option}: datasets cannot read it as {builder}: {detail}") from None


def load_hub(repo: str, file: str, option: str, cache_dir: Path):
    """``datasets.load_dataset("json", data_files="hf://datasets/{repo}/{file}")``: the Hub file through the JSON
    builder, converted once into Arrow in ``cache_dir`` and memory-mapped from there. A Hub that cannot be reached is
    one line saying to point ``option`` at a local copy (rather than the hub client's ~23 s of retries first)."""
    datasets = _datasets()
    offline = hub_offline_reason()
    hint = (f"set {option} to a local copy (a save_to_disk folder, or .jsonl / .parquet files of "
            f"{repo}/{file})")
    if offline is not None:
        raise MissingFileError(f"cannot load {repo}/{file} from the Hugging Face Hub ({offline}): {hint}")
    try:
        return datasets.load_dataset("json", data_files=f"hf://datasets/{repo}/{file}", split="train",
                                     cache_dir=str(cache_dir))
    except (OSError, ValueError) as err:  # no such file, HTTP and connection errors
        detail = " ".join(str(err).split())[:300]
        raise MissingFileError(f"cannot load {repo}/{file} from the Hugging Face Hub ({type(err).__name__}: "
                               f"{detail}): {hint}") from None


def cache_files(dataset) -> list[Path]:
    """The Arrow files a loaded dataset is memory-mapped from (their contents key the processed-data cache)."""
    return [Path(f["filename"]) for f in dataset.cache_files]


def _where(dataset) -> Path:
    """What an error names: the Arrow file, the folder of several, or (an in-memory table) its description."""
    files = cache_files(dataset)
    return files[0] if len(files) == 1 else files[0].parent if files else Path("<in-memory dataset>")


def arrow_columns(dataset, columns: list[str], option: str) -> pa.Table:
    """The given columns as an Arrow table, zero-copy from the memory map when the dataset has no index mapping;
    a missing column or an empty table is a one-line error."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataFormatError(_where(dataset), f"{option}: missing column(s) {missing}; the dataset has "
                                                       f"{dataset.column_names}")
    if len(dataset) == 0:
        raise DataFormatError(_where(dataset), f"{option}: the dataset has no rows")
    return dataset.with_format("arrow", columns=columns)[:]


def interaction_columns(dataset, user: str, item: str, time: str, option: str) -> tuple[np.ndarray, ...]:
    """(users, items, timestamps) as numpy arrays: string ids, int64 timestamps, no nulls (the first null is
    reported with its row)."""
    table = arrow_columns(dataset, [user, item, time], option)
    for name, kind in ((user, "strings"), (item, "strings"), (time, "integers")):
        column = table[name]
        fits = (pa.types.is_integer(column.type) if kind == "integers"
                else pa.types.is_string(column.type) or pa.types.is_large_string(column.type))
        if not fits:
            raise DataFormatError(_where(dataset), f"{option}: column {name!r} holds {column.type}, "
                                                 f"expected {kind}")
        if column.null_count:
            row = int(pc.index(pc.is_null(column), True).as_py())
            raise DataFormatError(_where(dataset), f"{option}: row {row}: column {name!r} is empty")
    return (table[user].to_numpy(), table[item].to_numpy(),
            table[time].cast(pa.int64()).to_numpy())


def rows_of(dataset, wanted: set[str], id_column: str, option: str) -> dict[str, dict[str, Any]]:
    """{id: record} for the wanted ids (the first row wins when an id repeats), decoded only for those rows: the id
    column is matched in Arrow, so a million-row metadata table costs one pass over one column."""
    ids = arrow_columns(dataset, [id_column], option)[id_column]
    hit = pc.is_in(ids, value_set=pa.array(sorted(wanted), type=ids.type)) if wanted else None
    if hit is None or not pc.any(hit).as_py():
        return {}
    rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    out: dict[str, dict[str, Any]] = {}
    for record in dataset.select(rows):
        out.setdefault(record[id_column], record)
    return out
