"""Shared plumbing of the datamodules that read files the user already has (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import SequentialDataModule
from ..item_tables import TableFormat, read_item_table
from ..parsing import require_file


class LocalFiles(SequentialDataModule):
    """An interaction file plus an optional item-text table, both local; subclasses parse the interaction file.

    Subclasses keep their own typed constructor (the CLI reads it) and call `_set_files` from it; `missing_hint` says
    how to pass an existing interaction file.
    """

    missing_hint = "Pass the path of an existing file."

    def _set_files(
        self,
        path: str,
        name: str | None,
        item_text_path: str | None,
        item_text_format: TableFormat,
        item_id_column: str | None,
        item_text_columns: list[str] | None,
        item_text_encoding: str | None,
    ) -> None:
        self.path = Path(path)
        self._name = name or self.path.name.split(".")[0]
        self.item_text_path = Path(item_text_path) if item_text_path else None
        self.item_text_format = item_text_format
        self.item_id_column = item_id_column
        self.item_text_columns = item_text_columns
        self.item_text_encoding = item_text_encoding

    @property
    def name(self) -> str:
        return self._name

    def raw_files(self) -> list[Path]:
        return [self.path] + ([self.item_text_path] if self.item_text_path else [])

    def download(self) -> None:
        require_file(self.path, self.missing_hint)
        if self.item_text_path:
            require_file(self.item_text_path, "Fix item_text_path or leave it out.")

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict] | None:
        if self.item_text_path is None:
            return None
        return read_item_table(self.item_text_path, self.item_text_format, self.item_id_column,
                               self.item_text_columns, self.item_text_encoding)
