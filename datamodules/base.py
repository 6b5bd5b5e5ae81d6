"""The base LightningDataModule: raw files -> leave-one-out batches, with a verified on-disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from .cache import file_digests, load_cache, read_verified, save_cache
from .preprocess import EmptyDataError, Interactions, Processed, preprocess
from .resume import EpochRandomSampler, ResumableDataLoader, epoch_seed
from .samplers import eval_sampler
from .splits import EvalSequences, PrefixSequences, TrainSequences, collate
from .text_embeddings import TextEmbeddings, TextOptions, load_or_build_text_embeddings

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when preprocessing or the cache layout changes, so old caches count as stale
ITEM_TEXT_FILE = "item_text.json"
# Constructor arguments that only shape batches; everything else (dataset options, filters) keys the cache.
LOADER_OPTIONS = frozenset({"data_dir", "max_len", "batch_size", "eval_batch_size", "num_workers", "train_window",
                            "train_mode", "seed", "text"})


class DataOptionError(ValueError):
    """A datamodule option outside its range or contradicting another; the message names the option."""


def _names_one_of(value: object, paths: set[Path]) -> bool:
    """Whether `value` is a (str or Path) path to one of `paths` (resolved)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return False
    try:
        return Path(value).resolve() in paths
    except (OSError, ValueError):  # not a path at all (e.g. a NUL byte)
        return False


