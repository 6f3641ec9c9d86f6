"""Stage 4, publish: train, build shards and a docstore, and publish a new index version.

Layout under ``index_root`` (any fsspec URL)::

    versions/<version>/trained.faiss            trained, empty IVF (quantizer + codebooks)
    versions/<version>/shard-NNNNN.faiss        IVF shards sharing that quantizer, disjoint pids
    versions/<version>/docstore/part-NNNNN.parquet   pid-sorted (pid, doc_id, title, text)
    versions/<version>/manifest.json            the contract read by dpr_lib.search
    LATEST                                      the current version id, written last

A version becomes visible only when LATEST names it, after every file and the manifest are
complete; a failure at any point leaves LATEST (and the version it names) untouched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpr_lib import accounting, schemas, storage
from dpr_lib import index as ix
from dpr_lib.config import Config, join_url
from dpr_lib.errors import ConfigError, IncompatibleIndexError, InputError, StorageError

log = logging.getLogger("dpr_lib.publish")

LATEST = "LATEST"
MANIFEST = "manifest.json"


def new_version_id() -> str:
    """Sortable, unique: UTC time to the second plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def version_url(root: str, version: str) -> str:
    if "/" in version or version in (".", "..") or not version:
        raise IncompatibleIndexError(f"invalid version id {version!r}")
    return join_url(root, "versions", version)


def read_latest(root: str, storage_options: dict | None = None) -> str | None:
    url = join_url(root, LATEST)
    if not storage.exists(url, storage_options):
        return None
    return storage.read_bytes(url, storage_options).decode().strip() or None


def list_versions(root: str, storage_options: dict | None = None) -> list[str]:
    fs, path = storage.get_fs(join_url(root, "versions"), storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def prune_versions(root: str, keep: int, storage_options: dict | None = None) -> list[str]:
    """Keep the newest ``keep`` complete versions (and always the one LATEST names); also remove
    incomplete ones (no manifest: a run that died) older than the newest complete version.
    Returns the removed ids."""
    latest = read_latest(root, storage_options)
    versions = list_versions(root, storage_options)
    complete = [v for v in versions if storage.exists(join_url(version_url(root, v), MANIFEST), storage_options)]
    doomed = [v for v in complete[:-keep] if v != latest] if keep > 0 else []
    if complete:
        doomed += [v for v in versions if v not in complete and v < complete[-1]]
    fs, _ = storage.get_fs(root, storage_options)
    for v in doomed:
        _, path = storage.get_fs(version_url(root, v), storage_options)
        storage.retry(lambda p=path: fs.rm(p, recursive=True), f"remove old version {v}")
        log.info("removed old version %s", v)
    return doomed


def set_latest(root: str, version: str, storage_options: dict | None = None, attempts: int = 5) -> None:
    storage.write_bytes_atomic(join_url(root, LATEST), (version + "\n").encode(), storage_options, attempts)


# ---------------------------------------------------------------- docstore

DOCSTORE_RESULT = pa.schema([("path", pa.string()), ("min_pid", pa.int64()), ("max_pid", pa.int64()),
                             ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


DOCSTORE_COLUMNS = ["pid", "doc_id", "title", "text"]


def _copy_sorted(fh, out: str, row_group: int) -> tuple[int, int, int] | None:
    """Stream a pid-sorted Parquet file into ``out`` one row group at a time: (rows, min, max) pid,
    or None as soon as a pid is smaller than the one before (the file is not sorted)."""
    rows, lo, hi = 0, -1, None
    with pq.ParquetWriter(out, schemas.DOCSTORE, compression="zstd", write_statistics=["pid"]) as writer:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=row_group, columns=DOCSTORE_COLUMNS):
            pids = batch.column("pid").to_numpy().astype(np.int64)
            if not len(pids):
                continue
            if (hi is not None and pids[0] < hi) or (np.diff(pids) < 0).any():
                return None
            lo, hi = (int(pids[0]) if hi is None else lo), int(pids[-1])
            writer.write_table(pa.Table.from_batches([batch]).cast(schemas.DOCSTORE), row_group_size=row_group)
            rows += len(pids)
    return rows, lo, -1 if hi is None else hi


def write_docstore_file(in_url: str, out_url: str, row_group: int, storage_options: dict, retries: int) -> dict:
    """Copy one Passages file's (pid, doc_id, title, text), sorted by pid, in small row groups.

    Streamed (memory: one row group, whatever the file's size): the corpus stage writes every
    Passages file sorted by pid. A file that is not sorted is read whole and sorted, with a warning."""
    fs, path = storage.get_fs(in_url)
    fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="dpr-docstore-", dir=ix.local_tmp_dir())
    os.close(fd)
    try:
        with fs.open(path, "rb") as fh:
            copied = _copy_sorted(fh, tmp, row_group)
        if copied is None:
            log.warning("docstore: %s is not sorted by pid; reading it whole to sort it", in_url)
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=DOCSTORE_COLUMNS).sort_by("pid").cast(schemas.DOCSTORE)
            pq.write_table(table, tmp, row_group_size=row_group, compression="zstd", write_statistics=["pid"])
            pids = table.column("pid")
            copied = (table.num_rows, pc.min(pids).as_py(), pc.max(pids).as_py()) if table.num_rows else (0, -1, -1)
        size, digest = os.path.getsize(tmp), storage.sha256_file(tmp)
        storage.upload_file_atomic(tmp, out_url, storage_options, attempts=retries)
    finally:
        os.remove(tmp)
    rows, lo, hi = copied
    return {"path": out_url, "min_pid": lo, "max_pid": hi, "rows": rows, "bytes": size, "sha256": digest}


