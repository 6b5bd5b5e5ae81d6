"""Amazon Reviews 2023 (McAuley Lab): raw per-category reviews and metadata, from the UCSD server, the HF Hub, or
Hugging Face ``datasets`` (the Hub through its cache, or a local copy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from ..base import DataOptionError, SequentialDataModule
from ..download import download_file
from ..parsing import require_file
from ..preprocess import Interactions
from . import hf_datasets
from .amazon import _drop_empty, _flat_unique, _price, _text, read_metadata_lines, read_review_lines

AMAZON2023_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/"
HF_REPO = "McAuley-Lab/Amazon-Reviews-2023"


def amazon2023_fields(record: dict) -> dict:
    details = record.get("details")
    if isinstance(details, str):  # the Hub's raw_meta_* configs store the free-form dict as JSON text
        try:
            details = json.loads(details)
        except ValueError:
            details = None
    return _drop_empty({
        "title": _text(record.get("title")),
        "brand": _text(record.get("store")),
        "categories": _flat_unique(record.get("categories")),
        "features": _flat_unique(record.get("features")),
        "description": _text(record.get("description")),
        "details": [f"{k}: {_text(v)}" for k, v in details.items() if _text(v)] if isinstance(details, dict) else None,
        "price": _price(record.get("price")),
    })


class Amazon2023(SequentialDataModule):
    """Amazon Reviews 2023, one category; items are ``parent_asin`` (product families), as in the release's benchmarks.

    The raw files are not k-cored: the k-core filter here does it. Timestamps are in milliseconds.
    Item text: title, brand (the ``store`` field), categories, features, description, details ("key: value"
    strings), price.

    Args:
        category: e.g. ``All_Beauty``, ``Video_Games``, ``Toys_and_Games``.
        source: ``jsonl``: download ``review_categories/{category}.jsonl.gz`` and
            ``meta_categories/meta_{category}.jsonl.gz`` from ``base_url``; ``hf``: fetch the same files from the
            Hugging Face Hub dataset ``McAuley-Lab/Amazon-Reviews-2023`` (needs ``huggingface_hub``; the files are
            read directly, so no ``datasets`` loading script is involved); ``datasets``: load them with Hugging Face
            ``datasets`` (``pip install 'm2rec[datasets]'``) into its Arrow cache under ``data_dir`` and read the
            memory-mapped tables, or read the local copies ``review_dataset`` / ``meta_dataset``.
        base_url: the ``amazon_2023/raw/`` folder URL (``jsonl`` source).
        with_text: also fetch and read the metadata file for item text.
        review_dataset: ``datasets`` source: a local copy of the reviews instead of the Hub: a ``save_to_disk``
            folder (e.g. of the ``raw_review_{category}`` config) or JSON-lines / Parquet files (a path or glob,
            read with ``load_dataset("json" | "parquet", data_files=...)``). Needs ``user_id``, ``parent_asin``
            and ``timestamp``.
        meta_dataset: ``datasets`` source: the same for the metadata (``raw_meta_{category}``); ``details`` may be a
            dict or, as in the Hub configs, its JSON text.
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    text_template = "amazon"

    def __init__(self, category: str = "All_Beauty", source: Literal["jsonl", "hf", "datasets"] = "jsonl",
                 base_url: str = AMAZON2023_URL, with_text: bool = True, review_dataset: str | None = None,
                 meta_dataset: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if source not in ("jsonl", "hf", "datasets"):
            raise DataOptionError(f"data.source must be 'jsonl', 'hf' or 'datasets', got {source!r}")
        for option, value in (("review_dataset", review_dataset), ("meta_dataset", meta_dataset)):
            if value is not None and source != "datasets":
                raise DataOptionError(f"data.{option} is read only with source: datasets (source is {source!r})")
        self.category, self.source, self.with_text = category, source, with_text
        self.base_url = base_url.rstrip("/") + "/"
        self.review_dataset, self.meta_dataset = review_dataset, meta_dataset
        self._tables: list | None = None  # the loaded `datasets.Dataset`s (source: datasets)

    @property
    def name(self) -> str:
        return f"amazon2023-{self.category}"

    def _remote(self) -> list[str]:
        suffix = ".jsonl.gz" if self.source == "jsonl" else ".jsonl"  # the Hub stores them uncompressed
        files = [f"review_categories/{self.category}{suffix}", f"meta_categories/meta_{self.category}{suffix}"]
        return files if self.with_text else files[:1]

    def _hf_datasets(self) -> list:
        """[reviews, metadata (with_text)] as memory-mapped ``datasets.Dataset``s, loaded once."""
        if self._tables is None:
            cache = self.raw_dir / "datasets"
            self._tables = [
                hf_datasets.load_local(local, f"data.{option}", cache) if local is not None
                else hf_datasets.load_hub(HF_REPO, f"raw/{remote}", f"data.{option}", cache)
                for local, option, remote in zip((self.review_dataset, self.meta_dataset),
                                                 ("review_dataset", "meta_dataset"), self._remote())
            ]
        return self._tables

    def _cache_options(self, raw_files: list[Path]) -> dict:
        # a local copy's location does not key the processed data: the Arrow files it loads to (raw_files) do
        options = super()._cache_options(raw_files)
        return {k: v for k, v in options.items() if k not in ("review_dataset", "meta_dataset")}

    def raw_files(self) -> list[Path]:
        if self.source == "datasets":
            return [f for table in self._hf_datasets() for f in hf_datasets.cache_files(table)]
        if self.source == "jsonl":
            return [self.raw_dir / Path(f).name for f in self._remote()]
        return [self.raw_dir / "hf" / "raw" / f for f in self._remote()]

    def download(self) -> None:
        if self.source == "datasets":  # loading converts the Hub files into the Arrow cache once
            self._hf_datasets()
            return
        missing = [(p, f) for p, f in zip(self.raw_files(), self._remote()) if not p.is_file()]
        if not missing:
            return
        if self.source == "jsonl":
            for path, relative in missing:
                download_file(self.base_url + relative, path)
            return
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise ImportError("source='hf' needs huggingface_hub: pip install 'm2rec[hub]' (or huggingface_hub)") from e
        for path, relative in missing:
            fetched = Path(hf_hub_download(HF_REPO, f"raw/{relative}", repo_type="dataset",
                                           local_dir=self.raw_dir / "hf"))
            if fetched.resolve() != path.resolve():
                raise FileNotFoundError(f"huggingface_hub saved raw/{relative} as {fetched}, expected {path}")

    def _require(self, path: Path) -> Path:
        where = self.base_url if self.source == "jsonl" else f"the Hub dataset {HF_REPO} (raw/...)"
        return require_file(path, f"Get it from {where} into {path.parent}, or let Amazon2023 download it.")

    def read_interactions(self) -> Interactions:
        if self.source == "datasets":
            return Interactions(*hf_datasets.interaction_columns(self._hf_datasets()[0], "user_id", "parent_asin",
                                                                 "timestamp", "data.review_dataset"))
        return read_review_lines(self._require(self.raw_files()[0]), "user_id", "parent_asin", "timestamp")

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict] | None:
        if not self.with_text:
            return None
        if self.source == "datasets":
            records = hf_datasets.rows_of(self._hf_datasets()[1], set(raw_item_ids.tolist()), "parent_asin",
                                          "data.meta_dataset")
            return {item: amazon2023_fields(record) for item, record in records.items()}
        return read_metadata_lines(self._require(self.raw_files()[1]), set(raw_item_ids.tolist()), "parent_asin",
                                   json.loads, amazon2023_fields)
