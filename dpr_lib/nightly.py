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

Stages are idempotent and recorded in ``<work_dir>/runs/<run>/state.json``: a failed run is
resumed by the next one from the stages it finished.
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

def _read_json(url: str) -> dict | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def _write_json(url: str, doc: dict) -> None:
    storage.write_bytes_atomic(url, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


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


def _unfinished_run(cfg: Config, key: str) -> dict | None:
    """The state of the newest run that did not publish, if it was for the same snapshot (to resume it)."""
    runs = join_url(cfg.path("work_dir"), "runs")
    fs, path = storage.get_fs(runs)
    if not fs.exists(path):
        return None
    for name in sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)), reverse=True):
        state = _read_json(join_url(runs, name, "state.json"))
        if state and not state.get("published"):
            return state if state.get("key") == key else None
        if state and state.get("published"):
            return None
    return None


def diff_passages(spark, new_url: str, old=None) -> dict:
    """Counts of new / changed / unchanged / deleted passages (by pid and content_hash); ``old``:
    the previous live Passages (a DataFrame with pid, content_hash), None on a first run."""
    from pyspark.sql import functions as F

    new = spark.read.parquet(storage.resolve_table(new_url)).select("pid", F.col("content_hash").alias("h_new"))
    if old is None:
        return {"new": new.count(), "changed": 0, "unchanged": 0, "deleted": 0}
    old = old.select("pid", F.col("content_hash").alias("h_old"))
    row = (new.join(old, "pid", "full_outer").agg(
        F.sum(F.when(F.col("h_old").isNull(), 1).otherwise(0)).alias("new"),
        F.sum(F.when(F.col("h_new").isNull(), 1).otherwise(0)).alias("deleted"),
        F.sum(F.when(F.col("h_new") == F.col("h_old"), 1).otherwise(0)).alias("unchanged"),
        F.sum(F.when(F.col("h_new") != F.col("h_old"), 1).otherwise(0)).alias("changed")).first())
    return {k: int(row[k] or 0) for k in ("new", "changed", "unchanged", "deleted")}


def passages_chain(baseline: dict) -> list[dict]:
    """The previous run's Passages as tables [{url, seq}]: one full table, or (after change-set runs)
    a full table and the delta tables that followed it, aligned with the index's segments."""
    p = baseline["passages"]
    return [{"url": p, "seq": 0}] if isinstance(p, str) else list(p)


def live_passages(spark, chain: list[dict], tombstones):
    """The live rows of a Passages chain: a row of the table with seq s is dead when its pid is
    tombstoned with a later seq (the index's rule, ``dpr_lib.segments``). ``tombstones``: [n, 2]
    int64 (pid, seq) rows, joined by broadcast (as many as the changes since the last compaction)."""
    from pyspark.sql import functions as F

    frames = [spark.read.parquet(storage.resolve_table(e["url"])).withColumn("_seq", F.lit(int(e["seq"])))
              for e in chain]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    if len(chain) > 1 and len(tombstones):
        import pyarrow as pa

        t = spark.createDataFrame(pa.table({"pid": tombstones[:, 0], "_tseq": tombstones[:, 1]}).to_pandas())
        df = df.join(F.broadcast(t), "pid", "left").where(F.col("_tseq").isNull() | (F.col("_tseq") <= F.col("_seq"))) \
            .drop("_tseq")
    return df.drop("_seq")


