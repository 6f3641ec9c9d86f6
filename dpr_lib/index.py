"""Stage 3, index: the merge job. The Embeddings table -> a trained IVF quantizer and shards
built on executors -> a published version (through :mod:`dpr_lib.publish`).

- ``build_index``: the job. On the driver: the index rule, a sample drawn on executors (driver
  memory = the sample, bounded by ``index.max_train_bytes``, plus a constant), training; then
  the shard pass on executors, recall of each nprobe against exact search, the accounting check,
  and the publish (docstore, manifest, LATEST).
- ``build_shards``: executors clone the broadcast trained index, add their shard's vectors in
  bounded batches with pids as FAISS ids, write the shard, and search the recall queries in it.
  Embeddings files feed it without a shuffle (each shard task reads its own row groups, see
  ``plan_pieces``); a DataFrame is hashed to shards by pid through Spark's shuffle, one shard per
  task. The same single pass checks dimensions and finiteness and computes the exact top-k of the
  recall queries by brute force over the batches it adds, so recall needs no second pass.
  Duplicate pids are caught per shard (hash sharding: all copies of a pid meet) or, for files, by
  the sampling pass (no duplicates inside a file, and file pid ranges that do not overlap).

The FAISS work itself is :mod:`dpr_lib.index_ops` (Spark-free). pyspark is imported inside the
Spark runners only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import accounting, gate, storage
from dpr_lib import index_ops as ops
from dpr_lib.config import Config, join_url
from dpr_lib.errors import ConfigError, InputError, StorageError
from dpr_lib.index_ops import (
    RerankStoreWriter,
    check_finite,
    deserialize,
    local_tmp_dir,
    merge_topk,
    peak_rss,
    recall_at_k,
    rerank,
    reset_peak_rss,
    set_nprobe,
    topk_block,
    vectors_of,
)
from dpr_lib.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    ShardEntry,
    new_version_id,
    read_latest,
    read_manifest,
    relative_to,
    software_versions,
    version_url,
    write_manifest,
)
from dpr_lib.publish import publish_version, write_docstore
from dpr_lib.search import DEFAULT_FUSION

log = logging.getLogger("dpr_lib.index")

def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _unnpy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------- Spark runners

def shard_of(pids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of each pid: a stable multiplicative hash, independent of partitioning. int64 [n]."""
    mixed = (pids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)
    return (mixed % np.uint64(num_shards)).astype(np.int64)


PACKED = pa.schema([("shard", pa.int32()), ("pids", pa.binary()), ("vectors", pa.binary())])


def pack_batch(batch: pa.RecordBatch, dim: int, num_shards: int) -> Iterator[pa.RecordBatch]:
    """(pid, vector) rows -> one row per shard holding raw int64 pids and float32 vectors.

    Vectors cross Spark's shuffle as opaque bytes: far cheaper than Spark's array<float> rows.
    """
    pids = batch.column("pid").to_numpy().astype(np.int64)
    vecs = vectors_of(batch, dim)
    shards = shard_of(pids, num_shards) if num_shards > 1 else np.zeros(len(pids), np.int64)
    for s in np.unique(shards):
        sel = shards == s
        yield pa.RecordBatch.from_pylist([{"shard": int(s), "pids": pids[sel].tobytes(),
                                           "vectors": np.ascontiguousarray(vecs[sel]).tobytes()}], schema=PACKED)


def _file_batches(url: str, batch_rows: int, columns=("pid", "vector")) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    from dpr_lib import storage

    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=list(columns))


def packed_vectors(spark, df, dim: int, num_shards: int):
    """DataFrame (shard, pids, vectors) of a (pid, vector) DataFrame, hashed to shards by pid."""
    from dpr_lib.spark import spark_schema

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield from pack_batch(batch, dim, num_shards)

    return df.select("pid", "vector").mapInArrow(run, spark_schema(PACKED))


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


SHARD_RESULT = pa.schema([("shard", pa.int32()), ("vectors", pa.int64()), ("bytes", pa.int64()),
                          ("sha256", pa.string()), ("path", pa.string()), ("rerank", pa.string()),
                          ("task_shards", pa.int32()), ("peak_rss", pa.int64()),
                          ("hit_scores", pa.binary()), ("hit_ids", pa.binary()), ("exact_scores", pa.binary()),
                          ("exact_ids", pa.binary())])


