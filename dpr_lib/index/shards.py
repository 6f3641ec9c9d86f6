"""Shards of a version, built on executors: the trained quantizer cloned per shard task, the
shard's vectors added in bounded batches with pids as FAISS ids, the shard written (with its
re-rank store), and the recall queries searched in it. Embeddings files feed the tasks without a
shuffle (each shard task reads its own row groups, :func:`plan_pieces`); a DataFrame is hashed to
shards by pid through Spark's shuffle, one shard per task. The same single pass checks dimensions
and finiteness and computes the exact top-k of the recall queries by brute force over the batches
it adds, so recall needs no second pass. pyspark is imported inside the Spark runners only.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import storage
from dpr_lib.errors import InputError
from dpr_lib.index_ops import (
    RerankStoreWriter,
    check_finite,
    deserialize,
    merge_topk,
    pad_topk,
    peak_rss,
    recall_at_k,
    rerank,
    reset_peak_rss,
    set_nprobe,
    topk_block,
    vectors_of,
)

log = logging.getLogger("dpr_lib.index")


def to_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
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


def file_batches(url: str, batch_rows: int, columns=("pid", "vector")) -> Iterator[pa.RecordBatch]:
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



SHARD_RESULT = pa.schema([("shard", pa.int32()), ("vectors", pa.int64()), ("bytes", pa.int64()),
                          ("sha256", pa.string()), ("path", pa.string()), ("rerank", pa.string()),
                          ("task_shards", pa.int32()), ("peak_rss", pa.int64()),
                          ("hit_scores", pa.binary()), ("hit_ids", pa.binary()), ("exact_scores", pa.binary()),
                          ("exact_ids", pa.binary())])


@dataclasses.dataclass
class ShardResult:
    """What a shard task reports about the shard it wrote (one row of its result, decoded)."""

    shard: int
    path: str              # the shard's .faiss URL
    vectors: int
    bytes: int
    sha256: str
    rerank: dict | None    # its re-rank store: {"pids": {path, bytes, sha256}, "vectors": {...}}
    task_shards: int       # shards the task held (1 unless a DataFrame put two in one task)
    peak_rss: int
    hit_scores: np.ndarray  # float32 [P nprobes, F k_factors, q, k]: the shard's top-k of the recall queries
    hit_ids: np.ndarray     # int64, the same shape
    exact_scores: np.ndarray  # float32 [q, k]: its brute-force top-k
    exact_ids: np.ndarray
    pid_ranges: list | None = None  # per piece read, [first pid, last pid] or None (files only)

    @classmethod
    def from_row(cls, r: dict) -> ShardResult:
        return cls(shard=int(r["shard"]), path=r["path"], vectors=int(r["vectors"]), bytes=int(r["bytes"]),
                   sha256=r["sha256"], rerank=json.loads(r["rerank"]) if r["rerank"] else None,
                   task_shards=int(r["task_shards"]), peak_rss=int(r["peak_rss"]),
                   hit_scores=from_npy(r["hit_scores"]), hit_ids=from_npy(r["hit_ids"]),
                   exact_scores=from_npy(r["exact_scores"]), exact_ids=from_npy(r["exact_ids"]),
                   pid_ranges=json.loads(r["pid_ranges"]) if r.get("pid_ranges") else None)

    def hits(self, nprobe_at: int, k_factor_at: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids [q, k] at the ``nprobe_at``-th nprobe and ``k_factor_at``-th k_factor swept."""
        return self.hit_scores[nprobe_at][k_factor_at], self.hit_ids[nprobe_at][k_factor_at]


