"""Spark-free FAISS operations of the merge job and the loader: the index rule, training,
top-k merging, exact re-ranking, the re-rank store and recall. Pure functions of numpy arrays and
FAISS indexes, tested without Spark; :mod:`dpr_lib.index` runs them on a cluster, and
:mod:`dpr_lib.search` in a search service.

- ``choose_factory`` / ``rule_table``: the automatic index rule (docs/stages.md#index-rule).
- ``train_quantizer`` (flat or two-level k-means): a trained, empty IVF from a sample.
- ``merge_topk`` / ``topk_block``: exact merges of per-shard (or per-batch) top-k lists.
- ``rerank`` / ``RerankStoreWriter``: exact re-scoring of candidates against stored vectors.
- ``recall_at_k``, shard planning (``shard_count``, ``check_task_memory``).

All shards of a version share one quantizer, so per-shard top-k lists merge exactly.
No pyspark import.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dpr_lib import storage
from dpr_lib.errors import ConfigError, EncoderError, IncompatibleIndexError, InputError

log = logging.getLogger("dpr_lib.index_ops")

METRIC = "inner_product"
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MIN_POINTS_PER_LIST = 39  # below this FAISS's k-means warns and centroids are poor
ID_BYTES = 8              # FAISS stores an int64 id beside every code in the inverted lists
K_FACTORS = (1, 2, 4, 8, 16, 32)
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_LIST  # 8-bit PQ codebooks: 256 centroids per sub-quantizer
RERANK_DTYPE = np.float16


KMEANS_NITER = 10         # FAISS's IVF k-means iterations (Level1Quantizer's default)
TWO_LEVEL_REFINE = 3      # full k-means iterations after two-level: they let points cross coarse-cluster
                          # borders (0 refinements lost 0.02-0.04 recall@10 at nprobe 1-8 against flat)
HNSW_M = 32               # links per centroid of an HNSW coarse quantizer
HNSW_EF_SEARCH = 64       # its search breadth: assignment and probing stay within ~0.1% of exhaustive


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int
    train_size: int
    reason: str
    train_method: str = "flat"
    """flat | two_level (see :func:`train_quantizer`)."""
    train_bytes: int = 0
    """Driver bytes of the training sample (float32)."""
    train_flops: float = 0.0
    """Estimated FLOPs of training (k-means, plus PQ codebooks)."""


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def train_flops(train: int, nlist: int, dim: int, method: str, factory: str = "") -> float:
    """Estimated k-means FLOPs: each iteration scores every training point against the centroids
    it may join (2*d FLOPs each): nlist of them (flat, KMEANS_NITER iterations), or sqrt(nlist)
    coarse + ~sqrt(nlist) fine (two_level) and then TWO_LEVEL_REFINE full iterations. PQ codebooks
    add 256 centroids per sub-space, 25 iterations."""
    if method == "flat":
        per_point = nlist * KMEANS_NITER
    else:
        per_point = 2 * math.sqrt(nlist) * KMEANS_NITER + nlist * TWO_LEVEL_REFINE
    flops = train * per_point * dim * 2 if nlist > 1 else 0.0
    if "PQ" in factory:
        flops += train * 256 * dim * 2 * 25
    return float(flops)


def choose_factory(n: int, dim: int, bytes_per_vector: int = 0, train_per_list: int = 64,
                   max_train_bytes: int = 2**31, min_nlist: int = 1, factory: str = "auto",
                   exact_below: int = 0, max_train_sample: int = 0, coarse: str = "flat",
                   train_method: str = "auto", large_nlist: int = 4096,
                   budget_key: str = "index.max_train_bytes") -> IndexPlan:
    """The index rule (docs/stages.md#index-rule), for n vectors of dimension d.

    - The training sample holds at most ``max_train_bytes`` of float32 vectors (and
      ``max_train_sample`` vectors if > 0): ``cap`` vectors.
    - nlist = the power of two at or above 4*sqrt(n), lowered until every list gets >= 39
      training points: first to n/39, then, when the budget is the limit, to the power of two
      at or below cap/39 (said in the reason). Sample = nlist * train_per_list (PQ: at least
      256*39), within cap: never fewer than 39 points per list.
    - Codes from the memory budget per vector: 0 or >= 4*d bytes -> Flat (exact), >= d -> SQ8,
      else PQ with the largest m <= budget dividing d. Exact codes and fewer than ``exact_below``
      vectors: IVF1,Flat, an exact index.
    - From ``large_nlist`` lists (train_method auto): two-level k-means, so training does not
      score every point against every centroid. ``coarse`` hnsw: an HNSW coarse quantizer
      (``IVFn_HNSW32``), so assignment does not scan every centroid either.

    An explicit ``factory`` whose nlist cannot get 39 points per list from the sample fails here,
    before anything is built.
    """
    if n <= 0:
        raise InputError("no vectors to index: the Embeddings table is empty")
    cap = max(1, max_train_bytes // (4 * dim))
    if max_train_sample:
        cap = min(cap, max_train_sample)
    cap = min(cap, n)
    if factory != "auto":
        nlist = _nlist_of(factory)
        if nlist and n < nlist:
            raise InputError(f"index.factory {factory} needs at least nlist={nlist} vectors to train, "
                             f"the Embeddings table has {n}; lower nlist or use index.factory=auto")
        train = min(cap, max(nlist * train_per_list, PQ_MIN_TRAIN if "PQ" in factory else 0) or n)
        if nlist > 1 and train < MIN_POINTS_PER_LIST * nlist:
            limit = (f"the Embeddings table has {n} vectors" if n < MIN_POINTS_PER_LIST * nlist else
                     f"{budget_key} = {max_train_bytes} bytes holds {cap} vectors of d={dim}")
            raise ConfigError(f"index.factory {factory}: nlist={nlist} needs {MIN_POINTS_PER_LIST * nlist} "
                              f"training vectors ({MIN_POINTS_PER_LIST} per list), the sample can have {train} "
                              f"({limit}); raise {budget_key}, lower nlist or use index.factory=auto")
        method = _method(train_method, nlist, large_nlist)
        return IndexPlan(factory, nlist, train, "index.factory from config", method, train * 4 * dim,
                         train_flops(train, nlist, dim, method, factory))
    nlist = 2 ** math.ceil(math.log2(max(4 * math.sqrt(n), 1)))
    nlist = max(min_nlist, min(nlist, n // MIN_POINTS_PER_LIST))
    nlist = max(1, min(nlist, n))
    lowered = ""
    if cap < MIN_POINTS_PER_LIST * nlist < n + 1 and nlist > 1:
        wanted, nlist = nlist, _pow2_floor(cap // MIN_POINTS_PER_LIST)
        lowered = (f"; nlist lowered from {wanted} to {nlist}: {budget_key} = {max_train_bytes} bytes holds "
                   f"{cap} training vectors of d={dim}, fewer than {MIN_POINTS_PER_LIST} x {wanted}")
    budget = bytes_per_vector - ID_BYTES  # the FAISS id stored beside every code
    if bytes_per_vector == 0 or bytes_per_vector >= 4 * dim:
        code, why = "Flat", "exact float32 codes (no per-vector memory budget below 4*d bytes)"
        if n < exact_below:
            train = min(n, max(train_per_list, 1))
            return IndexPlan("IVF1,Flat", 1, train,
                             f"n={n} < index.exact_below={exact_below}, d={dim}: one inverted list, every "
                             f"query scans all vectors: exact search ({why})", "flat", train * 4 * dim, 0.0)
    elif budget >= dim:
        code, why = "SQ8", f"8-bit scalar codes + 8-byte ids fit the budget of {bytes_per_vector} B/vector"
    elif budget >= 1 and cap < PQ_MIN_TRAIN:
        code, why = "SQ8", (f"{cap} training vectors are too few to train 256-centroid PQ codebooks (needs "
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
    train = min(train, cap)
    hnsw = coarse == "hnsw"
    factory = f"IVF{nlist}_HNSW{HNSW_M},{code}" if hnsw and nlist > 1 else f"IVF{nlist},{code}"
    method = _method(train_method, nlist, large_nlist)
    reason = (f"n={n}, d={dim}: nlist={nlist} (power of two >= 4*sqrt(n), >= {MIN_POINTS_PER_LIST} "
              f"points per list){lowered}; {train} training points ({train // max(1, nlist)} per list), "
              f"{method} k-means{', HNSW coarse quantizer' if hnsw and nlist > 1 else ''}; {why}")
    return IndexPlan(factory, nlist, train, reason, method, train * 4 * dim,
                     train_flops(train, nlist, dim, method, factory))


def _method(train_method: str, nlist: int, large_nlist: int) -> str:
    if train_method != "auto":
        return train_method
    return "two_level" if nlist >= large_nlist else "flat"


RULE_TABLE_N = (10_000, 100_000, 1_000_000, 10_000_000, 21_000_000, 100_000_000, 1_000_000_000)


def rule_table(dim: int, max_train_bytes: int, bytes_per_vector: int = 0, exact_below: int = 10_000,
               ns: tuple[int, ...] = RULE_TABLE_N) -> list[dict]:
    """The auto rule at each n (docs/stages.md#index-rule): factory, nlist, sample, driver bytes
    of the sample, estimated training FLOPs and training points per list."""
    rows = []
    for n in ns:
        p = choose_factory(n, dim, bytes_per_vector, max_train_bytes=max_train_bytes, exact_below=exact_below)
        rows.append({"n": n, "factory": p.factory, "nlist": p.nlist, "train_size": p.train_size,
                     "points_per_list": p.train_size // max(1, p.nlist), "driver_bytes": p.train_bytes,
                     "train_method": p.train_method, "train_flops": p.train_flops})
    return rows


def _nlist_of(factory: str) -> int:
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = part[3:].split("_")[0]
            if digits.isdigit():
                return int(digits)
    return 0


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int, spherical: bool,
                        refine: int = TWO_LEVEL_REFINE) -> np.ndarray:
    """nlist centroids by two-level k-means: sqrt(nlist) coarse clusters, then each coarse cluster
    split into a share of the nlist proportional to its size (at least one, at most its points);
    each point is scored against ~2*sqrt(nlist) centroids per iteration instead of nlist. Then
    ``refine`` iterations of k-means over all nlist centroids from there, so that points near a
    coarse border can join the centroid they are closest to. float32 [nlist, d]."""
    import faiss

    n, d = sample.shape
    nc1 = max(1, min(nlist, int(round(math.sqrt(nlist)))))
    coarse = faiss.Kmeans(d, nc1, niter=KMEANS_NITER, seed=seed, spherical=spherical,
                          max_points_per_centroid=256)  # FAISS copies its subsample: 256 per cluster
                          # keeps that copy small (2048 cost the driver 570 MB at 524k x 768)
    coarse.train(sample)
    _, assign = coarse.index.search(sample, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=nc1)
    # Largest-remainder shares of nlist, each within [1, size] for non-empty clusters.
    share = np.where(sizes > 0, np.maximum(1, np.floor(sizes * nlist / n)), 0).astype(np.int64)
    share = np.minimum(share, sizes)
    order = np.argsort(-(sizes * nlist / n - share))
    i = 0
    while share.sum() < nlist and i < 10 * nc1 + nlist:
        c = order[i % nc1]
        if share[c] < sizes[c]:
            share[c] += 1
        i += 1
    while share.sum() > nlist:
        c = int(np.argmax(share))
        share[c] -= 1
    by_cluster = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out, done = [], 0
    for c in range(nc1):
        if share[c] == 0:
            continue
        points = np.ascontiguousarray(sample[by_cluster[bounds[c]:bounds[c + 1]]])
        if share[c] == 1:
            cent = points.mean(axis=0, keepdims=True)
            if spherical:
                cent /= max(float(np.linalg.norm(cent)), 1e-12)
        else:
            km = faiss.Kmeans(d, int(share[c]), niter=KMEANS_NITER, seed=seed + c, spherical=spherical,
                              max_points_per_centroid=256)
            km.train(points)
            cent = km.centroids
        out.append(np.asarray(cent, np.float32))
        done += 1
        if done % max(1, nc1 // 10) == 0:
            log.info("two-level k-means: %d/%d coarse clusters split", done, nc1)
    centroids = np.ascontiguousarray(np.vstack(out), dtype=np.float32)
    if refine and len(centroids) > 1:
        km = faiss.Kmeans(d, len(centroids), niter=refine, seed=seed, spherical=spherical,
                          max_points_per_centroid=256)
        km.train(sample, init_centroids=centroids)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    return centroids


def train_quantizer(sample: np.ndarray, factory: str, seed: int = 1234, method: str = "flat"):
    """A trained, empty FAISS index (inner product) from ``sample``: float32 [n, d].

    ``method`` two_level: the coarse centroids come from :func:`two_level_centroids` and are
    added to the quantizer (flat or HNSW); FAISS then trains only the codes (SQ/PQ) on residuals."""
    import faiss

    d = sample.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"invalid index.factory {factory!r}: {str(exc).splitlines()[0]}") from None
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            # index_factory turns on polysemous training for "PQm"; it serves Hamming filtering,
            # which inner-product search never uses, and took 97 s of a 98 s IVF41,PQ64 training here.
            ivf.do_polysemous_training = False
        # Centroids live in the IVF's input space: with a pre-transform (OPQ, PCA) FAISS trains them.
        if method == "two_level" and ivf.nlist > 1 and not isinstance(faiss.downcast_index(index),
                                                                       faiss.IndexPreTransform):
            if len(sample) < MIN_POINTS_PER_LIST * ivf.nlist:
                raise InputError(f"cannot train index.factory {factory!r} on {len(sample)} vectors: "
                                 f"two-level k-means needs {MIN_POINTS_PER_LIST} per list")
            centroids = two_level_centroids(sample, ivf.nlist, seed, spherical=bool(ivf.cp.spherical))
            ivf.quantizer.add(centroids)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = HNSW_EF_SEARCH
    try:
        index.train(sample)
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


def code_size_of(factory: str, dim: int) -> int:
    """Bytes per vector of a factory's codes, from its string (Flat 4d, SQ8 d, SQ4 d/2, PQm[xb] m*b/8)."""
    code = factory.split(",")[-1]
    if code.startswith("SQ"):
        bits = int(code[2:]) if code[2:].isdigit() else 8
        return max(1, dim * bits // 8) if code[2:] != "fp16" else 2 * dim
    m = re.match(r"PQ(\d+)(?:x(\d+))?", code)
    if m:
        return max(1, int(m.group(1)) * int(m.group(2) or 8) // 8)
    return 4 * dim


def shard_count(n: int, num_shards: int, max_vectors_per_shard: int) -> int:
    """index.num_shards, raised until no shard holds more than index.max_vectors_per_shard."""
    return max(1, num_shards, -(-n // max(1, max_vectors_per_shard)))


LIST_GROWTH = 1.5           # inverted lists grow by doubling: ~1.5x their codes on average
TASK_BASE_BYTES = 400 << 20  # a Python worker with numpy, pyarrow and FAISS loaded, plus read buffers


def shard_task_bytes(vectors: int, code_bytes: int, dim: int, add_batch: int = 8192) -> int:
    """Estimated peak memory of a shard task: its codes and ids (with list growth), one add batch
    of float32 vectors, and a constant."""
    return int(vectors * (code_bytes + ID_BYTES) * LIST_GROWTH + add_batch * dim * 4 + TASK_BASE_BYTES)


def check_task_memory(n: int, num_shards: int, dim: int, code_bytes: int, task_bytes: int,
                      add_batch: int = 8192) -> None:
    """Refuse, before anything is built, shards that would not fit a task's memory share."""
    if not task_bytes:
        return
    per_shard = -(-n // num_shards)
    need = shard_task_bytes(per_shard, code_bytes, dim, add_batch)
    if need > task_bytes:
        raise ConfigError(
            f"shard 0 (and every shard: {per_shard} vectors each of {num_shards}) needs ~{need >> 20} MiB in its "
            f"task, over the task memory of {task_bytes >> 20} MiB (index.task_memory_bytes or "
            f"spark.executor.pyspark.memory); lower index.max_vectors_per_shard or raise the task memory")


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


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh (Linux: VmHWM), so a reused Python worker
    reports the peak of the current task only. Best effort. (``getrusage``'s ru_maxrss cannot be
    reset, and a child process inherits its parent's high-water mark across fork and exec.)"""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes of this process since the last reset (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RerankStoreWriter:
    """Collects a shard's (pid, vector) pairs in local temp files, then writes the store: two
    ``.npy`` files (pids int64 sorted; vectors float16 [n, d] in pid order), never holding the
    shard's vectors in memory at once."""

    def __init__(self, dim: int):
        self.dim = dim
        self.dir = tempfile.mkdtemp(prefix="dpr-rerank-", dir=storage.local_tmp_dir())
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


def check_finite(vectors: np.ndarray, pids: np.ndarray, block: int = 65536) -> None:
    """NaN/inf vectors are an EncoderError naming their pids (checked in blocks of rows: no
    whole-size temporary for a large sample)."""
    for start in range(0, len(vectors), block):
        bad = ~np.isfinite(vectors[start:start + block]).all(axis=1)
        if bad.any():
            raise EncoderError(f"NaN/inf vectors for pid(s) {pids[start:start + block][bad][:5].tolist()} "
                               "in the Embeddings table")


def pad_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-d lists [q, d] (d <= k) widened to [q, k]: score -inf, pid -1 for the missing hits."""
    pad = k - scores.shape[1]
    if pad <= 0:
        return scores, ids
    return (np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
            np.pad(ids, ((0, 0), (0, pad)), constant_values=-1).astype(np.int64))


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


def topk_block(scores: np.ndarray, pids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of a score block ([q, n] against the n vectors ``pids``), exactly as
    ``merge_topk`` would order it (ties broken by pid), without sorting whole rows: a partition
    picks k candidates per row; rows where more than k scores tie at the k-th are sorted whole."""
    n = scores.shape[1]
    if n <= k:
        return merge_topk([scores], [np.broadcast_to(pids, scores.shape)], k)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    cand = np.take_along_axis(scores, part, axis=1)
    top_s, top_i = merge_topk([cand], [pids[part]], k)
    tied = np.flatnonzero((scores >= cand.min(axis=1, keepdims=True)).sum(axis=1) > k)
    if len(tied):
        top_s[tied], top_i[tied] = merge_topk([scores[tied]], [np.broadcast_to(pids, (len(tied), n))], k)
    return top_s, top_i


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
