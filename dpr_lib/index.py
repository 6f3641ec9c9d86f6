"""Stage 3, index: the Embeddings table -> a trained IVF quantizer and shards, built on executors.

- ``choose_factory``: the automatic index rule (docs in README, "Index parameters").
- ``train_quantizer``: on the driver, from a sample only (driver memory = sample + constant).
- ``build_shards``: executors clone the broadcast trained index, add their shard's vectors in
  bounded batches with pids as FAISS ids, write the shard, and search the recall queries in it.
  The same single pass over the table checks dimensions, finiteness and duplicate pids (all
  copies of a pid hash to one shard) and computes the exact top-k of the recall queries by brute
  force over the batches it adds, so recall needs no second pass.

All shards share one quantizer, so per-shard top-k lists merge exactly (``merge_topk``).
FAISS and numpy only at module level; pyspark is imported inside the Spark runners.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib.errors import EncoderError, IncompatibleIndexError, InputError

log = logging.getLogger("dpr_lib.index")

METRIC = "inner_product"
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MIN_POINTS_PER_LIST = 39  # below this FAISS's k-means warns and centroids are poor
ID_BYTES = 8              # FAISS stores an int64 id beside every code in the inverted lists
K_FACTORS = (1, 2, 4, 8, 16, 32)
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_LIST  # 8-bit PQ codebooks: 256 centroids per sub-quantizer
RERANK_DTYPE = np.float16


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int
    train_size: int
    reason: str


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


def choose_factory(n: int, dim: int, bytes_per_vector: int = 0, train_per_list: int = 64,
                   max_train_sample: int = 200_000, min_nlist: int = 1, factory: str = "auto") -> IndexPlan:
    """The index rule. nlist = the power of two at or above 4*sqrt(n) (so within 4..8*sqrt(n)),
    lowered until every list gets >= 39 training points; codes from the memory budget per vector:
    0 or >= 4*d bytes -> Flat (exact), >= d -> SQ8, else PQ with the largest m <= budget dividing d.
    Training sample = nlist * train_per_list (PQ: at least 256*39), capped by max_train_sample and n.
    """
    if n <= 0:
        raise InputError("no vectors to index: the Embeddings table is empty")
    if factory != "auto":
        nlist = _nlist_of(factory)
        if nlist and n < nlist:
            raise InputError(f"index.factory {factory} needs at least nlist={nlist} vectors to train, "
                             f"the Embeddings table has {n}; lower nlist or use index.factory=auto")
        train = min(n, max_train_sample, max(nlist * train_per_list, PQ_MIN_TRAIN if "PQ" in factory else 0) or n)
        return IndexPlan(factory, nlist, train, "index.factory from config")
    nlist = 2 ** math.ceil(math.log2(max(4 * math.sqrt(n), 1)))
    nlist = max(min_nlist, min(nlist, n // MIN_POINTS_PER_LIST))
    nlist = max(1, min(nlist, n))
    budget = bytes_per_vector - ID_BYTES  # the FAISS id stored beside every code
    if bytes_per_vector == 0 or bytes_per_vector >= 4 * dim:
        code, why = "Flat", "exact float32 codes (no per-vector memory budget below 4*d bytes)"
    elif budget >= dim:
        code, why = "SQ8", f"8-bit scalar codes + 8-byte ids fit the budget of {bytes_per_vector} B/vector"
    elif budget >= 1 and n < PQ_MIN_TRAIN:
        code, why = "SQ8", (f"{n} vectors are too few to train 256-centroid PQ codebooks (needs "
                            f"{PQ_MIN_TRAIN}); 8-bit scalar codes until then (over the budget of "
                            f"{bytes_per_vector} B/vector, {n * (dim + ID_BYTES)} bytes in all)")
    elif budget >= 1:
        m = max(x for x in _divisors(dim) if x <= budget)
        code, why = f"PQ{m}", f"PQ with {m}-byte codes + 8-byte ids fits the budget of {bytes_per_vector} B/vector"
    else:
        raise InputError(f"index.bytes_per_vector {bytes_per_vector} leaves no room for a code beside the "
                         f"{ID_BYTES}-byte id: use at least {ID_BYTES + 1}")
    train = nlist * train_per_list
    if code.startswith("PQ"):
        train = max(train, PQ_MIN_TRAIN)
    train = min(train, max_train_sample, n)
    reason = (f"n={n}, d={dim}: nlist={nlist} (power of two >= 4*sqrt(n), >= {MIN_POINTS_PER_LIST} "
              f"points per list); {why}")
    return IndexPlan(f"IVF{nlist},{code}", nlist, train, reason)


def _nlist_of(factory: str) -> int:
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = part[3:].split("_")[0]
            if digits.isdigit():
                return int(digits)
    return 0


def train_quantizer(sample: np.ndarray, factory: str, seed: int = 1234):
    """A trained, empty FAISS index (inner product) from ``sample``: float32 [n, d]."""
    import faiss

    d = sample.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"invalid index.factory {factory!r}: {str(exc).splitlines()[0]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            # index_factory turns on polysemous training for "PQm"; it serves Hamming filtering,
            # which inner-product search never uses, and took 97 s of a 98 s IVF41,PQ64 training here.
            ivf.do_polysemous_training = False
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as exc:
        detail = next((line for line in str(exc).splitlines() if "Error" in line), str(exc)).strip()
        raise InputError(f"cannot train index.factory {factory!r} on {len(sample)} vectors: {detail}") from None
    return index


def wants_rerank(factory: str, rerank: str) -> bool:
    """Whether a version gets an on-disk re-rank store (index.rerank; auto = lossy codes)."""
    if rerank in ("none", "float16"):
        return rerank == "float16"
    return any(tag in factory for tag in ("PQ", "SQ", "LSH", "RaBitQ"))


def code_size(index) -> int:
    """Bytes per vector in the inverted lists of an IVF index (codes only)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.code_size) if ivf is not None else int(index.sa_code_size())