def build_shards(spark, source, trained: bytes, num_shards: int, dim: int, out_url_of,
                 queries: np.ndarray, k: int, nprobes: list[int], add_batch: int,
                 storage_options: dict, retries: int, k_factors: list | None = None,
                 pieces: list[list[dict]] | None = None, stop_recall: float | tuple = 1.0) -> list[ShardResult]:
    """Build every shard on executors; return a :class:`ShardResult` per shard, in shard order.

    Two ways to feed the shard tasks:

    - ``pieces`` (Embeddings files, see :func:`plan_pieces`): one task per shard reads its own
      Parquet row groups with pyarrow. Nothing crosses Spark's shuffle and every byte is read once.
    - otherwise ``source`` is a DataFrame: rows are hashed to shards by pid (:func:`shard_of`) and
      repartitioned through Spark's shuffle as packed bytes (:func:`packed_vectors`).

    ``out_url_of(shard)`` names where a shard is written (``.faiss``; its re-rank store beside it
    as ``.pids.npy`` and ``.vectors.npy`` when ``k_factors`` is given). ``hit_scores``/``hit_ids``
    hold the shard's top-k of the recall queries at each nprobe and k_factor (float32 / int64
    [P, F, q, k]; without re-rank F = 1 and the scores are the index's). A k_factor may be given
    as (k_factor, depth): the top ``depth`` of ``depth x k_factor`` candidates re-ranked, as a
    search for ``depth`` hits gets them (padded to k with pid -1). ``exact_scores``/
    ``exact_ids`` its brute-force top-k ([q, k]); ``rerank`` a JSON {pids: {path, bytes, sha256},
    vectors: {...}} or "".

    ``stop_recall`` (or (stop_recall, depth, more steps): recall at that depth, default k, then that
    many more nprobes searched, default 0): an exact-code shard stops its nprobe sweep once its
    own recall@k against its
    exact top-k reaches this; the larger nprobes repeat the last results (a lower bound of theirs:
    with exact codes more probes never lose a neighbour).
    """
    import json

    from dpr_lib.spark import spark_schema, tasks_dataframe

    bc_index = spark.sparkContext.broadcast(trained)
    bc_queries = spark.sparkContext.broadcast(queries.astype(np.float32))
    urls = {s: out_url_of(s) for s in range(num_shards)}
    builder = ShardTask(bc_index, bc_queries, urls, dim, k, nprobes, add_batch, storage_options, retries,
                         k_factors, stop_recall)

    if pieces is not None:
        def run_pieces(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                for row in b.to_pylist():
                    ranges: list = []
                    chunks = ((row["shard"], p, v) for p, v in ranged_pieces(json.loads(row["pieces"]), dim,
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
    return sorted((ShardResult.from_row(r) for r in rows), key=lambda r: r.shard)


class ShardTask:
    """The work of a shard task, whatever feeds it: (shard, pids, vectors) chunks in -> for each
    shard, its index written (and re-rank store), its recall hits and exact top-k out."""

    def __init__(self, bc_index, bc_queries, urls, dim, k, nprobes, add_batch, storage_options, retries, k_factors,
                 stop_recall=1.0):
        self.bc_index, self.bc_queries, self.urls = bc_index, bc_queries, urls
        self.dim, self.k, self.nprobes, self.add_batch = dim, k, nprobes, add_batch
        self.storage_options, self.retries, self.k_factors = storage_options, retries, k_factors
        self.stop_recall, self.stop_k, self.stop_after = (tuple(stop_recall) + (k, 0))[:3] \
            if isinstance(stop_recall, tuple) else (stop_recall, k, 0)

    def _upload(self, local: str, url: str) -> dict:
        storage.upload_file_atomic(local, url, self.storage_options, attempts=self.retries)
        return {"path": url, "bytes": os.path.getsize(local), "sha256": storage.sha256_file(local)}

    def _write_index(self, index, url: str) -> dict:
        import faiss

        with storage.StagedFile(url, ".faiss", self.storage_options, self.retries, prefix="dpr-shard-") as staged:
            faiss.write_index(index, staged.path)
        return staged.entry()

    def __call__(self, chunks: Iterator[tuple[int, np.ndarray, np.ndarray]]) -> Iterator[pa.RecordBatch]:
        import json

        import faiss
        from pyspark import TaskContext


        ctx = TaskContext.get()
        reset_peak_rss()
        # FAISS's OpenMP would start one thread per core in every concurrent task: oversubscribed,
        # its spinning threads slow everything down. One task = its spark.task.cpus threads.
        faiss.omp_set_num_threads(max(1, int(ctx.cpus()) if ctx is not None and hasattr(ctx, "cpus") else 1))
        q, k = self.bc_queries.value, self.k
        k_factors = [kf if isinstance(kf, (tuple, list)) else (kf, k) for kf in self.k_factors or []]
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
                reached = None  # the sweep step at which this shard's own recall reached stop_recall
                for step, nprobe in enumerate(self.nprobes):
                    if exact_codes and all_i and reached is None and recall_at_k(
                            all_i[-1][0][:, :self.stop_k], st["exact"][1][:, :self.stop_k]) >= self.stop_recall:
                        reached = step - 1
                    if reached is not None and step > reached + self.stop_after:
                        all_s.append(all_s[-1])
                        all_i.append(all_i[-1])
                        continue
                    set_nprobe(idx, nprobe)
                    if st["store"] is None:
                        sc, ids = idx.search(q, k)
                        all_s.append([sc])
                        all_i.append([ids])
                        continue
                    _, cand = idx.search(q, max(d * kf for kf, d in k_factors))
                    per_kf = [pad_topk(*rerank(q, np.ascontiguousarray(cand[:, :d * kf]), store_pids, store_vecs, d), k)
                              for kf, d in k_factors]
                    all_s.append([r[0] for r in per_kf])
                    all_i.append([r[1] for r in per_kf])
                yield pa.RecordBatch.from_pylist([{
                    "shard": s, "vectors": int(len(all_pids)), "bytes": shard_meta["bytes"],
                    "sha256": shard_meta["sha256"], "path": self.urls[s], "rerank": store_meta,
                    "task_shards": len(shards), "peak_rss": peak_rss(),
                    "hit_scores": to_npy(np.array(all_s, np.float32)), "hit_ids": to_npy(np.array(all_i, np.int64)),
                    "exact_scores": to_npy(st["exact"][0]), "exact_ids": to_npy(st["exact"][1])}], schema=SHARD_RESULT)
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


def ranged_pieces(pieces: list[dict], dim: int, batch_rows: int, ranges: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`read_pieces`, appending to ``ranges`` each piece's [first pid, last pid] when its pids
    strictly increase (files the encode job wrote are pid-sorted), else None: the shard's pid
    intervals, by which the sparse side sends passages to the same shards without a join."""
    for piece in pieces:
        first = last = None
        increasing = True
        for p, v in read_pieces([piece], dim, batch_rows):
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


def sparse_assignment(shards: list[ShardResult], pieces, num_shards: int, spark) -> dict:
    """How passages reach their dense shard's sparse task: by pid intervals when every shard's
    pieces are increasing and no two intervals overlap, by hash for hash-sharded DataFrames, else
    by a join with the shards' pids."""
    if pieces is None:
        return {"assign": functools.partial(shard_of, num_shards=num_shards)}
    intervals = [(lo_hi[0], lo_hi[1], s.shard) if lo_hi else None
                 for s in shards for lo_hi in (s.pid_ranges or [])]
    if intervals and None not in intervals:
        ordered = sorted(intervals)
        if all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])):
            from dpr_lib.sparse import assign_by_ranges

            return {"assign": assign_by_ranges(ordered)}
    log.info("sparse: the shards' pids are not disjoint intervals; joining passages with the shards' pids")
    return {"pid_shards": pid_shard_table(spark, pieces)}


def read_pieces(pieces: list[dict], dim: int, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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