def write_docstore(spark, cfg: Config, vurl: str) -> list[dict]:
    """One docstore file per Passages file, written by executors. Returns manifest entries."""
    from dpr_lib.spark import spark_schema, tasks_dataframe

    files = storage.list_files(cfg.path("passages"), ".parquet")
    opts, retries, row_group = cfg.storage_options(), cfg.publish.retries, cfg.publish.docstore_row_group
    rows = [{"input": f, "output": join_url(vurl, "docstore", f"part-{i:05d}.parquet")} for i, f in enumerate(files)]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for r in batch.to_pylist():
                yield pa.RecordBatch.from_pylist(
                    [write_docstore_file(r["input"], r["output"], row_group, opts, retries)], schema=DOCSTORE_RESULT)

    out = [r.asDict() for r in tasks_dataframe(spark, rows, "input string, output string")
           .mapInArrow(run, spark_schema(DOCSTORE_RESULT)).collect()]
    out = [r for r in out if r["rows"] > 0]
    out.sort(key=lambda r: r["min_pid"])
    for r in out:
        r["path"] = _relative(r["path"], vurl)
    return out


@contextlib.contextmanager
def _driver_spill_dir(spark):
    """A temporary directory that tasks can write and the driver read: local mode only (else None)."""
    from dpr_lib.spark import is_local_master

    if not is_local_master(spark.sparkContext.master):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="dpr-sample-") as d:
        yield d


def _count_rows(url: str) -> int:
    """Rows of the Parquet files under ``url``, from their footers."""
    return sum(f["rows"] for f in ix.file_layout(storage.list_files(url, ".parquet")))


def _relative(url: str, vurl: str) -> str:
    return url[len(vurl):].lstrip("/") if url.startswith(vurl) else url


# ---------------------------------------------------------------- the merge job

def read_recall_questions(cfg: Config) -> list[str]:
    """The questions of ``index.recall_questions`` (at most max(recall_queries, 1024), a seeded
    sample of a longer file). Errors name the key: a run should fail before it encodes anything."""
    url, icfg = cfg.index.recall_questions, cfg.index
    try:
        raw = storage.read_bytes(url, cfg.storage_options(), attempts=2)
    except (OSError, StorageError) as exc:
        raise ConfigError(f"index.recall_questions: cannot read {url}: {exc}") from None
    try:
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"index.recall_questions: {url} is not UTF-8 text ({exc})") from None
    questions = []
    for no, line in enumerate(lines, 1):
        if not line:
            continue
        if url.endswith((".jsonl", ".json")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"index.recall_questions: {url} line {no} is not JSON ({exc.msg})") from None
            line = row.get("question") if isinstance(row, dict) else row
            if not isinstance(line, str):
                raise ConfigError(f'index.recall_questions: {url} line {no} has no "question" string')
            line = line.strip()
        if line:
            questions.append(line)
    if not questions:
        raise ConfigError(f"index.recall_questions: {url} holds no questions")
    limit = max(icfg.recall_queries, 1024)
    if len(questions) > limit:
        pick = np.sort(np.random.default_rng(icfg.seed).choice(len(questions), limit, replace=False))
        questions = [questions[i] for i in pick]
    return questions


