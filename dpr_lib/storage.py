"""Object storage through fsspec: ``file://`` / plain paths, ``s3://`` (s3fs), ``gs://`` and the rest.

Every operation retries transient errors with exponential backoff. Writes go through
``write_bytes_atomic`` so a reader never sees a partial object: local files are renamed into
place, object stores make a PUT visible only when it completes.

No pyspark import here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
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


# The options of every call that passes none: Config.storage_options(), bound once per job on the
# driver (use_options) and handed to tasks as a Spark local property (dpr_lib.spark.bind_storage),
# so a work dir, a model URL or a checkpoint on MinIO is reached through the same endpoint as the index.
OPTIONS_PROPERTY = "dpr.storage_options"
_options: dict = {}


def use_options(options: dict | None) -> None:
    """Make ``options`` the default of every storage call in this process that passes none."""
    global _options
    _options = dict(options or {})


def default_options() -> dict:
    """The options in force here: the running Spark task's (set by the driver that submitted it),
    else this process's (``use_options``)."""
    if "pyspark" in sys.modules:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        raw = ctx.getLocalProperty(OPTIONS_PROPERTY) if ctx is not None else None
        if raw is not None:
            return json.loads(raw)
    return _options


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or local path. ``storage_options`` None means
    the defaults in force (``default_options``); local paths take none."""
    if url.startswith(("s3a://", "s3n://")):
        url = "s3://" + url.split("://", 1)[1]  # Hadoop's S3 schemes name the same objects
    if is_local(url):
        storage_options = {}
    elif storage_options is None:
        # The bound options are an S3-compatible store's (endpoint, addressing); gs://, az:// and
        # the rest take their settings from their own environment.
        storage_options = default_options() if url.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
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
        except (FileNotFoundError, FileExistsError) as exc:
            raise type(exc)(f"{what}: {exc}") from exc
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


def local_tmp_dir() -> str | None:
    """Spark's local scratch directory on an executor (SPARK_LOCAL_DIRS), else None (the system's)."""
    local_dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]
    return local_dirs[0] if local_dirs else None


class StagedFile:
    """A local temporary file that becomes ``url`` when its ``with`` block ends without error.

    ``path``: where to write it (a Parquet writer, FAISS, numpy). On a clean exit it is uploaded
    atomically (:func:`upload_file_atomic`: readers see the old object or the whole new one) unless
    ``skip`` was set (nothing worth publishing); its ``bytes`` and ``sha256`` are then filled. The
    local file is removed in every case. The one way this package writes a file it built locally."""

    def __init__(self, url: str, suffix: str = ".parquet", storage_options: dict | None = None, attempts: int = 5,
                 prefix: str = "dpr-"):
        self.url, self.suffix, self.opts, self.attempts, self.prefix = url, suffix, storage_options, attempts, prefix
        self.skip, self.bytes, self.sha256, self.path = False, 0, "", ""

    def __enter__(self) -> StagedFile:
        fd, self.path = tempfile.mkstemp(suffix=self.suffix, prefix=self.prefix, dir=local_tmp_dir())
        os.close(fd)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and not self.skip:
                self.bytes, self.sha256 = os.path.getsize(self.path), sha256_file(self.path)
                upload_file_atomic(self.path, self.url, self.opts, self.attempts)
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)
        return False

    def entry(self) -> dict:
        return {"path": self.url, "bytes": self.bytes, "sha256": self.sha256}


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


# ---------------------------------------------------------------- conditional writes
# What a lock needs from a store: create only if absent, and replace or delete only the object that
# was read. S3 has both (PUT If-None-Match: * and If-Match: <ETag>); local paths get them from
# link(2) (fails when the name exists) and, for replace/delete, a flock(2)-held guard file beside it.
# Other stores refuse with ConditionalWriteUnsupported rather than pretend.


class ConditionalWriteUnsupported(StorageError):
    """The store cannot create-if-absent or replace-if-unchanged."""


def _conditional_kind(url: str) -> str:
    if is_local(url):
        return "local"
    if url.split("://", 1)[0] in ("s3", "s3a", "s3n"):
        return "s3"
    raise ConditionalWriteUnsupported(
        f"{url.split('://', 1)[0]}:// has no conditional writes through this library (supported: local "
        "paths and S3-compatible stores with If-None-Match/If-Match)")


def _precondition_failed(exc: BaseException) -> bool:
    return isinstance(exc, FileExistsError) or (
        isinstance(exc, OSError) and exc.errno == errno.EINVAL and "condition" in str(exc).lower())


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there: True when this call created it,
    False when it already existed. Atomic against every other writer using these functions."""
    kind = _conditional_kind(url)
    fs, path = get_fs(url, storage_options)
    if kind == "local":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails with EEXIST: the complete file appears or nothing does
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                return _create_excl(path, data)  # a filesystem without hard links
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    try:
        # A retried PUT whose first attempt landed also reads as "exists": callers that must tell
        # the two apart compare the content with what they wrote.
        retry(lambda: fs.pipe_file(path, data, mode="create"), f"create {url}")
    except FileExistsError:
        return False
    finally:
        fs.invalidate_cache(path)
    return True