RERANK_BLOCK_FLOATS = 1 << 22  # candidate vectors gathered at once: 16 MB of float32


def rerank(queries: np.ndarray, cand_ids: np.ndarray, store_pids: np.ndarray, store_vecs: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among candidates [n, m] (pid -1 = none): every candidate is re-scored as
    q . v with v its stored vector (store_pids sorted; store_vecs may be a read-only memmap, of
    which only the candidates' rows are read). Queries go in blocks, so the gathered vectors
    never exceed RERANK_BLOCK_FLOATS whatever the batch size."""
    n, m = cand_ids.shape
    block = max(1, RERANK_BLOCK_FLOATS // max(1, m * queries.shape[1]))
    if n > block:
        parts = [_rerank_block(queries[i:i + block], cand_ids[i:i + block], store_pids, store_vecs, k)
                 for i in range(0, n, block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _rerank_block(queries, cand_ids, store_pids, store_vecs, k)


def _rerank_block(queries, cand_ids, store_pids, store_vecs, k):
    n, m = cand_ids.shape
    flat = cand_ids.reshape(-1)
    valid = flat >= 0
    if len(store_pids) == 0:
        valid[:] = False
        pos = np.zeros_like(flat)
        vecs = np.zeros((n, m, queries.shape[1]), np.float32)
    else:
        pos = np.minimum(np.searchsorted(store_pids, np.where(valid, flat, 0)), len(store_pids) - 1)
        valid &= store_pids[pos] == flat
        order = np.argsort(pos, kind="stable")  # read the mapped file in ascending row order
        gathered = np.empty((n * m, store_vecs.shape[1]), np.float32)
        gathered[order] = store_vecs[pos[order]]
        vecs = gathered.reshape(n, m, -1)
    scores = np.einsum("nd,nmd->nm", np.asarray(queries, np.float32), vecs)
    valid = valid.reshape(n, m)
    return merge_topk([np.where(valid, scores, -np.inf).astype(np.float32)], [np.where(valid, cand_ids, -1)], k)


class RerankStoreWriter:
    """Collects a shard's (pid, vector) pairs in local temp files, then writes the store: two
    ``.npy`` files (pids int64 sorted; vectors float16 [n, d] in pid order), never holding the
    shard's vectors in memory at once."""

    def __init__(self, dim: int):
        import tempfile

        self.dim = dim
        local_dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]
        self.dir = tempfile.mkdtemp(prefix="dpr-rerank-", dir=local_dirs[0] if local_dirs else None)
        self._pids = open(f"{self.dir}/pids.raw", "wb")
        self._vecs = open(f"{self.dir}/vecs.raw", "wb")
        self.n = 0

    def add(self, pids: np.ndarray, vectors: np.ndarray) -> None:
        self._pids.write(np.ascontiguousarray(pids, np.int64).tobytes())
        self._vecs.write(np.ascontiguousarray(vectors, RERANK_DTYPE).tobytes())
        self.n += len(pids)

    def finish(self, chunk: int = 65536) -> tuple[str, str]:
        """(pids.npy, vectors.npy) local paths."""
        self._pids.close()
        self._vecs.close()
        pids = np.fromfile(f"{self.dir}/pids.raw", dtype=np.int64)
        order = np.argsort(pids, kind="stable")
        pids_path, vecs_path = f"{self.dir}/pids.npy", f"{self.dir}/vectors.npy"
        np.save(pids_path, pids[order], allow_pickle=False)
        src = np.memmap(f"{self.dir}/vecs.raw", dtype=RERANK_DTYPE, mode="r", shape=(self.n, self.dim)) \
            if self.n else np.zeros((0, self.dim), RERANK_DTYPE)
        out = np.lib.format.open_memmap(vecs_path, mode="w+", dtype=RERANK_DTYPE, shape=(self.n, self.dim))
        for start in range(0, self.n, chunk):
            sel = order[start:start + chunk]
            rows = np.empty((len(sel), self.dim), RERANK_DTYPE)
            srt = np.argsort(sel, kind="stable")
            rows[srt] = src[sel[srt]]
            out[start:start + len(sel)] = rows
        out.flush()
        del out, src
        return pids_path, vecs_path

    def close(self) -> None:
        import shutil

        for fh in (self._pids, self._vecs):
            if not fh.closed:
                fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def set_nprobe(index, nprobe: int) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def vectors_of(batch: pa.RecordBatch | pa.Table, dim: int, column: str = "vector") -> np.ndarray:
    """float32 [n, dim] from a list / fixed-size-list column, without per-row Python work."""
    col = batch.column(column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size != len(col) * dim:
        raise IncompatibleIndexError(f"vectors are not of dimension {dim}: {flat.size} values for {len(col)} rows")
    return flat.reshape(len(col), dim)


def check_finite(vectors: np.ndarray, pids: np.ndarray) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise EncoderError(f"NaN/inf vectors for pid(s) {pids[bad][:5].tolist()} in the Embeddings table")


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each float32/int64 [q, k_i]) into the global top-k [q, k].

    Ties are broken by pid so the result does not depend on shard order. Missing hits are -1.
    """
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    s = np.where(i < 0, -np.inf, s)
    order = np.lexsort((i, -s), axis=1)[:, :k] if s.shape[1] else np.zeros((s.shape[0], 0), dtype=np.int64)
    top_s = np.take_along_axis(s, order, axis=1)
    top_i = np.take_along_axis(i, order, axis=1)
    if top_s.shape[1] < k:
        pad = k - top_s.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s.astype(np.float32), top_i.astype(np.int64)


def drop_ids(ids: np.ndarray, drop: np.ndarray | None, k: int) -> np.ndarray:
    """Each row of ``ids`` [q, m] without the id ``drop[row]``, first k kept (-1 padded). ``drop``
    None: the first k columns."""
    if drop is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, d) in enumerate(zip(ids, drop)):
        kept = row[row != d][:k]
        out[r, :len(kept)] = kept
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k ids found in its approximate top-k."""
    hits = [len(set(f[f >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 0.0


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


def packed_vectors(spark, source, dim: int, num_shards: int, batch_rows: int = 8192):
    """DataFrame (shard, pids, vectors) of the whole table; ``source`` is a list of Embeddings
    Parquet files (read by pyarrow in one task per file, the fast path) or a DataFrame."""
    from dpr_lib.spark import spark_schema, tasks_dataframe

    if isinstance(source, list):
        def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                for url in b.column("path").to_pylist():
                    for batch in _file_batches(url, batch_rows):
                        yield from pack_batch(batch, dim, num_shards)

        tasks = tasks_dataframe(spark, [{"path": f} for f in source], "path string")
        return tasks.mapInArrow(run, spark_schema(PACKED))

    def run_df(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield from pack_batch(batch, dim, num_shards)

    return source.select("pid", "vector").mapInArrow(run_df, spark_schema(PACKED))


def sample_vectors(spark, source, dim: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A Bernoulli sample (pids int64 [m], vectors float32 [m, d]) of the table, drawn on executors;
    only the sample reaches the driver."""
    packed = packed_vectors(spark, source, dim, 1)
    schema = PACKED

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        rng = np.random.default_rng([seed, ctx.partitionId() if ctx else 0])
        for b in batches:
            for row in b.to_pylist():
                pids = np.frombuffer(row["pids"], dtype=np.int64)
                keep = rng.random(len(pids)) < fraction
                if keep.any():
                    vecs = np.frombuffer(row["vectors"], dtype=np.float32).reshape(-1, dim)
                    yield pa.RecordBatch.from_pylist([{"shard": 0, "pids": pids[keep].tobytes(),
                                                       "vectors": np.ascontiguousarray(vecs[keep]).tobytes()}],
                                                     schema=schema)

    from dpr_lib.spark import spark_schema

    rows = packed.mapInArrow(run, spark_schema(schema)).toArrow()
    if rows.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    pids = np.concatenate([np.frombuffer(b, dtype=np.int64) for b in rows.column("pids").to_pylist()])
    vecs = np.concatenate([np.frombuffer(b, dtype=np.float32).reshape(-1, dim)
                           for b in rows.column("vectors").to_pylist()])
    return pids, vecs


SHARD_RESULT = pa.schema([("shard", pa.int32()), ("vectors", pa.int64()), ("bytes", pa.int64()),
                          ("sha256", pa.string()), ("path", pa.string()), ("rerank", pa.string()),
                          ("hit_scores", pa.binary()), ("hit_ids", pa.binary()), ("exact_scores", pa.binary()),
                          ("exact_ids", pa.binary())])


def build_shards(spark, packed, trained: bytes, num_shards: int, dim: int, out_url_of,
                 queries: np.ndarray, k: int, nprobes: list[int], add_batch: int,
                 storage_options: dict, retries: int, k_factors: list[int] | None = None) -> list[dict]:
    """Build every shard on executors; return per-shard {shard, vectors, bytes, sha256, path, rerank, hit_*, exact_*}.

    ``packed`` is ``packed_vectors(...)`` with the same ``num_shards``. ``out_url_of(shard)`` names
    where a shard is written (``.faiss``; its re-rank store beside it as ``.pids.npy`` and
    ``.vectors.npy`` when ``k_factors`` is given). ``hit_scores``/``hit_ids`` hold the shard's
    top-k of the recall queries at each nprobe and k_factor (float32 / int64 [P, F, q, k]; without
    re-rank F = 1 and the scores are the index's); ``exact_scores``/``exact_ids`` its brute-force
    top-k ([q, k]); ``rerank`` a JSON {pids: {path, bytes, sha256}, vectors: {...}} or "".
    """
    import json

    from dpr_lib import storage
    from dpr_lib.spark import spark_schema

    bc_index = spark.sparkContext.broadcast(trained)
    bc_queries = spark.sparkContext.broadcast(queries.astype(np.float32))
    urls = {s: out_url_of(s) for s in range(num_shards)}

    def upload(local: str, url: str) -> dict:
        storage.upload_file_atomic(local, url, storage_options, attempts=retries)
        return {"path": url, "bytes": os.path.getsize(local), "sha256": storage.sha256_file(local)}

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        q = bc_queries.value
        shards: dict[int, dict] = {}
        try:
            for batch in batches:
                for row in batch.to_pylist():
                    s = row["shard"]
                    p = np.frombuffer(row["pids"], dtype=np.int64)
                    v = np.frombuffer(row["vectors"], dtype=np.float32).reshape(-1, dim)
                    check_finite(v, p)
                    st = shards.get(int(s))
                    if st is None:
                        st = shards[int(s)] = {
                            "index": deserialize(bc_index.value), "pids": [],
                            "store": RerankStoreWriter(dim) if k_factors else None,
                            "exact": (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))}
                    for start in range(0, len(p), add_batch):
                        st["index"].add_with_ids(np.ascontiguousarray(v[start:start + add_batch]),
                                                 np.ascontiguousarray(p[start:start + add_batch], dtype=np.int64))
                    if st["store"] is not None:
                        st["store"].add(p, v)
                    st["pids"].append(p)
                    scores = q @ v.T
                    st["exact"] = merge_topk([st["exact"][0], scores],
                                             [st["exact"][1], np.broadcast_to(p, scores.shape)], k)
            for s, st in shards.items():
                all_pids = np.concatenate(st["pids"])
                uniq, counts = np.unique(all_pids, return_counts=True)
                if (counts > 1).any():
                    raise InputError(f"duplicate pids in the Embeddings table: {uniq[counts > 1][:5].tolist()}")
                idx = st["index"]
                data = serialize(idx)
                storage.write_bytes_atomic(urls[s], data, storage_options, attempts=retries)
                store_meta = ""
                if st["store"] is not None:
                    pids_path, vecs_path = st["store"].finish()
                    base = urls[s][: -len(".faiss")] if urls[s].endswith(".faiss") else urls[s]
                    store_meta = json.dumps({"pids": upload(pids_path, base + ".pids.npy"),
                                             "vectors": upload(vecs_path, base + ".vectors.npy")})
                    store_pids = np.load(pids_path, mmap_mode="r")
                    store_vecs = np.load(vecs_path, mmap_mode="r")
                all_s, all_i = [], []
                for nprobe in nprobes:
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
                    "shard": s, "vectors": int(len(all_pids)), "bytes": len(data),
                    "sha256": storage.sha256_bytes(data), "path": urls[s], "rerank": store_meta,
                    "hit_scores": _npy(np.array(all_s, np.float32)), "hit_ids": _npy(np.array(all_i, np.int64)),
                    "exact_scores": _npy(st["exact"][0]), "exact_ids": _npy(st["exact"][1])}], schema=SHARD_RESULT)
                del data, st["index"]
                if st["store"] is not None:
                    del store_pids, store_vecs
                    st["store"].close()
        finally:
            for st in shards.values():
                if st.get("store") is not None:
                    st["store"].close()

    df = packed.repartition(num_shards, "shard").sortWithinPartitions("shard")
    rows = [r.asDict() for r in df.mapInArrow(run, spark_schema(SHARD_RESULT)).collect()]
    bc_index.unpersist()
    bc_queries.unpersist()
    for r in rows:
        for key in ("hit_scores", "hit_ids", "exact_scores", "exact_ids"):
            r[key] = _unnpy(r[key])
        r["rerank"] = json.loads(r["rerank"]) if r["rerank"] else None
    return sorted(rows, key=lambda r: r["shard"])


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
                    scores = q @ vecs.T
                    best = merge_topk([best[0], scores], [best[1], np.broadcast_to(pids, scores.shape)], k)
                yield pa.RecordBatch.from_pylist([{"scores": _npy(best[0]), "ids": _npy(best[1])}],
                                                 schema=EXACT_RESULT)

    tasks = tasks_dataframe(spark, [{"path": f} for f in files], "path string")
    partial = tasks.mapInArrow(run, spark_schema(EXACT_RESULT)).toLocalIterator()
    best = (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
    for row in partial:  # one file's top-k at a time
        best = merge_topk([best[0], _unnpy(row["scores"])], [best[1], _unnpy(row["ids"])], k)
    bc.unpersist()
    return best