class SequentialDataModule(L.LightningDataModule):
    """Leave-one-out sequential recommendation data (the RecBole / Mamba4Rec protocol, DESIGN.md §2).

    Preparation: ``download`` -> ``read_interactions`` -> duplicates -> stable sort by (user, timestamp) ->
    iterative k-core -> drop users with < 3 interactions -> ids remapped to 1..N (0 = padding) -> cached in
    ``data_dir/<name>/processed/<hash>/`` (hash of the raw files' contents and of every non-loader option).
    It runs lazily on first access of any data property (``num_items`` etc.) or in ``prepare_data``/``setup``,
    under a file lock, so concurrent processes and DDP ranks build once and the others load.

    Batches (dicts of LongTensors, 0 = padding, inputs right-padded to ``max_len`` columns):
      * train, ``all_positions``: ``input_ids``, ``target_ids`` (B×L) — next-item targets at every position —
        and ``history`` (B×H, the user's train items older than the input).
      * train, ``prefix``: same keys, target only at the last input position, one sample per train position.
      * val / test: ``user`` (B), ``input_ids`` (B×L), ``target`` (B), ``seen`` (B×H, items before the target).
      * predict: ``user``, ``input_ids`` and ``seen`` from each user's full history.

    Subclass it for a new dataset: set ``name``, implement ``raw_files`` and ``read_interactions`` (and optionally
    ``download`` and ``read_item_text``); see ``datamodules.sources.custom`` for a worked example.

    Args:
        data_dir: root folder for downloads and caches; this dataset uses ``data_dir/<name>/``.
        max_len: number of most recent items in an input sequence.
        min_user_interactions: iterative k-core threshold for users (0 disables).
        min_item_interactions: iterative k-core threshold for items (0 disables).
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size.
        num_workers: DataLoader worker processes (batches are built vectorised; 0 is usually fast enough).
        train_window: which windows of ``max_len + 1`` training items ``all_positions`` trains on. ``recent``:
            each user's most recent one; ``random``: one random contiguous window per user, redrawn every epoch;
            ``all``: consecutive windows tiling each whole history, so every training target counts every epoch
            (histories longer than ``max_len + 1`` give several samples; see ``splits.TrainSequences``).
        train_mode: ``all_positions``: one sample per user with a target at every position (for causal
            encoders); ``prefix``: one sample per training position (RecBole's augmentation).
        seed: seeds training shuffles and random windows.
        drop_duplicates: drop repeated (user, item, timestamp) rows, keeping the first (RecBole keeps them;
            they are counted in ``stats`` either way). Without timestamps a repeated (user, item) pair counts.
        tie_order: one user's interactions sharing a timestamp stay in ``file`` order (RecBole's rule) or take a
            fixed ``shuffle``d order; see ``preprocess.preprocess``. ML-1M's file order inside a second is largely the
            same for every user, so the published ML-1M numbers partly rest on it (``experiments/results/ml-1m/tie_order.md``).
        text: embed item texts with a language model for the semantic branch (None = no text features). The table
            is cached under the processed data, keyed by items, texts, model, pooling, template and length.
    """

    text_template: str | None = None
    """The dataset's default template for `text.template` (see `datamodules.text_templates`)."""

    def __init__(
        self,
        data_dir: str = "data",
        max_len: int = 50,
        min_user_interactions: int = 5,
        min_item_interactions: int = 5,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        train_window: Literal["recent", "random", "all"] = "recent",
        train_mode: Literal["all_positions", "prefix"] = "all_positions",
        seed: int = 0,
        drop_duplicates: bool = False,
        tie_order: Literal["file", "shuffle"] = "file",
        text: TextOptions | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        for arg, value, low in (("max_len", max_len, 1), ("batch_size", batch_size, 1),
                                ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                ("min_user_interactions", min_user_interactions, 0),
                                ("min_item_interactions", min_item_interactions, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataOptionError(f"data.{arg} must be an integer >= {low}, got {value!r}")
        if train_window not in ("recent", "random", "all"):
            raise DataOptionError(f"data.train_window must be 'recent', 'random' or 'all', got {train_window!r}")
        if train_mode not in ("all_positions", "prefix"):
            raise DataOptionError(f"data.train_mode must be 'all_positions' or 'prefix', got {train_mode!r}")
        if tie_order not in ("file", "shuffle"):
            raise DataOptionError(f"data.tie_order must be 'file' or 'shuffle', got {tie_order!r}")
        if train_mode == "prefix" and train_window != "recent":
            raise DataOptionError(f"data.train_window={train_window!r} only applies to train_mode='all_positions' "
                                  "(prefix mode already trains on every position)")
        self.data_dir = Path(data_dir)
        self.max_len = max_len
        self.min_user_interactions = min_user_interactions
        self.min_item_interactions = min_item_interactions
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_window = train_window
        self.train_mode = train_mode
        self.seed = seed
        self.drop_duplicates = drop_duplicates
        self.tie_order = tie_order
        self.text = text
        self._text_embeddings: TextEmbeddings | None = None
        self._data: Processed | None = None
        self._processed_dir: Path | None = None
        self._meta: dict | None = None
        self._item_text: list[dict | None] | None = None

    # ---- what a dataset subclass provides ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Folder name under ``data_dir``."""
        return type(self).__name__.lower()

    def download(self) -> None:
        """Fetch the raw files into ``self.raw_dir`` if missing (default: nothing to fetch)."""

    def raw_files(self) -> list[Path]:
        """Every raw file that preparation reads; their contents key the cache."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_files()")

    def read_interactions(self) -> Interactions:
        """Parse the raw files into interactions in file order."""
        raise NotImplementedError(f"{type(self).__name__} must implement read_interactions()")

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict] | None:
        """Text fields for the given raw item ids, keyed by ``str(raw id)``; None when the dataset has no text.

        Items missing from the returned dict get ``None`` in ``item_text`` and are counted in ``stats``.
        """
        return None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.name

    # ---- public data, prepared on first access -------------------------------------------------------------------

    @property
    def num_users(self) -> int:
        return len(self._prepared().user_ids)

    @property
    def num_items(self) -> int:
        """N; internal item ids are 1..N, 0 is padding."""
        return len(self._prepared().item_ids) - 1

    @property
    def user_ids(self) -> np.ndarray:
        """(U,) raw id of each internal user index 0..U-1."""
        return self._prepared().user_ids

    @property
    def item_ids(self) -> np.ndarray:
        """(N+1,) raw id of each internal item id; index 0 is a padding placeholder ("" or -1)."""
        return self._prepared().item_ids

    def train_item_counts(self) -> np.ndarray:
        """(N+1,) int64: how often each item id occurs in the training part of the sequences (every user's items but
        the last two, which leave-one-out keeps for validation and test); index 0, the padding id, is 0."""
        data = self._prepared()
        lengths = np.diff(data.offsets)
        position = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lengths)  # index within its user
        train = position < np.repeat(lengths - 2, lengths)
        return np.bincount(data.items[train], minlength=self.num_items + 1)

    @property
    def item_text(self) -> list[dict | None] | None:
        """(N+1) per-item dicts of text fields (None for padding and items without text); None without text."""
        self._prepared()
        if self._item_text is None and ITEM_TEXT_FILE in self._meta["checksums"]:
            data = read_verified(self._processed_dir, ITEM_TEXT_FILE, self._meta)
            self._item_text = json.loads(data.decode("utf-8"))
        return self._item_text

    @property
    def text_embeddings(self) -> TextEmbeddings | None:
        """The frozen (N+1, text_dim) item-text table (row 0 and items without text are zeros), or None.

        Built on first use (progress bar; resumable shards) and cached; later runs load it in well under a second.
        """
        if self.text is None:
            return None
        if self._text_embeddings is None:
            self._text_embeddings = load_or_build_text_embeddings(**self.text_build_arguments())
            log.info("item text: %d of %d items have no text (zero vectors)", self._text_embeddings.num_missing,
                     self.num_items)
        return self._text_embeddings

    def text_build_arguments(self) -> dict:
        """The arguments of ``load_or_build_text_embeddings`` for this dataset's items and ``text`` options; the
        distributed build (``python -m datamodules.embed_text``) takes the same, so both key one table."""
        texts = self.item_text
        if texts is None:
            raise ValueError(f"data.text is set but {type(self).__name__} has no item text "
                             "(pass an item-text table, or set data.text to null)")
        opts = self.text
        return dict(
            cache_dir=self.processed_dir / "text", item_ids=self.item_ids[1:].tolist(), texts=texts[1:],
            template=opts.template if opts.template is not None else self.text_template,
            model=opts.model, pooling=opts.pooling, normalize=opts.normalize, max_length=opts.max_length,
            batch_size=opts.batch_size, dtype=opts.dtype, device=opts.device, revision=opts.revision,
            trust_remote_code=opts.trust_remote_code,
        )

    @property
    def text_dim(self) -> int:
        """Width of the item-text table; 0 without text. LightningCLI links it to the model."""
        table = self.text_embeddings
        return 0 if table is None else int(table.table.shape[1])

    @property
    def stats(self) -> dict:
        """Counts of the prepared data and of what every filter removed."""
        return self._prepared().stats

    @property
    def processed_dir(self) -> Path:
        self._prepared()
        return self._processed_dir

    def sequence(self, user: int) -> np.ndarray:
        """Internal item ids of internal user ``user``, oldest first (all of them, including val/test targets)."""
        data = self._prepared()
        return data.items[data.offsets[user]: data.offsets[user + 1]]

    # ---- preparation ---------------------------------------------------------------------------------------------

    def _prepared(self) -> Processed:
        if self._data is None:
            self._prepare()
        return self._data

    def _prepare(self) -> None:
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.raw_dir / ".download.lock"):
            self.download()
        raw = self.raw_files()
        digests = file_digests(raw, self.raw_dir / "processed" / "raw_digests.json")
        dataset = f"{type(self).__module__}.{type(self).__qualname__}"
        identity = {"dataset": dataset, "options": self._cache_options(raw), "raw_files": digests,
                    "version": CACHE_VERSION}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = self.raw_dir / "processed" / key
        with FileLock(str(folder) + ".lock"):
            loaded = load_cache(folder, {"key": key, "version": CACHE_VERSION})
            if loaded is None:
                self._build(folder, identity | {"key": key})
                loaded = load_cache(folder, {"key": key, "version": CACHE_VERSION})
                if loaded is None:
                    raise OSError(f"the cache just written to {folder} does not verify (disk full or failing?)")
            else:
                log.info("loaded %s from %s", self.name, folder)
        arrays, meta = loaded
        self._data = Processed(
            offsets=arrays["offsets"], items=arrays["items"], timestamps=arrays.get("timestamps"),
            user_ids=arrays["user_ids"], item_ids=arrays["item_ids"], stats=meta["stats"],
        )
        self._processed_dir, self._meta, self._item_text = folder, meta, None

    def _cache_options(self, raw_files: list[Path]) -> dict:
        """The constructor arguments that key the cache: every preprocessing option, however the module was made.

        Left out: loader options (they only shape batches), the bookkeeping entries LightningCLI adds to the
        hyper-parameters (``_class_path``, ``_instantiator``: without them `m2rec stats` and `m2rec fit` would key
        one dataset twice), and arguments naming a raw file, whose contents (not location) already key the cache.
        """
        raw = {p.resolve() for p in raw_files}
        return {name: str(value) if isinstance(value, Path) else value for name, value in self.hparams.items()
                if name not in LOADER_OPTIONS and not name.startswith("_") and not _names_one_of(value, raw)}

    @property
    def cache_key(self) -> str:
        """The key of the processed data (a function of the raw files' contents and the preprocessing options); a
        checkpoint records it, so that `--ckpt_path best|last` never picks a run fitted on other data."""
        return self.processed_dir.name

    def _build(self, folder: Path, identity: dict) -> None:
        start = time.perf_counter()
        log.info("preparing %s into %s", self.name, folder)
        interactions = self.read_interactions()
        if self.tie_order == "shuffle" and interactions.timestamps is None:
            raise DataOptionError(f"data.tie_order: shuffle needs timestamps, and {self.name} has none (its file order "
                                  "is the time order): use tie_order: file")
        try:
            processed = preprocess(interactions, self.min_user_interactions, self.min_item_interactions,
                                   self.drop_duplicates, self.tie_order)
        except EmptyDataError as err:  # name what was read: the message alone does not say which file
            files = ", ".join(str(f) for f in self.raw_files()) or self.name
            raise EmptyDataError(f"{files}: {err}") from None
        stats = {"dataset": self.name, **processed.stats}
        files = {}
        text = self.read_item_text(processed.item_ids[1:])
        if text is not None:
            item_text = [None] + [text.get(str(raw)) for raw in processed.item_ids[1:].tolist()]
            stats["items_without_text"] = sum(1 for t in item_text[1:] if not t or not any(t.values()))
            files[ITEM_TEXT_FILE] = json.dumps(item_text, ensure_ascii=False).encode("utf-8")
        stats["prepare_seconds"] = round(time.perf_counter() - start, 3)
        arrays = {"offsets": processed.offsets, "items": processed.items, "user_ids": processed.user_ids,
                  "item_ids": processed.item_ids}
        if processed.timestamps is not None:
            arrays["timestamps"] = processed.timestamps
        save_cache(folder, arrays, files, identity | {"stats": stats, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log.info("prepared %s: %d users, %d items, %d interactions in %.1f s", self.name, stats["users"],
                 stats["items"], stats["interactions"], stats["prepare_seconds"])

    def prepare_data(self) -> None:
        self._prepared()
        self.text_embeddings

    def setup(self, stage: str | None = None) -> None:
        self._prepared()

    # ---- loaders -------------------------------------------------------------------------------------------------

    def train_dataset(self) -> TrainSequences | PrefixSequences:
        data = self._prepared()
        if self.train_mode == "prefix":
            return PrefixSequences(data.items, data.offsets, self.max_len)
        # a trainer that reloads dataloaders every epoch gets new draws rather than a re-seeded repeat
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return TrainSequences(data.items, data.offsets, self.max_len, self.train_window,
                              epoch_seed(self.seed, epoch))

    def eval_dataset(self, split: Literal["val", "test", "predict"]) -> EvalSequences:
        data = self._prepared()
        return EvalSequences(data.items, data.offsets, self.max_len, split)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        if len(dataset) == 0:
            raise EmptyDataError(f"{self.name}: no training samples (every user has fewer than 4 interactions, so "
                                 "the train part left by leave-one-out has no (input, target) pair)")
        # The order of each epoch is a function of (seed, epoch) and the loader checkpoints its position, so a run
        # killed mid-epoch and resumed with --ckpt_path last trains on exactly the batches an uninterrupted run
        # would (datamodules/resume.py). The loader's own generator only seeds workers, never the global RNG.
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=EpochRandomSampler(dataset, self.seed),
                                   num_workers=self.num_workers, collate_fn=collate,
                                   persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                                   generator=torch.Generator().manual_seed(self.seed))

    def _eval_loader(self, split: Literal["val", "test", "predict"]) -> DataLoader:
        dataset = self.eval_dataset(split)
        return self._loader(dataset, batch_size=self.eval_batch_size, sampler=eval_sampler(dataset))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
