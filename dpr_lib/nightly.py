"""Nightly incremental reindexing: re-encode only what changed, reuse the quantizer while it serves.

A run:
1. takes the lock ``<index_root>/_lock`` (same storage as the index; a lock older than
   ``nightly.stale_lock_s`` is taken over);
2. shards the new corpus snapshot into ``<work_dir>/runs/<run>/passages``;
3. diffs it against the last successful run's Passages by pid and content_hash
   (new / changed / unchanged / deleted) and stops if the snapshot shrank by more than
   ``nightly.max_shrink`` (unless forced);
4. encodes only new and changed passages; unchanged ones reuse their embedding when it was made
   by the same encoder fingerprint;
5. publishes a version. With the previous version's quantizer still usable it publishes a
   **delta**: one new segment of the new and changed passages plus tombstones for the changed and
   deleted pids, referencing the earlier segments (``dpr_lib.segments``): what it writes and what a
   search node downloads follow the change. It **compacts** instead (a fresh full version,
   re-sharding every vector) on ``--compact``, when tombstones plus delta vectors would exceed
   ``nightly.compact_ratio`` of the corpus, or when the settings of the sides changed; and it
   retrains the quantizer when the encoder changed, the vector count grew past
   ``nightly.retrain_growth``, or (at a full build) the reused quantizer needs more than
   ``nightly.max_nprobe_growth`` x the previous version's nprobe to reach the recall target.
   The manifest's ``compaction`` says which and why;
6. records the run as the new baseline (``<work_dir>/state/last_success.json``) and releases the lock.

Stages (:class:`NightlyRun`: ``shard``, ``diff``, ``encode``, ``publish``) are idempotent and
recorded in ``<work_dir>/runs/<run>/state.json`` by :class:`Stages`: a failed run is resumed by the
next one from the stages it finished. The Spark tables it reads and writes are
:mod:`dpr_lib.changes`; a version is published through :mod:`dpr_lib.index`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
import uuid

from dpr_lib import backends, encoder_choice, storage
from dpr_lib.changes import (
    diff_passages,
    full_passages,
    live_passages,
    merge_embeddings,
    passages_chain,
    read_changes,
    run_passages,
)
from dpr_lib.config import Config, join_url
from dpr_lib.errors import DprError, InputError

log = logging.getLogger("dpr_lib.nightly")


class LockError(DprError):
    """Another run holds the lock."""

    exit_code = 8


# ---------------------------------------------------------------- lock

class RunLock:
    """One nightly run at a time per index root: a lock object created only if absent (S3 PUT
    If-None-Match: *; link(2) on local paths). A lock older than ``stale_s`` was left by a dead run
    and is taken over by replacing exactly the object that was read (If-Match: its ETag), so of
    several runs that find it stale, one wins. Release deletes the lock only if it is still ours."""

    def __init__(self, root: str, stale_s: float, storage_options: dict | None = None):
        self.url = join_url(root, "_lock")
        self.stale_s = stale_s
        self.opts = storage_options
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "since": time.time()}).encode()

    def acquire(self) -> None:
        try:
            if storage.create_exclusive(self.url, self._body(), self.opts):
                return
            current = storage.read_tagged(self.url, self.opts)
            if current is None:  # released between the two calls: one more exclusive create
                if storage.create_exclusive(self.url, self._body(), self.opts):
                    return
                raise LockError(f"lost the race for {self.url} to another run")
        except storage.ConditionalWriteUnsupported as exc:
            raise LockError(f"cannot lock {self.url}: {exc}. Run the nightly job with nightly.lock=false "
                            "only if your scheduler never starts two runs at once") from None
        data, tag = current
        try:
            held = json.loads(data)
        except ValueError:
            held = {"since": 0, "owner": "unreadable"}
        if held.get("owner") == self.owner:  # our create was retried after it had landed
            return
        age = time.time() - float(held.get("since", 0))
        if age < self.stale_s:
            raise LockError(f"another run ({held.get('owner')}) holds {self.url} since {age:.0f}s; "
                            f"it is considered stale after nightly.stale_lock_s={self.stale_s:.0f}s")
        if not storage.replace_if(self.url, self._body(), tag, self.opts):
            raise LockError(f"lost the race to take over the stale lock {self.url} to another run")
        log.warning("took over a stale lock of %s (%.0fs old)", held.get("owner"), age)

    def release(self) -> None:
        current = storage.read_tagged(self.url, self.opts)
        if current is None:
            return
        try:
            owner = json.loads(current[0]).get("owner")
        except ValueError:
            return
        if owner == self.owner and not storage.delete_if(self.url, current[1], self.opts):
            log.warning("the lock %s changed hands before this run released it", self.url)


# ---------------------------------------------------------------- state

def read_json(url: str) -> dict | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def write_json(url: str, doc: dict) -> None:
    """Atomically (a reader sees the old document or the new one, never a part)."""
    storage.write_bytes_atomic(url, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


class Stages:
    """A small resumable stage runner: ``run(name, fn)`` returns the recorded result of a stage an
    earlier attempt finished, else runs ``fn`` and records its result, then writes the whole state
    atomically. A stage that raises is not recorded, so the next attempt runs it again."""

    def __init__(self, url: str, state: dict):
        self.url, self.state = url, state
        state.setdefault("done", [])
        state.setdefault("seconds", {})

    def run(self, name: str, fn):
        if name in self.state["done"]:
            return self.state.get(name)
        t = time.time()
        result = fn()
        self.state[name] = result
        self.state["done"].append(name)
        self.state["seconds"][name] = round(time.time() - t, 2)
        self.save()
        return result

    def save(self) -> None:
        write_json(self.url, self.state)


def resume_key(cfg: Config, fingerprint_id: str, changes: str | None = None) -> str:
    """What a resumed run must share with the failed one: the same snapshot (or change set) files
    (name, size, mtime), passage settings and encoder. Otherwise a new run starts."""
    import hashlib

    source = changes or cfg.corpus.input
    parts = [fingerprint_id, str(cfg.corpus.words), str(cfg.corpus.overlap), source, "changes" if changes else ""]
    if source and not source.startswith("table:"):
        fs, path = storage.get_fs(source)
        if fs.exists(path):
            for f in storage.list_files(source):
                info = fs.info(storage.get_fs(f)[1])
                parts.append(f"{f}:{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def unfinished_run(cfg: Config, key: str) -> dict | None:
    """The state of the newest run that did not publish, if it was for the same snapshot (to resume it)."""
    runs = join_url(cfg.path("work_dir"), "runs")
    fs, path = storage.get_fs(runs)
    if not fs.exists(path):
        return None
    for name in sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)), reverse=True):
        state = read_json(join_url(runs, name, "state.json"))
        if state and not state.get("published"):
            return state if state.get("key") == key else None
        if state and state.get("published"):
            return None
    return None


def baseline_url(cfg: Config) -> str:
    """The last successful run's record: what the next run diffs against and reuses."""
    return join_url(cfg.path("work_dir"), "state", "last_success.json")


