"""Delta segments: publish a nightly change as one small immutable segment plus tombstones.

A version built here references every segment of the previous version (their files stay where
they were written) and adds one segment of its own, holding only the new and changed passages,
with the previous version's trained quantizer (so scores merge exactly: each vector has the codes
a full rebuild with that quantizer would give it). The pids it removes from earlier segments
(changed or deleted passages) go into the version's tombstones: ``tombstones.npy``, rows of
(pid, seq), meaning "pid is dead in every segment older than seq". The tombstone file is
cumulative (one row per pid, the latest seq), so a reader needs only the version's own.

The sparse side follows: the delta's BM25 shards are built like a full version's, and the
corpus-wide statistics (document count, average length, document frequencies) are updated by
adding the delta's and subtracting the removed passages' (tokenised from the previous Passages),
so BM25 scores equal those of a full rebuild.

What a run writes to the index storage grows with the change: the delta's shards, re-rank
stores, docstore and sparse shards, the tombstones, the (small) vocabulary and the manifest.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import gate, storage
from dpr_lib import index_ops as ops
from dpr_lib.config import Config, join_url
from dpr_lib.errors import InputError
from dpr_lib.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    new_version_id,
    relative_to,
    software_versions,
    version_url,
)

log = logging.getLogger("dpr_lib.segments")

TOMBSTONES = "tombstones.npy"


def read_tombstones(manifest: Manifest, vurl: str, storage_options: dict | None = None) -> np.ndarray:
    """A version's tombstones as [n, 2] int64 (pid, seq), sorted by pid; empty without any."""
    t = manifest.tombstones
    if not t:
        return np.zeros((0, 2), np.int64)
    arr = np.load(io.BytesIO(storage.read_bytes(join_url(vurl, t["path"]), storage_options)), allow_pickle=False)
    return arr.astype(np.int64).reshape(-1, 2)


def add_tombstones(old: np.ndarray, pids: np.ndarray, seq: int) -> np.ndarray:
    """``old`` with ``pids`` tombstoned at ``seq`` (a pid already there takes the later seq)."""
    new = np.stack([np.asarray(pids, np.int64), np.full(len(pids), seq, np.int64)], axis=1)
    both = np.concatenate([old.reshape(-1, 2), new])
    order = np.lexsort((-both[:, 1], both[:, 0]))  # by pid, latest seq first
    both = both[order]
    keep = np.ones(len(both), bool)
    keep[1:] = both[1:, 0] != both[:-1, 0]
    return np.ascontiguousarray(both[keep])


def garbage(manifest: Manifest) -> dict:
    """What a version carries beyond a fresh build: tombstoned rows and vectors in delta segments."""
    deltas = sum(seg.vectors for seg in manifest.all_segments() if seg.seq > 0)
    tombstones = int((manifest.tombstones or {}).get("count", 0))
    return {"tombstones": tombstones, "delta_vectors": deltas}