def encode_recall_questions(cfg: Config) -> np.ndarray:
    """``index.recall_questions`` encoded on the driver by the question encoder: float32 [n, d].
    Kept in the local cache_dir by (questions, encoder fingerprint): nightly runs with the same
    file and encoder do not encode them again."""
    import hashlib

    from dpr_lib.encode import Encoder, resolve_spec

    questions = read_recall_questions(cfg)
    t = time.time()
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options())
    key = hashlib.sha256(json.dumps([spec.fingerprint_id(), questions]).encode()).hexdigest()[:24]
    cached = os.path.join(cfg.path("cache_dir"), "recall_questions", f"{key}.npy")
    if os.path.exists(cached):
        vectors = np.load(cached, allow_pickle=False)
        if vectors.shape == (len(questions), spec.dim) and vectors.dtype == np.float32:
            log.info("recall questions: %d from %s (cached encodings)", len(questions), cfg.index.recall_questions)
            return vectors
    vectors = Encoder(spec).encode(None, questions)
    log.info("recall questions: %d from %s encoded (%.1fs)", len(questions), cfg.index.recall_questions,
             time.time() - t)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs the next run a re-encode
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{uuid.uuid4().hex}.npy"
        np.save(tmp, vectors, allow_pickle=False)
        os.replace(tmp, cached)
    return vectors