def record_baseline(cfg: Config, run: str, passages, passages_count: int, embeddings: list[str], fingerprint: dict,
                    version: str) -> dict:
    """Make a run the baseline of the next: its Passages (one table URL, or a chain [{url, seq}]),
    their count, its Embeddings tables, the encoder fingerprint and the version it published.
    Also how a baseline built outside the nightly job (a backfill) is adopted."""
    doc = {"run": run, "passages": passages, "passages_count": passages_count, "embeddings": list(embeddings),
           "fingerprint": fingerprint, "version": version}
    write_json(baseline_url(cfg), doc)
    return doc


def corpus_counts(stats: dict) -> dict:
    """The corpus stage's counts a run keeps (its stats hold more)."""
    return {k: stats[k] for k in ("passages", "rejects", "docs", "input_records")}


def run_paths(cfg: Config, run_dir: str, **paths) -> Config:
    """``cfg`` with a run's stage paths (passages, rejects, embeddings, stats) under ``run_dir``."""
    import copy

    out = copy.deepcopy(cfg)
    out.paths.passages = paths.get("passages", join_url(run_dir, "passages"))
    out.paths.rejects = join_url(run_dir, "rejects")
    out.paths.embeddings = paths.get("embeddings", join_url(run_dir, "embeddings"))
    out.paths.stats = join_url(run_dir, "stats")
    return out


