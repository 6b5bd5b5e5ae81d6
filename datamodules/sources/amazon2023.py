"""Amazon Reviews 2023 (McAuley Lab): raw per-category reviews and metadata, from the UCSD server or the HF Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from ..base import SequentialDataModule
from ..download import download_file
from ..parsing import require_file
from ..preprocess import Interactions
from .amazon import _drop_empty, _flat_unique, _price, _text, read_metadata_lines, read_review_lines

AMAZON2023_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/"
HF_REPO = "McAuley-Lab/Amazon-Reviews-2023"


def amazon2023_fields(record: dict) -> dict:
    details = record.get("details")
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
            read directly, so no ``datasets`` loading script is involved).
        base_url: the ``amazon_2023/raw/`` folder URL (``jsonl`` source).
        with_text: also fetch and read the metadata file for item text.
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    text_template = "amazon"

    def __init__(self, category: str = "All_Beauty", source: Literal["jsonl", "hf"] = "jsonl",
                 base_url: str = AMAZON2023_URL, with_text: bool = True, **kwargs):
        super().__init__(**kwargs)
        if source not in ("jsonl", "hf"):
            raise ValueError(f"source must be 'jsonl' or 'hf', got {source!r}")
        self.category, self.source, self.with_text = category, source, with_text
        self.base_url = base_url.rstrip("/") + "/"

    @property
    def name(self) -> str:
        return f"amazon2023-{self.category}"

    def _remote(self) -> list[str]:
        suffix = ".jsonl.gz" if self.source == "jsonl" else ".jsonl"  # the Hub stores them uncompressed
        files = [f"review_categories/{self.category}{suffix}", f"meta_categories/meta_{self.category}{suffix}"]
        return files if self.with_text else files[:1]

    def raw_files(self) -> list[Path]:
        if self.source == "jsonl":
            return [self.raw_dir / Path(f).name for f in self._remote()]
        return [self.raw_dir / "hf" / "raw" / f for f in self._remote()]

    def download(self) -> None:
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
        return read_review_lines(self._require(self.raw_files()[0]), "user_id", "parent_asin", "timestamp")

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict] | None:
        if not self.with_text:
            return None
        return read_metadata_lines(self._require(self.raw_files()[1]), set(raw_item_ids.tolist()), "parent_asin",
                                   json.loads, amazon2023_fields)
