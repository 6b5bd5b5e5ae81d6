"""Downloads that resume, verify and land atomically; archive extraction that refuses to escape its folder."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .cache import atomic_write

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download that failed or did not verify; the message names the URL and where to put the file by hand."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would be written outside the target folder (absolute path, ``..``, or a link)."""


def git_blob_sha1(path: str | Path) -> str:
    """The id ``git hash-object`` gives a file: sha1 of ``b"blob <size>\\0" + content``."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hexdigest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | Path, size: int | None = None, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise DownloadError when ``path`` does not have the given size / checksums."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{path}: size {actual} bytes, expected {size}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None and _hexdigest(path, algorithm) != expected.lower():
            raise DownloadError(f"{path}: {algorithm} {_hexdigest(path, algorithm)}, expected {expected}")


def download_file(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    Bytes go to ``dest.part``; an interrupted transfer resumes with an HTTP Range request (or restarts cleanly when
    the server ignores it). The finished file is checked against ``size``/``sha256``/``md5`` and only then renamed
    to ``dest``; a file that fails the check is deleted.

    Args:
        url: http(s):// or file:// URL.
        dest: final path.
        size: expected size in bytes.
        sha256: expected sha256 (hex).
        md5: expected md5 (hex).
        retries: attempts after a dropped connection before giving up.
        timeout: socket timeout in seconds.
        progress: show a tqdm progress bar.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            verify_file(dest, size, sha256, md5)
            return dest
        except DownloadError as e:
            log.warning("%s; downloading it again", e)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    manual = f"Download {url} by hand and save it as {dest}."
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500 and e.code != 416:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}. {manual}") from e
            if attempt == retries:
                raise DownloadError(f"{url}: {e} (after {retries + 1} attempts). {manual}") from e
            log.warning("download of %s interrupted (%s); resuming (attempt %d)", url, e, attempt + 2)
    try:
        verify_file(part, size, sha256, md5)
    except DownloadError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} did not verify: {e}. {manual}") from None
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our range starts at or past the end: restart from scratch
            part.unlink()
            return _fetch(url, part, timeout, progress)
        raise
    with response:
        status = getattr(response, "status", None)
        content_range = response.headers.get("Content-Range", "")
        resumed = have and status == 206 and re.match(rf"bytes {have}-", content_range)
        if have and not resumed:
            log.info("server ignored the Range request for %s; restarting the download", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name[: -len(".part")],
            disable=not progress,
        ) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and part.stat().st_size != total:
            raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")


def _safe_target(dest: Path, name: str) -> Path:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    target = (dest / path).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    return target


def extract_archive(archive: str | Path, dest: str | Path, members: list[str] | None = None) -> list[Path]:
    """Extract a zip or tar archive into ``dest`` after checking every member.

    The whole archive is refused (nothing written) if any member has an absolute path, a ``..`` component, or is a
    symlink, hard link or device. Each file is written atomically.

    Args:
        archive: .zip, .tar, .tar.gz, .tgz, ...
        dest: target folder.
        members: names to extract (default: all). Missing names are an error.

    Returns:
        The extracted file paths.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _safe_target(dest, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink")
            files = [(i.filename, i) for i in infos if not i.is_dir()]
            return _extract(archive, dest, files, members, zf.open)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            infos = tf.getmembers()
            for info in infos:
                _safe_target(dest, info.name)
                if not (info.isfile() or info.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link or special file")
            files = [(i.name, i) for i in infos if i.isfile()]
            return _extract(archive, dest, files, members, tf.extractfile)
    raise DownloadError(f"{archive} is neither a zip nor a tar archive (a truncated or failed download?)")


def _extract(archive, dest, files, members, open_member) -> list[Path]:
    if members is not None:
        names = {name for name, _ in files}
        missing = [m for m in members if m not in names]
        if missing:
            raise DownloadError(f"{archive} does not contain {missing}")
        files = [(name, info) for name, info in files if name in set(members)]
    written = []
    for name, info in files:
        target = _safe_target(dest, name)
        with open_member(info) as source:
            atomic_write(target, lambda f: shutil.copyfileobj(source, f, 1 << 20))
        written.append(target)
    return written