def build_index(spark, cfg: Config, embeddings_df=None, extra_manifest: dict | None = None,
                reuse_from: dict | None = None, question_vectors: np.ndarray | None = None,
                counts: dict | None = None, questions_source: str = "") -> dict:
    """Train, build shards and the docstore, write the manifest, then LATEST. Returns the manifest.

    Recall (and so the recommended nprobe) is measured on ``question_vectors`` when given (encoded
    real questions: what a service will be asked; ``questions_source`` names where they came
    from in the manifest), else on ``index.recall_questions`` when configured, else on stored vectors sampled from the table,
    each query's own pid excluded from both its exact and approximate top-k (a stored vector always
    finds itself in its own list, which would overstate recall by up to 1/k).

    ``counts``: the run's corpus and encode counts for the accounting check (``dpr_lib.accounting``);
    None reads them from the stages' stats in this work dir. The check runs before the manifest.

    ``reuse_from`` = {"trained": bytes, "manifest": previous manifest, "reason": str} skips training
    and adds the vectors to the previous version's quantizer; if the recall measured with it
    misses ``index.recall_target``, or reaches it only above ``reuse_from["max_nprobe"]`` (if
    given), the version is discarded and the job retrains.
    """
    from pyspark.sql import functions as F

    from dpr_lib.encode import check_embeddings, resolve_spec
    from dpr_lib.spark import task_errors

    t0 = time.time()
    timings: dict[str, float] = {}
    icfg, root, opts = cfg.index, cfg.path("index_root"), cfg.storage_options()
    emb_url = cfg.path("embeddings")
    if question_vectors is None and icfg.recall_questions:
        question_vectors = encode_recall_questions(cfg)
        questions_source = icfg.recall_questions
        timings["recall_questions"] = time.time() - t0
    if embeddings_df is None:
        files = storage.list_files(emb_url, ".parquet")
        if not files:
            raise InputError(f"no Embeddings files under {emb_url}; run the encode stage first")
        configured = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="passage", storage_options=opts).fingerprint()
        fingerprint, n = check_embeddings(files, configured)
        source = files  # read by pyarrow in one task per file (fast path)
    else:
        fingerprint, n = (extra_manifest or {}).get("encoder", {}), embeddings_df.count()
        source = embeddings_df
    dim = int(fingerprint.get("dim") or 0)
    if not dim:
        from pyspark.sql import functions as F

        first = embeddings_df.select(F.size("vector").alias("d")).first()
        dim = int(first["d"]) if first else 0
    # Dimension, NaN and duplicate-pid checks happen in the shard pass (one scan of the table).

    if reuse_from:
        prev = reuse_from["manifest"]
        plan = ix.IndexPlan(prev["factory"], prev["nlist"], 0, f"quantizer reused from version {prev['version']}")
    else:
        plan = ix.choose_factory(n, dim, icfg.bytes_per_vector, icfg.train_per_list, cfg.train_budget_bytes(),
                                 icfg.min_nlist, icfg.factory, icfg.exact_below, icfg.max_train_sample,
                                 icfg.coarse, icfg.train_method, icfg.large_nlist,
                                 budget_key="index.max_train_bytes" if icfg.max_train_bytes else
                                 "index.max_train_bytes (0: half of spark.driver.memory)")
    num_shards = ix.shard_count(n, icfg.num_shards, icfg.max_vectors_per_shard)
    ix.check_task_memory(n, num_shards, dim, ix.code_size_of(plan.factory, dim), cfg.task_memory_bytes())
    log.info("index: %d vectors of d=%d -> %s, %d shards (%s)", n, dim, plan.factory, num_shards, plan.reason)

    # Sample on the executors, collect only the sample: the driver holds the sample plus a
    # constant, whatever the table's size.
    t = time.time()
    sample_size = max(plan.train_size, min(n, icfg.recall_queries))
    pieces = None
    with task_errors():
        if isinstance(source, list):  # files: exactly sample_size rows; no shuffle anywhere
            layout = ix.file_layout(source)
            with _driver_spill_dir(spark) as spill:
                sample_pids, sample, ranges = ix.sample_files(spark, layout, dim, sample_size, icfg.seed, spill)
            ix.check_disjoint_files(spark, ranges)
            pieces = ix.plan_pieces(layout, num_shards)
        else:  # a DataFrame: a ~1.2x Bernoulli sample, trimmed here (seeded)
            sample_pids, sample = ix.sample_vectors(spark, source, dim, min(1.0, 1.2 * sample_size / n), icfg.seed)
    ix.check_finite(sample, sample_pids)
    if len(sample) > sample_size:
        keep = np.sort(np.random.default_rng(icfg.seed).choice(len(sample), sample_size, replace=False))
        sample, sample_pids = sample[keep], sample_pids[keep]
    timings["sample"] = time.time() - t
    t = time.time()
    if reuse_from:
        trained_bytes = reuse_from["trained"]
        quantizer = {"reused": True, "from_version": reuse_from["manifest"]["version"], "reason": reuse_from["reason"]}
    else:
        log.info("index: training %s on %d vectors (%s k-means, ~%.1f TFLOP)", plan.factory, len(sample),
                 plan.train_method, plan.train_flops / 1e12)
        trained_bytes = ix.serialize(ix.train_quantizer(sample, plan.factory, icfg.seed, plan.train_method))
        quantizer = {"reused": False, "reason": (extra_manifest or {}).get("retrain_reason", "trained for this version")}
    timings["train"] = time.time() - t
    rng = np.random.default_rng(icfg.seed)
    if question_vectors is not None and len(question_vectors):
        q = np.asarray(question_vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != dim:
            raise InputError(f"question vectors for recall have shape {list(q.shape)}, expected [n, {dim}]")
        pick = np.sort(rng.choice(len(q), size=min(len(q), max(icfg.recall_queries, 1024)), replace=False))
        queries = (q[pick], None, questions_source)
    else:
        pick = rng.choice(len(sample), size=min(icfg.recall_queries, len(sample)), replace=False)
        queries = (sample[pick], sample_pids[pick], "")
    del sample, sample_pids

    version = new_version_id()
    vurl = version_url(root, version)
    try:
        return _build_version(spark, cfg, source, extra_manifest, reuse_from, vurl, version, trained_bytes,
                              quantizer, plan, queries, fingerprint, n, dim, num_shards, timings, t0, counts,
                              pieces)
    except BaseException:
        # Nothing of a failed version may linger (LATEST never named it); best effort.
        try:
            fs, vpath = storage.get_fs(vurl, opts)
            if fs.exists(vpath):
                fs.rm(vpath, recursive=True)
        except Exception:  # noqa: BLE001
            log.warning("could not remove the incomplete version %s", vurl)
        raise


def _stale_quantizer(reuse_from: dict, recall_by_nprobe: dict, nprobe: int, k: int, icfg) -> str | None:
    """Why a reused quantizer no longer serves, or None. It must reach ``index.recall_target`` at
    all, and (unless nprobe is forced) at no more than ``reuse_from["max_nprobe"]`` probes: one
    that needs many more lists than the previous version did has drifted away from the corpus,
    and every query would pay for it."""
    prev = reuse_from["manifest"]
    recall = recall_by_nprobe.get(nprobe, 0)
    if recall < icfg.recall_target:
        return (f"recall@{k} {recall:.3f} with the reused quantizer of version {prev['version']} is below "
                f"index.recall_target {icfg.recall_target}")
    limit = reuse_from.get("max_nprobe")
    if limit and not icfg.nprobe and nprobe > limit:
        return (f"the reused quantizer of version {prev['version']} needs nprobe {nprobe} to reach "
                f"index.recall_target {icfg.recall_target}, over the limit of {limit:g} "
                f"({reuse_from.get('max_nprobe_key', 'growth')} x the nprobe {prev.get('nprobe')} that version served with)")
    return None


def _build_version(spark, cfg, source, extra_manifest, reuse_from, vurl, version, trained_bytes,
                   quantizer, plan, queries, fingerprint, n, dim, num_shards, timings, t0, counts,
                   pieces=None) -> dict:
    from dpr_lib.corpus import write_stats
    from dpr_lib.encode import resolve_spec
    from dpr_lib.spark import task_errors

    icfg, root, opts = cfg.index, cfg.path("index_root"), cfg.storage_options()
    emb_url = cfg.path("embeddings")
    try:
        storage.write_bytes_atomic(join_url(vurl, "trained.faiss"), trained_bytes, opts, cfg.publish.retries)
    except StorageError as exc:
        raise StorageError(f"cannot write to index_root {root}: {exc}") from exc
    k = icfg.recall_k
    queries, query_pids, questions_source = queries
    k_search = k if query_pids is None else k + 1  # room to drop the query's own pid
    nprobes = [p for p in ix.NPROBES if p <= max(1, plan.nlist)]
    with_store = ix.wants_rerank(plan.factory, icfg.rerank)
    k_factors = ([icfg.k_factor] if icfg.k_factor else list(ix.K_FACTORS)) if with_store else None
    t = time.time()
    with task_errors():
        shards = ix.build_shards(spark, source, trained_bytes, num_shards, dim,
                                 lambda s: join_url(vurl, f"shard-{s:05d}.faiss"), queries, k_search, nprobes,
                                 icfg.add_batch, opts, cfg.publish.retries, k_factors, pieces)
    timings["add_write"] = time.time() - t
    t = time.time()
    _, exact_i = ix.merge_topk([s["exact_scores"] for s in shards], [s["exact_ids"] for s in shards], k_search)
    exact_i = ix.drop_ids(exact_i, query_pids, k)
    recall_by = {}  # (nprobe, k_factor) -> recall@k; k_factor 0 = no re-rank
    for j, p in enumerate(nprobes):
        for f, kf in enumerate(k_factors or [0]):
            _, found = ix.merge_topk([s["hit_scores"][j][f] for s in shards], [s["hit_ids"][j][f] for s in shards],
                                     k_search)
            recall_by[(p, kf)] = round(ix.recall_at_k(ix.drop_ids(found, query_pids, k), exact_i), 4)
    # The smallest nprobe, then the smallest k_factor, reaching the target (forced values fixed).
    candidates = [(p, kf) for (p, kf) in recall_by if not icfg.nprobe or p == icfg.nprobe]
    reaching = sorted(c for c in candidates if recall_by[c] >= icfg.recall_target)
    nprobe, k_factor = reaching[0] if reaching else (
        max(candidates) if candidates else (icfg.nprobe, max(k_factors) if k_factors else 0))
    if icfg.nprobe:
        nprobe = icfg.nprobe
    recall_by_nprobe = {p: recall_by[(p, kf)] for (p, kf) in recall_by if kf == k_factor}
    timings["recall"] = time.time() - t
    stale = _stale_quantizer(reuse_from, recall_by_nprobe, nprobe, k, icfg) if reuse_from else None
    if stale:
        fs, vpath = storage.get_fs(vurl, opts)
        fs.rm(vpath, recursive=True)
        why = stale
        log.warning("%s: retraining", why)
        return build_index(spark, cfg, None if isinstance(source, list) else source,
                           {**(extra_manifest or {}), "retrain_reason": why},
                           question_vectors=queries if query_pids is None else None, counts=counts,
                           questions_source=questions_source)
    t = time.time()
    docstore = []
    if cfg.publish.docstore:
        with task_errors():
            docstore = write_docstore(spark, cfg, vurl)
    timings["docstore"] = time.time() - t

    vectors = sum(s["vectors"] for s in shards)
    code_bytes = ix.code_size(ix.deserialize(trained_bytes))
    passages_docstore = sum(d["rows"] for d in docstore)
    ledger = {**(accounting.from_stats(cfg) if counts is None else counts), "embeddings": n, "vectors": vectors}
    if cfg.publish.docstore:
        ledger.update(passages=_count_rows(cfg.path("passages")), docstore_rows=passages_docstore)
    ledger = accounting.check(ledger, "merge job")
    manifest = {
        "format_version": schemas.MANIFEST_FORMAT_VERSION,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "encoder": fingerprint,
        "question_encoder": resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=opts).fingerprint(),
        "metric": ix.METRIC,
        "dim": dim,
        "factory": plan.factory,
        "factory_reason": plan.reason,
        "nlist": plan.nlist,
        "quantizer": quantizer,
        "train_size": plan.train_size,
        "training": {"method": plan.train_method, "sample_bytes": plan.train_bytes,
                     "estimated_flops": plan.train_flops, "budget_bytes": cfg.train_budget_bytes()}
        if not reuse_from else None,
        "nprobe": nprobe,
        "k_factor": k_factor or None,
        "rerank": {"store": "float16", "k_factor": k_factor,
                   "recall_by_nprobe_k_factor": {f"{p}/{kf}": r for (p, kf), r in recall_by.items()}}
        if with_store else None,
        "memory": {"resident_bytes_per_passage": code_bytes + ix.ID_BYTES,
                   "disk_bytes_per_passage": 2 * dim + ix.ID_BYTES if with_store else 0,
                   "flat_float32_bytes_per_passage": 4 * dim},
        "recall": {"k": k, "target": icfg.recall_target, "queries": len(queries),
                   "query_source": "questions" if query_pids is None else "stored vectors, self excluded",
                   **({"questions_file": questions_source} if questions_source else {}),
                   "by_nprobe": {str(p): r for p, r in recall_by_nprobe.items()},
                   "at_nprobe": recall_by_nprobe.get(nprobe),
                   "reached_target": recall_by_nprobe.get(nprobe, 0) >= icfg.recall_target},
        "trained": {"path": "trained.faiss", "bytes": len(trained_bytes),
                    "sha256": storage.sha256_bytes(trained_bytes)},
        "shards": [{"index": s["shard"], "path": _relative(s["path"], vurl), "vectors": s["vectors"],
                    "bytes": s["bytes"], "sha256": s["sha256"], "task_peak_rss": s["peak_rss"],
                    **({"rerank": {part: {**meta, "path": _relative(meta["path"], vurl)}
                                   for part, meta in s["rerank"].items()}} if s["rerank"] else {})}
                   for s in shards],
        "docstore": docstore,
        "totals": {"vectors": vectors, "shards": len(shards), "bytes": sum(s["bytes"] for s in shards),
                   "rerank_bytes": sum(m["bytes"] for s in shards if s["rerank"] for m in s["rerank"].values()),
                   "docstore_rows": passages_docstore},
        "source": {"passages": cfg.path("passages"), "embeddings": emb_url},
        "counts": {"embeddings": n, "vectors_published": vectors},
        "accounting": ledger,
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
    }
    if extra_manifest:
        for key, value in extra_manifest.items():
            manifest.setdefault(key, value)
    storage.write_bytes_atomic(join_url(vurl, MANIFEST), json.dumps(manifest, indent=2).encode(), opts,
                               cfg.publish.retries)
    set_latest(root, version, opts, cfg.publish.retries)
    removed = prune_versions(root, cfg.publish.keep_versions, opts)
    manifest["timings"]["total"] = round(time.time() - t0, 3)
    stats = {"stage": "build_index", "version": version, "index_root": root, "removed_versions": removed,
             "factory": plan.factory, "nprobe": nprobe, "recall_at_nprobe": recall_by_nprobe.get(nprobe),
             "vectors": vectors, "shards": len(shards), "timings": manifest["timings"]}
    write_stats(cfg, "build_index", stats)
    log.info("published version %s to %s: %d vectors in %d shards, %s, nprobe %d gives recall@%d %.3f (%.1fs)",
             version, root, vectors, len(shards), plan.factory, nprobe, k, recall_by_nprobe.get(nprobe, 0),
             manifest["timings"]["total"])
    return manifest
