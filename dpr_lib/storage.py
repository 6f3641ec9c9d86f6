"""Object storage through fsspec: ``file://`` / plain paths, ``s3://`` (s3fs), ``gs://`` and the rest.

Every operation retries transient errors with exponential backoff. Writes go through
``write_bytes_atomic`` so a reader never sees a partial object: local files are renamed into
place, object stores make a PUT visible only when it completes.

No pyspark import here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from typing import Callable, TypeVar

import fsspec

from dpr_lib.errors import StorageError

log = logging.getLogger("dpr_lib.storage")
T = TypeVar("T")

# Not worth retrying: the caller's input is wrong, retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
# A full (or read-only) local disk does not get better within a backoff either.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or local path."""
    if url.startswith(("s3a://", "s3n://")):
        url = "s3://" + url.split("://", 1)[1]  # Hadoop's S3 schemes name the same objects
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn`` until it succeeds; transient errors are retried with backoff, then StorageError."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{what}: {exc}") from exc
        except _PERMANENT as exc:
            raise StorageError(f"{what}: {exc}") from exc
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                if attempt == attempts:
                    raise StorageError(f"{what} failed after {attempts} attempts: {exc}") from exc
                _backoff(what, exc, attempt, attempts, base_delay)
                continue
            raise StorageError(f"{what}: local disk full or read-only ({exc.strerror}"
                               f"{': ' + str(exc.filename) if exc.filename else ''})") from exc
        except Exception as exc:  # noqa: BLE001 - storage clients raise many types
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {exc}") from exc
            _backoff(what, exc, attempt, attempts, base_delay)
    raise AssertionError("unreachable")


def _backoff(what: str, exc: BaseException, attempt: int, attempts: int, base_delay: float) -> None:
    delay = base_delay * (2 ** (attempt - 1))
    log.warning("%s failed (%s), retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
    time.sleep(delay)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str, chunk: int = 1 << 20, storage_options: dict | None = None) -> str:
    """sha256 of a local file or any fsspec URL, streamed in chunks."""
    h = hashlib.sha256()
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None, attempts: int = 5) -> None:
    """Write ``data`` to ``url`` so that readers see either the old object or the complete new one."""
    fs, path = get_fs(url, storage_options)

    def _write() -> None:
        if is_local(url):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)

    retry(_write, f"write {url}", attempts)


def upload_file_atomic(local: str, url: str, storage_options: dict | None = None, attempts: int = 5) -> None:
    """Copy the local file ``local`` to ``url`` so that readers see the old object or the whole new one
    (local: staged copy renamed into place; object stores: one PUT, visible only when complete)."""
    fs, path = get_fs(url, storage_options)
    if is_local(url):
        _via_temp(path, ".tmp", lambda staged: shutil.copyfile(local, staged), f"write {url}", attempts)
    else:
        retry(lambda: fs.put_file(local, path), f"upload {url}", attempts)


def read_bytes(url: str, storage_options: dict | None = None, attempts: int = 5) -> bytes:
    fs, path = get_fs(url, storage_options)
    return retry(lambda: fs.cat_file(path), f"read {url}", attempts)


def exists(url: str, storage_options: dict | None = None, attempts: int = 5) -> bool:
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache()
    return retry(lambda: fs.exists(path), f"stat {url}", attempts)


def download(url: str, dest: str, storage_options: dict | None = None, attempts: int = 5) -> None:
    """Copy ``url`` to the local file ``dest`` through a temporary file (never a partial ``dest``)."""
    fs, path = get_fs(url, storage_options)
    _via_temp(dest, ".part", lambda tmp: fs.get_file(path, tmp), f"download {url}", attempts)


def _via_temp(dest: str, suffix: str, write: Callable[[str], object], what: str, attempts: int) -> None:
    """``write(tmp)`` (retried) into a unique temp file beside the local path ``dest``, then rename
    it into place: ``dest`` is the old file or the whole new one, never a partial one."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}.{uuid.uuid4().hex}{suffix}"
    try:
        retry(lambda: write(tmp), what, attempts)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(url: str, suffix: str = "", storage_options: dict | None = None) -> list[str]:
    """Files under ``url`` (recursive) ending with ``suffix``, sorted, as URLs of the same protocol.

    Hidden and underscore-prefixed names (``_SUCCESS``, ``.crc``) are skipped as Spark does.
    """
    fs, path = get_fs(url, storage_options)
    if fs.isfile(path):
        return [url]
    found = retry(lambda: fs.find(path), f"list {url}")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    out = []
    for p in sorted(found):
        name = p.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or not name.endswith(suffix):
            continue
        out.append(protocol + p if protocol and not p.startswith(protocol) else p)
    return out