def build_shards(spark, source, trained: bytes, num_shards: int, dim: int, out_url_of,
                 queries: np.ndarray, k: int, nprobes: list[int], add_batch: int,
                 storage_options: dict, retries: int, k_factors: list[int] | None = None,
                 pieces: list[list[dict]] | None = None, stop_recall: float = 1.0) -> list[dict]:
    """Build every shard on executors; return per-shard {shard, vectors, bytes, sha256, path, rerank, hit_*, exact_*}.

    Two ways to feed the shard tasks:

    - ``pieces`` (Embeddings files, see :func:`plan_pieces`): one task per shard reads its own
      Parquet row groups with pyarrow. Nothing crosses Spark's shuffle and every byte is read once.
    - otherwise ``source`` is a DataFrame: rows are hashed to shards by pid (:func:`shard_of`) and
      repartitioned through Spark's shuffle as packed bytes (:func:`packed_vectors`).

    ``out_url_of(shard)`` names where a shard is written (``.faiss``; its re-rank store beside it
    as ``.pids.npy`` and ``.vectors.npy`` when ``k_factors`` is given). ``hit_scores``/``hit_ids``
    hold the shard's top-k of the recall queries at each nprobe and k_factor (float32 / int64
    [P, F, q, k]; without re-rank F = 1 and the scores are the index's); ``exact_scores``/
    ``exact_ids`` its brute-force top-k ([q, k]); ``rerank`` a JSON {pids: {path, bytes, sha256},
    vectors: {...}} or "".

    ``stop_recall``: an exact-code shard stops its nprobe sweep once its own recall@k against its
    exact top-k reaches this; the larger nprobes repeat the last results (a lower bound of theirs:
    with exact codes more probes never lose a neighbour).
    """
    import json

    from dpr_lib.spark import spark_schema, tasks_dataframe

    bc_index = spark.sparkContext.broadcast(trained)
    bc_queries = spark.sparkContext.broadcast(queries.astype(np.float32))
    urls = {s: out_url_of(s) for s in range(num_shards)}
    builder = _ShardTask(bc_index, bc_queries, urls, dim, k, nprobes, add_batch, storage_options, retries,
                         k_factors, stop_recall)

    if pieces is not None:
        def run_pieces(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                for row in b.to_pylist():
                    ranges: list = []
                    chunks = ((row["shard"], p, v) for p, v in _ranged_pieces(json.loads(row["pieces"]), dim,
                                                                              add_batch, ranges))
                    for out_batch in builder(chunks):
                        yield out_batch.append_column("pid_ranges", pa.array([json.dumps(ranges)], pa.string()))

        tasks = tasks_dataframe(spark, [{"shard": s, "pieces": json.dumps(pieces[s])} for s in range(num_shards)],
                                "shard int, pieces string")
        out = tasks.mapInArrow(run_pieces, spark_schema(SHARD_RESULT.append(pa.field("pid_ranges", pa.string()))))
    else:
        def run_packed(pairs: Iterator[tuple]) -> Iterator[dict]:
            chunks = ((shard, np.frombuffer(p, dtype=np.int64), np.frombuffer(v, dtype=np.float32).reshape(-1, dim))
                      for shard, (p, v) in pairs)
            for batch in builder(chunks):
                yield from batch.to_pylist()

        # Shard s goes to partition s (identity partitioner): a task never holds two shards, as a
        # hash of the shard number into num_shards partitions would let it.
        packed = packed_vectors(spark, source, dim, num_shards).rdd.map(
            lambda r: (r["shard"], (r["pids"], r["vectors"])))
        out = packed.partitionBy(num_shards, lambda shard: shard).mapPartitions(run_packed)
    rows = out.collect() if pieces is None else [r.asDict() for r in out.collect()]
    bc_index.unpersist()
    bc_queries.unpersist()
    for r in rows:
        r["pid_ranges"] = json.loads(r["pid_ranges"]) if r.get("pid_ranges") else None
        for key in ("hit_scores", "hit_ids", "exact_scores", "exact_ids"):
            r[key] = _unnpy(r[key])
        r["rerank"] = json.loads(r["rerank"]) if r["rerank"] else None
    return sorted(rows, key=lambda r: r["shard"])


class _ShardTask:
    """The work of a shard task, whatever feeds it: (shard, pids, vectors) chunks in -> for each
    shard, its index written (and re-rank store), its recall hits and exact top-k out."""

    def __init__(self, bc_index, bc_queries, urls, dim, k, nprobes, add_batch, storage_options, retries, k_factors,
                 stop_recall=1.0):
        self.bc_index, self.bc_queries, self.urls = bc_index, bc_queries, urls
        self.dim, self.k, self.nprobes, self.add_batch = dim, k, nprobes, add_batch
        self.storage_options, self.retries, self.k_factors = storage_options, retries, k_factors
        self.stop_recall = stop_recall

    def _upload(self, local: str, url: str) -> dict:
        from dpr_lib import storage

        storage.upload_file_atomic(local, url, self.storage_options, attempts=self.retries)
        return {"path": url, "bytes": os.path.getsize(local), "sha256": storage.sha256_file(local)}

    def _write_index(self, index, url: str) -> dict:
        import faiss

        fd, local = tempfile.mkstemp(suffix=".faiss", prefix="dpr-shard-", dir=local_tmp_dir())
        os.close(fd)
        try:
            faiss.write_index(index, local)
            return self._upload(local, url)
        finally:
            os.remove(local)

    def __call__(self, chunks: Iterator[tuple[int, np.ndarray, np.ndarray]]) -> Iterator[pa.RecordBatch]:
        import json

        import faiss
        from pyspark import TaskContext


        ctx = TaskContext.get()
        reset_peak_rss()
        # FAISS's OpenMP would start one thread per core in every concurrent task: oversubscribed,
        # its spinning threads slow everything down. One task = its spark.task.cpus threads.
        faiss.omp_set_num_threads(max(1, int(ctx.cpus()) if ctx is not None and hasattr(ctx, "cpus") else 1))
        q, k, k_factors = self.bc_queries.value, self.k, self.k_factors
        shards: dict[int, dict] = {}
        try:
            for s, p, v in chunks:
                check_finite(v, p)
                st = shards.get(int(s))
                if st is None:
                    st = shards[int(s)] = {
                        "index": deserialize(self.bc_index.value), "pids": [],
                        "store": RerankStoreWriter(self.dim) if k_factors else None,
                        "exact": (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))}
                try:
                    for start in range(0, len(p), self.add_batch):
                        st["index"].add_with_ids(np.ascontiguousarray(v[start:start + self.add_batch]),
                                                 np.ascontiguousarray(p[start:start + self.add_batch], np.int64))
                except MemoryError:
                    raise InputError(f"shard {int(s)}: out of memory after {st['index'].ntotal} vectors in its task; "
                                     f"lower index.max_vectors_per_shard or raise the executors' memory") from None
                if st["store"] is not None:
                    st["store"].add(p, v)
                st["pids"].append(p)
                block = topk_block(q @ v.T, p, k)
                st["exact"] = merge_topk([st["exact"][0], block[0]], [st["exact"][1], block[1]], k)
            for s, st in shards.items():
                all_pids = np.concatenate(st["pids"])
                uniq, counts = np.unique(all_pids, return_counts=True)
                if (counts > 1).any():
                    raise InputError(f"duplicate pids in the Embeddings table: {uniq[counts > 1][:5].tolist()}")
                idx = st["index"]
                # Written to a local file and uploaded from there: serialising into memory would
                # hold two more copies of the shard's codes.
                shard_meta = self._write_index(idx, self.urls[s])
                store_meta = ""
                if st["store"] is not None:
                    pids_path, vecs_path = st["store"].finish()
                    url = self.urls[s]
                    base = url[: -len(".faiss")] if url.endswith(".faiss") else url
                    store_meta = json.dumps({"pids": self._upload(pids_path, base + ".pids.npy"),
                                             "vectors": self._upload(vecs_path, base + ".vectors.npy")})
                    store_pids = np.load(pids_path, mmap_mode="r")
                    store_vecs = np.load(vecs_path, mmap_mode="r")
                all_s, all_i = [], []
                # With exact codes (IVF-Flat, no pre-transform) more probes never lose a neighbour:
                # once this shard's own recall reaches stop_recall (1.0: every query found its exact
                # top-k, so larger nprobes return the same), the larger nprobes repeat the last
                # results instead of scanning up to half the shard per query. (Lossy codes could let
                # a newly scanned vector overtake; they are searched at every nprobe.)
                exact_codes = st["store"] is None and type(faiss.downcast_index(idx)) is faiss.IndexIVFFlat
                for nprobe in self.nprobes:
                    if exact_codes and all_i and recall_at_k(all_i[-1][0], st["exact"][1]) >= self.stop_recall:
                        all_s.append(all_s[-1])
                        all_i.append(all_i[-1])
                        continue
                    set_nprobe(idx, nprobe)
                    if st["store"] is None:
                        sc, ids = idx.search(q, k)
                        all_s.append([sc])
                        all_i.append([ids])
                        continue
                    _, cand = idx.search(q, k * max(k_factors))
                    per_kf = [rerank(q, np.ascontiguousarray(cand[:, :k * kf]), store_pids, store_vecs, k)
                              for kf in k_factors]
                    all_s.append([r[0] for r in per_kf])
                    all_i.append([r[1] for r in per_kf])
                yield pa.RecordBatch.from_pylist([{
                    "shard": s, "vectors": int(len(all_pids)), "bytes": shard_meta["bytes"],
                    "sha256": shard_meta["sha256"], "path": self.urls[s], "rerank": store_meta,
                    "task_shards": len(shards), "peak_rss": peak_rss(),
                    "hit_scores": _npy(np.array(all_s, np.float32)), "hit_ids": _npy(np.array(all_i, np.int64)),
                    "exact_scores": _npy(st["exact"][0]), "exact_ids": _npy(st["exact"][1])}], schema=SHARD_RESULT)
                del st["index"], idx
                if st["store"] is not None:
                    del store_pids, store_vecs
                    st["store"].close()
        finally:
            for st in shards.values():
                if st.get("store") is not None:
                    st["store"].close()


