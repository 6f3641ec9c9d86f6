"""The nightly delta: a version = the previous version's segments + one delta segment of the new and
changed passages + tombstones for the changed and deleted pids (format and rules:
:mod:`dpr_lib.segments`), published through the same :class:`~dpr_lib.index.writer.VersionWriter`
as a full build. What a run writes grows with the change."""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np

from dpr_lib import accounting, storage
from dpr_lib import index_ops as ops
from dpr_lib.config import Config
from dpr_lib.errors import InputError
from dpr_lib.index.recall import RECALL_LISTS, RecallLists, base_nprobe, merge_lists, probe_queries, recall_of_lists
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
    with VersionWriter(spark, cfg, trained, shares_trained=prev) as w:
        lists = _read_lists(prev, prev_vurl, opts)
        if lists is None:
            shards, pieces, num_shards, docstore, recall = _delta_segment(w, prev, files if n else [], n)
            recall = {**prev.recall, "carried_from": prev.recall.get("carried_from", prev.version),
                      "delta_segment": {"vectors": sum(s.vectors for s in shards), **recall}}
            nprobe = prev.nprobe
        else:
            shards, pieces, num_shards, docstore, recall, nprobe = _measured_delta(w, prev, lists, files if n else [],
                                                                                   n, removed_pids)
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
            recall=recall, nprobe=nprobe,
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


class DeltaRecallMiss(Exception):
    """The version a delta would publish misses ``index.recall_target`` at every nprobe the rule
    allows, or its recall cannot be known: the delta is discarded and the nightly job compacts."""


LIST_CERTAIN_MIN = 0.9
"""A delta's recall is measured on the queries whose top k its merged lists know for certain; with
fewer than this fraction of them the figure is not trusted and the nightly job compacts."""


def _read_lists(prev: Manifest, prev_vurl: str, opts: dict) -> RecallLists | None:
    """The previous version's recall lists (None: a version without them, e.g. one with a re-rank
    store or written before them; its deltas carry its figures). A file that fails its checksum is
    an error naming it."""
    from dpr_lib.config import join_url
    from dpr_lib.errors import IndexIntegrityError

    entry = (prev.recall or {}).get("lists")
    if not entry:
        return None
    data = storage.read_bytes(join_url(prev_vurl, entry["path"]), opts)
    if storage.sha256_bytes(data) != entry["sha256"]:
        raise IndexIntegrityError(f"{join_url(prev_vurl, entry['path'])} does not match its sha256 in the manifest")
    return RecallLists.from_bytes(data)


