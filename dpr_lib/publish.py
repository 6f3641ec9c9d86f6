"""Stage 4, publish: what makes a built version visible. The merge job (:mod:`dpr_lib.index`)
calls it twice: :func:`write_docstore` (executors copy the Passages files, pid-sorted, into the
version) and :func:`publish_version` (the manifest, then ``LATEST``, then pruning).

A version becomes visible only when LATEST names it, after every file and the manifest are
complete; a failure at any point leaves LATEST (and the version it names) untouched. The layout
and the manifest are defined in :mod:`dpr_lib.manifest`.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpr_lib import schemas, storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import InputError
from dpr_lib.manifest import DocstoreEntry, Manifest, prune_versions, relative_to, set_latest, write_manifest

log = logging.getLogger("dpr_lib.publish")


def publish_version(root: str, vurl: str, manifest: Manifest, storage_options: dict, retries: int,
                    keep_versions: int) -> list[str]:
    """Write the manifest of a complete version, then point LATEST at it, then prune versions
    beyond ``keep_versions``. Returns the removed version ids."""
    write_manifest(vurl, manifest, storage_options, retries)
    set_latest(root, manifest.version, storage_options, retries)
    return prune_versions(root, keep_versions, storage_options)


# ---------------------------------------------------------------- docstore

DOCSTORE_RESULT = pa.schema([("path", pa.string()), ("min_pid", pa.int64()), ("max_pid", pa.int64()),
                             ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


DOCSTORE_COLUMNS = ["pid", "doc_id", "title", "text"]


def _copy_sorted(fh, out: str, row_group: int) -> tuple[int, int, int] | None:
    """Stream a pid-sorted Parquet file into ``out`` one row group at a time: (rows, min, max) pid,
    or None as soon as a pid is smaller than the one before (the file is not sorted)."""
    rows, lo, hi = 0, -1, None
    with pq.ParquetWriter(out, schemas.DOCSTORE, compression="zstd", write_statistics=["pid"]) as writer:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=row_group, columns=DOCSTORE_COLUMNS):
            pids = batch.column("pid").to_numpy().astype(np.int64)
            if not len(pids):
                continue
            if (hi is not None and pids[0] < hi) or (np.diff(pids) < 0).any():
                return None
            lo, hi = (int(pids[0]) if hi is None else lo), int(pids[-1])
            writer.write_table(pa.Table.from_batches([batch]).cast(schemas.DOCSTORE), row_group_size=row_group)
            rows += len(pids)
    return rows, lo, -1 if hi is None else hi


def write_docstore_file(in_url: str, out_url: str, row_group: int, storage_options: dict, retries: int) -> dict:
    """Copy one Passages file's (pid, doc_id, title, text), sorted by pid, in small row groups.

    Streamed (memory: one row group, whatever the file's size): the corpus stage writes every
    Passages file sorted by pid. A file that is not sorted is read whole and sorted, with a warning."""
    fs, path = storage.get_fs(in_url)
    with storage.StagedFile(out_url, storage_options=storage_options, attempts=retries,
                            prefix="dpr-docstore-") as staged:
        tmp = staged.path
        try:
            with fs.open(path, "rb") as fh:
                copied = _copy_sorted(fh, tmp, row_group)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read the Passages file {in_url} for the docstore: "
                             f"{str(exc).splitlines()[0]}") from None
        if copied is None:
            log.warning("docstore: %s is not sorted by pid; reading it whole to sort it", in_url)
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=DOCSTORE_COLUMNS).sort_by("pid").cast(schemas.DOCSTORE)
            pq.write_table(table, tmp, row_group_size=row_group, compression="zstd", write_statistics=["pid"])
            pids = table.column("pid")
            copied = (table.num_rows, pc.min(pids).as_py(), pc.max(pids).as_py()) if table.num_rows else (0, -1, -1)
    rows, lo, hi = copied
    return {"path": out_url, "min_pid": lo, "max_pid": hi, "rows": rows, "bytes": staged.bytes,
            "sha256": staged.sha256}


def write_docstore(spark, cfg: Config, vurl: str) -> list[DocstoreEntry]:
    """One docstore file per Passages file, written by executors. Returns manifest entries, by pid."""
    from dpr_lib.spark import spark_schema, tasks_dataframe

    files = storage.list_files(cfg.path("passages"), ".parquet")
    opts, retries, row_group = cfg.storage_options(), cfg.publish.retries, cfg.publish.docstore_row_group
    rows = [{"input": f, "output": join_url(vurl, "docstore", f"part-{i:05d}.parquet")} for i, f in enumerate(files)]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for r in batch.to_pylist():
                yield pa.RecordBatch.from_pylist(
                    [write_docstore_file(r["input"], r["output"], row_group, opts, retries)], schema=DOCSTORE_RESULT)

    out = [r.asDict() for r in tasks_dataframe(spark, rows, "input string, output string")
           .mapInArrow(run, spark_schema(DOCSTORE_RESULT)).collect()]
    out = [r for r in out if r["rows"] > 0]
    out.sort(key=lambda r: r["min_pid"])
    return [DocstoreEntry.from_dict({**r, "path": relative_to(r["path"], vurl)}) for r in out]