# ---------------------------------------------------------------- Embeddings files: no shuffle

def file_layout(files: list[str]) -> list[dict]:
    """Per Embeddings file, from its footer: {path, rows, row_groups: [rows per row group]}."""
    import pyarrow.parquet as pq

    from dpr_lib import storage

    out = []
    for f in files:
        fs, path = storage.get_fs(f)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        out.append({"path": f, "rows": meta.num_rows,
                    "row_groups": [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]})
    return out


def plan_pieces(layout: list[dict], num_shards: int) -> list[list[dict]]:
    """Cut the files' rows, in file order, into ``num_shards`` contiguous runs of equal size (to
    within one row): shard s gets [{path, groups: [[row_group, start, stop], ...]}, ...] with
    start/stop rows inside the row group. Every row is in exactly one shard; with pid-sorted files
    each shard is a pid range."""
    total = sum(f["rows"] for f in layout)
    bounds = [total * s // num_shards for s in range(num_shards + 1)]
    pieces: list[list[dict]] = [[] for _ in range(num_shards)]
    offset = 0
    for f in layout:
        for g, rows in enumerate(f["row_groups"]):
            lo, hi = offset, offset + rows
            for s in range(num_shards):
                a, b = max(lo, bounds[s]), min(hi, bounds[s + 1])
                if a >= b:
                    continue
                if not pieces[s] or pieces[s][-1]["path"] != f["path"]:
                    pieces[s].append({"path": f["path"], "groups": []})
                pieces[s][-1]["groups"].append([g, a - lo, b - lo])
            offset = hi
    return pieces


def _ranged_pieces(pieces: list[dict], dim: int, batch_rows: int, ranges: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`_read_pieces`, appending to ``ranges`` each piece's [first pid, last pid] when its pids
    strictly increase (files the encode job wrote are pid-sorted), else None: the shard's pid
    intervals, by which the sparse side sends passages to the same shards without a join."""
    for piece in pieces:
        first = last = None
        increasing = True
        for p, v in _read_pieces([piece], dim, batch_rows):
            if len(p):
                if (last is not None and p[0] <= last) or (len(p) > 1 and not (np.diff(p) > 0).all()):
                    increasing = False
                first = int(p[0]) if first is None else first
                last = int(p[-1])
            yield p, v
        if first is not None:
            ranges.append([first, last] if increasing else None)


def pid_shard_table(spark, pieces: list[list[dict]]):
    """DataFrame (pid, shard) of the shards' pieces (pid column only): the sparse side's join key
    when the shards' pids are not intervals."""
    from dpr_lib.spark import tasks_dataframe

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for row in b.to_pylist():
                for piece in json.loads(row["pieces"]):
                    fs, path = storage.get_fs(piece["path"])
                    import pyarrow.parquet as pq

                    with fs.open(path, "rb") as fh:
                        pf = pq.ParquetFile(fh)
                        for g, start, stop in piece["groups"]:
                            pids = pf.read_row_group(g, columns=["pid"]).column("pid").to_numpy()[start:stop]
                            yield pa.RecordBatch.from_arrays(
                                [pa.array(pids.astype(np.int64)), pa.array(np.full(len(pids), row["shard"], np.int32))],
                                names=["pid", "shard"])

    return tasks_dataframe(spark, [{"shard": s, "pieces": json.dumps(p)} for s, p in enumerate(pieces)],
                           "shard int, pieces string").mapInArrow(run, "pid long, shard int")


def sparse_assignment(shards: list[dict], pieces, num_shards: int, spark) -> dict:
    """How passages reach their dense shard's sparse task: by pid intervals when every shard's
    pieces are increasing and no two intervals overlap, by hash for hash-sharded DataFrames, else
    by a join with the shards' pids."""
    if pieces is None:
        return {"assign": functools.partial(shard_of, num_shards=num_shards)}
    intervals = [(lo_hi[0], lo_hi[1], s["shard"]) if lo_hi else None
                 for s in shards for lo_hi in (s.get("pid_ranges") or [])]
    if intervals and None not in intervals:
        ordered = sorted(intervals)
        if all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])):
            from dpr_lib.sparse import assign_by_ranges

            return {"assign": assign_by_ranges(ordered)}
    log.info("sparse: the shards' pids are not disjoint intervals; joining passages with the shards' pids")
    return {"pid_shards": pid_shard_table(spark, pieces)}