def tables(urls) -> list[str]:
    """A baseline's Embeddings: one table URL (older runs, full builds) or the list of a delta chain."""
    return [urls] if isinstance(urls, str) else list(urls)


def compaction_reason(cfg: Config, prev, diff: dict, passages: int, compact: bool) -> str | None:
    """Why this run must publish a full version although the quantizer of ``prev`` (the previous
    version's manifest) could be reused; None: a delta."""
    from dpr_lib.segments import garbage

    if compact:
        return "--compact"
    had_docstore = any(seg.docstore for seg in prev.all_segments())
    if bool(prev.sparse) != cfg.sparse_enabled() or had_docstore != bool(cfg.publish.docstore):
        return "the sparse side or the docstore was switched on or off since the previous version"
    g = garbage(prev)
    removed, added = diff["changed"] + diff["deleted"], diff["new"] + diff["changed"]
    ratio = (g["tombstones"] + removed + g["delta_vectors"] + added) / max(1, passages)
    if ratio > cfg.nightly.compact_ratio:
        return (f"tombstones and delta vectors would be {ratio:.1%} of the corpus "
                f"(> nightly.compact_ratio={cfg.nightly.compact_ratio:g})")
    return None


def _baseline_tombstones(cfg: Config, baseline: dict):
    """The tombstones of the version the baseline published ([n, 2] int64 (pid, seq))."""
    from dpr_lib.manifest import MANIFEST, read_manifest, version_url
    from dpr_lib.segments import read_tombstones

    vurl = version_url(cfg.path("index_root"), baseline["version"])
    opts = cfg.storage_options()
    return read_tombstones(read_manifest(join_url(vurl, MANIFEST), opts), vurl, opts)


def prune_runs(cfg: Config, keep: int, current: str, needed: list[str] = ()) -> None:
    """Remove run directories beyond the newest ``keep``, except those holding an Embeddings table
    of the current baseline (a delta chain references earlier runs' tables)."""
    runs = join_url(cfg.path("work_dir"), "runs")
    fs, path = storage.get_fs(runs)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    referenced = {u.split("/runs/", 1)[1].split("/", 1)[0] for u in needed if "/runs/" in u}
    for name in names[:-keep]:
        if name != current and name not in referenced:
            fs.rm(f"{path}/{name}", recursive=True)


# ---------------------------------------------------------------- the run

def run_nightly(spark, cfg: Config, force: bool = False, compact: bool = False, changes: str | None = None) -> dict:
    """One scheduled run. Returns the run report (also written to <run>/report.json).
    ``compact``: publish a fresh full version (no delta segment) whatever the garbage ratio.
    ``changes`` (or ``nightly.changes``): a change set (documents upserted, ids deleted) applied to
    the previous run instead of reading a full snapshot: only those documents are split and diffed."""
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    t0 = time.time()
    root, opts = cfg.path("index_root"), cfg.storage_options()
    lock = RunLock(root, cfg.nightly.stale_lock_s, opts) if cfg.nightly.lock else None
    if lock:
        lock.acquire()
    else:
        log.warning("nightly.lock=false: nothing stops a second run on %s from starting now", root)
    try:
        run = NightlyRun(spark, cfg, force, compact, changes or cfg.nightly.changes or None)
        run.run()
    finally:
        if lock:
            lock.release()
    return run.report(t0)