def read_changes(spark, url: str):
    """A change set: rows with ``op`` (upsert | delete), ``id``, and for upserts ``title``, ``text``;
    JSON Lines, Parquet, or ``table:<name>`` (e.g. a Delta/Iceberg change feed read as a table).
    Returns (upserts DataFrame [id, title, text], deleted ids DataFrame [doc_id], counts)."""
    from pyspark.sql import functions as F

    if url.startswith("table:"):
        name = url[len("table:"):]
        if not spark.catalog.tableExists(name):
            raise InputError(f"nightly.changes names table {name!r}, which is not in the session's catalog")
        df = spark.table(name)
    else:
        files = storage.list_files(url) if storage.exists(url) else []
        if not files:
            raise InputError(f"nightly.changes: no change set at {url}")
        df = spark.read.parquet(*files) if all(f.endswith(".parquet") for f in files) else spark.read.json(files)
    missing = [c for c in ("op", "id") if c not in df.columns]
    if missing:
        raise InputError(f"nightly.changes {url}: the change set lacks column(s) {missing}; expected op "
                         f"(upsert | delete), id, title, text; got {df.columns}")
    op = F.lower(F.trim(F.col("op").cast("string")))
    df = df.withColumn("op", op).withColumn("id", F.col("id").cast("string"))
    bad = df.where(F.col("op").isNull() | ~F.col("op").isin("upsert", "delete") | F.col("id").isNull())
    n_bad = bad.count()
    if n_bad:
        sample = [r.asDict() for r in bad.select("op", "id").limit(3).collect()]
        raise InputError(f"nightly.changes {url}: {n_bad} row(s) with an op other than upsert / delete or no id "
                         f"(e.g. {sample}); nothing was published")
    both = df.groupBy("id").agg(F.countDistinct("op").alias("ops")).where(F.col("ops") > 1)
    conflicts = [r["id"] for r in both.limit(5).collect()]
    if conflicts:
        raise InputError(f"nightly.changes {url}: document(s) {conflicts} are both upserted and deleted in one change "
                         "set; send one op per document")
    cols = [F.col("id"), F.col("title") if "title" in df.columns else F.lit(None).cast("string").alias("title"),
            F.col("text") if "text" in df.columns else F.lit(None).cast("string").alias("text")]
    upserts = df.where(F.col("op") == "upsert").select(*cols)
    deletes = df.where(F.col("op") == "delete").select(F.col("id").alias("doc_id")).distinct()
    return upserts, deletes


# ---------------------------------------------------------------- the run

def _tables(urls) -> list[str]:
    """A baseline's Embeddings: one table URL (older runs, full builds) or the list of a delta chain."""
    return [urls] if isinstance(urls, str) else list(urls)


