"""Stage 5, search: the loader that search services use, and the ``dpr-search`` CLI.

Opens an index root (follows ``LATEST``) or one version's ``manifest.json`` from any fsspec URL,
fetches shards into a local cache keyed by sha256 (every file verified; a mismatch names the
file), loads them with FAISS (optionally memory-mapped), searches every loaded shard and merges
the per-shard top-k (exact, since all shards share one quantizer). Passage text comes from the
version's pid-sorted docstore, reading only the Parquet row groups that hold the wanted pids.

A node may load a subset of shards (``shards=[...]``); a broker then merges the nodes' partial
top-k lists with :func:`dpr_lib.index_ops.merge_topk`, exactly as this class merges its shards.

No pyspark import: a search service depends on dpr_lib without Spark.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from dpr_lib import storage
from dpr_lib.config import EncoderConfig, join_url
from dpr_lib.errors import DprError, IncompatibleIndexError, IndexIntegrityError, InputError, StorageError
from dpr_lib.fusion import fuse_runs, fusion_of
from dpr_lib.index_ops import ID_BYTES, code_size, merge_topk, rerank, set_nprobe
from dpr_lib.manifest import ShardEntry, open_manifest

log = logging.getLogger("dpr_lib.search")


@dataclass
class Hit:
    pid: int
    score: float
    doc_id: str
    title: str
    text: str


def _safe_relpath(rel: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or "://" in rel or ".." in parts or not rel:
        raise IndexIntegrityError(f"manifest names a file outside its version directory: {rel!r}")
    return rel


class ShardCache:
    """Local files named by their sha256: an entry is complete or absent. Several processes may fill
    one cache at once: each download goes to a temp file of its own, is verified, then renamed into
    place (a rename over an identical file is harmless). An entry present is trusted, its name being
    its checksum; ``verify=True`` re-hashes it on every use (and refetches it if it differs)."""

    def __init__(self, cache_dir: str, storage_options: dict | None = None, verify: bool = False):
        self.dir = os.path.join(cache_dir, "blobs")
        self.storage_options = storage_options
        self.verify = verify
        self.downloaded_bytes = 0
        """Bytes this cache object fetched from storage (entries already present cost nothing)."""
        self.downloaded_files = 0
        os.makedirs(self.dir, exist_ok=True)

    def fetch(self, url: str, sha256: str, suffix: str) -> str:
        if not isinstance(sha256, str) or len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise IndexIntegrityError(f"manifest entry for {url} has an invalid sha256 {sha256!r}")
        dest = os.path.join(self.dir, sha256 + suffix)
        if os.path.exists(dest):
            if not self.verify or storage.sha256_file(dest) == sha256:
                return dest
            log.warning("cache entry %s does not match its name: fetched again", dest)
            with contextlib.suppress(FileNotFoundError):
                os.remove(dest)  # a corrupted cache entry is refetched, never used
        if storage.is_local(url):
            src = storage.local_path(url)
            if not os.path.exists(src):
                raise IndexIntegrityError(f"{url} is listed in the manifest but missing")
        tmp = f"{dest}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        try:
            try:
                storage.download(url, tmp, self.storage_options)
            except FileNotFoundError:
                raise IndexIntegrityError(f"{url} is listed in the manifest but missing") from None
            except (OSError, StorageError) as exc:
                raise StorageError(f"cannot store {url} in the cache {self.dir}: {exc}") from exc
            got = storage.sha256_file(tmp)
            if got != sha256:
                raise IndexIntegrityError(f"{url} is corrupt: sha256 {got} does not match the manifest's {sha256}")
            size = os.path.getsize(tmp)
            os.replace(tmp, dest)
            self.downloaded_bytes += size
            self.downloaded_files += 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return dest


class ShardedIndex:
    """The shards of one version (or a subset), searchable as one index.

    A version made of segments (manifest format 3) is searched over every segment; a pid that the
    version's tombstones remove from a segment is never returned from it (a FAISS ID selector
    inside the IVF scan, so each shard still returns its k best live vectors). All segments
    share the quantizer, so the merged top-k equals that of one index holding the live vectors.

    ``reuse``: a loaded ShardedIndex (the version being replaced) whose loaded files this one
    shares by sha256 instead of loading them again: a swap to a version that adds a delta segment
    downloads and loads only the delta (and the small tombstone and vocabulary files)."""

    def __init__(self, index: str, cache_dir: str | None = None, shards: list[int] | None = None,
                 mmap: bool = False, nprobe: int | None = None, storage_options: dict | None = None,
                 k_factor: int | None = None, verify_cache: bool = False, docstore_cache_mb: float = 64,
                 sparse: bool = True, reuse: ShardedIndex | None = None, sparse_exact: bool = False):
        import faiss

        self.manifest, self.version_url = open_manifest(index, storage_options)
        self.version = self.manifest.version
        self.dim = self.manifest.dim
        self.cache = ShardCache(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dpr_lib"),
                                storage_options, verify_cache)
        segments = self.manifest.all_segments()
        if shards is not None:
            known = {e.index for seg in segments for e in seg.shards}
            unknown = sorted(set(shards) - known)
            if unknown:
                raise InputError(f"shards {unknown} are not in version {self.version} (it has {sorted(known)})")
        self.nprobe = int(nprobe or self.manifest.nprobe or 1)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        rerank = self.manifest.rerank
        self.k_factor = int(k_factor or (rerank or {}).get("k_factor") or 1) if rerank else 0
        self.tombstones = self._open_tombstones()
        shared = dict(reuse._loaded) if reuse is not None and reuse.dim == self.dim else {}
        self._loaded: dict[str, tuple] = {}  # shard sha256 -> (faiss index, re-rank store or None)
        self.shards, self.stores, self._selectors, self._segment_urls = [], [], [], []
        self.shard_seqs: list[int] = []  # the segment (seq) of each loaded shard
        self.reused_files = 0
        shard_filter = None if shards is None else set(shards)
        for seg in segments:
            surl = self.segment_url(seg.version)
            self._segment_urls.append((surl, seg))
            dead = self.dead_in(seg.seq)
            selector = _not_in(dead) if len(dead) else None
            for e in seg.shards:
                if shard_filter is not None and e.index not in shard_filter:
                    continue
                if e.sha256 in shared:
                    idx, store = shared[e.sha256]
                    self.reused_files += 1
                else:
                    idx = self._read_shard(surl, e, flags)
                    set_nprobe(idx, self.nprobe)  # the default of direct users of .shards; searches pass theirs
                    store = self._open_store(surl, e, idx.ntotal) if rerank else None
                self._loaded[e.sha256] = (idx, store)
                self.shards.append(idx)
                if rerank:
                    self.stores.append(store)
                self._selectors.append(selector)
                self.shard_seqs.append(seg.seq)
        stored = sum(s.ntotal for s in self.shards)
        # Live vectors: the manifest's count for a whole version (tombstoned rows excluded); a
        # shard subset counts its stored rows.
        self.ntotal = int(self.manifest.totals.get("vectors", stored)) if shards is None else stored
        self.sparse = self._open_sparse(shard_filter, sparse_exact) if sparse and self.manifest.sparse else None
        self._docstore = [(surl, sorted(seg.docstore, key=lambda d: d.min_pid))
                          for surl, seg in reversed(self._segment_urls)]  # newest first: a pid's live text
        self._docstore_files: dict[str, object] = {}
        self._docstore_lock = threading.Lock()  # lookups may come from several service threads
        self.docstore_cache_bytes = int(docstore_cache_mb * 2**20)
        self._groups: OrderedDict = OrderedDict()
        self._groups_bytes = 0
        log.info("loaded version %s: %d segment(s), %d shards, %d live vectors, nprobe %d%s", self.version,
                 len(segments), len(self.shards), self.ntotal, self.nprobe,
                 f", {self.reused_files} shard(s) shared with version {reuse.version}" if self.reused_files else "")

    def prefetch_docstore(self) -> int:
        """Fetch every docstore file into the cache now (a service does, before it swaps: no first
        request pays a download). Returns the files fetched or found."""
        n = 0
        for surl, entries in self._docstore:
            for e in entries:
                self.cache.fetch(join_url(surl, _safe_relpath(e.path)), e.sha256, ".parquet")
                n += 1
        return n

    def segment_url(self, version: str) -> str:
        """The directory of the version that wrote a segment (a sibling of this version's)."""
        if version == self.version:
            return self.version_url
        from dpr_lib.manifest import version_url

        return version_url(self.version_url.rstrip("/").rsplit("/", 2)[0], version)

    def _open_tombstones(self) -> tuple[np.ndarray, np.ndarray]:
        """(pids sorted, seq) of the version's tombstones; empty without any."""
        t = self.manifest.tombstones
        if not t:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        local = self.cache.fetch(join_url(self.version_url, _safe_relpath(t["path"])), t["sha256"], ".npy")
        try:
            arr = np.load(local, allow_pickle=False)
        except ValueError as exc:
            raise IndexIntegrityError(f"tombstones of version {self.version} are not a plain .npy array: {exc}") from None
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype != np.int64 or len(arr) != int(t.get("count", len(arr))):
            raise IndexIntegrityError(f"tombstones of version {self.version} have shape {arr.shape} {arr.dtype}, "
                                      f"expected [{t.get('count')}, 2] int64")
        return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])

    def dead_in(self, seq: int) -> np.ndarray:
        """Pids removed from the segment with this seq (tombstoned by a later segment)."""
        pids, seqs = self.tombstones
        return pids[seqs > seq]

    def _read_shard(self, surl: str, e: ShardEntry, flags: int):
        import faiss

        path = self.cache.fetch(join_url(surl, _safe_relpath(e.path)), e.sha256, ".faiss")
        try:
            idx = faiss.read_index(path, flags)
        except RuntimeError as exc:
            wrote = (self.manifest.software or {}).get("faiss")
            why = str(exc).strip().splitlines()[-1][:300]
            if wrote and wrote != faiss.__version__:
                raise IncompatibleIndexError(
                    f"shard {e.path} was written by FAISS {wrote}; this FAISS {faiss.__version__} cannot read it "
                    f"({why}). Install faiss-cpu=={wrote} where the index is searched, or rebuild the version "
                    "with this FAISS") from None
            raise IndexIntegrityError(f"shard {e.path} cannot be read by FAISS {faiss.__version__}: {why}") from None
        if idx.d != self.dim:
            raise IncompatibleIndexError(f"shard {e.path} has dimension {idx.d}, manifest says {self.dim}")
        return idx

    def _open_sparse(self, shard_filter: set[int] | None, exact: bool = False):
        """The BM25 side of the loaded shards, over every segment (tombstoned pids masked):
        verified, memory-mapped; statistics are the live corpus's."""
        from dpr_lib.sparse import SparseIndex

        sp = self.manifest.sparse

        def fetch(url: str, entry: dict) -> str:
            return self.cache.fetch(join_url(url, _safe_relpath(entry["path"])), entry["sha256"], ".bm25")

        try:
            paths, dead = [], []
            for surl, seg in self._segment_urls:
                for e in seg.sparse_shards:
                    if shard_filter is None or e["index"] in shard_filter:
                        paths.append(fetch(surl, e))
                        dead.append(self.dead_in(seg.seq))
            return SparseIndex(fetch(self.version_url, sp["vocab"]), paths, sp["docs"], sp["avg_doc_len"],
                               sp.get("k1", 1.5), sp.get("b", 0.75), dead=dead, exact=exact)
        except (KeyError, TypeError) as exc:
            raise IndexIntegrityError(f"version {self.version}: the manifest's sparse section is incomplete ({exc})") from None

    def require_sparse(self):
        """The sparse side, or a readable refusal when the version (or this load) has none."""
        if self.sparse is None:
            raise InputError(f"version {self.version} has no sparse side (built with index.sparse=false, or "
                             "loaded without it): only mode 'dense' is available")
        return self.sparse

    def search_sparse(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 top-k of the loaded shards' passages (global statistics: merges across nodes are exact)."""
        return self.require_sparse().search(questions, k)

    def _open_store(self, surl: str, entry: ShardEntry, ntotal: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's re-rank store, verified and memory-mapped read-only (``.npy``, no pickle)."""
        store = entry.rerank or {}
        if set(store) != {"pids", "vectors"}:
            raise IndexIntegrityError(f"shard {entry.path}: the manifest lists no complete re-rank store")
        local = {part: self.cache.fetch(join_url(surl, _safe_relpath(meta.path)), meta.sha256,
                                        f".{part}.npy") for part, meta in store.items()}
        try:
            pids = np.load(local["pids"], mmap_mode="r", allow_pickle=False)
            vecs = np.load(local["vectors"], mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise IndexIntegrityError(f"re-rank store of {entry.path} is not a plain .npy array: {exc}") from None
        if pids.dtype != np.int64 or vecs.ndim != 2 or vecs.shape != (len(pids), self.dim) or len(pids) != ntotal:
            raise IndexIntegrityError(
                f"re-rank store of {entry.path} does not match its shard: pids {pids.dtype} {pids.shape}, "
                f"vectors {vecs.dtype} {vecs.shape}, shard has {ntotal} vectors of d={self.dim}")
        return pids, vecs

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the loaded shards. queries: float32 [n, d] -> (scores float32 [n, k], pids int64 [n, k]);
        pid -1 marks a missing hit when fewer than k vectors are loaded. With a re-rank store, each
        shard's top k x k_factor candidates are re-scored exactly from the memory-mapped vectors."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries must have shape [n, {self.dim}], got {list(q.shape)}")
        results = []
        for i, shard in enumerate(self.shards):
            params = _search_params(shard, self.nprobe, self._selectors[i])
            if self.stores:
                pids, vecs = self.stores[i]
                results.append(rerank(q, shard.search(q, k * self.k_factor, params=params)[1], pids, vecs, k))
            else:
                results.append(shard.search(q, k, params=params))
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def memory(self) -> dict:
        """Bytes held: codes + ids of the FAISS shards in RAM, and the mapped re-rank stores on disk."""
        ram = sum((code_size(s) + ID_BYTES) * s.ntotal for s in self.shards)
        disk = sum(p.nbytes + v.nbytes for p, v in self.stores)
        out = {"codes_and_ids_bytes": int(ram), "rerank_store_bytes": int(disk), "vectors": int(self.ntotal)}
        if self.sparse is not None:
            out["sparse_mapped_bytes"] = self.sparse.memory()["sparse_bytes"]
        return out

    def lookup(self, pids) -> dict[int, dict]:
        """{pid: {doc_id, title, text}} for the given pids, reading only the row groups that hold them."""

        wanted = sorted({int(p) for p in pids if int(p) >= 0})
        out: dict[int, dict] = {}
        with self._docstore_lock:
            for surl, entries in self._docstore:  # newest segment first: the live text of a changed pid
                starts = [d.min_pid for d in entries]
                by_file: dict[int, list[int]] = {}
                for pid in wanted:
                    i = bisect.bisect_right(starts, pid) - 1
                    if i >= 0 and pid <= entries[i].max_pid:
                        by_file.setdefault(i, []).append(pid)
                self._read_docstore(surl, entries, by_file, out)
                wanted = [p for p in wanted if p not in out]
                if not wanted:
                    break
        return out

    def _read_docstore(self, surl: str, entries, by_file: dict[int, list[int]], out: dict[int, dict]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for i, file_pids in by_file.items():
            entry = entries[i]
            # (local path, footer): the file is opened only to read a row group missing from the
            # LRU, then closed, so a service holding many segments keeps no descriptor per file.
            known = self._docstore_files.get(entry.sha256)
            if known is None:
                local = self.cache.fetch(join_url(surl, _safe_relpath(entry.path)), entry.sha256, ".parquet")
                known = self._docstore_files[entry.sha256] = (local, pq.read_metadata(local))
            local, meta = known
            tables = []
            for g in range(meta.num_row_groups):
                st = meta.row_group(g).column(0).statistics
                lo, hi = (st.min, st.max) if st is not None and st.has_min_max else (None, None)
                if lo is None or any(lo <= p <= hi for p in file_pids):
                    tables.append(self._row_group(local, meta, entry.sha256, g))
            table = pa.concat_tables(tables)
            # Only the wanted rows become Python objects (a row group holds publish.docstore_row_group rows).
            hit = table.filter(pc.is_in(table.column("pid"), value_set=pa.array(file_pids, type=pa.int64())))
            for row in hit.to_pylist():
                out[row["pid"]] = {"doc_id": row["doc_id"], "title": row["title"], "text": row["text"]}

    def _row_group(self, local: str, meta, path: str, group: int):
        """A decoded docstore row group, from a bounded LRU (``docstore_cache_bytes``): decompressing
        a whole row group for ten hits was most of a lookup; hot groups are read once."""
        key = (path, group)
        table = self._groups.get(key)
        if table is not None:
            self._groups.move_to_end(key)
            return table
        import pyarrow.parquet as pq

        with pq.ParquetFile(local, metadata=meta) as pf:
            table = pf.read_row_group(group, columns=["pid", "doc_id", "title", "text"])
        if table.nbytes <= self.docstore_cache_bytes:
            self._groups[key] = table
            self._groups_bytes += table.nbytes
            while self._groups_bytes > self.docstore_cache_bytes:
                _, old = self._groups.popitem(last=False)
                self._groups_bytes -= old.nbytes
        return table


def _not_in(pids: np.ndarray):
    """A FAISS selector of every id except ``pids`` (the selector it wraps is kept alive with it)."""
    import faiss

    ids = np.ascontiguousarray(pids, dtype=np.int64)
    batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    sel = faiss.IDSelectorNot(batch)
    sel.referenced = batch  # the C++ object holds a raw pointer to it
    return sel


def _search_params(index, nprobe: int, selector):
    """Per-call search parameters: the IVF's nprobe (shards shared between two loaded versions may
    serve different nprobes) and the tombstone selector, if any."""
    import faiss

    if faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
    elif selector is None:
        return None
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


MODES = ("dense", "bm25", "hybrid")
class Searcher:
    """Questions in, passages out: the question encoder of the manifest + a ShardedIndex."""

    def __init__(self, index: str, encoder_cfg: EncoderConfig | None = None, cache_dir: str | None = None,
                 shards: list[int] | None = None, mmap: bool = False, nprobe: int | None = None,
                 storage_options: dict | None = None, max_k: int = 1000, k_factor: int | None = None,
                 verify_cache: bool = False, docstore_cache_mb: float = 64, mode: str = "auto",
                 reuse: ShardedIndex | None = None, sparse_exact: bool = False):
        """``reuse``: the ShardedIndex of the version being replaced (see :class:`ShardedIndex`)."""
        from dpr_lib.encoder import get_encoder, resolve_spec

        if mode not in MODES + ("auto",):
            raise InputError(f"mode must be one of {', '.join(MODES + ('auto',))}, got {mode!r}")
        self.index = ShardedIndex(index, cache_dir, shards, mmap, nprobe, storage_options, k_factor, verify_cache,
                                  docstore_cache_mb, sparse=mode != "dense", reuse=reuse, sparse_exact=sparse_exact)
        self.max_k = max_k
        self.fusion = fusion_of(self.index.manifest)
        self.mode = self.fusion.get("mode", "hybrid") if mode == "auto" and self.index.sparse else \
            ("dense" if mode == "auto" else mode)
        if self.mode != "dense" and self.index.sparse is None:
            self.index.require_sparse()
        expected = self.index.manifest.question_encoder or self.index.manifest.encoder or {}
        # The question prompt and the dimensions come from the version (keys left to auto).
        spec = resolve_spec(encoder_cfg or EncoderConfig(), cache_dir or self.index.cache.dir, role="question",
                            storage_options=storage_options, recorded=expected)
        got = spec.fingerprint()
        if expected.get("id") != got["id"]:
            differ = sorted(k for k in set(expected) | set(got) if k not in ("id", "note", "chosen_by")
                            and expected.get(k) != got.get(k))
            raise IncompatibleIndexError(
                f"the configured question encoder ({got['model_id']}, fingerprint {got['id']}) is not the one "
                f"this index was built for ({expected.get('model_id')}, fingerprint {expected.get('id')}); they differ "
                f"in {', '.join(differ)}: set encoder.model / encoder.question_model (and encoder.query_prompt, "
                "encoder.dimensions, encoder.pooling if set) to match the manifest")
        self.encoder = get_encoder(spec)

    def retrieve(self, questions: list[str], k: int, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], pids int64 [q, k]; -1 = no hit) in ``mode`` (default: this
        searcher's). hybrid: each side's top k x fetch_k_factor, fused as the manifest says."""
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "bm25":
            return self.index.search_sparse(questions, k)
        fetch = k * int(self.fusion.get("fetch_k_factor", 1)) if mode == "hybrid" else k
        if mode == "hybrid":
            sparse = self.index.search_sparse(questions, fetch)  # refuses before encoding when absent
        dense = self.index.search(self.encoder.encode(None, questions), fetch)
        if mode == "dense":
            return dense
        return fuse_runs(self.fusion, sparse, dense, k)

    def ask(self, questions: list[str], k: int = 10, mode: str | None = None) -> list[list[Hit]]:
        if not isinstance(k, int) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if k > self.max_k:
            raise InputError(f"k must be <= {self.max_k} (search.max_k), got {k}")
        bad = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
        if bad:
            raise InputError(f"empty question(s) at position {bad}")
        if not questions:
            return []
        scores, pids = self.retrieve([q.strip() for q in questions], k, mode)
        docs = self.index.lookup(pids.ravel())
        results = []
        for srow, prow in zip(scores, pids):
            hits = []
            for s, p in zip(srow, prow):
                if p < 0:
                    continue
                d = docs.get(int(p), {"doc_id": "", "title": "", "text": ""})
                hits.append(Hit(int(p), float(s), d["doc_id"], d["title"], d["text"]))
            results.append(hits)
        return results


def format_hits(question: str, hits: list[Hit], width: int = 100) -> str:
    lines = [f"Q: {question}"]
    for rank, h in enumerate(hits, 1):
        snippet = h.text if len(h.text) <= width else h.text[: width - 1] + "…"
        lines.append(f"  {rank:>2}. [{h.score:.3f}] {h.title}  (pid {h.pid})\n      {snippet}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dataclasses import asdict

    from dpr_lib.cli import base_parser, parse_shards, setup_logging
    from dpr_lib.config import load_config

    parser = base_parser("Search a published DPR index.", prog="dpr-search", default_conf=None)
    parser.add_argument("questions", nargs="+", help="one or more questions")
    parser.add_argument("--index", required=True, help="index root (reads LATEST) or a manifest.json URL")
    parser.add_argument("-k", type=int, default=10, help="hits per question (default 10)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--nprobe", type=int, default=0, help="override the manifest's nprobe")
    parser.add_argument("--shards", default="", help="comma-separated shard numbers to load (default: all)")
    parser.add_argument("--mmap", action="store_true", help="memory-map shards")
    parser.add_argument("--k-factor", type=int, default=0, help="override the manifest's re-rank factor")
    parser.add_argument("--mode", choices=MODES + ("auto",), default=None,
                        help="dense, bm25, hybrid, or auto: what the version recommends (default search.mode)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger("dpr_lib").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.conf, args.overrides)
        storage.use_options(cfg.storage_options())
        searcher = Searcher(args.index, cfg.encoder, cfg.path("cache_dir"), parse_shards(args.shards),
                            args.mmap or cfg.search.mmap, args.nprobe or cfg.search.nprobe or None,
                            cfg.storage_options(), cfg.search.max_k, args.k_factor or cfg.search.k_factor or None,
                            cfg.search.verify_cache, cfg.search.docstore_cache_mb, args.mode or cfg.search.mode,
                            sparse_exact=cfg.search.sparse_exact)
        results = searcher.ask(args.questions, args.k)
    except DprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"version": searcher.index.version, "mode": searcher.mode, "results": [
            {"question": q, "hits": [asdict(h) for h in hits]} for q, hits in zip(args.questions, results)]},
            indent=2))
    else:
        print(f"index version {searcher.index.version} ({searcher.index.ntotal} passages, mode {searcher.mode})")
        for q, hits in zip(args.questions, results):
            print(format_hits(q, hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
