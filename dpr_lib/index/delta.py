"""The nightly delta: a version = the previous version's segments + one delta segment of the new and
changed passages + tombstones for the changed and deleted pids (format and rules:
:mod:`dpr_lib.segments`), published through the same :class:`~dpr_lib.index.writer.VersionWriter`
as a full build. What a run writes grows with the change."""

from __future__ import annotations

import io
import logging

import numpy as np

from dpr_lib import accounting, storage
from dpr_lib import index_ops as ops
from dpr_lib.config import Config
from dpr_lib.errors import InputError
from dpr_lib.index.recall import probe_queries
from dpr_lib.index.shards import file_layout, plan_pieces
from dpr_lib.index.writer import VersionWriter
from dpr_lib.manifest import Manifest, relative_to
from dpr_lib.segments import TOMBSTONES, add_tombstones, garbage, merge_vocab, read_tombstones, removed_statistics

log = logging.getLogger("dpr_lib.index")


def build_delta(spark, cfg: Config, prev: Manifest, prev_vurl: str, trained: bytes, removed_pids: np.ndarray,
                removed_df, counts: dict, extra: dict, reason: str, validation=None, force: bool = False) -> Manifest:
    """Publish a version = ``prev``'s segments + one delta segment of the Embeddings files under
    ``cfg.paths.embeddings`` (the new and changed passages; their Passages rows under
    ``cfg.paths.passages``) + tombstones for ``removed_pids`` (changed and deleted pids;
    ``removed_df`` their previous Passages rows, for the sparse statistics). The quality gate and
    LATEST work as for a full build."""
    from dpr_lib.encode import check_embeddings
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    opts = cfg.storage_options()
    emb = cfg.path("embeddings")
    files = storage.list_files(emb, ".parquet") if storage.exists(emb, opts) else []
    n = check_embeddings(files, prev.encoder)[1] if files else 0
    seq = max(seg.seq for seg in prev.all_segments()) + 1
    with VersionWriter(spark, cfg, trained) as w:
        shards, pieces, num_shards, docstore, recall = _delta_segment(w, prev, files if n else [], n)
        sparse = _delta_sparse(w, prev, prev_vurl, shards, pieces, num_shards, n, removed_pids, removed_df) \
            if prev.sparse else None
        with w.timed("tombstones"):
            tomb = add_tombstones(read_tombstones(prev, prev_vurl, opts), removed_pids, seq)
            buf = io.BytesIO()
            np.save(buf, tomb, allow_pickle=False)
            tomb_file = w.write_file(TOMBSTONES, buf.getvalue())
        delta_vectors = sum(s.vectors for s in shards)
        live = int(prev.totals.get("vectors", 0)) + delta_vectors - len(removed_pids)
        ledger = accounting.check({**counts, "embeddings": live, "vectors": live, "passages": counts["corpus_passages"],
                                   **({"docstore_rows": int(prev.totals.get("docstore_rows", 0))
                                       + sum(d.rows for d in docstore) - len(removed_pids)}
                                      if cfg.publish.docstore else {})}, "nightly delta")
        manifest = w.delta_manifest(
            prev, shards, docstore, seq, live, ledger["counts"].get("docstore_rows") or 0,
            sparse=sparse,
            tombstones={"path": tomb_file.path, "bytes": tomb_file.bytes, "sha256": tomb_file.sha256,
                        "count": int(len(tomb))},
            quantizer={"reused": True, "from_version": prev.version, "reason": "delta segment"},
            recall={**prev.recall, "carried_from": prev.recall.get("carried_from", prev.version),
                    "delta_segment": {"vectors": delta_vectors, **recall}},
            counts={"embeddings": live, "vectors_published": live, "delta_vectors": delta_vectors,
                    "removed": len(removed_pids)},
            accounting=ledger,
            source={"passages": cfg.path("passages"), "embeddings": cfg.path("embeddings")},
            extra={k: v for k, v in extra.items() if k not in Manifest.field_names()})
        if sparse:
            manifest.memory = {**manifest.memory, "sparse_disk_bytes_per_passage": sparse["disk_bytes_per_passage"]}
        g = garbage(manifest)
        manifest.compaction = {"kind": "delta", "reason": reason, "segment_seq": seq, **g,
                               "garbage_ratio": round((g["tombstones"] + g["delta_vectors"]) / max(1, live), 4)}
        return w.publish(manifest, validation, force,
                         {"kind": "delta", "delta_vectors": delta_vectors, "tombstones": len(tomb)},
                         f"delta segment {seq} of {delta_vectors} vectors, {len(tomb)} tombstones, {live} live vectors")


