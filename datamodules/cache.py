"""On-disk cache of processed arrays: .npy files (never pickled), a JSON sidecar with the sha256 of each, atomic writes.

A cache folder is valid only when its ``meta.json`` exists, names the expected key and version, and every file it lists
has the recorded checksum. ``meta.json`` is written last, so a crash mid-write leaves an invalid (rebuilt) cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

META_FILE = "meta.json"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary file)`` on a temp file in the same folder, fsync, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def save_cache(folder: str | Path, arrays: dict[str, np.ndarray], files: dict[str, bytes], meta: dict) -> None:
    """Write ``name.npy`` per array and the raw ``files``, then ``meta.json`` with their checksums.

    Args:
        folder: the cache folder (created; an older meta.json is removed first so a half-rewritten cache is invalid).
        arrays: numeric or fixed-width string arrays (object arrays are refused: they would need pickle).
        files: extra files (e.g. JSON) stored verbatim.
        meta: JSON-able metadata; ``checksums`` is added.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)
    checksums = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; convert it to str or a number type before caching")
        file = f"{name}.npy"
        atomic_write(folder / file, lambda f, a=array: np.save(f, a, allow_pickle=False))
        checksums[file] = sha256_file(folder / file)
    for file, data in files.items():
        atomic_write_bytes(folder / file, data)
        checksums[file] = hashlib.sha256(data).hexdigest()
    write_json(folder / META_FILE, {**meta, "checksums": checksums})


def read_meta(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / META_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def load_cache(folder: str | Path, expect: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """Load and verify a cache; None (with a logged reason) when it is missing, stale or corrupt.

    Args:
        folder: the cache folder.
        expect: metadata entries that must match exactly (e.g. key and format version).

    Returns:
        (arrays by name, meta) — only the ``.npy`` files are loaded; other files are verified here and can be
        read with :func:`read_verified`.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        if folder.exists():
            log.warning("cache %s has no readable %s; rebuilding", folder, META_FILE)
        return None
    for field, value in expect.items():
        if meta.get(field) != value:
            log.warning("cache %s is stale (%s=%r, expected %r); rebuilding", folder, field, meta.get(field), value)
            return None
    arrays = {}
    for file, checksum in meta.get("checksums", {}).items():
        path = folder / file
        if not path.is_file() or sha256_file(path) != checksum:
            log.warning("cache file %s is missing or corrupt (checksum mismatch); rebuilding", path)
            return None
        if file.endswith(".npy"):
            arrays[file[: -len(".npy")]] = np.load(path, allow_pickle=False)
    return arrays, meta


def read_verified(folder: str | Path, file: str, meta: dict) -> bytes:
    """Read a cached non-array file and check it against the checksum in ``meta``."""
    data = (Path(folder) / file).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["checksums"][file]:
        raise OSError(f"{Path(folder) / file} changed since the cache was verified (checksum mismatch); delete "
                      f"{folder} to rebuild it")
    return data


def file_digests(paths: list[Path], memo: Path) -> dict[str, str]:
    """sha256 of each file, memoised by (size, mtime_ns) in ``memo`` so large raw files are hashed once.

    Returns:
        {file name: sha256}. Names (not full paths) key the digest so a moved data folder keeps its cache; a name
        that repeats gets ``#<position>`` appended.
    """
    try:
        known = json.loads(memo.read_text("utf-8"))
    except (OSError, ValueError):
        known = {}
    digests, changed = {}, False
    for path in paths:
        stat = path.stat()
        entry = known.get(str(path.resolve()))
        if entry is None or entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
            known[str(path.resolve())] = entry
            changed = True
        # two save_to_disk folders both hold data-00000-of-00001.arrow: a repeated name keys by its position
        digests[path.name if path.name not in digests else f"{path.name}#{len(digests)}"] = entry["sha256"]
    if changed:
        try:
            write_json(memo, known)
        except OSError as e:  # a read-only data folder still works, it just re-hashes next time
            log.info("could not save raw-file digests to %s: %s", memo, e)
    return digests
