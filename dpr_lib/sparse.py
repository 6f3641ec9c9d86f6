"""The sparse side of a version: BM25 shards over the same pids as the dense shards.

Analyzer: the evaluation's (:func:`dpr_lib.train_data.bm25_tokens`: lower-cased ``\\w\\w+`` words,
English stop words removed, Snowball stemming) over ``title + " " + text``. Terms are stored as a
64-bit hash of the stemmed token (blake2b): the term dictionary needs no strings, and two of ten
million terms collide with probability ~3e-6.

Scoring is Lucene's BM25 (bm25s' default: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term weight
tf / (tf + k1 (1 - b + b dl / avgdl)), no (k1 + 1) factor), evaluated **at query time** from the
stored term frequencies and document lengths with global N, avgdl and df. Nothing in a shard
depends on the rest of the corpus: a shard is written once, scores of different shards are on
one scale (merging their top-k is exact), and a later delta segment only adds shards and updates
the small global statistics, never rewrites old postings.

Files of a version (each a :class:`ArrayFile`, memory-mapped by the loader):

- ``sparse-vocab.bm25``: ``terms`` int64 (sorted term hashes) and ``df`` int32: document
  frequencies over the whole corpus, aggregated once on Spark from the shards' own counts.
- ``sparse-NNNNN.bm25``: per dense shard, an inverted index: ``terms`` int64 (sorted), ``df``
  uint32 (the shard's own), the compressed postings of :mod:`dpr_lib.postings` (blocks of 128
  bit-packed row gaps and tf values, per-block skip and score-bound data, checksums), ``pids``
  int64 and ``doc_len`` uint16/int32 per passage (pid-sorted; a posting's row indexes them).
  Meta ``postings: "blocks-128"``. Files written before it hold the postings uncompressed
  (``offsets``, ``rows``, ``tf``): they are still read, and scored exhaustively.

Search is pruned by default (:func:`dpr_lib.postings.topk_pruned`: block-max MaxScore over windows
of rows, as Lucene's MaxScore bulk scorer goes; the top k equal the exhaustive scorer's, ties
included). Shards are searched one after another, each starting from the k-th best score of those
before it. It keeps one float per document length (the length part of BM25), and per thread
about 1.2 MB of window-sized scratch; it holds no lock and releases the GIL, so a service's
threads score questions in parallel. ``search.sparse_exact`` scores every posting of every query
term instead (the reference the tests compare with).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import postings, storage
from dpr_lib.bm25 import ANALYZER, K1, B, analyze, analyze_passages, idf
from dpr_lib.config import Config, join_url
from dpr_lib.errors import IndexIntegrityError, InputError
from dpr_lib.manifest import relative_to

log = logging.getLogger("dpr_lib.sparse")

MAGIC = b"DPRARR1\x00"
MMAP_MIN_BYTES = 4 << 20
"""Array files at least this large are memory-mapped; smaller ones are read (Python's mmap holds a
file descriptor per mapping, and a month of nightly deltas makes many small files)."""
ALIGN = 64
VOCAB = "sparse-vocab.bm25"
POSTINGS = "blocks-128"

# ---------------------------------------------------------------- one file of named arrays

class ArrayFile:
    """Named numpy arrays in one file: MAGIC, header length (uint64), a JSON header {meta,
    arrays: {name: {dtype, shape, offset}}}, then each array 64-byte aligned. Read back
    memory-mapped (pages load as queries touch them) or into RAM."""

    @staticmethod
    def write(path: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        entries, offset = {}, 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            offset += -(-a.nbytes // ALIGN) * ALIGN
        header = json.dumps({"meta": meta or {}, "arrays": entries}).encode()
        start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
        with open(path, "wb") as fh:
            fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
            fh.write(b"\0" * (start - fh.tell()))
            for name, a in arrays.items():
                fh.seek(start + entries[name]["offset"])
                fh.write(np.ascontiguousarray(a).tobytes())
            fh.truncate(start + offset)

    def __init__(self, path: str, mmap: bool = True):
        """``mmap``: one read-only mapping of the whole file, every array a view of it (one file
        descriptor per file, whatever its number of arrays); files under :data:`MMAP_MIN_BYTES`
        (a nightly delta's) and ``mmap=False`` read into memory instead, so a service holding many
        segments keeps no descriptor for each. Arrays are read-only either way."""
        import mmap as mmap_module

        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 8)
            if head[:len(MAGIC)] != MAGIC:
                raise InputError(f"{path} is not a dpr_lib array file (bad magic)")
            n = int.from_bytes(head[len(MAGIC):], "little")
            header = json.loads(fh.read(n))
            fh.seek(0)
            size = os.fstat(fh.fileno()).st_size
            mapped = mmap and size >= MMAP_MIN_BYTES
            buf = mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ) if mapped else fh.read()
        self.meta = header["meta"]
        start = -(-(len(MAGIC) + 8 + n) // ALIGN) * ALIGN
        self.arrays: dict[str, np.ndarray] = {}
        self.offsets = {name: start + e["offset"] for name, e in header["arrays"].items()}
        """Where each array starts in the file (bytes)."""
        for name, e in header["arrays"].items():
            dtype, shape = np.dtype(e["dtype"]), tuple(e["shape"])
            count = int(np.prod(shape)) if shape else 1
            if count == 0:
                self.arrays[name] = np.zeros(shape, dtype)
                continue
            if start + e["offset"] + count * dtype.itemsize > size:
                raise IndexIntegrityError(f"{path}: array {name} runs past the end of the file (truncated)")
            self.arrays[name] = np.frombuffer(buf, dtype, count, start + e["offset"]).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


# ---------------------------------------------------------------- building (Spark-free parts)

DOCS = pa.schema([("shard", pa.int32()), ("pids", pa.binary()), ("lens", pa.binary()),
                  ("nterms", pa.binary()), ("terms", pa.binary()), ("tfs", pa.binary())])


def pack_docs(pids: np.ndarray, shards: np.ndarray, analyzed: list) -> Iterator[dict]:
    """Analyzed passages -> one packed row per shard (raw arrays as bytes: compact in the shuffle).
    Passages whose shard is -1 (no dense shard holds their pid) are left out."""
    for s in np.unique(shards):
        if s < 0:
            continue
        sel = np.flatnonzero(shards == s)
        terms = [analyzed[i][0] for i in sel]
        tfs = [analyzed[i][1] for i in sel]
        yield {"shard": int(s), "pids": pids[sel].astype(np.int64).tobytes(),
               "lens": np.array([analyzed[i][2] for i in sel], np.int32).tobytes(),
               "nterms": np.array([len(t) for t in terms], np.int32).tobytes(),
               "terms": (np.concatenate(terms) if terms else np.zeros(0, np.int64)).tobytes(),
               "tfs": (np.concatenate(tfs) if tfs else np.zeros(0, np.int32)).tobytes()}


def unpack_docs(rows) -> tuple[np.ndarray, ...]:
    """The packed rows of one shard (:func:`pack_docs`) -> (pids, lens, nterms, terms, tfs), concatenated."""
    return tuple(np.concatenate([np.frombuffer(r[key], dtype) for r in rows]) for key, dtype in
                 (("pids", np.int64), ("lens", np.int32), ("nterms", np.int32), ("terms", np.int64),
                  ("tfs", np.int32)))


def inverted(pids: np.ndarray, lens: np.ndarray, nterms: np.ndarray, terms: np.ndarray,
             tfs: np.ndarray) -> dict[str, np.ndarray]:
    """Passages' (term, tf) lists -> a pid-sorted inverted index (see the module doc)."""
    order = np.argsort(pids, kind="stable")
    if len(pids) > 1 and (np.diff(pids[order]) == 0).any():
        dup = pids[order][1:][np.diff(pids[order]) == 0]
        raise InputError(f"duplicate pids in the Passages table: {np.unique(dup)[:5].tolist()}")
    new_row = np.empty(len(pids), np.int32)
    new_row[order] = np.arange(len(pids), dtype=np.int32)
    rows = np.repeat(new_row, nterms)
    post = np.lexsort((rows, terms))
    terms, rows, tfs = terms[post], rows[post], tfs[post]
    uniq, starts = np.unique(terms, return_index=True)
    offsets = np.append(starts, len(terms)).astype(np.int64)
    lens = lens[order]
    return {"terms": uniq.astype(np.int64), "offsets": offsets, "rows": rows.astype(np.int32),
            "tf": np.minimum(tfs, 65535).astype(np.uint16), "pids": pids[order].astype(np.int64),
            "doc_len": lens.astype(np.uint16 if (len(lens) == 0 or lens.max() < 65536) else np.int32)}


def shard_avgdl(inv: dict[str, np.ndarray]) -> float:
    return float(inv["doc_len"].astype(np.float64).mean()) if len(inv["doc_len"]) else 1.0


def shard_file(inv: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An :func:`inverted` index -> the arrays of a shard file (postings compressed; block bounds
    at the shard's own average length, see :func:`dpr_lib.postings.bound_scale`)."""
    return {"terms": inv["terms"], "df": np.diff(inv["offsets"]).astype(np.uint32),
            **postings.encode(inv["offsets"], inv["rows"], inv["tf"], inv["doc_len"], K1, B, shard_avgdl(inv)),
            "pids": inv["pids"], "doc_len": inv["doc_len"]}


def shard_meta(shard: int, inv: dict[str, np.ndarray]) -> dict:
    return {"kind": "bm25-shard", "shard": shard, "analyzer": ANALYZER, "postings": POSTINGS,
            "bounds": {"k1": K1, "b": B, "avgdl": shard_avgdl(inv)}}


# ---------------------------------------------------------------- searching

class SparseIndex:
    """BM25 over a version's sparse shards (all of them, or those of a shard subset: scores use
    the global statistics, so a subset ranks its passages exactly as the whole index would)."""

    def __init__(self, vocab_path: str, shard_paths: list[str], n_docs: int, avg_doc_len: float,
                 k1: float = K1, b: float = B, mmap: bool = True, dead: list[np.ndarray] | None = None,
                 exact: bool = False, window: int = postings.WINDOW):
        """``dead``: per shard, pids removed from it (tombstoned by a later segment), never returned.
        ``exact``: score every posting (``search.sparse_exact``) instead of the pruned scorer.
        ``window``: rows per window of the pruned scorer (see :func:`dpr_lib.postings.topk_pruned`)."""
        self.vocab = ArrayFile(vocab_path, mmap)
        self.paths = list(shard_paths)
        self.shards = [ArrayFile(p, mmap) for p in self.paths]
        self.blocks = [self._blocks(p, f) for p, f in zip(self.paths, self.shards)]
        self.n_docs, self.avgdl, self.k1, self.b = int(n_docs), float(avg_doc_len), k1, b
        self.exact = exact
        self.dead_rows = [np.zeros(0, np.uint8) if d is None or not len(d) else
                          np.isin(np.asarray(f["pids"]), d).astype(np.uint8)
                          for f, d in zip(self.shards, dead or [None] * len(self.shards))]
        self._f32 = (np.float32(k1), np.float32(1.0 - b), np.float32(b / max(self.avgdl, 1e-9)))
        self.scales = [self._scale(f) for f in self.shards]
        if window <= 0 or window % 64:
            raise ValueError(f"the pruned scorer's window is {window} rows: it must be a positive multiple of 64")
        self.window = int(window)
        self._local = threading.local()  # per thread: the pruned scorer's scratch
        self._norms: np.ndarray | None = None
        self._row_norms: list[np.ndarray | None] = [None] * len(self.shards)

    def _table(self) -> np.ndarray:
        """Per document length, the length part of BM25 at this index's statistics (float32, as
        :func:`dpr_lib.postings.norms`; made on the first question: one float per length, where a
        float per passage would cost 4 B each and twice the memory traffic of the 2-byte lengths)."""
        if self._norms is None:
            longest = max((int(np.asarray(f["doc_len"]).max(initial=0)) for f in self.shards), default=0)
            self._norms = postings.norms(np.arange(longest + 1), *self._f32)
        return self._norms

    def _scale(self, f: ArrayFile) -> float:
        """The factor of the file's stored block weights at this index's statistics; 0 (the bound
        from tf and length) when the file's k1 or b are not this index's."""
        built = f.meta.get("bounds") or {}
        if built.get("k1") != self.k1 or built.get("b") != self.b:
            return 0.0
        return postings.bound_scale(built["avgdl"], self.avgdl)

    @staticmethod
    def _blocks(path: str, f: ArrayFile) -> tuple | None:
        """The compressed postings' arrays (None: a file with uncompressed postings), checked for
        the shapes the kernels rely on, so a truncated or inconsistent file is refused up front."""
        if "packed" not in f.arrays:
            if not {"offsets", "rows", "tf"} <= set(f.arrays):
                raise IndexIntegrityError(f"{path}: a sparse shard without postings")
            return None
        try:
            blocks = tuple(np.asarray(f[n]) for n in postings.BLOCK_ARRAYS)
            nterms, nblocks = len(f["terms"]), len(blocks[1])
            ok = (len(blocks[0]) == nterms + 1 and len(f["df"]) == nterms and len(blocks[2]) == nblocks + 1
                  and all(len(a) == nblocks for a in blocks[3:9] + blocks[10:]) and (nblocks == 0 or (
                      int(blocks[0][-1]) == nblocks and int(blocks[2][-1]) < len(blocks[9])
                      and int(blocks[4].max()) <= 32 and int(blocks[5].max()) <= 32)))
        except KeyError as exc:
            raise IndexIntegrityError(f"{path}: a sparse shard without {exc}") from None
        if not ok:
            raise IndexIntegrityError(f"{path}: the sparse shard's block tables are inconsistent (corrupted file)")
        return blocks + (np.zeros(nblocks, np.uint8),)  # per block: checksum verified (by the first decode)

    def query_terms(self, questions: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per question: (term hashes found in the vocabulary, their weight = count x idf)."""
        vt, vdf = self.vocab["terms"], self.vocab["df"]
        out = []
        for h, tf, _ in analyze(questions):
            pos = np.searchsorted(vt, h)
            ok = pos < len(vt)
            ok[ok] = vt[pos[ok]] == h[ok]
            out.append((h[ok], tf[ok].astype(np.float64) * idf(vdf[pos[ok]], self.n_docs)))
        return out

    def search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 top-k: scores float32 [q, k] (-inf = no hit), pids int64 [q, k] (-1 = no hit);
        ties broken by pid."""
        from dpr_lib.index_ops import merge_topk

        scores = np.full((len(questions), k), -np.inf, np.float32)
        pids = np.full((len(questions), k), -1, np.int64)
        for q, (terms, weights) in enumerate(self.query_terms(questions)):
            if not len(terms):
                continue
            w32 = weights.astype(np.float32)
            for i in range(len(self.shards)):  # each shard starts from the k-th best of those before
                s, p = self._shard_topk(i, terms, w32, k, float(scores[q, -1]))
                ms, mp = merge_topk([scores[q:q + 1], s[None, :]], [pids[q:q + 1], p[None, :]], k)
                scores[q], pids[q] = ms[0], mp[0]
        return scores, pids

    def _shard_topk(self, i: int, terms: np.ndarray, weights: np.ndarray, k: int, theta: float = -np.inf):
        """Shard ``i``'s k best (scores, pids); the pruned scorer returns only those scoring at least
        ``theta`` (the k-th best score of the shards before it)."""
        shard = self.shards[i]
        st = shard["terms"]
        pos = np.searchsorted(st, terms)
        found = pos < len(st)
        found[found] = st[pos[found]] == terms[found]
        out_s = np.full(k, -np.inf, np.float32)
        out_p = np.full(k, -1, np.int64)
        if not found.any():
            return out_s, out_p
        if self.exact or self.blocks[i] is None:
            rows, tf, counts = self._postings(i, pos[found])
            cand, vals = self._exhaustive(i, rows, tf, np.repeat(weights[found], counts), k)
            cand_pids = np.asarray(shard["pids"])[cand]
            order = np.lexsort((cand_pids, -vals))[:k]
            out_s[:len(order)], out_p[:len(order)] = vals[order], cand_pids[order]
            return out_s, out_p
        nq = int(found.sum())
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch[1]) < self.window * nq:
            scratch = (np.zeros(self.window), np.zeros(self.window * max(nq, 16), np.float32),
                       np.zeros(self.window // 64, np.uint64))
            self._local.scratch = scratch
        vals, rows, bad = postings.topk_pruned(pos[found].astype(np.int64), weights[found], self.blocks[i],
                                               np.asarray(shard["doc_len"]), self._table(), self.dead_rows[i], k,
                                               *self._f32, self.scales[i], theta, *scratch)
        if bad >= 0:
            self._local.scratch = None  # left dirty
            raise self._corrupted(i, bad)
        out_s[:len(vals)], out_p[:len(vals)] = vals, np.asarray(shard["pids"])[rows]
        return out_s, out_p

    def _corrupted(self, i: int, block: int) -> IndexIntegrityError:
        return IndexIntegrityError(f"{self.paths[i]}: postings block {block} fails its checksum (the file is "
                                   "corrupted); remove it from the shard cache so the loader fetches and verifies "
                                   "it again")

    def _postings(self, i: int, term_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every posting of the shard's terms at ``term_pos``: rows, tf, and the count per term."""
        shard, blocks = self.shards[i], self.blocks[i]
        if blocks is None:
            off = shard["offsets"]
            starts, stops = off[term_pos], off[term_pos + 1]
            rows = np.concatenate([shard["rows"][a:b] for a, b in zip(starts.tolist(), stops.tolist())])
            tf = np.concatenate([shard["tf"][a:b] for a, b in zip(starts.tolist(), stops.tolist())])
            return rows, tf, (stops - starts).astype(np.int64)
        counts = np.asarray(shard["df"])[term_pos].astype(np.int64)
        rows, tf = np.empty(counts.sum(), np.int64), np.empty(counts.sum(), np.int64)
        bad = postings.decode_terms(term_pos.astype(np.int64), blocks, rows, tf)
        if bad >= 0:
            raise self._corrupted(i, bad)
        return rows, tf, counts

    def _exhaustive(self, i: int, rows: np.ndarray, tf: np.ndarray, w: np.ndarray, k: int):
        """Every posting scored (float32 contributions summed per row in query-term order, float64):
        the reference the pruned scorer equals. Returns candidate rows and their float32 scores, the
        k best and everything tied with the k-th."""
        tf = tf.astype(np.float32)
        if self._row_norms[i] is None:  # per passage (4 B): the exhaustive scorer's one gather per posting
            self._row_norms[i] = self._table()[np.asarray(self.shards[i]["doc_len"])]
        contrib = w * tf / (tf + self._row_norms[i][rows])
        n = len(self.shards[i]["pids"])
        if len(rows) * 8 > n:  # accumulate densely
            acc = np.bincount(rows, contrib, minlength=n)
            cand = np.flatnonzero(acc > 0)
            vals = acc[cand]
        else:
            cand, inv = np.unique(rows, return_inverse=True)
            vals = np.bincount(inv, contrib)
        vals = vals.astype(np.float32)  # a score is its float32; ties (after rounding) go by pid
        dead = self.dead_rows[i]
        if len(dead):
            live = dead[cand] == 0
            cand, vals = cand[live], vals[live]
        if len(vals) > k:  # the k best (and everything tied with the k-th), then ordered exactly
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]
            keep = vals >= kth
            cand, vals = cand[keep], vals[keep]
        return cand, vals

    def memory(self) -> dict:
        files = [self.vocab, *self.shards]
        return {"sparse_bytes": int(sum(a.nbytes for f in files for a in f.arrays.values()))}


# ---------------------------------------------------------------- the Spark build

SHARD_OUT = pa.schema([("shard", pa.int32()), ("result", pa.string()), ("terms", pa.binary()),
                       ("df", pa.binary())])
VOCAB_OUT = pa.schema([("result", pa.string())])


def write_array_file(arrays: dict, meta: dict, url: str, opts: dict, retries: int) -> dict:
    with storage.StagedFile(url, ".bm25", opts, retries, prefix="dpr-sparse-") as staged:
        ArrayFile.write(staged.path, arrays, meta)
    return staged.entry()


def assign_by_ranges(ranges: list[tuple[int, int, int]]):
    """pid -> shard from disjoint [lo, hi] pid intervals per shard; -1 outside every interval."""
    ranges = sorted(ranges)
    lo = np.array([r[0] for r in ranges], np.int64)
    hi = np.array([r[1] for r in ranges], np.int64)
    sh = np.array([r[2] for r in ranges], np.int64)

    def assign(pids: np.ndarray) -> np.ndarray:
        i = np.searchsorted(lo, pids, side="right") - 1
        ok = (i >= 0) & (pids <= hi[np.maximum(i, 0)])
        return np.where(ok, sh[np.maximum(i, 0)], -1)

    return assign


def build_sparse(spark, cfg: Config, vurl: str, num_shards: int, assign=None, pid_shards=None) -> dict:
    """Build the version's sparse side on Spark; returns the manifest's ``sparse`` section.

    Passages reach their dense shard's task by ``assign`` (a function pid -> shard, broadcast
    with the tasks: hash sharding or the shards' pid intervals) or, when the shards' pids are not
    intervals, by a join with ``pid_shards`` (a DataFrame of pid, shard). Each shard task writes its
    inverted index and returns its local document frequencies, which Spark sums per term; one task
    writes the sorted vocabulary (its memory: the vocabulary, not the corpus)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from dpr_lib.spark import spark_schema

    t0 = time.time()
    opts, retries = cfg.storage_options(), cfg.publish.retries
    files = storage.list_files(cfg.path("passages"), ".parquet")
    if not files:
        raise InputError(f"no Passages files under {cfg.path('passages')}: the sparse side (index.sparse) "
                         "needs them; set index.sparse=false for a vectors-only version")
    passages = spark.read.parquet(*files).select("pid", "title", "text")
    if pid_shards is not None:
        passages = passages.join(pid_shards, "pid")

    def tokenize(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            pids = batch.column("pid").to_numpy().astype(np.int64)
            shards = (batch.column("shard").to_numpy().astype(np.int64) if assign is None else assign(pids))
            analyzed = analyze_passages(batch.column("title").to_pylist(), batch.column("text").to_pylist())
            rows = list(pack_docs(pids, shards, analyzed))
            if rows:
                yield pa.RecordBatch.from_pylist(rows, schema=DOCS)

    urls = {s: join_url(vurl, f"sparse-{s:05d}.bm25") for s in range(num_shards)}

    def build(pairs) -> Iterator[tuple]:
        parts: dict[int, list] = {}
        for shard, row in pairs:
            parts.setdefault(int(shard), []).append(row)
        for s, rows in parts.items():
            inv = inverted(*unpack_docs(rows))
            meta = write_array_file(shard_file(inv), shard_meta(s, inv), urls[s], opts, retries)
            df = np.diff(inv["offsets"]).astype(np.int64)
            result = {**meta, "shard": s, "docs": len(inv["pids"]), "terms": len(inv["terms"]),
                      "postings": len(inv["rows"]), "doc_len_sum": int(inv["doc_len"].astype(np.int64).sum())}
            yield s, json.dumps(result), inv["terms"].tobytes(), df.tobytes()

    docs = passages.mapInArrow(tokenize, spark_schema(DOCS))
    built = docs.rdd.map(lambda r: (r["shard"], r)).partitionBy(num_shards, lambda shard: shard).mapPartitions(build)
    built_df = spark.createDataFrame(built, spark_schema(SHARD_OUT)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        results = [json.loads(r["result"]) for r in built_df.select("result").collect()]
        n_docs = sum(r["docs"] for r in results)
        total_len = sum(r["doc_len_sum"] for r in results)
        vocab_url = join_url(vurl, VOCAB)

        def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                for t, d in zip(b.column("terms").to_pylist(), b.column("df").to_pylist()):
                    yield pa.RecordBatch.from_arrays([pa.array(np.frombuffer(t, np.int64)),
                                                      pa.array(np.frombuffer(d, np.int64))], names=["term", "df"])

        def write_vocab(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            terms, dfs = [], []
            for b in batches:
                terms.append(b.column("term").to_numpy())
                dfs.append(b.column("df").to_numpy())
            t = np.concatenate(terms) if terms else np.zeros(0, np.int64)
            d = np.concatenate(dfs) if dfs else np.zeros(0, np.int64)
            order = np.argsort(t)
            meta = write_array_file({"terms": t[order].astype(np.int64), "df": d[order].astype(np.int32)},
                               {"kind": "bm25-vocab", "analyzer": ANALYZER, "docs": n_docs}, vocab_url, opts, retries)
            yield pa.RecordBatch.from_pylist([{"result": json.dumps({**meta, "terms": int(len(t))})}], schema=VOCAB_OUT)

        vocab = json.loads(
            built_df.select("terms", "df").mapInArrow(explode, "term long, df long")
            .groupBy("term").agg(F.sum("df").alias("df")).repartition(1)
            .mapInArrow(write_vocab, spark_schema(VOCAB_OUT)).collect()[0]["result"])
    finally:
        built_df.unpersist()
    results.sort(key=lambda r: r["shard"])
    disk = vocab["bytes"] + sum(r["bytes"] for r in results)
    log.info("sparse: BM25 over %d passages in %d shards, %d terms, %.1f MB (%.1fs)", n_docs, len(results),
             vocab["terms"], disk / 1e6, time.time() - t0)
    return {"method": "bm25", "k1": K1, "b": B, "analyzer": ANALYZER, "docs": n_docs,
            "avg_doc_len": total_len / n_docs if n_docs else 0.0,
            "vocab": {**vocab, "path": relative_to(vocab["path"], vurl)},
            "shards": [{"index": r["shard"], "path": relative_to(r["path"], vurl), "bytes": r["bytes"],
                        "sha256": r["sha256"], "docs": r["docs"], "terms": r["terms"], "postings": r["postings"]}
                       for r in results],
            "disk_bytes_per_passage": round(disk / n_docs, 1) if n_docs else 0.0,
            "seconds": round(time.time() - t0, 2)}


def build_local(out_dir: str, pids: np.ndarray, texts: list[str], shard_of_pid=None, num_shards: int = 1) -> dict:
    """The same files as :func:`build_sparse`, in one process (a closed corpus: tests, small
    collections). ``texts`` are what is indexed (title + " " + text). Returns {vocab, shards,
    docs, avg_doc_len} with local paths."""
    pids = np.asarray(pids, np.int64)
    shards = shard_of_pid(pids) if shard_of_pid is not None else np.zeros(len(pids), np.int64)
    analyzed = analyze(texts)
    os.makedirs(out_dir, exist_ok=True)
    df_terms, df_counts, paths, total = [], [], [], 0
    for row in pack_docs(pids, shards, analyzed):
        inv = inverted(*unpack_docs([row]))
        path = os.path.join(out_dir, f"sparse-{row['shard']:05d}.bm25")
        ArrayFile.write(path, shard_file(inv), shard_meta(row["shard"], inv))
        paths.append(path)
        df_terms.append(inv["terms"])
        df_counts.append(np.diff(inv["offsets"]))
        total += int(inv["doc_len"].astype(np.int64).sum())
    terms = np.concatenate(df_terms) if df_terms else np.zeros(0, np.int64)
    counts = np.concatenate(df_counts) if df_counts else np.zeros(0, np.int64)
    uniq, inv_idx = np.unique(terms, return_inverse=True)
    vocab = os.path.join(out_dir, VOCAB)
    ArrayFile.write(vocab, {"terms": uniq, "df": np.bincount(inv_idx, counts, len(uniq)).astype(np.int32)},
                    {"kind": "bm25-vocab", "analyzer": ANALYZER, "docs": len(pids)})
    return {"vocab": vocab, "shards": paths, "docs": len(pids), "avg_doc_len": total / max(1, len(pids))}