def _delta_segment(w: VersionWriter, prev: Manifest, files: list[str], n: int):
    """The delta's dense shards (none when nothing is new or changed: a segment of tombstones only)
    and docstore. The shards answer a few of their own vectors: a check that they search, and the
    delta's own recall at the served nprobe (reported; the version serves prev's nprobe)."""
    if not n:
        return [], None, 0, [], {"queries": 0, "recall_at_nprobe": None}
    icfg = w.cfg.index
    num_shards = ops.shard_count(n, 1, icfg.max_vectors_per_shard)
    layout = file_layout(files)
    pieces = plan_pieces(layout, num_shards)
    queries = probe_queries(layout, prev.dim, min(n, 256))
    kf = int(prev.k_factor or 1)
    shards = w.build_shards(files, num_shards, prev.dim, queries, icfg.recall_k, [prev.nprobe],
                            [kf] if prev.rerank else None, pieces)
    k = min(icfg.recall_k, n)
    _, exact = ops.merge_topk([s.exact_scores for s in shards], [s.exact_ids for s in shards], k)
    hits = [s.hits(0, 0) for s in shards]
    _, found = ops.merge_topk([h[0] for h in hits], [h[1] for h in hits], k)
    recall = {"queries": int(len(queries)), "recall_at_nprobe": round(ops.recall_at_k(found, exact), 4)}
    return shards, pieces, num_shards, w.docstore(), recall


def _delta_sparse(w: VersionWriter, prev: Manifest, prev_vurl: str, shards, pieces, num_shards: int, n: int,
                  removed_pids: np.ndarray, removed_df) -> dict:
    """The delta's BM25 shards, and the corpus-wide statistics updated by adding the delta's and
    subtracting the removed passages' (tokenised from the previous Passages), so BM25 scores equal
    those of a full rebuild."""
    from dpr_lib.config import join_url
    from dpr_lib.spark import task_errors
    from dpr_lib.sparse import VOCAB

    delta = w.sparse(shards, pieces, num_shards) if n else {"docs": 0, "avg_doc_len": 0.0, "shards": [],
                                                            "seconds": 0.0}
    with w.timed("sparse"):
        with task_errors():
            removed = removed_statistics(w.spark, removed_df)
        if removed["docs"] != len(removed_pids):
            raise InputError(f"{len(removed_pids)} pids are removed but {removed['docs']} of their previous "
                             "Passages rows were found: the previous run's Passages table changed")
        vocab = merge_vocab(join_url(prev_vurl, prev.sparse["vocab"]["path"]), w.url(VOCAB) if n else None,
                            removed, w.url(VOCAB), w.opts, w.retries)
    docs = int(prev.sparse["docs"]) + int(delta["docs"]) - removed["docs"]
    length = (float(prev.sparse["avg_doc_len"]) * int(prev.sparse["docs"])
              + float(delta["avg_doc_len"]) * int(delta["docs"]) - removed["length"])
    all_shards = [e for seg in prev.all_segments() for e in seg.sparse_shards] + delta["shards"]
    disk = vocab["bytes"] + sum(int(e["bytes"]) for e in all_shards)
    return {**prev.sparse, "docs": docs, "avg_doc_len": length / docs if docs else 0.0,
            "vocab": {**vocab, "path": relative_to(vocab["path"], w.vurl)}, "shards": delta["shards"],
            "disk_bytes_per_passage": round(disk / docs, 1) if docs else 0.0, "seconds": delta["seconds"]}