def _read_pieces(pieces: list[dict], dim: int, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import pyarrow.parquet as pq

    from dpr_lib import storage

    for piece in pieces:
        fs, path = storage.get_fs(piece["path"])
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for g, start, stop in piece["groups"]:
                offset = 0
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=["pid", "vector"]):
                    a, b = max(start - offset, 0), min(stop - offset, batch.num_rows)
                    offset += batch.num_rows
                    if a < b:
                        part = batch.slice(a, b - a)
                        yield part.column("pid").to_numpy().astype(np.int64), vectors_of(part, dim)


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
        tasks.append({"index": i, "path": f["path"], "rows": _npy(local.astype(np.int64))})

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for row in b.to_pylist():
                want = _unnpy(row["rows"])
                all_pids, got_p, got_v, offset = [], [], [], 0
                # streamed: memory = one batch + the file's pids + its sample
                for batch in _file_batches(row["path"], 8192):
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
                for batch in _file_batches(url, 65536, columns=("pid",)):
                    yield pa.RecordBatch.from_arrays([batch.column("pid").cast(pa.int64())], names=["pid"])

    dup = (tasks_dataframe(spark, [{"path": r["path"]} for r in ranges], "path string")
           .mapInArrow(pids_of, "pid long").groupBy("pid").count().filter(F.col("count") > 1).limit(5).collect())
    if dup:
        raise InputError(f"duplicate pids in the Embeddings table: {[r['pid'] for r in dup]}")


EXACT_RESULT = pa.schema([("scores", pa.binary()), ("ids", pa.binary())])