def _measured_delta(w: VersionWriter, prev: Manifest, lists: RecallLists, files: list[str], n: int,
                    removed_pids: np.ndarray):
    """The delta's segment and the new version's own recall, measured in proportion to the change:
    the delta's shards answer the previous version's recall queries at every nprobe it swept, and
    those lists are merged with the previous version's minus the removed pids (:func:`merge_lists`).
    Below ``index.recall_target`` at the served nprobe, the rule (docs/operations/nightly.md):
    serve the smallest swept nprobe that reaches it, up to ``nightly.max_nprobe_growth`` x the nprobe
    of the last full build; else :class:`DeltaRecallMiss` (the nightly job compacts)."""
    icfg, queries, depth = w.cfg.index, lists.recall_queries(), lists.depth
    q, empty = len(queries.vectors), (np.full((len(queries.vectors), depth), -np.inf, np.float32),
                                       np.full((len(queries.vectors), depth), -1, np.int64))
    if n:
        num_shards = ops.shard_count(n, 1, icfg.max_vectors_per_shard)
        pieces = plan_pieces(file_layout(files), num_shards)
        shards = w.build_shards(files, num_shards, prev.dim, queries.vectors, depth, lists.nprobes, None, pieces)
        own = RecallLists.of_shards(shards, lists.nprobes, queries, depth)
    else:
        shards, pieces, num_shards = [], None, 0
        own = RecallLists(queries.vectors, queries.pids, queries.source, lists.nprobes, empty,
                          [empty] * len(lists.nprobes))
    dead = np.unique(np.asarray(removed_pids, np.int64))
    *exact, sure_e = merge_lists(lists.exact, dead, own.exact, depth)
    merged = [merge_lists(old, dead, new, depth) for old, new in zip(lists.hits, own.hits)]
    by_depth: dict[int, dict] = {}
    uncertain = {}
    for d in dict.fromkeys((icfg.recall_k, icfg.recall_report_k)):
        if d and queries.k_search(d) <= depth:
            for p, (s, i, sure) in zip(lists.nprobes, merged):
                r, unsure = recall_of_lists(exact, (s, i), queries.pids, d, np.minimum(sure_e, sure))
                by_depth.setdefault(d, {})[p] = r
                uncertain[(d, p)] = unsure
    k, target = icfg.recall_k, icfg.recall_target
    if k not in by_depth:
        raise DeltaRecallMiss(f"index.recall_k={k} is deeper than the recall lists of version {prev.version} "
                              f"({depth} hits per query)")
    nprobe = prev.nprobe
    base = base_nprobe(prev)
    limit = w.cfg.nightly.max_nprobe_growth * base
    unsure = uncertain[(k, nprobe)] if (k, nprobe) in uncertain else q
    if unsure > (1 - LIST_CERTAIN_MIN) * q:
        raise DeltaRecallMiss(f"the delta's recall cannot be measured: {unsure} of {q} recall queries lost too many "
                              "of their top hits to tombstones")
    at = by_depth[k].get(nprobe)
    rule = None
    if at is None or at < target:
        reaching = [] if icfg.nprobe else \
            [p for p in lists.nprobes if nprobe < p <= limit and (by_depth[k][p] or 0) >= target]
        if not reaching:
            raise DeltaRecallMiss(
                f"recall@{k} of the delta version is {at} at nprobe {nprobe}, below index.recall_target {target}, "
                + (f"and index.nprobe={icfg.nprobe} is forced" if icfg.nprobe else
                   f"and no nprobe up to {limit:g} (nightly.max_nprobe_growth x the base nprobe {base}) reaches it"))
        rule = f"recall@{k} {at} at nprobe {nprobe} < {target}: nprobe raised to {reaching[0]}"
        log.warning("delta: %s", rule)
        nprobe = reaching[0]
    new_lists = RecallLists(queries.vectors, queries.pids, queries.source, lists.nprobes,
                            (exact[0], exact[1]), [(s, i) for s, i, _ in merged])
    own_recall = recall_of_lists(own.exact, own.hits[lists.nprobes.index(prev.nprobe)], queries.pids, k)[0] \
        if n and prev.nprobe in lists.nprobes else None
    recall = {"k": k, "target": target, "queries": q, "query_source": prev.recall.get("query_source"),
              **({"questions_file": queries.source} if queries.source else {}),
              "by_nprobe": {str(p): r for p, r in by_depth[k].items()}, "at_nprobe": by_depth[k][nprobe],
              "reached_target": (by_depth[k][nprobe] or 0) >= target,
              "at_depth": {str(d): by[nprobe] for d, by in by_depth.items()},
              "by_nprobe_at_depth": {str(d): {str(p): r for p, r in by.items()} for d, by in by_depth.items() if d != k},
              "measured": "delta: the previous version's recall lists merged with the delta segment's",
              "uncertain_queries": unsure, "base_nprobe": base, "rule": rule,
              "lists": dataclasses.asdict(w.write_file(RECALL_LISTS, new_lists.to_bytes())),
              "delta_segment": {"vectors": sum(s.vectors for s in shards), "queries": q, "recall_at_nprobe": own_recall}}
    return shards, pieces, num_shards, w.docstore() if n else [], recall, nprobe


def _delta_segment(w: VersionWriter, prev: Manifest, files: list[str], n: int):
    """The delta's dense shards (none when nothing is new or changed: a segment of tombstones only)
    and docstore, for a previous version without recall lists. The shards answer a few of their own
    vectors: a check that they search, and the delta's own recall at the served nprobe (reported;
    the version serves prev's nprobe and carries its recall figures)."""
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