def _create_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read_tagged(url: str, storage_options: dict | None = None) -> tuple[bytes, str] | None:
    """(content, tag) of ``url``, or None when absent. ``tag`` identifies this exact object for
    ``replace_if`` / ``delete_if`` (S3: its ETag; local: the sha256 of its content)."""
    kind = _conditional_kind(url)
    fs, path = get_fs(url, storage_options)
    if kind == "local":
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, sha256_bytes(data)
    fs.invalidate_cache(path)
    try:
        # The ETag first: if the object changes before the body is read, replace_if(tag) fails.
        tag = retry(lambda: fs.info(path), f"stat {url}")["ETag"]
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    return data, tag


def replace_if(url: str, data: bytes, tag: str, storage_options: dict | None = None) -> bool:
    """Replace ``url`` with ``data`` only if it is still the object ``read_tagged`` returned with
    ``tag``: True when replaced, False when it changed or vanished meanwhile."""
    return _if_unchanged(url, tag, data, storage_options)


def delete_if(url: str, tag: str, storage_options: dict | None = None) -> bool:
    """Delete ``url`` only if it is still the object tagged ``tag``."""
    return _if_unchanged(url, tag, None, storage_options)


def _if_unchanged(url: str, tag: str, data: bytes | None, storage_options: dict | None) -> bool:
    kind = _conditional_kind(url)
    fs, path = get_fs(url, storage_options)
    if kind == "local":
        import fcntl

        with open(f"{path}.guard", "a+b") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # every replace/delete of this path goes one at a time
            current = read_tagged(url)
            if current is None or current[1] != tag:
                return False
            if data is None:
                os.remove(path)
            else:
                write_bytes_atomic(url, data)
            return True
    bucket, key, _ = fs.split_path(path)
    try:
        if data is None:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
        else:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if _precondition_failed(exc):
            return False
        raise StorageError(f"conditional {'delete' if data is None else 'write'} of {url}: {exc}") from exc
    finally:
        fs.invalidate_cache(path)
    return True


# ---------------------------------------------------------------- tables published by pointer
# A Spark-written table (Passages, rejects, training data) lives as <table>/<version>/part-*; the
# small object <table>/_CURRENT, written last, names the version readers see and its files in order.
# A crash before the pointer leaves the previous version readable; see dpr_lib.outputs.commit_table.

TABLE_POINTER = "_CURRENT"


def table_pointer(url: str, storage_options: dict | None = None) -> dict | None:
    """The pointer of a table published by pointer, or None (a plain directory, a file, a glob)."""
    try:
        raw = read_bytes(url.rstrip("/") + "/" + TABLE_POINTER, storage_options)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except StorageError as exc:
        if isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)):
            return None
        raise
    try:
        pointer = json.loads(raw)
        assert isinstance(pointer["version"], str) and isinstance(pointer["files"], list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise StorageError(f"{url}/{TABLE_POINTER} is not a table pointer (expected JSON with version and files)") \
            from None
    return pointer


def resolve_table(url: str, storage_options: dict | None = None) -> str:
    """The directory holding a table's current files: ``<url>/<version>`` for a table published by
    pointer, else ``url`` itself (any plain Parquet directory or file)."""
    pointer = table_pointer(url, storage_options)
    return url.rstrip("/") + "/" + pointer["version"] if pointer else url


def list_files(url: str, suffix: str = "", storage_options: dict | None = None) -> list[str]:
    """Files under ``url`` (recursive) ending with ``suffix``, sorted, as URLs of the same protocol.

    Hidden and underscore-prefixed names (``_SUCCESS``, ``.crc``) are skipped as Spark does. A table
    published by pointer lists the files of its current version, in the pointer's order.
    """
    pointer = table_pointer(url, storage_options) if "*" not in url else None
    if pointer:
        base = url.rstrip("/") + "/" + pointer["version"]
        return [f"{base}/{name}" for name in pointer["files"] if name.endswith(suffix)]
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