def exact_topk(spark, files: list[str], queries: np.ndarray, k: int, dim: int,
               batch_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of ``queries`` over Embeddings files, one Spark task per file.

    Each task returns its file's top-k ([q, k], never the vectors); the driver merges them, so it
    holds files x q x k results and no embeddings.
    """
    from dpr_lib.spark import spark_schema, tasks_dataframe

    bc = spark.sparkContext.broadcast(np.ascontiguousarray(queries, dtype=np.float32))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        q = bc.value
        for b in batches:
            for url in b.column("path").to_pylist():
                best = (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
                for batch in _file_batches(url, batch_rows):
                    pids = batch.column("pid").to_numpy().astype(np.int64)
                    vecs = vectors_of(batch, dim)
                    check_finite(vecs, pids)
                    block = topk_block(q @ vecs.T, pids, k)
                    best = merge_topk([best[0], block[0]], [best[1], block[1]], k)
                yield pa.RecordBatch.from_pylist([{"scores": _npy(best[0]), "ids": _npy(best[1])}],
                                                 schema=EXACT_RESULT)

    tasks = tasks_dataframe(spark, [{"path": f} for f in files], "path string")
    partial = tasks.mapInArrow(run, spark_schema(EXACT_RESULT)).toLocalIterator()
    best = (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
    for row in partial:  # one file's top-k at a time
        best = merge_topk([best[0], _unnpy(row["scores"])], [best[1], _unnpy(row["ids"])], k)
    bc.unpersist()
    return best


# ---------------------------------------------------------------- the merge job (driver)

@contextlib.contextmanager
def _driver_spill_dir(spark):
    """A temporary directory that tasks can write and the driver read: local mode only (else None)."""
    from dpr_lib.spark import is_local_master

    if not is_local_master(spark.sparkContext.master):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="dpr-sample-") as d:
        yield d


def _count_rows(url: str) -> int:
    """Rows of the Parquet files under ``url``, from their footers."""
    return sum(f["rows"] for f in file_layout(storage.list_files(url, ".parquet")))



def read_recall_questions(cfg: Config) -> list[str]:
    """The questions of ``index.recall_questions`` (at most max(recall_queries, 1024), a seeded
    sample of a longer file). Errors name the key: a run should fail before it encodes anything."""
    url, icfg = cfg.index.recall_questions, cfg.index
    try:
        raw = storage.read_bytes(url, cfg.storage_options(), attempts=2)
    except (OSError, StorageError) as exc:
        raise ConfigError(f"index.recall_questions: cannot read {url}: {exc}") from None
    try:
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"index.recall_questions: {url} is not UTF-8 text ({exc})") from None
    questions = []
    for no, line in enumerate(lines, 1):
        if not line:
            continue
        if url.endswith((".jsonl", ".json")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"index.recall_questions: {url} line {no} is not JSON ({exc.msg})") from None
            line = row.get("question") if isinstance(row, dict) else row
            if not isinstance(line, str):
                raise ConfigError(f'index.recall_questions: {url} line {no} has no "question" string')
            line = line.strip()
        if line:
            questions.append(line)
    if not questions:
        raise ConfigError(f"index.recall_questions: {url} holds no questions")
    limit = max(icfg.recall_queries, 1024)
    if len(questions) > limit:
        pick = np.sort(np.random.default_rng(icfg.seed).choice(len(questions), limit, replace=False))
        questions = [questions[i] for i in pick]
    return questions


def encode_recall_questions(cfg: Config) -> np.ndarray:
    """``index.recall_questions`` encoded on the driver by the question encoder: float32 [n, d].
    Kept in the local cache_dir by (questions, encoder fingerprint): nightly runs with the same
    file and encoder do not encode them again."""
    import hashlib

    from dpr_lib.encode import Encoder, resolve_spec

    questions = read_recall_questions(cfg)
    t = time.time()
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options())
    key = hashlib.sha256(json.dumps([spec.fingerprint_id(), questions]).encode()).hexdigest()[:24]
    cached = os.path.join(cfg.path("cache_dir"), "recall_questions", f"{key}.npy")
    if os.path.exists(cached):
        vectors = np.load(cached, allow_pickle=False)
        if vectors.shape == (len(questions), spec.dim) and vectors.dtype == np.float32:
            log.info("recall questions: %d from %s (cached encodings)", len(questions), cfg.index.recall_questions)
            return vectors
    vectors = Encoder(spec).encode(None, questions)
    log.info("recall questions: %d from %s encoded (%.1fs)", len(questions), cfg.index.recall_questions,
             time.time() - t)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs the next run a re-encode
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{uuid.uuid4().hex}.npy"
        np.save(tmp, vectors, allow_pickle=False)
        os.replace(tmp, cached)
    return vectors


def _question_fingerprint(cfg: Config, passage_fingerprint: dict) -> dict:
    """The question encoder's fingerprint; where passages went through an exported backend, it
    says why questions did not (encoder.backend applies to passages only)."""
    from dpr_lib.backends import QUESTION_NOTE
    from dpr_lib.encode import resolve_spec

    fp = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options()
                      ).fingerprint()
    if passage_fingerprint.get("backend", "torch") != "torch":
        fp["note"] = QUESTION_NOTE
    return fp


def build_index(spark, cfg: Config, embeddings_df=None, extra_manifest: dict | None = None,
                reuse_from: dict | None = None, question_vectors: np.ndarray | None = None,
                counts: dict | None = None, questions_source: str = "", force: bool = False,
                validation: gate.Validation | None = None) -> Manifest:
    """Train, build shards and the docstore, write the manifest, then LATEST. Returns the Manifest.

    With ``index.validation_questions`` (or ``validation``, the pairs already read) the complete
    version is searched on them before LATEST moves, and the quality gate (``dpr_lib.gate``) stops
    the publish on a regression: :class:`~dpr_lib.gate.QualityGateError`, the version kept and
    marked rejected, unless ``force``.

    ``extra_manifest``: keys the caller adds to the manifest (the nightly job's ``nightly`` and
    ``retrain_reason``); its ``encoder`` is the fingerprint of a DataFrame input.

    Recall (and so the recommended nprobe) is measured on ``question_vectors`` when given (encoded
    real questions: what a service will be asked; ``questions_source`` names where they came
    from in the manifest), else on ``index.recall_questions`` when configured, else on stored vectors sampled from the table,
    each query's own pid excluded from both its exact and approximate top-k (a stored vector always
    finds itself in its own list, which would overstate recall by up to 1/k).

    ``counts``: the run's corpus and encode counts for the accounting check (``dpr_lib.accounting``);
    None reads them from the stages' stats in this work dir. The check runs before the manifest.

    ``reuse_from`` = {"trained": bytes, "manifest": previous Manifest, "reason": str} skips training
    and adds the vectors to the previous version's quantizer; if the recall measured with it
    misses ``index.recall_target``, or reaches it only above ``reuse_from["max_nprobe"]`` (if
    given), the version is discarded and the job retrains.
    """
    from pyspark.sql import functions as F

    from dpr_lib.encode import check_embeddings, passage_spec
    from dpr_lib.spark import bind_storage, task_errors

    bind_storage(spark, cfg)
    t0 = time.time()
    timings: dict[str, float] = {}
    icfg, root, opts = cfg.index, cfg.path("index_root"), cfg.storage_options()
    emb_url = cfg.path("embeddings")
    if validation is None and icfg.validation_questions:
        validation = gate.read_validation_questions(cfg)  # a bad file fails before any stage
    if question_vectors is None and icfg.recall_questions:
        question_vectors = encode_recall_questions(cfg)
        questions_source = icfg.recall_questions
        timings["recall_questions"] = time.time() - t0
    if embeddings_df is None:
        files = storage.list_files(emb_url, ".parquet")
        if not files:
            raise InputError(f"no Embeddings files under {emb_url}; run the encode stage first")
        configured = passage_spec(cfg).fingerprint()
        fingerprint, n = check_embeddings(files, configured)
        source = files  # read by pyarrow in one task per file (fast path)
    else:
        fingerprint, n = (extra_manifest or {}).get("encoder", {}), embeddings_df.count()
        source = embeddings_df
    dim = int(fingerprint.get("dim") or 0)
    if not dim:
        from pyspark.sql import functions as F

        first = embeddings_df.select(F.size("vector").alias("d")).first()
        dim = int(first["d"]) if first else 0
    # Dimension, NaN and duplicate-pid checks happen in the shard pass (one scan of the table).

    if reuse_from:
        prev = reuse_from["manifest"]
        plan = ops.IndexPlan(prev.factory, prev.nlist, 0, f"quantizer reused from version {prev.version}")
    else:
        plan = ops.choose_factory(n, dim, icfg.bytes_per_vector, icfg.train_per_list, _train_budget(spark, cfg),
                                 icfg.min_nlist, icfg.factory, icfg.exact_below, icfg.max_train_sample,
                                 icfg.coarse, icfg.train_method, icfg.large_nlist,
                                 budget_key="index.max_train_bytes" if icfg.max_train_bytes else
                                 "index.max_train_bytes (0: half of spark.driver.memory)")
    num_shards = ops.shard_count(n, icfg.num_shards, icfg.max_vectors_per_shard)
    ops.check_task_memory(n, num_shards, dim, ops.code_size_of(plan.factory, dim), cfg.task_memory_bytes())
    log.info("index: %d vectors of d=%d -> %s, %d shards (%s)", n, dim, plan.factory, num_shards, plan.reason)

    # Sample on the executors, collect only the sample: the driver holds the sample plus a
    # constant, whatever the table's size.
    t = time.time()
    sample_size = max(plan.train_size, min(n, icfg.recall_queries))
    pieces = None
    with task_errors():
        if isinstance(source, list):  # files: exactly sample_size rows; no shuffle anywhere
            layout = file_layout(source)
            with _driver_spill_dir(spark) as spill:
                sample_pids, sample, ranges = sample_files(spark, layout, dim, sample_size, icfg.seed, spill)
            check_disjoint_files(spark, ranges)
            pieces = plan_pieces(layout, num_shards)
        else:  # a DataFrame: a ~1.2x Bernoulli sample, trimmed here (seeded)
            sample_pids, sample = sample_vectors(spark, source, dim, min(1.0, 1.2 * sample_size / n), icfg.seed)
    ops.check_finite(sample, sample_pids)
    if len(sample) > sample_size:
        keep = np.sort(np.random.default_rng(icfg.seed).choice(len(sample), sample_size, replace=False))
        sample, sample_pids = sample[keep], sample_pids[keep]
    timings["sample"] = time.time() - t
    t = time.time()
    if reuse_from:
        trained_bytes = reuse_from["trained"]
        quantizer = {"reused": True, "from_version": reuse_from["manifest"].version, "reason": reuse_from["reason"]}
    else:
        log.info("index: training %s on %d vectors (%s k-means, ~%.1f TFLOP)", plan.factory, len(sample),
                 plan.train_method, plan.train_flops / 1e12)
        trained_bytes = ops.serialize(ops.train_quantizer(sample, plan.factory, icfg.seed, plan.train_method))
        quantizer = {"reused": False, "reason": (extra_manifest or {}).get("retrain_reason", "trained for this version")}
    timings["train"] = time.time() - t
    rng = np.random.default_rng(icfg.seed)
    if question_vectors is not None and len(question_vectors):
        q = np.asarray(question_vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != dim:
            raise InputError(f"question vectors for recall have shape {list(q.shape)}, expected [n, {dim}]")
        pick = np.sort(rng.choice(len(q), size=min(len(q), max(icfg.recall_queries, 1024)), replace=False))
        queries = (q[pick], None, questions_source)
    else:
        pick = rng.choice(len(sample), size=min(icfg.recall_queries, len(sample)), replace=False)
        queries = (sample[pick], sample_pids[pick], "")
    del sample, sample_pids

    version = new_version_id()
    vurl = version_url(root, version)
    try:
        return _build_version(spark, cfg, source, extra_manifest, reuse_from, vurl, version, trained_bytes,
                              quantizer, plan, queries, fingerprint, n, dim, num_shards, timings, t0, counts,
                              pieces, force, validation)
    except gate.QualityGateError:
        raise  # a complete version, kept and marked rejected for inspection
    except BaseException:
        discard_unpublished(vurl, opts)
        raise


def discard_unpublished(vurl: str, opts: dict) -> None:
    """Remove a version that failed before LATEST named it (best effort: nothing of it may linger)."""
    try:
        fs, vpath = storage.get_fs(vurl, opts)
        if fs.exists(vpath):
            fs.rm(vpath, recursive=True)
    except Exception:  # noqa: BLE001
        log.warning("could not remove the incomplete version %s", vurl)


def _train_budget(spark, cfg: Config) -> int:
    """The training sample's budget from the running session's driver memory (spark-submit's
    --driver-memory included), not only from the config file."""
    live = spark.sparkContext.getConf().get("spark.driver.memory", None) if spark is not None else None
    return cfg.train_budget_bytes(live)


def _quality_gate(cfg: Config, root: str, vurl: str, manifest: Manifest, validation: gate.Validation | None,
                  force: bool) -> None:
    """Measure the complete version on the validation questions (its manifest written, LATEST not
    yet moved) and compare with what LATEST's manifest recorded; refuse a regression unless forced."""
    opts, retries = cfg.storage_options(), cfg.publish.retries
    if not validation:
        return
    write_manifest(vurl, manifest, opts, retries)  # complete, searchable by its manifest, not published
    manifest.validation, fusion = gate.validate_version(cfg, join_url(vurl, MANIFEST), validation)
    if fusion:
        manifest.fusion = fusion
    previous_version = read_latest(root, opts)
    previous = read_manifest(join_url(version_url(root, previous_version), MANIFEST), opts) \
        if previous_version else None
    reason = gate.judge(manifest.validation, previous.validation if previous else None, previous_version, cfg)
    manifest.gate = {"passed": not reason, "forced": bool(reason) and force, "reason": reason,
                     "compared_with": previous_version if previous and previous.validation else None,
                     "max_regression": cfg.publish.max_regression}
    if reason and not force:
        write_manifest(vurl, manifest, opts, retries)
        gate.reject(vurl, reason, opts, retries)
        raise gate.QualityGateError(
            f"version {manifest.version} was built but not published: {reason}. LATEST still names "
            f"{previous_version or 'nothing'}; the version is kept in {vurl} (rejected.json). "
            "Rerun with --force to publish it anyway")
    if reason:
        log.warning("quality gate overridden by --force: %s", reason)


