"""Delta segments: the format and rules of a nightly change as one small immutable segment plus
tombstones (published by :mod:`dpr_lib.index.delta`).

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

import io
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.errors import InputError
from dpr_lib.manifest import Manifest

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

    from dpr_lib.bm25 import analyze_passages

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
    from dpr_lib.bm25 import ANALYZER
    from dpr_lib.sparse import ArrayFile, write_array_file

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
    meta = write_array_file({"terms": uniq[keep], "df": df[keep].astype(np.int32)}, {"kind": "bm25-vocab", "analyzer": ANALYZER},
                       out_url, opts, retries)
    return {**meta, "terms": int(keep.sum())}