class NightlyRun:
    """One run's stages, in order: :meth:`shard`, :meth:`diff`, :meth:`encode`, :meth:`publish`
    (each recorded by :class:`Stages`, so a failed run resumes after its last finished stage), then
    :meth:`finish` (the new baseline, old runs pruned)."""

    def __init__(self, spark, cfg: Config, force: bool, compact: bool, changes: str | None):
        from dpr_lib.encoder import resolve_spec
        from dpr_lib.gate import read_validation_questions
        from dpr_lib.index import encode_recall_questions

        self.spark, self.force, self.compact, self.changes = spark, force, compact, changes
        # Read (and encode) once, before any stage: a bad file fails now, not after the encode stage.
        self.questions = encode_recall_questions(cfg) if cfg.index.recall_questions else None
        self.validation = read_validation_questions(cfg) if cfg.index.validation_questions else None
        # encoder.backend=auto: the choice recorded by an earlier run (kept night after night); on
        # the first run it is made after the shard stage, on this snapshot's passages.
        self.cfg = cfg = encoder_choice.resolve(cfg, missing_ok=True)
        spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), storage_options=cfg.storage_options())
        # The key names the configured encoder: an export made by this run does not change it.
        key = resume_key(cfg, spec.fingerprint_id(), changes)
        self.spec = backends.attach(cfg, spec)
        state = unfinished_run(cfg, key)
        if state:
            log.info("resuming run %s from stage(s) done: %s", state["run"], state["done"])
        else:
            run = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
            state = {"run": run, "key": key, "done": [], "seconds": {}, "published": False}
        self.run_dir = join_url(cfg.path("work_dir"), "runs", state["run"])
        self.stages = Stages(join_url(self.run_dir, "state.json"), state)
        self.baseline = read_json(baseline_url(cfg))
        self.run_cfg = run_paths(cfg, self.run_dir)
        self._fingerprint(self.spec.fingerprint())
        if changes and not self.baseline:
            raise InputError("nightly.changes: a change set applies to a previous run; run once on a full snapshot "
                             "(corpus.input) first")
        if changes and not self.same_encoder:
            raise InputError("nightly.changes: the encoder changed since the previous run, so every passage must be "
                             "encoded again; run on a full snapshot (corpus.input) instead of a change set")
        self.chain = passages_chain(self.baseline) if self.baseline else []
        self.tombstones = _baseline_tombstones(cfg, self.baseline) if len(self.chain) > 1 else None

    @property
    def state(self) -> dict:
        return self.stages.state

    def _fingerprint(self, fingerprint: dict) -> None:
        self.fingerprint = fingerprint
        self.same_encoder = bool(self.baseline) and self.baseline["fingerprint"]["id"] == fingerprint["id"]

    def run(self) -> None:
        self.corpus = self.stages.run("shard", self.shard)
        self.choose_encoder()
        self.diff = self.stages.run("diff", lambda: diff_passages(self.spark, self.run_cfg.path("passages"),
                                                                  self.old_live()))
        # Passages after this run: the snapshot's, or with a change set the previous count plus the diff.
        self.total = self.baseline["passages_count"] + self.diff["new"] - self.diff["deleted"] if self.changes \
            else self.corpus["passages"]
        self.check_shrink()
        self.encoded = self.stages.run("encode", self.encode)
        self.published = self.stages.run("publish", self.publish)
        self.finish()

    def old_live(self):
        """The previous live Passages; with a change set, only the rows of the documents it names."""
        if not self.baseline:
            return None
        old = live_passages(self.spark, self.chain, self.tombstones)
        if self.changes:
            from pyspark.sql import functions as F

            ids = self.spark.read.parquet(join_url(self.run_dir, "changes", "affected")).select("doc_id")
            old = old.join(F.broadcast(ids), "doc_id", "left_semi")
        return old

    # ------------------------------------------------------------ stages

    def shard(self) -> dict:
        from dpr_lib.corpus import shard_corpus

        if not self.changes:
            return corpus_counts(shard_corpus(self.spark, self.run_cfg))
        upserts, deletes = read_changes(self.spark, self.changes)
        affected = upserts.select(upserts["id"].alias("doc_id")).unionByName(deletes).distinct()
        affected.write.mode("overwrite").parquet(join_url(self.run_dir, "changes", "affected"))
        out = corpus_counts(shard_corpus(self.spark, self.run_cfg, df=upserts))
        out["deleted_docs"] = deletes.count()
        return out

    def choose_encoder(self) -> None:
        """The first run with this encoder.backend: chosen (auto) and exported now (int8 calibrated
        on this snapshot's passages), then kept in <work_dir>/encoders for every later night."""
        from dpr_lib.encoder_choice import passage_spec

        if self.cfg.encoder.backend == "auto" or (self.spec.backend != "torch" and not self.spec.artifact_sha256):
            passages = self.run_cfg.path("passages")
            self.cfg = encoder_choice.resolve(self.cfg, build=True, passages_url=passages)
            self.spec = passage_spec(self.cfg, build=True, passages_url=passages)
            self._fingerprint(self.spec.fingerprint())

    def check_shrink(self) -> None:
        if not self.baseline or self.force or self.changes:
            return
        before, after = self.baseline["passages_count"], self.corpus["passages"]
        if after < (1 - self.cfg.nightly.max_shrink) * before:
            raise InputError(
                f"the snapshot shrank from {before} to {after} passages (more than nightly.max_shrink="
                f"{self.cfg.nightly.max_shrink:.0%}): likely a broken export; nothing was published. Rerun with "
                "--force to publish it anyway")

    def encode(self) -> dict:
        from dpr_lib.encode import encode_passages

        spark, run_dir = self.spark, self.run_dir
        passages = spark.read.parquet(storage.resolve_table(self.run_cfg.path("passages")))
        todo = passages
        if self.same_encoder:
            # The new and changed passages (by the diff's key): every passage of the previous
            # snapshot has a vector in the baseline's Embeddings tables. They are also the delta
            # segment's passages.
            todo = passages.join(self.old_live().select("pid", "content_hash"), ["pid", "content_hash"], "left_anti")
        todo_url = join_url(run_dir, "to_encode")
        n_todo = todo.count()
        # One encode task per file: enough files to keep every core busy, none tiny; files of
        # disjoint pid ranges, pid-sorted (the delta's docstore and shards read them in order).
        parts = max(1, min(max(spark.sparkContext.defaultParallelism, -(-n_todo // 2000)), -(-n_todo // 64)))
        todo.repartitionByRange(parts, "pid").sortWithinPartitions("pid").write.mode("overwrite").parquet(todo_url)
        enc_cfg = run_paths(self.cfg, run_dir, passages=todo_url, embeddings=join_url(run_dir, "embeddings_new"))
        stats = encode_passages(spark, enc_cfg) if n_todo else {"passages_encoded": 0}
        # Files a crashed attempt of this run already encoded are kept: they count as encoded.
        return {"encoded": stats["passages_encoded"] + stats.get("passages_reused", 0), "to_encode": n_todo}

    def embeddings_df(self):
        """Every live passage's vector: this run's new ones plus the baseline's still current."""
        from dpr_lib.encode import check_embeddings

        spark, run_dir = self.spark, self.run_dir
        passages = spark.read.parquet(storage.resolve_table(run_passages(run_dir, self.changes))) \
            .select("pid", "content_hash")
        frames = []
        new_url = join_url(run_dir, "embeddings_new")
        new_files = storage.list_files(new_url, ".parquet") if storage.exists(new_url) else []
        if new_files:
            check_embeddings(new_files, self.fingerprint)
            frames.append(spark.read.parquet(*new_files).select("pid", "content_hash", "vector"))
        if self.same_encoder:
            old = spark.read.parquet(*tables(self.baseline["embeddings"])).select("pid", "content_hash", "vector")
            frames.append(old.join(passages, ["pid", "content_hash"], "left_semi"))
        df = frames[0]
        for f in frames[1:]:
            df = df.unionByName(f)
        # A passage deleted and later re-added with its old text has a vector in two tables.
        return df.dropDuplicates(["pid"]) if len(frames) > 1 else df

    def reuse(self):
        """(the previous version's quantizer offered for reuse or None, why a retrain)."""
        from dpr_lib.index import Reuse
        from dpr_lib.index.recall import base_nprobe
        from dpr_lib.manifest import MANIFEST, read_latest, read_manifest, version_url

        if not self.baseline:
            return None, "first run"
        root, opts, ncfg = self.cfg.path("index_root"), self.cfg.storage_options(), self.cfg.nightly
        prev_version = read_latest(root, opts)
        prev = read_manifest(join_url(version_url(root, prev_version), MANIFEST), opts) if prev_version else None
        if not self.same_encoder:
            return None, "encoder fingerprint changed"
        if prev is None:
            return None, "no previous version published"
        if self.total > ncfg.retrain_growth * prev.totals["vectors"]:
            return None, (f"vector count grew from {prev.totals['vectors']} to {self.total}"
                          f" (> nightly.retrain_growth={ncfg.retrain_growth})")
        url = join_url(version_url(root, prev.trained_holder()), prev.trained.path)
        trained = storage.read_bytes(url, opts)
        if storage.sha256_bytes(trained) != prev.trained.sha256:
            log.warning("nightly: the quantizer %s fails its checksum: retraining (a full build)", url)
            return None, f"the quantizer {url} failed its sha256 check"
        return Reuse(trained, prev, "same encoder, growth within nightly.retrain_growth",
                     ncfg.max_nprobe_growth * base_nprobe(prev), "nightly.max_nprobe_growth"), None

    def publish(self) -> dict:
        reuse, reason = self.reuse()
        diff, encoded, total = self.diff, self.encoded, self.total
        extra = {"encoder": self.fingerprint, "retrain_reason": reason,
                 "nightly": {"run": self.state["run"], "diff": diff, "encoded": encoded["encoded"],
                             "reused_embeddings": total - encoded["encoded"], "changes": self.changes}}
        # The ledger: reused = the diff's unchanged passages (a join apart from the one that
        # selects the reused vectors), embedded = rows the encode tasks wrote.
        counts = {"input_records": self.corpus["input_records"], "docs": self.corpus["docs"],
                  "rejects": self.corpus["rejects"], "corpus_passages": total, "embedded": encoded["encoded"],
                  "reused": (total - encoded["encoded"] if self.changes else diff["unchanged"])
                  if self.same_encoder else 0}
        from dpr_lib.index import DeltaRecallMiss

        full_why = compaction_reason(self.cfg, reuse.manifest, diff, total, self.compact) if reuse else reason
        if reuse and full_why is None:
            try:
                return self.publish_delta(reuse, counts, extra)
            except DeltaRecallMiss as why:  # the rule of docs/operations/nightly.md: compact instead
                log.warning("%s: compacting", why)
                full_why = f"the delta missed the recall target: {why}"
        return self.publish_full(reuse, full_why, counts, extra)

    def publish_full(self, reuse, why: str, counts: dict, extra: dict) -> dict:
        from dpr_lib.index import build_index

        spark, run_dir = self.spark, self.run_dir
        if self.changes:
            # A full build needs every passage: the previous live rows of the documents the change
            # set does not name, plus this run's (written once, as the next baseline).
            full_passages(spark, run_dir, live_passages(spark, self.chain, self.tombstones))
        # The join and union are computed once, into this run's Embeddings table (the next run's
        # baseline); the merge job reads that table, not the lineage again per action.
        df = spark.read.parquet(merge_embeddings(spark, run_dir, self.embeddings_df, self.fingerprint))
        extra["compaction"] = {"kind": "full", "reason": why}
        passages = run_passages(run_dir, self.changes)
        manifest = build_index(spark, run_paths(self.cfg, run_dir, passages=passages), df, extra, reuse_from=reuse,
                               counts=counts, force=self.force, validation=self.validation,
                               question_vectors=self.questions, questions_source=self.cfg.index.recall_questions)
        return {"version": manifest.version, "quantizer": manifest.quantizer,
                "vectors": manifest.totals["vectors"], "recall": manifest.recall["at_nprobe"],
                "nprobe": manifest.nprobe, "kind": "full", "reason": why,
                "embeddings": [join_url(run_dir, "embeddings")], "passages": [{"url": passages, "seq": 0}]}

    def publish_delta(self, reuse, counts: dict, extra: dict) -> dict:
        """The new and changed passages (``to_encode``, their vectors in ``embeddings_new``) as one
        segment, the changed and deleted pids (from the previous live Passages, or those of the
        documents a change set names) as tombstones."""
        import numpy as np
        from pyspark import StorageLevel

        from dpr_lib.index import build_delta
        from dpr_lib.manifest import version_url

        spark, cfg, run_dir, diff = self.spark, self.cfg, self.run_dir, self.diff
        passages = spark.read.parquet(storage.resolve_table(join_url(run_dir, "passages"))).select("pid", "content_hash")
        # Used twice (the pids here, their texts for the BM25 statistics): the join over the
        # previous Passages runs once. As many rows as the change.
        removed_df = self.old_live().join(passages, ["pid", "content_hash"], "left_anti") \
            .select("pid", "title", "text").persist(StorageLevel.MEMORY_AND_DISK)
        new_url = join_url(run_dir, "embeddings_new")
        reason = (f"{diff['new'] + diff['changed']} new or changed and {diff['changed'] + diff['deleted']} removed "
                  f"passages within nightly.compact_ratio={cfg.nightly.compact_ratio:g}")
        try:
            # Collected: the changed and deleted pids, as many as the change (8 bytes each).
            removed = np.array(sorted(r["pid"] for r in removed_df.select("pid").collect()), np.int64)
            delta_cfg = run_paths(cfg, run_dir, passages=join_url(run_dir, "to_encode"), embeddings=new_url)
            prev = reuse.manifest
            manifest = build_delta(spark, delta_cfg, prev, version_url(cfg.path("index_root"), prev.version),
                                   reuse.trained, removed, removed_df, counts, extra, reason, self.validation,
                                   self.force)
        finally:
            removed_df.unpersist()
        has_new = storage.exists(new_url) and bool(storage.list_files(new_url, ".parquet"))
        if not self.changes:  # a snapshot run's Passages are the whole live state
            chain = [{"url": join_url(run_dir, "passages"), "seq": manifest.segment_seq}]
        else:
            chain = self.chain + [{"url": join_url(run_dir, "to_encode"), "seq": manifest.segment_seq}]
        return {"version": manifest.version, "quantizer": manifest.quantizer, "vectors": manifest.totals["vectors"],
                "recall": manifest.recall.get("at_nprobe"), "nprobe": manifest.nprobe, "kind": "delta",
                "reason": reason, "embeddings": tables(self.baseline["embeddings"]) + ([new_url] if has_new else []),
                "passages": chain}

    # ------------------------------------------------------------ after the publish

    def finish(self) -> None:
        published = self.published
        new = record_baseline(self.cfg, self.state["run"], published["passages"], self.total, published["embeddings"],
                              self.fingerprint, published["version"])
        self.state["published"] = True
        self.stages.save()
        prune_runs(self.cfg, keep=self.cfg.nightly.keep_runs, current=self.state["run"],
                   needed=tables(new["embeddings"]) + [e["url"] for e in published["passages"]])

    def report(self, t0: float) -> dict:
        published, diff, encoded, total, changes = self.published, self.diff, self.encoded, self.total, self.changes
        report = {
            "run": self.state["run"], "version": published["version"], "diff": diff,
            "encoded": encoded["encoded"], "reused": total - encoded["encoded"],
            "passages": total, "rejects": self.corpus["rejects"], "quantizer": published["quantizer"],
            "input": f"change set {changes}" if changes else "snapshot",
            "recall_at_nprobe": published["recall"], "nprobe": published["nprobe"],
            "kind": published.get("kind", "full"), "compaction_reason": published.get("reason"),
            "seconds": {**self.state["seconds"], "total": round(time.time() - t0, 2)},
        }
        write_json(join_url(self.run_dir, "report.json"), report)
        q = "reused" if published["quantizer"]["reused"] else "retrained"
        report["summary"] = (
            f"nightly {self.state['run']}: published {published['version']} ({total} passages: "
            f"{diff['new']} new, {diff['changed']} changed, {diff['unchanged']} unchanged, {diff['deleted']} deleted; "
            f"encoded {encoded['encoded']}, reused {report['reused']}; "
            f"{'delta segment' if report['kind'] == 'delta' else 'full build: ' + str(report['compaction_reason'])}; "
            f"quantizer {q}: {published['quantizer']['reason']}; "
            f"recall@{self.cfg.index.recall_k} {published['recall']}) in {report['seconds']['total']:.0f}s")
        log.info(report["summary"])
        return report