def run_nightly(spark, cfg: Config, force: bool = False, compact: bool = False, changes: str | None = None) -> dict:
    """One scheduled run. Returns the run report (also written to <run>/report.json).
    ``compact``: publish a fresh full version (no delta segment) whatever the garbage ratio.
    ``changes`` (or ``nightly.changes``): a change set (documents upserted, ids deleted) applied to
    the previous run instead of reading a full snapshot: only those documents are split and diffed."""
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import check_embeddings, encode_passages, passage_spec, resolve_spec
    from dpr_lib.gate import read_validation_questions
    from dpr_lib.index import build_index, encode_recall_questions
    from dpr_lib.manifest import MANIFEST, read_latest, read_manifest, version_url
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    t0 = time.time()
    ncfg = cfg.nightly
    root, opts = cfg.path("index_root"), cfg.storage_options()
    lock = RunLock(root, ncfg.stale_lock_s, opts) if ncfg.lock else None
    if lock:
        lock.acquire()
    else:
        log.warning("nightly.lock=false: nothing stops a second run on %s from starting now", root)
    try:
        # Read (and encode) once, before any stage: a bad file fails now, not after the encode stage.
        questions = encode_recall_questions(cfg) if cfg.index.recall_questions else None
        validation = read_validation_questions(cfg) if cfg.index.validation_questions else None
        # encoder.backend=auto: the choice recorded by an earlier run (kept night after night); on
        # the first run it is made after the shard stage, on this snapshot's passages.
        cfg = encoder_choice.resolve(cfg, missing_ok=True)
        spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), storage_options=opts)
        changes = changes or ncfg.changes or None
        # The key names the configured encoder: an export made by this run does not change it.
        key = resume_key(cfg, spec.fingerprint_id(), changes)
        spec = backends.attach(cfg, spec)
        fingerprint = spec.fingerprint()
        state = _unfinished_run(cfg, key)
        if state:
            log.info("resuming run %s from stage(s) done: %s", state["run"], state["done"])
        else:
            run = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
            state = {"run": run, "key": key, "done": [], "seconds": {}, "published": False}
        run_dir = join_url(cfg.path("work_dir"), "runs", state["run"])
        state_url = join_url(run_dir, "state.json")
        baseline = _read_json(join_url(cfg.path("work_dir"), "state", "last_success.json"))
        run_cfg = _with_paths(cfg, run_dir)

        def stage(name, fn):
            if name in state["done"]:
                return state.get(name)
            t = time.time()
            state[name] = fn()
            state["done"].append(name)
            state["seconds"][name] = round(time.time() - t, 2)
            _write_json(state_url, state)
            return state[name]

        same_encoder = bool(baseline) and baseline["fingerprint"]["id"] == fingerprint["id"]
        if changes and not baseline:
            raise InputError("nightly.changes: a change set applies to a previous run; run once on a full snapshot "
                             "(corpus.input) first")
        if changes and not same_encoder:
            raise InputError("nightly.changes: the encoder changed since the previous run, so every passage must be "
                             "encoded again; run on a full snapshot (corpus.input) instead of a change set")
        chain = passages_chain(baseline) if baseline else []
        tombstones = _baseline_tombstones(cfg, baseline) if len(chain) > 1 else None

        def old_live():
            """The previous live Passages; with a change set, only the rows of the documents it names."""
            if not baseline:
                return None
            old = live_passages(spark, chain, tombstones)
            if changes:
                from pyspark.sql import functions as F

                ids = spark.read.parquet(join_url(run_dir, "changes", "affected")).select("doc_id")
                old = old.join(F.broadcast(ids), "doc_id", "left_semi")
            return old

        def shard() -> dict:
            if not changes:
                return _slim(shard_corpus(spark, run_cfg))
            upserts, deletes = read_changes(spark, changes)
            affected = upserts.select(upserts["id"].alias("doc_id")).unionByName(deletes).distinct()
            affected.write.mode("overwrite").parquet(join_url(run_dir, "changes", "affected"))
            out = _slim(shard_corpus(spark, run_cfg, df=upserts))
            out["deleted_docs"] = deletes.count()
            return out

        corpus = stage("shard", shard)
        if cfg.encoder.backend == "auto" or (spec.backend != "torch" and not spec.artifact_sha256):
            # The first run with this encoder.backend: chosen (auto) and exported now (int8
            # calibrated on this snapshot's passages), then kept in <work_dir>/encoders for every
            # later night.
            cfg = encoder_choice.resolve(cfg, build=True, passages_url=run_cfg.path("passages"))
            spec = passage_spec(cfg, build=True, passages_url=run_cfg.path("passages"))
            fingerprint = spec.fingerprint()
            same_encoder = bool(baseline) and baseline["fingerprint"]["id"] == fingerprint["id"]
        diff = stage("diff", lambda: diff_passages(spark, run_cfg.path("passages"), old_live()))
        # Passages after this run: the snapshot's, or with a change set the previous count plus the diff.
        total = baseline["passages_count"] + diff["new"] - diff["deleted"] if changes else corpus["passages"]
        if baseline and not force and not changes:
            before, after = baseline["passages_count"], corpus["passages"]
            if after < (1 - ncfg.max_shrink) * before:
                raise InputError(
                    f"the snapshot shrank from {before} to {after} passages (more than nightly.max_shrink="
                    f"{ncfg.max_shrink:.0%}): likely a broken export; nothing was published. Rerun with --force "
                    "to publish it anyway")

        def encode_changed() -> dict:
            passages = spark.read.parquet(storage.resolve_table(run_cfg.path("passages")))
            todo = passages
            if same_encoder:
                # The new and changed passages (by the diff's key): every passage of the previous
                # snapshot has a vector in the baseline's Embeddings tables. They are also the
                # delta segment's passages.
                todo = passages.join(old_live().select("pid", "content_hash"), ["pid", "content_hash"], "left_anti")
            todo_url = join_url(run_dir, "to_encode")
            n_todo = todo.count()
            # One encode task per file: enough files to keep every core busy, none tiny; files of
            # disjoint pid ranges, pid-sorted (the delta's docstore and shards read them in order).
            parts = max(1, min(max(spark.sparkContext.defaultParallelism, -(-n_todo // 2000)), -(-n_todo // 64)))
            todo.repartitionByRange(parts, "pid").sortWithinPartitions("pid").write.mode("overwrite").parquet(todo_url)
            enc_cfg = _with_paths(cfg, run_dir, passages=todo_url, embeddings=join_url(run_dir, "embeddings_new"))
            stats = encode_passages(spark, enc_cfg) if n_todo else {"passages_encoded": 0}
            # Files a crashed attempt of this run already encoded are kept: they count as encoded.
            return {"encoded": stats["passages_encoded"] + stats.get("passages_reused", 0), "to_encode": n_todo}

        encoded = stage("encode", encode_changed)

        def embeddings_df():
            passages = spark.read.parquet(storage.resolve_table(_run_passages(run_dir, changes))) \
                .select("pid", "content_hash")
            frames = []
            new_files = storage.list_files(join_url(run_dir, "embeddings_new"), ".parquet") \
                if storage.exists(join_url(run_dir, "embeddings_new")) else []
            if new_files:
                check_embeddings(new_files, fingerprint)
                frames.append(spark.read.parquet(*new_files).select("pid", "content_hash", "vector"))
            if same_encoder:
                old = spark.read.parquet(*_tables(baseline["embeddings"])).select("pid", "content_hash", "vector")
                frames.append(old.join(passages, ["pid", "content_hash"], "left_semi"))
            df = frames[0]
            for f in frames[1:]:
                df = df.unionByName(f)
            # A passage deleted and later re-added with its old text has a vector in two tables.
            return df.dropDuplicates(["pid"]) if len(frames) > 1 else df

        def publish() -> dict:
            reuse, reason = None, "first run"
            if baseline:
                prev_root_version = read_latest(root, opts)
                prev_manifest = read_manifest(join_url(version_url(root, prev_root_version), MANIFEST), opts) \
                    if prev_root_version else None
                if not same_encoder:
                    reason = "encoder fingerprint changed"
                elif prev_manifest is None:
                    reason = "no previous version published"
                elif total > ncfg.retrain_growth * prev_manifest.totals["vectors"]:
                    reason = (f"vector count grew from {prev_manifest.totals['vectors']} to {total}"
                              f" (> nightly.retrain_growth={ncfg.retrain_growth})")
                else:
                    trained = storage.read_bytes(join_url(version_url(root, prev_root_version), "trained.faiss"), opts)
                    reuse = {"trained": trained, "manifest": prev_manifest,
                             "reason": "same encoder, growth within nightly.retrain_growth",
                             "max_nprobe": ncfg.max_nprobe_growth * prev_manifest.nprobe,
                             "max_nprobe_key": "nightly.max_nprobe_growth"}
            extra = {"encoder": fingerprint, "retrain_reason": reason,
                     "nightly": {"run": state["run"], "diff": diff, "encoded": encoded["encoded"],
                                 "reused_embeddings": total - encoded["encoded"], "changes": changes}}
            # The ledger: reused = the diff's unchanged passages (a join apart from the one that
            # selects the reused vectors), embedded = rows the encode tasks wrote.
            counts = {"input_records": corpus["input_records"], "docs": corpus["docs"],
                      "rejects": corpus["rejects"], "corpus_passages": total,
                      "embedded": encoded["encoded"],
                      "reused": (total - encoded["encoded"] if changes else diff["unchanged"]) if same_encoder else 0}
            full_why = _compaction_reason(cfg, reuse, diff, total, compact) if reuse else reason
            if reuse and full_why is None:
                return _publish_delta(spark, cfg, run_dir, old_live(), reuse, diff, counts, extra, validation, force,
                                      baseline)
            if changes:
                # A full build needs every passage: the previous live rows of the documents the
                # change set does not name, plus this run's (written once, as the next baseline).
                _full_passages(spark, run_dir, live_passages(spark, chain, tombstones))
            # The join and union are computed once, into this run's Embeddings table (the next
            # run's baseline); the merge job reads that table, not the lineage again per action.
            df = spark.read.parquet(_merged_embeddings(spark, run_dir, embeddings_df, fingerprint))
            extra["compaction"] = {"kind": "full", "reason": full_why}
            manifest = build_index(spark, _with_paths(cfg, run_dir, passages=_run_passages(run_dir, changes)), df,
                                   extra, reuse_from=reuse, counts=counts,
                                   force=force, validation=validation,
                                   question_vectors=questions, questions_source=cfg.index.recall_questions)
            return {"version": manifest.version, "quantizer": manifest.quantizer,
                    "vectors": manifest.totals["vectors"], "recall": manifest.recall["at_nprobe"],
                    "nprobe": manifest.nprobe, "kind": "full", "reason": full_why,
                    "embeddings": [join_url(run_dir, "embeddings")],
                    "passages": [{"url": _run_passages(run_dir, changes), "seq": 0}]}

        published = stage("publish", publish)
        new_baseline = {"run": state["run"], "passages": published["passages"], "passages_count": total,
                        "embeddings": published["embeddings"], "fingerprint": fingerprint,
                        "version": published["version"]}
        _write_json(join_url(cfg.path("work_dir"), "state", "last_success.json"), new_baseline)
        state["published"] = True
        _write_json(state_url, state)
        _prune_runs(cfg, keep=ncfg.keep_runs, current=state["run"],
                    needed=_tables(new_baseline["embeddings"]) + [e["url"] for e in published["passages"]])
    finally:
        if lock:
            lock.release()
    report = {
        "run": state["run"], "version": published["version"], "diff": diff,
        "encoded": encoded["encoded"], "reused": total - encoded["encoded"],
        "passages": total, "rejects": corpus["rejects"], "quantizer": published["quantizer"],
        "input": f"change set {changes}" if changes else "snapshot",
        "recall_at_nprobe": published["recall"], "nprobe": published["nprobe"],
        "kind": published.get("kind", "full"), "compaction_reason": published.get("reason"),
        "seconds": {**state["seconds"], "total": round(time.time() - t0, 2)},
    }
    _write_json(join_url(run_dir, "report.json"), report)
    q = "reused" if published["quantizer"]["reused"] else "retrained"
    report["summary"] = (
        f"nightly {state['run']}: published {published['version']} ({total} passages: "
        f"{diff['new']} new, {diff['changed']} changed, {diff['unchanged']} unchanged, {diff['deleted']} deleted; "
        f"encoded {encoded['encoded']}, reused {report['reused']}; "
        f"{'delta segment' if report['kind'] == 'delta' else 'full build: ' + str(report['compaction_reason'])}; "
        f"quantizer {q}: {published['quantizer']['reason']}; "
        f"recall@{cfg.index.recall_k} {published['recall']}) in {report['seconds']['total']:.0f}s")
    log.info(report["summary"])
    return report


def _merged_embeddings(spark, run_dir: str, df_fn, fingerprint: dict) -> str:
    """Materialise this run's full Embeddings table (new + reused) as the next run's baseline, as the
    DESIGN contract's table, like the encode job writes it: files of disjoint pid ranges, sorted by
    pid, fixed-size float32 vectors, the encoder fingerprint in each file's metadata (so
    :func:`~dpr_lib.encode.check_embeddings` accepts them; Spark's own writer drops both)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark import TaskContext

    from dpr_lib import schemas
    from dpr_lib.encode import embeddings_batch, embeddings_metadata
    from dpr_lib.index_ops import local_tmp_dir, vectors_of

    url = join_url(run_dir, "embeddings")
    fs, path = storage.get_fs(url)
    if fs.exists(path):  # a crashed attempt's files: rewritten whole
        fs.rm(path, recursive=True)
    dim = int(fingerprint["dim"])
    metadata = embeddings_metadata(fingerprint, "nightly-merge")

    def write(batches):
        # Built in the task: a pickled pyarrow schema loses the list element's non-nullability.
        schema = schemas.embeddings_schema(dim).with_metadata(metadata)
        out_url = join_url(url, f"part-{TaskContext.get().partitionId():05d}.parquet")
        fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="dpr-emb-", dir=local_tmp_dir())
        os.close(fd)
        rows = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for b in batches:
                    if not b.num_rows:
                        continue
                    writer.write_batch(embeddings_batch(b.column("pid").cast(pa.int64()), b.column("content_hash"),
                                                        vectors_of(b, dim), schema))
                    rows += b.num_rows
            if rows:
                storage.upload_file_atomic(tmp, out_url)
        finally:
            os.remove(tmp)
        yield pa.RecordBatch.from_pylist([{"rows": rows}])

    parts = max(1, spark.sparkContext.defaultParallelism)
    (df_fn().select("pid", "content_hash", "vector").repartitionByRange(parts, "pid").sortWithinPartitions("pid")
     .mapInArrow(write, "rows long").collect())
    return url


def _compaction_reason(cfg: Config, reuse: dict, diff: dict, passages: int, compact: bool) -> str | None:
    """Why this run must publish a full version although the quantizer could be reused; None: a delta."""
    from dpr_lib.segments import garbage

    prev = reuse["manifest"]
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


def _publish_delta(spark, cfg: Config, run_dir: str, old, reuse: dict, diff: dict, counts: dict,
                   extra: dict, validation, force: bool, baseline: dict) -> dict:
    """The delta path of the publish stage: the new and changed passages (``to_encode``, their
    vectors in ``embeddings_new``) as one segment, the changed and deleted pids (``old``: the
    previous live Passages, or those of the documents a change set names) as tombstones."""
    import numpy as np

    from dpr_lib.manifest import version_url
    from dpr_lib.segments import build_delta

    passages = spark.read.parquet(storage.resolve_table(join_url(run_dir, "passages"))).select("pid", "content_hash")
    from pyspark import StorageLevel

    # Used twice (the pids here, their texts for the BM25 statistics): the join over the previous
    # Passages runs once. As many rows as the change.
    removed_df = old.join(passages, ["pid", "content_hash"], "left_anti").select("pid", "title", "text") \
        .persist(StorageLevel.MEMORY_AND_DISK)
    try:
        # Collected: the changed and deleted pids, as many as the change (8 bytes each).
        removed = np.array(sorted(r["pid"] for r in removed_df.select("pid").collect()), np.int64)
        new_url = join_url(run_dir, "embeddings_new")
        prev = reuse["manifest"]
        delta_cfg = _with_paths(cfg, run_dir, passages=join_url(run_dir, "to_encode"), embeddings=new_url)
        reason = (f"{diff['new'] + diff['changed']} new or changed and {diff['changed'] + diff['deleted']} removed "
                  f"passages within nightly.compact_ratio={cfg.nightly.compact_ratio:g}")
        manifest = build_delta(spark, delta_cfg, prev, version_url(cfg.path("index_root"), prev.version),
                               reuse["trained"], removed, removed_df, counts, extra, reason, validation, force)
    finally:
        removed_df.unpersist()
    has_new = storage.exists(new_url) and bool(storage.list_files(new_url, ".parquet"))
    tables = _tables(baseline["embeddings"]) + ([new_url] if has_new else [])
    chain = passages_chain(baseline)
    if not extra["nightly"].get("changes"):  # a snapshot run's Passages are the whole live state
        chain = [{"url": join_url(run_dir, "passages"), "seq": manifest.segment_seq}]
    else:
        chain = chain + [{"url": join_url(run_dir, "to_encode"), "seq": manifest.segment_seq}]
    return {"version": manifest.version, "quantizer": manifest.quantizer, "vectors": manifest.totals["vectors"],
            "recall": manifest.recall.get("at_nprobe"), "nprobe": manifest.nprobe, "kind": "delta",
            "reason": reason, "embeddings": tables, "passages": chain}


def _run_passages(run_dir: str, changes: str | None) -> str:
    """The run's full Passages table: the snapshot's, or with a change set the one a full build wrote."""
    return join_url(run_dir, "passages_full" if changes else "passages")


def _full_passages(spark, run_dir: str, live) -> str:
    """Every live passage after a change set: the previous live rows of documents it does not name,
    plus the run's; pid-sorted files of disjoint ranges (the docstore copies them in order)."""
    url = _run_passages(run_dir, "changes")
    ids = spark.read.parquet(join_url(run_dir, "changes", "affected")).select("doc_id")
    new = spark.read.parquet(storage.resolve_table(join_url(run_dir, "passages")))
    from pyspark.sql import functions as F

    full = live.join(F.broadcast(ids), "doc_id", "left_anti").select(*new.columns).unionByName(new)
    parts = max(1, spark.sparkContext.defaultParallelism)
    full.repartitionByRange(parts, "pid").sortWithinPartitions("pid").write.mode("overwrite").parquet(url)
    return url


def _baseline_tombstones(cfg: Config, baseline: dict):
    """The tombstones of the version the baseline published ([n, 2] int64 (pid, seq))."""
    from dpr_lib.manifest import MANIFEST, read_manifest, version_url
    from dpr_lib.segments import read_tombstones

    vurl = version_url(cfg.path("index_root"), baseline["version"])
    opts = cfg.storage_options()
    return read_tombstones(read_manifest(join_url(vurl, MANIFEST), opts), vurl, opts)


def _slim(stats: dict) -> dict:
    return {k: stats[k] for k in ("passages", "rejects", "docs", "input_records")}


def _with_paths(cfg: Config, run_dir: str, **paths) -> Config:
    import copy

    out = copy.deepcopy(cfg)
    out.paths.passages = paths.get("passages", join_url(run_dir, "passages"))
    out.paths.rejects = join_url(run_dir, "rejects")
    out.paths.embeddings = paths.get("embeddings", join_url(run_dir, "embeddings"))
    out.paths.stats = join_url(run_dir, "stats")
    return out


def _prune_runs(cfg: Config, keep: int, current: str, needed: list[str] = ()) -> None:
    """Remove run directories beyond the newest ``keep``, except those holding an Embeddings table
    of the current baseline (a delta chain references earlier runs' tables)."""
    runs = join_url(cfg.path("work_dir"), "runs")
    fs, path = storage.get_fs(runs)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    referenced = {u.split("/runs/", 1)[1].split("/", 1)[0] for u in needed if "/runs/" in u}
    for name in names[:-keep]:
        if name != current and name not in referenced:
            fs.rm(f"{path}/{name}", recursive=True)