def removed_statistics(spark, removed_df) -> dict:
    """Document frequencies, count and total length of the removed passages (the previous
    Passages rows of changed and deleted pids), tokenised as the sparse side indexes them.
    Collected to the driver: its size follows the change, not the corpus."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from dpr_lib.sparse import analyze_passages

    schema = pa.schema([(name, pa.int64()) for name in ("term", "df", "docs", "length")])

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            analyzed = analyze_passages(b.column("title").to_pylist(), b.column("text").to_pylist())
            flat = np.concatenate([h for h, _, _ in analyzed]) if analyzed else np.zeros(0, np.int64)
            zeros = np.zeros(len(flat), np.int64)
            yield pa.RecordBatch.from_arrays([pa.array(flat), pa.array(zeros + 1), pa.array(zeros), pa.array(zeros)],
                                             schema=schema)
            # One row without a term per batch: its document count and token total.
            yield pa.RecordBatch.from_pylist([{"term": None, "df": 0, "docs": len(analyzed),
                                               "length": int(sum(a[2] for a in analyzed))}], schema=schema)

    tokens = removed_df.select("title", "text").mapInArrow(run, "term long, df long, docs long, length long") \
        .persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows = tokens.where(F.col("term").isNotNull()).groupBy("term").agg(F.sum("df").alias("df")).collect()
        agg = tokens.where(F.col("term").isNull()).agg(F.sum("docs").alias("docs"),
                                                       F.sum("length").alias("length")).first()
    finally:
        tokens.unpersist()
    return {"terms": np.array([r["term"] for r in rows], np.int64), "df": np.array([r["df"] for r in rows], np.int64),
            "docs": int(agg["docs"] or 0), "length": int(agg["length"] or 0)}


def merge_vocab(old_url: str, delta_url: str | None, removed: dict, out_url: str, opts: dict, retries: int) -> dict:
    """The corpus-wide vocabulary after the change: old df + delta df - removed df (terms left
    with df 0 dropped), written to ``out_url``. Held on the driver: the vocabulary, not the corpus."""
    from dpr_lib.sparse import ANALYZER, ArrayFile, _write_file

    def load(url: str) -> tuple[np.ndarray, np.ndarray]:
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".bm25", prefix="dpr-vocab-")
        os.close(fd)
        try:
            storage.download(url, tmp, opts)
            f = ArrayFile(tmp, mmap=False)
            return np.array(f["terms"], np.int64), np.array(f["df"], np.int64)
        finally:
            os.remove(tmp)

    (ot, od) = load(old_url)
    dt_, dd = load(delta_url) if delta_url else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    terms = np.concatenate([ot, dt_, removed["terms"]])
    dfs = np.concatenate([od, dd, -removed["df"]])
    uniq, inv = np.unique(terms, return_inverse=True)
    df = np.bincount(inv, dfs, len(uniq)).round().astype(np.int64)
    if (df < 0).any():
        raise InputError("the sparse vocabulary would get negative document frequencies: the removed passages "
                         "are not those the previous version indexed (its Passages table changed?)")
    keep = df > 0
    meta = _write_file({"terms": uniq[keep], "df": df[keep].astype(np.int32)}, {"kind": "bm25-vocab", "analyzer": ANALYZER},
                       out_url, opts, retries)
    return {**meta, "terms": int(keep.sum())}


def build_delta(spark, cfg: Config, prev: Manifest, prev_vurl: str, trained: bytes, removed_pids: np.ndarray,
                removed_df, counts: dict, extra: dict, reason: str, validation=None, force: bool = False) -> Manifest:
    """Publish a version = ``prev``'s segments + one delta segment of the Embeddings files under
    ``cfg.paths.embeddings`` (the new and changed passages; their Passages rows under
    ``cfg.paths.passages``) + tombstones for ``removed_pids`` (changed and deleted pids;
    ``removed_df`` their previous Passages rows, for the sparse statistics). The quality gate and
    LATEST work as for a full build (``dpr_lib.index``)."""
    from dpr_lib import accounting
    from dpr_lib.encode import check_embeddings
    from dpr_lib.index import (
        _quality_gate,
        build_shards,
        discard_unpublished,
        file_layout,
        plan_pieces,
        sparse_assignment,
    )
    from dpr_lib.outputs import write_stats
    from dpr_lib.publish import publish_version, write_docstore
    from dpr_lib.spark import bind_storage, task_errors

    bind_storage(spark, cfg)
    t0 = time.time()
    timings: dict[str, float] = {}
    icfg, root, opts, retries = cfg.index, cfg.path("index_root"), cfg.storage_options(), cfg.publish.retries
    emb = cfg.path("embeddings")
    files = storage.list_files(emb, ".parquet") if storage.exists(emb, opts) else []
    n = check_embeddings(files, prev.encoder)[1] if files else 0
    if n == 0:
        files = []  # nothing new or changed: a segment of tombstones only
    dim = prev.dim
    seq = max(seg.seq for seg in prev.all_segments()) + 1
    version = new_version_id()
    vurl = version_url(root, version)
    try:
        storage.write_bytes_atomic(join_url(vurl, "trained.faiss"), trained, opts, retries)
        shards, docstore, delta_recall, queries = [], [], None, np.zeros((0, dim), np.float32)
        if n:
            num_shards = ops.shard_count(n, 1, icfg.max_vectors_per_shard)
            layout = file_layout(files)
            pieces = plan_pieces(layout, num_shards)
            kf = int(prev.k_factor or 1)
            # The delta's shards answer a few of their own vectors: a check that they search, and the
            # delta's own recall at the served nprobe (reported; the version serves prev's nprobe).
            queries = _probe_queries(layout, dim, min(n, 256))
            t = time.time()
            with task_errors():
                shards = build_shards(spark, files, trained, num_shards, dim,
                                      lambda s: join_url(vurl, f"shard-{s:05d}.faiss"), queries, icfg.recall_k,
                                      [prev.nprobe], icfg.add_batch, opts, retries,
                                      [kf] if prev.rerank else None, pieces)
            timings["add_write"] = time.time() - t
            k = min(icfg.recall_k, n)
            _, exact = ops.merge_topk([s["exact_scores"] for s in shards], [s["exact_ids"] for s in shards], k)
            _, found = ops.merge_topk([s["hit_scores"][0][0] for s in shards], [s["hit_ids"][0][0] for s in shards], k)
            delta_recall = round(ops.recall_at_k(found, exact), 4)
            t = time.time()
            if cfg.publish.docstore:
                with task_errors():
                    docstore = write_docstore(spark, cfg, vurl)
            timings["docstore"] = time.time() - t
        sparse = None
        if prev.sparse:
            t = time.time()
            from dpr_lib.sparse import VOCAB, build_sparse

            with task_errors():
                delta_sparse = build_sparse(spark, cfg, vurl, num_shards,
                                            **sparse_assignment(shards, pieces, num_shards, spark)) if n else \
                    {"docs": 0, "avg_doc_len": 0.0, "shards": [], "seconds": 0.0}
                removed = removed_statistics(spark, removed_df)
            if removed["docs"] != len(removed_pids):
                raise InputError(f"{len(removed_pids)} pids are removed but {removed['docs']} of their previous "
                                 "Passages rows were found: the previous run's Passages table changed")
            vocab = merge_vocab(join_url(prev_vurl, prev.sparse["vocab"]["path"]), join_url(vurl, VOCAB) if n else None,
                                removed, join_url(vurl, VOCAB), opts, retries)
            docs = int(prev.sparse["docs"]) + int(delta_sparse["docs"]) - removed["docs"]
            length = (float(prev.sparse["avg_doc_len"]) * int(prev.sparse["docs"])
                      + float(delta_sparse["avg_doc_len"]) * int(delta_sparse["docs"]) - removed["length"])
            all_shards = [e for seg in prev.all_segments() for e in seg.sparse_shards] + delta_sparse["shards"]
            disk = vocab["bytes"] + sum(int(e["bytes"]) for e in all_shards)
            sparse = {**prev.sparse, "docs": docs, "avg_doc_len": length / docs if docs else 0.0,
                      "vocab": {**vocab, "path": relative_to(vocab["path"], vurl)}, "shards": delta_sparse["shards"],
                      "disk_bytes_per_passage": round(disk / docs, 1) if docs else 0.0,
                      "seconds": delta_sparse["seconds"]}
            timings["sparse"] = time.time() - t

        t = time.time()
        tomb = add_tombstones(read_tombstones(prev, prev_vurl, opts), removed_pids, seq)
        buf = io.BytesIO()
        np.save(buf, tomb, allow_pickle=False)
        data = buf.getvalue()
        storage.write_bytes_atomic(join_url(vurl, TOMBSTONES), data, opts, retries)
        timings["tombstones"] = time.time() - t

        delta_vectors = sum(s["vectors"] for s in shards)
        live = int(prev.totals.get("vectors", 0)) + delta_vectors - len(removed_pids)
        ledger = accounting.check({**counts, "embeddings": live, "vectors": live, "passages": counts["corpus_passages"],
                                   **({"docstore_rows": int(prev.totals.get("docstore_rows", 0))
                                       + sum(d.rows for d in docstore) - len(removed_pids)}
                                      if cfg.publish.docstore else {})}, "nightly delta")
        manifest = copy.deepcopy(prev)
        manifest.version = version
        manifest.created = Manifest.__dataclass_fields__["created"].default_factory()
        manifest.segments = [*prev.segments, prev.own_segment()]
        manifest.segment_seq = seq
        manifest.shards = [ShardEntry(index=s["shard"], path=relative_to(s["path"], vurl), vectors=s["vectors"],
                                      bytes=s["bytes"], sha256=s["sha256"], task_peak_rss=s["peak_rss"],
                                      rerank={part: FileEntry(relative_to(m["path"], vurl), m["bytes"], m["sha256"])
                                              for part, m in s["rerank"].items()} if s["rerank"] else None)
                           for s in shards]
        manifest.docstore = docstore
        manifest.sparse = sparse
        manifest.tombstones = {"path": TOMBSTONES, "bytes": len(data), "sha256": storage.sha256_bytes(data),
                               "count": int(len(tomb))}
        manifest.trained = FileEntry("trained.faiss", len(trained), storage.sha256_bytes(trained))
        manifest.quantizer = {"reused": True, "from_version": prev.version, "reason": "delta segment"}
        manifest.training = None
        all_segs = manifest.all_segments()
        manifest.totals = {"vectors": live, "shards": sum(len(g.shards) for g in all_segs),
                           "segments": len(all_segs),
                           "bytes": sum(e.bytes for g in all_segs for e in g.shards),
                           "rerank_bytes": sum(f.bytes for g in all_segs for e in g.shards for f in (e.rerank or {}).values()),
                           "docstore_rows": ledger["counts"].get("docstore_rows") or 0}
        if sparse:
            manifest.memory = {**manifest.memory, "sparse_disk_bytes_per_passage": sparse["disk_bytes_per_passage"]}
        manifest.recall = {**prev.recall, "carried_from": prev.recall.get("carried_from", prev.version),
                           "delta_segment": {"vectors": delta_vectors, "queries": int(len(queries)),
                                             "recall_at_nprobe": delta_recall}}
        manifest.counts = {"embeddings": live, "vectors_published": live, "delta_vectors": delta_vectors,
                           "removed": len(removed_pids)}
        manifest.accounting = ledger
        manifest.source = {"passages": cfg.path("passages"), "embeddings": cfg.path("embeddings")}
        manifest.validation, manifest.gate = {}, {}
        manifest.software = software_versions()
        manifest.extra = {k: v for k, v in extra.items() if k not in Manifest.field_names()}
        g = garbage(manifest)
        manifest.compaction = {"kind": "delta", "reason": reason, "segment_seq": seq, **g,
                               "garbage_ratio": round((g["tombstones"] + g["delta_vectors"]) / max(1, live), 4)}
        manifest.timings = {k: round(v, 3) for k, v in timings.items()}
        _quality_gate(cfg, root, vurl, manifest, validation, force)
        removed_versions = publish_version(root, vurl, manifest, opts, retries, cfg.publish.keep_versions)
    except gate.QualityGateError:
        raise  # a complete version, kept and marked rejected for inspection
    except BaseException:
        discard_unpublished(vurl, opts)
        raise
    manifest.timings["total"] = round(time.time() - t0, 3)
    write_stats(cfg, "build_index", {"stage": "build_index", "version": version, "kind": "delta",
                                     "removed_versions": removed_versions, "delta_vectors": delta_vectors,
                                     "tombstones": len(tomb), "timings": manifest.timings})
    log.info("published version %s: delta segment %d of %d vectors, %d tombstones, %d live vectors (%.1fs)",
             version, seq, delta_vectors, len(tomb), live, manifest.timings["total"])
    return manifest


def _probe_queries(layout: list[dict], dim: int, n: int) -> np.ndarray:
    """The first ``n`` vectors of the delta's files (read from the driver: a few hundred rows)."""
    import pyarrow.parquet as pq

    from dpr_lib.index_ops import vectors_of

    out = []
    for f in layout:
        fs, path = storage.get_fs(f["path"])
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=n, columns=["vector"]):
                out.append(vectors_of(batch, dim))
                break
        if sum(len(o) for o in out) >= n:
            break
    q = np.concatenate(out)[:n] if out else np.zeros((1, dim), np.float32)
    return np.ascontiguousarray(q, np.float32)
