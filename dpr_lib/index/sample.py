"""The training sample of the merge job, drawn on executors: only the sample reaches the driver
(its memory = the sample, bounded by ``index.max_train_bytes``, plus a constant). Files are
sampled exactly (one task per file, which also checks its file for duplicate pids and reports its
pid range); a DataFrame by a seeded Bernoulli draw."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib.errors import InputError
from dpr_lib.index.shards import PACKED, file_batches, from_npy, to_npy
from dpr_lib.index_ops import vectors_of


def sample_vectors(spark, df, dim: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A Bernoulli sample (pids int64 [m], vectors float32 [m, d]) of a (pid, vector) DataFrame,
    drawn on executors; only the sample reaches the driver."""
    from dpr_lib.spark import spark_schema

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        rng = np.random.default_rng([seed, ctx.partitionId() if ctx else 0])
        for batch in batches:
            keep = np.flatnonzero(rng.random(batch.num_rows) < fraction)
            if len(keep):
                picked = batch.take(pa.array(keep))
                yield pa.RecordBatch.from_pylist([{
                    "shard": 0, "pids": picked.column("pid").to_numpy().astype(np.int64).tobytes(),
                    "vectors": np.ascontiguousarray(vectors_of(picked, dim)).tobytes()}], schema=PACKED)

    rows = df.select("pid", "vector").mapInArrow(run, spark_schema(PACKED)).toArrow()
    if rows.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    pids = np.concatenate([np.frombuffer(b, dtype=np.int64) for b in rows.column("pids").to_pylist()])
    vecs = np.concatenate([np.frombuffer(b, dtype=np.float32).reshape(-1, dim)
                           for b in rows.column("vectors").to_pylist()])
    return pids, vecs



SAMPLE_RESULT = pa.schema([("path", pa.string()), ("pids", pa.binary()), ("vectors", pa.binary()),
                           ("min_pid", pa.int64()), ("max_pid", pa.int64()), ("duplicates", pa.string())])


def sample_files(spark, layout: list[dict], dim: int, size: int, seed: int, spill_dir: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Exactly ``size`` rows sampled without replacement, drawn on executors (one task per file,
    each file contributing in proportion to its rows). Each task also checks its file for
    duplicate pids and reports its pid range. Returns (pids, vectors, [{path, min_pid, max_pid}]).

    ``spill_dir``: a directory the driver can read (local mode): tasks leave their sample there as
    ``.npy`` instead of sending it through Spark's result path (a copy through the JVM less)."""
    from dpr_lib.spark import spark_schema, tasks_dataframe

    total = sum(f["rows"] for f in layout)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False)) if total else np.zeros(0, np.int64)
    starts = np.cumsum([0] + [f["rows"] for f in layout])
    tasks = []
    for i, f in enumerate(layout):
        local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        tasks.append({"index": i, "path": f["path"], "rows": to_npy(local.astype(np.int64))})

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for row in b.to_pylist():
                want = from_npy(row["rows"])
                all_pids, got_p, got_v, offset = [], [], [], 0
                # streamed: memory = one batch + the file's pids + its sample
                for batch in file_batches(row["path"], 8192):
                    pids = batch.column("pid").to_numpy().astype(np.int64)
                    all_pids.append(pids)
                    sel = want[(want >= offset) & (want < offset + len(pids))] - offset
                    if len(sel):
                        got_p.append(pids[sel])
                        got_v.append(vectors_of(batch.take(pa.array(sel)), dim))
                    offset += len(pids)
                uniq, counts = np.unique(np.concatenate(all_pids or [np.zeros(0, np.int64)]), return_counts=True)
                got_p = np.concatenate(got_p or [np.zeros(0, np.int64)])
                got_v = np.concatenate(got_v or [np.zeros((0, dim), np.float32)])
                if spill_dir:
                    name = os.path.join(spill_dir, f"{row['index']:06d}")
                    np.save(name + ".pids.npy", got_p)
                    np.save(name + ".vectors.npy", got_v)
                    got_p, got_v = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
                yield pa.RecordBatch.from_pylist([{
                    "path": row["path"], "pids": got_p.tobytes(), "vectors": got_v.tobytes(),
                    "min_pid": int(uniq[0]) if len(uniq) else None, "max_pid": int(uniq[-1]) if len(uniq) else None,
                    "duplicates": ",".join(map(str, uniq[counts > 1][:5].tolist()))}], schema=SAMPLE_RESULT)

    rows = tasks_dataframe(spark, tasks, "index int, path string, rows binary").mapInArrow(
        run, spark_schema(SAMPLE_RESULT)).toArrow()
    dups = [d for d in rows.column("duplicates").to_pylist() if d]
    if dups:
        raise InputError(f"duplicate pids in the Embeddings table: {dups[0]}")
    if spill_dir:  # filled part by part into one array: the driver holds the sample once, not twice
        parts = [os.path.join(spill_dir, f"{i:06d}") for i in range(len(layout))]
        pids = np.concatenate([np.load(p + ".pids.npy") for p in parts] or [np.zeros(0, np.int64)])
        vecs = np.empty((len(pids), dim), np.float32)
        offset = 0
        for p in parts:
            part = np.load(p + ".vectors.npy", mmap_mode="r")
            vecs[offset:offset + len(part)] = part
            offset += len(part)
            del part
    else:
        pids = np.concatenate([np.frombuffer(b, dtype=np.int64) for b in rows.column("pids").to_pylist()] or
                              [np.zeros(0, np.int64)])
        vecs = np.concatenate([np.frombuffer(b, dtype=np.float32).reshape(-1, dim)
                               for b in rows.column("vectors").to_pylist()] or [np.zeros((0, dim), np.float32)])
    ranges = [{"path": p, "min_pid": lo, "max_pid": hi} for p, lo, hi in
              zip(rows.column("path").to_pylist(), rows.column("min_pid").to_pylist(),
                  rows.column("max_pid").to_pylist()) if lo is not None]
    return pids, vecs, ranges


def check_disjoint_files(spark, ranges: list[dict]) -> None:
    """Files without duplicates inside, whose pid ranges do not overlap, hold unique pids. Files
    that overlap (Embeddings not written by the encode job) are checked with a pid-only group-by."""
    ordered = sorted(ranges, key=lambda r: r["min_pid"])
    if all(a["max_pid"] < b["min_pid"] for a, b in zip(ordered, ordered[1:])):
        return
    from pyspark.sql import functions as F

    from dpr_lib.spark import tasks_dataframe

    def pids_of(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for url in b.column("path").to_pylist():
                for batch in file_batches(url, 65536, columns=("pid",)):
                    yield pa.RecordBatch.from_arrays([batch.column("pid").cast(pa.int64())], names=["pid"])

    dup = (tasks_dataframe(spark, [{"path": r["path"]} for r in ranges], "path string")
           .mapInArrow(pids_of, "pid long").groupBy("pid").count().filter(F.col("count") > 1).limit(5).collect())
    if dup:
        raise InputError(f"duplicate pids in the Embeddings table: {[r['pid'] for r in dup]}")


@contextlib.contextmanager
def driver_spill_dir(spark):
    """A temporary directory that tasks can write and the driver read: local mode only (else None)."""
    from dpr_lib.spark import is_local_master

    if not is_local_master(spark.sparkContext.master):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="dpr-sample-") as d:
        yield d

