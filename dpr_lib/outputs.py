"""Outputs every stage writes the same way: its stats JSON (``<paths.stats>/<stage>.json``) and
the publication of a Spark job's table: each version in its own directory, made visible by a
pointer written last (see ``dpr_lib.storage.TABLE_POINTER``). Imported by the stages
(corpus, encode, index, training data), so none of them imports another for it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import StorageError

VERSION_PREFIX = "v-"


def write_stats(cfg: Config, stage: str, stats: dict) -> str:
    """Write a stage's stats JSON to <paths.stats>/<stage>.json and return its URL."""
    url = join_url(cfg.path("stats"), f"{stage}.json")
    storage.write_bytes_atomic(url, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
    return url


def spark_part(name: str) -> str | None:
    """``part-NNNNN`` of a Spark output file name (``part-00003-<uuid>-c000.snappy.parquet``), the
    partition number that stays the same across runs; None for other names."""
    m = re.match(r"(part-\d{5})-", name)
    return m.group(1) if m else None


def new_table_version(table_url: str) -> str:
    """A fresh directory under ``table_url`` for Spark to write the table's next version into; it
    is invisible to readers until :func:`commit_table` points the table at it."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return join_url(table_url, f"{VERSION_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}")


def commit_table(table_url: str, version_url: str, suffix: str = ".parquet", keep: int = 2) -> list[str]:
    """Point ``table_url`` at ``version_url`` (its part files, in Spark's partition order) by writing
    the pointer last, then remove older versions beyond ``keep`` (the previous one stays for readers
    still on it). Returns the URLs of the table's files."""
    fs, vpath = storage.get_fs(version_url)
    fs.invalidate_cache()
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(vpath, detail=False))
    files = [n for n in names if n.startswith("part-") and n.endswith(suffix)]
    if not files:
        raise StorageError(f"{version_url} holds no part-*{suffix} files: nothing to publish")
    version = version_url.rstrip("/").rsplit("/", 1)[-1]
    before = storage.table_pointer(table_url)
    earlier = ([before["version"]] + before.get("earlier", [])) if before else []
    pointer = {"version": version, "files": files, "committed_at": time.time(),
               "earlier": earlier[:max(0, keep - 1)]}  # published versions kept for readers still on them
    storage.write_bytes_atomic(join_url(table_url, storage.TABLE_POINTER), json.dumps(pointer).encode())
    prune_table(table_url)
    return [join_url(version_url, f) for f in files]


def discard_table_version(version_url: str) -> None:
    """Remove a version that will not be published (a failed check); the table is unchanged."""
    fs, path = storage.get_fs(version_url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def prune_table(table_url: str) -> list[str]:
    """Remove what readers can no longer reach: versions older than the current one that the pointer
    does not keep (``earlier``): superseded ones and those a crashed run left unpublished; and part
    files of the flat layout before pointers. Versions newer than the current one are left alone: a
    run writing one now must not lose it."""
    pointer = storage.table_pointer(table_url)
    if not pointer:
        return []
    fs, path = storage.get_fs(table_url)
    fs.invalidate_cache()
    keep = {pointer["version"], *pointer.get("earlier", [])}
    removed = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        stale_version = name.startswith(VERSION_PREFIX) and name < pointer["version"] and name not in keep
        if stale_version or name.startswith("part-"):
            fs.rm(p, recursive=True)
            removed.append(name)
    return removed