def _stale_quantizer(reuse_from: dict, recall_by_nprobe: dict, nprobe: int, k: int, icfg) -> str | None:
    """Why a reused quantizer no longer serves, or None. It must reach ``index.recall_target`` at
    all, and (unless nprobe is forced) at no more than ``reuse_from["max_nprobe"]`` probes: one
    that needs many more lists than the previous version did has drifted away from the corpus,
    and every query would pay for it."""
    prev = reuse_from["manifest"]
    recall = recall_by_nprobe.get(nprobe, 0)
    if recall < icfg.recall_target:
        return (f"recall@{k} {recall:.3f} with the reused quantizer of version {prev.version} is below "
                f"index.recall_target {icfg.recall_target}")
    limit = reuse_from.get("max_nprobe")
    if limit and not icfg.nprobe and nprobe > limit:
        return (f"the reused quantizer of version {prev.version} needs nprobe {nprobe} to reach "
                f"index.recall_target {icfg.recall_target}, over the limit of {limit:g} "
                f"({reuse_from.get('max_nprobe_key', 'growth')} x the nprobe {prev.nprobe} that version served with)")
    return None


def _build_version(spark, cfg, source, extra_manifest, reuse_from, vurl, version, trained_bytes,
                   quantizer, plan, queries, fingerprint, n, dim, num_shards, timings, t0, counts,
                   pieces=None, force=False, validation=None) -> Manifest:
    from dpr_lib.outputs import write_stats
    from dpr_lib.spark import task_errors

    icfg, root, opts = cfg.index, cfg.path("index_root"), cfg.storage_options()
    emb_url = cfg.path("embeddings")
    try:
        storage.write_bytes_atomic(join_url(vurl, "trained.faiss"), trained_bytes, opts, cfg.publish.retries)
    except StorageError as exc:
        raise StorageError(f"cannot write to index_root {root}: {exc}") from exc
    k = icfg.recall_k
    queries, query_pids, questions_source = queries
    k_search = k if query_pids is None else k + 1  # room to drop the query's own pid
    nprobes = [p for p in ops.NPROBES if p <= max(1, plan.nlist)]
    with_store = ops.wants_rerank(plan.factory, icfg.rerank)
    k_factors = ([icfg.k_factor] if icfg.k_factor else list(ops.K_FACTORS)) if with_store else None
    t = time.time()
    with task_errors():
        # A shard's sweep stops once its own recall is within a tenth of the target's shortfall of
        # 1.0 (0.995 for 0.95): the merged recall the target is judged by is then well above it.
        stop_recall = 1.0 - (1.0 - icfg.recall_target) / 10
        shards = build_shards(spark, source, trained_bytes, num_shards, dim,
                              lambda s: join_url(vurl, f"shard-{s:05d}.faiss"), queries, k_search, nprobes,
                              icfg.add_batch, opts, cfg.publish.retries, k_factors, pieces, stop_recall)
    timings["add_write"] = time.time() - t
    t = time.time()
    _, exact_i = ops.merge_topk([s["exact_scores"] for s in shards], [s["exact_ids"] for s in shards], k_search)
    exact_i = ops.drop_ids(exact_i, query_pids, k)
    recall_by = {}  # (nprobe, k_factor) -> recall@k; k_factor 0 = no re-rank
    for j, p in enumerate(nprobes):
        for f, kf in enumerate(k_factors or [0]):
            _, found = ops.merge_topk([s["hit_scores"][j][f] for s in shards], [s["hit_ids"][j][f] for s in shards],
                                     k_search)
            recall_by[(p, kf)] = round(ops.recall_at_k(ops.drop_ids(found, query_pids, k), exact_i), 4)
    # The smallest nprobe, then the smallest k_factor, reaching the target (forced values fixed).
    candidates = [(p, kf) for (p, kf) in recall_by if not icfg.nprobe or p == icfg.nprobe]
    reaching = sorted(c for c in candidates if recall_by[c] >= icfg.recall_target)
    nprobe, k_factor = reaching[0] if reaching else (
        max(candidates) if candidates else (icfg.nprobe, max(k_factors) if k_factors else 0))
    if icfg.nprobe:
        nprobe = icfg.nprobe
    recall_by_nprobe = {p: recall_by[(p, kf)] for (p, kf) in recall_by if kf == k_factor}
    timings["recall"] = time.time() - t
    stale = _stale_quantizer(reuse_from, recall_by_nprobe, nprobe, k, icfg) if reuse_from else None
    if stale:
        fs, vpath = storage.get_fs(vurl, opts)
        fs.rm(vpath, recursive=True)
        why = stale
        log.warning("%s: retraining", why)
        return build_index(spark, cfg, None if isinstance(source, list) else source,
                           {**(extra_manifest or {}), "retrain_reason": why},
                           question_vectors=queries if query_pids is None else None, counts=counts,
                           questions_source=questions_source, force=force, validation=validation)
    t = time.time()
    docstore = []
    if cfg.publish.docstore:
        with task_errors():
            docstore = write_docstore(spark, cfg, vurl)
    timings["docstore"] = time.time() - t
    sparse = None
    if cfg.sparse_enabled():
        t = time.time()
        from dpr_lib.sparse import build_sparse

        with task_errors():
            sparse = build_sparse(spark, cfg, vurl, num_shards, **sparse_assignment(shards, pieces, num_shards, spark))
        timings["sparse"] = time.time() - t

    vectors = sum(s["vectors"] for s in shards)
    code_bytes = ops.code_size(ops.deserialize(trained_bytes))
    passages_docstore = sum(d.rows for d in docstore)
    ledger = {**(accounting.from_stats(cfg) if counts is None else counts), "embeddings": n, "vectors": vectors}
    if cfg.publish.docstore:
        ledger.update(passages=_count_rows(cfg.path("passages")), docstore_rows=passages_docstore)
    ledger = accounting.check(ledger, "merge job")
    manifest = Manifest(
        version=version,
        encoder=fingerprint,
        question_encoder=_question_fingerprint(cfg, fingerprint),
        metric=ops.METRIC,
        dim=dim,
        factory=plan.factory,
        factory_reason=plan.reason,
        nlist=plan.nlist,
        quantizer=quantizer,
        train_size=plan.train_size,
        training={"method": plan.train_method, "sample_bytes": plan.train_bytes,
                  "estimated_flops": plan.train_flops, "budget_bytes": _train_budget(spark, cfg)}
        if not reuse_from else None,
        nprobe=nprobe,
        k_factor=k_factor or None,
        rerank={"store": "float16", "k_factor": k_factor,
                "recall_by_nprobe_k_factor": {f"{p}/{kf}": r for (p, kf), r in recall_by.items()}}
        if with_store else None,
        memory={"resident_bytes_per_passage": code_bytes + ops.ID_BYTES,
                "disk_bytes_per_passage": 2 * dim + ops.ID_BYTES if with_store else 0,
                "flat_float32_bytes_per_passage": 4 * dim,
                **({"sparse_disk_bytes_per_passage": sparse["disk_bytes_per_passage"]} if sparse else {})},
        sparse=sparse,
        fusion=dict(DEFAULT_FUSION) if sparse else {},
        recall={"k": k, "target": icfg.recall_target, "queries": len(queries),
                "query_source": "questions" if query_pids is None else "stored vectors, self excluded",
                **({"questions_file": questions_source} if questions_source else {}),
                "by_nprobe": {str(p): r for p, r in recall_by_nprobe.items()},
                "at_nprobe": recall_by_nprobe.get(nprobe),
                "reached_target": recall_by_nprobe.get(nprobe, 0) >= icfg.recall_target},
        trained=FileEntry("trained.faiss", len(trained_bytes), storage.sha256_bytes(trained_bytes)),
        shards=[ShardEntry(index=s["shard"], path=relative_to(s["path"], vurl), vectors=s["vectors"],
                           bytes=s["bytes"], sha256=s["sha256"], task_peak_rss=s["peak_rss"],
                           rerank={part: FileEntry(relative_to(meta["path"], vurl), meta["bytes"], meta["sha256"])
                                   for part, meta in s["rerank"].items()} if s["rerank"] else None)
                for s in shards],
        docstore=docstore,
        totals={"vectors": vectors, "shards": len(shards), "bytes": sum(s["bytes"] for s in shards),
                "rerank_bytes": sum(m["bytes"] for s in shards if s["rerank"] for m in s["rerank"].values()),
                "docstore_rows": passages_docstore},
        source={"passages": cfg.path("passages"), "embeddings": emb_url},
        counts={"embeddings": n, "vectors_published": vectors},
        accounting=ledger,
        timings={k_: round(v, 3) for k_, v in timings.items()},
        software=software_versions(),
        compaction=(extra_manifest or {}).get("compaction") or {"kind": "full", "reason": quantizer["reason"]},
        extra={key: v for key, v in (extra_manifest or {}).items() if key not in Manifest.field_names()},
    )
    _quality_gate(cfg, root, vurl, manifest, validation, force)
    removed = publish_version(root, vurl, manifest, opts, cfg.publish.retries, cfg.publish.keep_versions)
    manifest.timings["total"] = round(time.time() - t0, 3)
    stats = {"stage": "build_index", "version": version, "index_root": root, "removed_versions": removed,
             "factory": plan.factory, "nprobe": nprobe, "recall_at_nprobe": recall_by_nprobe.get(nprobe),
             "vectors": vectors, "shards": len(shards), "timings": manifest.timings}
    write_stats(cfg, "build_index", stats)
    log.info("published version %s to %s: %d vectors in %d shards, %s, nprobe %d gives recall@%d %.3f (%.1fs)",
             version, root, vectors, len(shards), plan.factory, nprobe, k, recall_by_nprobe.get(nprobe, 0),
             manifest.timings["total"])
    return manifest
