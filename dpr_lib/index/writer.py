"""The version writer: the one path by which a version reaches the index storage.

A full build (:mod:`dpr_lib.index.job`) and a nightly delta (:mod:`dpr_lib.index.delta`) both plan
their shards, then hand the rest to a :class:`VersionWriter`, which owns:

- the version's directory (``<index_root>/versions/<id>/``) and its removal if anything fails
  before LATEST names it (a version the quality gate refuses is kept, marked rejected);
- the trained quantizer file (a delta shares its base's file instead: ``shares_trained``), the
  shards (built on executors) and their manifest entries: nothing else makes a
  :class:`~dpr_lib.manifest.ShardEntry`;
- the docstore and the sparse side's shards;
- the manifest's shared sections (version, created, trained, shards, docstore, software, totals,
  timings), the quality gate, the publish (manifest, then LATEST) and the stage's stats.

Use::

    with VersionWriter(spark, cfg, trained, timings) as w:
        results = w.build_shards(...)
        manifest = w.full_manifest(results, ...)      # or w.delta_manifest(prev, results, ...)
        w.publish(manifest, validation, force, stats, summary)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

from dpr_lib import gate, storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import StorageError
from dpr_lib.index.shards import ShardResult, build_shards, sparse_assignment
from dpr_lib.manifest import (
    MANIFEST,
    TRAINED,
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

log = logging.getLogger("dpr_lib.index")


class StaleQuantizer(Exception):
    """A reused quantizer no longer serves this corpus: the version is discarded and the caller
    retrains (an explicit step, see :func:`dpr_lib.index.job.build_index`)."""


def discard_unpublished(vurl: str, opts: dict) -> None:
    """Remove a version that failed before LATEST named it (best effort: nothing of it may linger)."""
    try:
        fs, vpath = storage.get_fs(vurl, opts)
        if fs.exists(vpath):
            fs.rm(vpath, recursive=True)
    except Exception:  # noqa: BLE001
        log.warning("could not remove the incomplete version %s", vurl)


class VersionWriter:
    """Writes one version; see the module's docstring. ``timings``: stages already timed by the
    caller (sample, train, ...), continued here. ``shares_trained``: the manifest whose quantizer
    file ``trained`` is (a delta's previous version): the new version references that file instead
    of writing a copy, which at IVF65536 x 768 is ~200 MB a night."""

    def __init__(self, spark, cfg: Config, trained: bytes, timings: dict | None = None, t0: float | None = None,
                 shares_trained: Manifest | None = None):
        self.spark, self.cfg, self.trained = spark, cfg, trained
        self.shared = shares_trained
        self.root, self.opts, self.retries = cfg.path("index_root"), cfg.storage_options(), cfg.publish.retries
        self.version = new_version_id()
        self.vurl = version_url(self.root, self.version)
        self.timings: dict[str, float] = dict(timings or {})
        self.t0 = time.time() if t0 is None else t0

    # ------------------------------------------------------------ lifetime

    def __enter__(self) -> VersionWriter:
        try:
            if self.shared is None:  # also the first write: an index_root we cannot write fails here
                storage.write_bytes_atomic(self.url(TRAINED), self.trained, self.opts, self.retries)
        except StorageError as exc:
            discard_unpublished(self.vurl, self.opts)
            raise StorageError(f"cannot write to index_root {self.root}: {exc}") from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not issubclass(exc_type, gate.QualityGateError):
            discard_unpublished(self.vurl, self.opts)  # a refused version stays, marked rejected
        return False

    def url(self, *parts: str) -> str:
        return join_url(self.vurl, *parts)

    @contextlib.contextmanager
    def timed(self, stage: str):
        t = time.time()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.time() - t

    # ------------------------------------------------------------ the version's files

    def build_shards(self, source, num_shards: int, dim: int, queries, k: int, nprobes: list[int],
                     k_factors: list | None, pieces=None, stop_recall: float | tuple = 1.0) -> list[ShardResult]:
        """The shards on executors (:func:`~dpr_lib.index.shards.build_shards`), written into this version."""
        from dpr_lib.spark import task_errors

        with self.timed("add_write"), task_errors():
            return build_shards(self.spark, source, self.trained, num_shards, dim,
                                lambda s: self.url(f"shard-{s:05d}.faiss"), queries, k, nprobes,
                                self.cfg.index.add_batch, self.opts, self.retries, k_factors, pieces, stop_recall)

    def shard_entries(self, results: list[ShardResult]) -> list[ShardEntry]:
        return [ShardEntry(index=s.shard, path=relative_to(s.path, self.vurl), vectors=s.vectors, bytes=s.bytes,
                           sha256=s.sha256, task_peak_rss=s.peak_rss,
                           rerank={part: FileEntry(relative_to(m["path"], self.vurl), m["bytes"], m["sha256"])
                                   for part, m in s.rerank.items()} if s.rerank else None)
                for s in results]

    def docstore(self) -> list:
        """The docstore of ``cfg.paths.passages`` (``publish.docstore``), else []."""
        from dpr_lib.publish import write_docstore
        from dpr_lib.spark import task_errors

        if not self.cfg.publish.docstore:
            return []
        with self.timed("docstore"), task_errors():
            return write_docstore(self.spark, self.cfg, self.vurl)

    def sparse(self, results: list[ShardResult], pieces, num_shards: int) -> dict:
        """BM25 shards of ``cfg.paths.passages``, aligned with the dense shards (and this set's statistics)."""
        from dpr_lib.spark import task_errors
        from dpr_lib.sparse import build_sparse

        with self.timed("sparse"), task_errors():
            return build_sparse(self.spark, self.cfg, self.vurl, num_shards,
                                **sparse_assignment(results, pieces, num_shards, self.spark))

    def write_file(self, name: str, data: bytes) -> FileEntry:
        storage.write_bytes_atomic(self.url(name), data, self.opts, self.retries)
        return FileEntry(name, len(data), storage.sha256_bytes(data))

    # ------------------------------------------------------------ the manifest

    def _own(self, manifest: Manifest, results: list[ShardResult], docstore: list) -> Manifest:
        manifest.version = self.version
        manifest.created = Manifest.__dataclass_fields__["created"].default_factory()
        if self.shared is None:
            manifest.trained = FileEntry(TRAINED, len(self.trained), storage.sha256_bytes(self.trained))
            manifest.trained_version = ""
        else:
            manifest.trained = copy.copy(self.shared.trained)
            manifest.trained_version = self.shared.trained_holder()
        manifest.shards = self.shard_entries(results)
        manifest.docstore = docstore
        manifest.software = software_versions()
        return manifest

    @staticmethod
    def totals(manifest: Manifest, live_vectors: int, docstore_rows: int) -> dict:
        segs = manifest.all_segments()
        out = {"vectors": live_vectors, "shards": sum(len(g.shards) for g in segs),
               "bytes": sum(e.bytes for g in segs for e in g.shards),
               "rerank_bytes": sum(f.bytes for g in segs for e in g.shards for f in (e.rerank or {}).values()),
               "docstore_rows": docstore_rows}
        if manifest.segments:
            out["segments"] = len(segs)
        return out

    def full_manifest(self, results: list[ShardResult], docstore: list, **fields) -> Manifest:
        """A version of its own shards only (a full build); ``fields``: the build's sections."""
        vectors = sum(s.vectors for s in results)
        manifest = self._own(Manifest(version=self.version, trained=None, shards=[], **fields), results, docstore)
        manifest.totals = self.totals(manifest, vectors, sum(d.rows for d in docstore))
        return manifest

    def delta_manifest(self, prev: Manifest, results: list[ShardResult], docstore: list, seq: int,
                       live_vectors: int, docstore_rows: int, **fields) -> Manifest:
        """``prev``'s segments plus this version's own (a delta); ``fields`` override prev's sections."""
        manifest = copy.deepcopy(prev)
        manifest.segments = [*prev.segments, prev.own_segment()]
        manifest.segment_seq = seq
        self._own(manifest, results, docstore)
        manifest.training = None
        manifest.validation, manifest.gate = {}, {}
        for key, value in fields.items():
            setattr(manifest, key, value)
        manifest.totals = self.totals(manifest, live_vectors, docstore_rows)
        return manifest

    # ------------------------------------------------------------ gate and publish

    def quality_gate(self, manifest: Manifest, validation: gate.Validation | None, force: bool) -> None:
        """Measure the complete version on the validation questions (its manifest written, LATEST
        not yet moved), compare with what LATEST's manifest recorded; refuse a regression unless forced."""
        cfg, opts, retries, root = self.cfg, self.opts, self.retries, self.root
        if not validation:
            return
        write_manifest(self.vurl, manifest, opts, retries)  # complete, searchable by its manifest, not published
        manifest.validation, fusion = gate.validate_version(cfg, self.url(MANIFEST), validation)
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
            write_manifest(self.vurl, manifest, opts, retries)
            gate.reject(self.vurl, reason, opts, retries)
            raise gate.QualityGateError(
                f"version {manifest.version} was built but not published: {reason}. LATEST still names "
                f"{previous_version or 'nothing'}; the version is kept in {self.vurl} (rejected.json). "
                "Rerun with --force to publish it anyway")
        if reason:
            log.warning("quality gate overridden by --force: %s", reason)

    def publish(self, manifest: Manifest, validation: gate.Validation | None, force: bool, stats: dict,
                summary: str) -> Manifest:
        """Gate, then publish (manifest, LATEST, old versions pruned), then the stage's stats and
        the log line (``summary`` gets the total seconds appended)."""
        from dpr_lib.outputs import write_stats
        from dpr_lib.publish import publish_version

        manifest.timings = {k: round(v, 3) for k, v in self.timings.items()}
        self.quality_gate(manifest, validation, force)
        removed = publish_version(self.root, self.vurl, manifest, self.opts, self.retries,
                                  self.cfg.publish.keep_versions)
        manifest.timings["total"] = round(time.time() - self.t0, 3)
        write_stats(self.cfg, "build_index", {"stage": "build_index", "version": self.version,
                                              "index_root": self.root, "removed_versions": removed, **stats,
                                              "timings": manifest.timings})
        log.info("published version %s to %s: %s (%.1fs)", self.version, self.root, summary,
                 manifest.timings["total"])
        return manifest
