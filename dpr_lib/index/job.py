"""Stage 3, index: the merge job. The Embeddings table -> a trained IVF quantizer and shards built
on executors -> a published version.

On the driver: the index rule, a sample drawn on executors (:mod:`~dpr_lib.index.sample`; driver
memory = the sample, bounded by ``index.max_train_bytes``, plus a constant), training; then the
shard pass on executors (:mod:`~dpr_lib.index.shards`), recall of each nprobe against exact search
(:mod:`~dpr_lib.index.recall`), the accounting check, and the publish through the version writer
(:mod:`~dpr_lib.index.writer`: docstore, sparse side, manifest, quality gate, LATEST).

A quantizer reused from the previous version (the nightly job) that no longer reaches the recall
target is an explicit retrain step here: the version built with it is discarded and the job runs
again with a trained one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from dpr_lib import accounting, gate, storage
from dpr_lib import index_ops as ops
from dpr_lib.config import Config
from dpr_lib.errors import InputError
from dpr_lib.fusion import DEFAULT_FUSION
from dpr_lib.index.recall import (
    RECALL_LISTS,
    RecallLists,
    RecallQueries,
    choose_nprobe,
    encode_recall_questions,
    question_fingerprint,
    stale_quantizer,
    sweep_plan,
)
from dpr_lib.index.sample import check_disjoint_files, driver_spill_dir, sample_files, sample_vectors
from dpr_lib.index.shards import file_layout, plan_pieces
from dpr_lib.index.writer import StaleQuantizer, VersionWriter
from dpr_lib.manifest import Manifest

log = logging.getLogger("dpr_lib.index")


@dataclasses.dataclass
class Source:
    """What the merge job reads: Embeddings ``files`` (pyarrow, one task per file, no shuffle) or a DataFrame ``df``."""

    files: list[str] | None
    df: object | None
    fingerprint: dict
    n: int
    dim: int


@dataclasses.dataclass
class Reuse:
    """The previous version's quantizer, offered for reuse (the nightly job)."""

    trained: bytes
    manifest: Manifest
    reason: str
    max_nprobe: float = 0.0          # 0: no limit
    max_nprobe_key: str = "growth"

    @classmethod
    def of(cls, d: dict | None) -> Reuse | None:
        return d if d is None or isinstance(d, cls) else cls(**d)


def count_rows(url: str) -> int:
    """Rows of the Parquet files under ``url``, from their footers."""
    return sum(f["rows"] for f in file_layout(storage.list_files(url, ".parquet")))


def train_budget(spark, cfg: Config) -> int:
    """The training sample's budget from the running session's driver memory (spark-submit's
    --driver-memory included), not only from the config file."""
    live = spark.sparkContext.getConf().get("spark.driver.memory", None) if spark is not None else None
    return cfg.train_budget_bytes(live)


def read_source(cfg: Config, embeddings_df=None, fingerprint: dict | None = None) -> Source:
    from dpr_lib.encode import check_embeddings
    from dpr_lib.encoder_choice import passage_spec

    if embeddings_df is None:
        emb_url = cfg.path("embeddings")
        files = storage.list_files(emb_url, ".parquet")
        if not files:
            raise InputError(f"no Embeddings files under {emb_url}; run the encode stage first")
        fingerprint, n = check_embeddings(files, passage_spec(cfg).fingerprint())
        return Source(files, None, fingerprint, n, int(fingerprint.get("dim") or 0))
    fingerprint, n = fingerprint or {}, embeddings_df.count()
    dim = int(fingerprint.get("dim") or 0)
    if not dim:
        from pyspark.sql import functions as F

        first = embeddings_df.select(F.size("vector").alias("d")).first()
        dim = int(first["d"]) if first else 0
    return Source(None, embeddings_df, fingerprint, n, dim)


def build_index(spark, cfg: Config, embeddings_df=None, extra_manifest: dict | None = None,
                reuse_from: Reuse | dict | None = None, question_vectors: np.ndarray | None = None,
                counts: dict | None = None, questions_source: str = "", force: bool = False,
                validation: gate.Validation | None = None) -> Manifest:
    """Train, build shards and the docstore, write the manifest, then LATEST. Returns the Manifest.

    With ``index.validation_questions`` (or ``validation``, the pairs already read) the complete
    version is searched on them before LATEST moves, and the quality gate (``dpr_lib.gate``) stops
    the publish on a regression: :class:`~dpr_lib.gate.QualityGateError`, the version kept and
    marked rejected, unless ``force``.

    ``extra_manifest``: keys the caller adds to the manifest (the nightly job's ``nightly``,
    ``retrain_reason`` and ``compaction``); its ``encoder`` is the fingerprint of a DataFrame input.

    Recall (and so the recommended nprobe) is measured on ``question_vectors`` when given (encoded
    real questions: what a service will be asked; ``questions_source`` names where they came from
    in the manifest), else on ``index.recall_questions`` when configured, else on stored vectors
    sampled from the table, each query's own pid excluded from both its exact and approximate
    top-k (a stored vector always finds itself in its own list, which would overstate recall by up
    to 1/k).

    ``counts``: the run's corpus and encode counts for the accounting check (``dpr_lib.accounting``);
    None reads them from the stages' stats in this work dir. The check runs before the manifest.

    ``reuse_from`` (:class:`Reuse`) skips training and adds the vectors to the previous version's
    quantizer; if the recall measured with it misses ``index.recall_target``, or reaches it only
    above ``max_nprobe``, that version is discarded and the job retrains.
    """
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    t0, timings = time.time(), {}
    icfg = cfg.index
    if validation is None and icfg.validation_questions:
        validation = gate.read_validation_questions(cfg)  # a bad file fails before any stage
    if question_vectors is None and icfg.recall_questions:
        question_vectors = encode_recall_questions(cfg)
        questions_source = icfg.recall_questions
        timings["recall_questions"] = time.time() - t0
    extra = dict(extra_manifest or {})
    source = read_source(cfg, embeddings_df, extra.get("encoder"))
    # Dimension, NaN and duplicate-pid checks happen in the shard pass (one scan of the table).
    reuse = Reuse.of(reuse_from)
    args = (spark, cfg, source, extra, question_vectors, questions_source, counts, force, validation)
    if reuse is not None:
        try:
            return _build(*args, reuse, timings, t0)
        except StaleQuantizer as why:
            log.warning("%s: retraining", why)
            extra["retrain_reason"] = str(why)
            t0, timings = time.time(), {}
    return _build(*args, None, timings, t0)


def _plan(spark, cfg: Config, source: Source, reuse: Reuse | None) -> tuple[ops.IndexPlan, int]:
    icfg, n, dim = cfg.index, source.n, source.dim
    if reuse:
        prev = reuse.manifest
        plan = ops.IndexPlan(prev.factory, prev.nlist, 0, f"quantizer reused from version {prev.version}")
    else:
        plan = ops.choose_factory(n, dim, icfg.bytes_per_vector, icfg.train_per_list, train_budget(spark, cfg),
                                  icfg.min_nlist, icfg.factory, icfg.exact_below, icfg.max_train_sample,
                                  icfg.coarse, icfg.train_method, icfg.large_nlist,
                                  budget_key="index.max_train_bytes" if icfg.max_train_bytes else
                                  "index.max_train_bytes (0: half of spark.driver.memory)")
    num_shards = ops.shard_count(n, icfg.num_shards, icfg.max_vectors_per_shard)
    ops.check_task_memory(n, num_shards, dim, ops.code_size_of(plan.factory, dim), cfg.task_memory_bytes())
    log.info("index: %d vectors of d=%d -> %s, %d shards (%s)", n, dim, plan.factory, num_shards, plan.reason)
    return plan, num_shards


def _sample(spark, cfg: Config, source: Source, size: int, num_shards: int):
    """(sample pids, sample vectors, the files' shard pieces or None). Only the sample reaches the
    driver: it holds the sample plus a constant, whatever the table's size."""
    from dpr_lib.spark import task_errors

    icfg, n, dim = cfg.index, source.n, source.dim
    pieces = None
    with task_errors():
        if source.files is not None:  # files: exactly ``size`` rows; no shuffle anywhere
            layout = file_layout(source.files)
            with driver_spill_dir(spark) as spill:
                pids, sample, ranges = sample_files(spark, layout, dim, size, icfg.seed, spill)
            check_disjoint_files(spark, ranges)
            pieces = plan_pieces(layout, num_shards)
        else:  # a DataFrame: a ~1.2x Bernoulli sample, trimmed here (seeded)
            pids, sample = sample_vectors(spark, source.df, dim, min(1.0, 1.2 * size / n), icfg.seed)
    ops.check_finite(sample, pids)
    if len(sample) > size:
        keep = np.sort(np.random.default_rng(icfg.seed).choice(len(sample), size, replace=False))
        sample, pids = sample[keep], pids[keep]
    return pids, sample, pieces


def _recall_queries(cfg: Config, question_vectors, questions_source: str, sample, sample_pids, dim: int
                    ) -> RecallQueries:
    icfg = cfg.index
    rng = np.random.default_rng(icfg.seed)
    if question_vectors is not None and len(question_vectors):
        q = np.asarray(question_vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != dim:
            raise InputError(f"question vectors for recall have shape {list(q.shape)}, expected [n, {dim}]")
        pick = np.sort(rng.choice(len(q), size=min(len(q), max(icfg.recall_queries, 1024)), replace=False))
        return RecallQueries(q[pick], None, questions_source)
    pick = rng.choice(len(sample), size=min(icfg.recall_queries, len(sample)), replace=False)
    return RecallQueries(sample[pick], sample_pids[pick], "")


def _build(spark, cfg: Config, source: Source, extra: dict, question_vectors, questions_source: str,
           counts: dict | None, force: bool, validation, reuse: Reuse | None, timings: dict, t0: float) -> Manifest:
    """One attempt: plan, sample, train (or reuse), then the version through the writer."""
    icfg = cfg.index
    plan, num_shards = _plan(spark, cfg, source, reuse)
    t = time.time()
    sample_pids, sample, pieces = _sample(spark, cfg, source, max(plan.train_size, min(source.n, icfg.recall_queries)),
                                          num_shards)
    timings["sample"] = time.time() - t
    t = time.time()
    if reuse:
        trained = reuse.trained
        quantizer = {"reused": True, "from_version": reuse.manifest.version, "reason": reuse.reason}
    else:
        log.info("index: training %s on %d vectors (%s k-means, ~%.1f TFLOP)", plan.factory, len(sample),
                 plan.train_method, plan.train_flops / 1e12)
        trained = ops.serialize(ops.train_quantizer(sample, plan.factory, icfg.seed, plan.train_method))
        quantizer = {"reused": False, "reason": extra.get("retrain_reason", "trained for this version")}
    timings["train"] = time.time() - t
    queries = _recall_queries(cfg, question_vectors, questions_source, sample, sample_pids, source.dim)
    del sample, sample_pids
    with VersionWriter(spark, cfg, trained, timings, t0) as w:
        return _write(w, source, extra, plan, num_shards, pieces, queries, quantizer, reuse, counts, force,
                      validation)


def _write(w: VersionWriter, source: Source, extra: dict, plan: ops.IndexPlan, num_shards: int, pieces,
           queries: RecallQueries, quantizer: dict, reuse: Reuse | None, counts: dict | None, force: bool,
           validation) -> Manifest:
    cfg, icfg, dim = w.cfg, w.cfg.index, source.dim
    k = icfg.recall_k
    with_store = ops.wants_rerank(plan.factory, icfg.rerank)
    k_factors = ([icfg.k_factor] if icfg.k_factor else list(ops.K_FACTORS)) if with_store else None
    nprobes = [p for p in ops.NPROBES if p <= max(1, plan.nlist)]
    search_k, combos = sweep_plan(k, icfg.recall_report_k, queries, k_factors)
    # A shard's sweep stops once its own recall@k is within a tenth of the target's shortfall of 1.0
    # (0.995 for 0.95): the merged recall the target is judged by is then well above it. Deeper
    # depths and the recall lists at larger nprobes then repeat the last hits (lower bounds), except
    # for the steps up to nightly.max_nprobe_growth x, the nprobes a delta may raise to.
    shards = w.build_shards(source.files if source.files is not None else source.df, num_shards, dim,
                            queries.vectors, search_k, nprobes, combos, pieces,
                            (1.0 - (1.0 - icfg.recall_target) / 10, queries.k_search(k),
                             0 if with_store else math.ceil(math.log2(max(1.0, cfg.nightly.max_nprobe_growth)))))
    with w.timed("recall"):
        choice = choose_nprobe(shards, nprobes, combos, k, queries, icfg, icfg.recall_report_k)
        recall = choice.section(k, icfg.recall_target, queries)
        if not with_store:  # what a nightly delta measures its own recall from
            lists = RecallLists.of_shards(shards, nprobes, queries, search_k)
            recall["lists"] = dataclasses.asdict(w.write_file(RECALL_LISTS, lists.to_bytes()))
        recall["base_nprobe"] = choice.nprobe
    if reuse:
        why = stale_quantizer(reuse.manifest, reuse.max_nprobe, reuse.max_nprobe_key, choice, k, icfg)
        if why:
            raise StaleQuantizer(why)
    docstore = w.docstore()
    sparse = w.sparse(shards, pieces, num_shards) if cfg.sparse_enabled() else None
    vectors = sum(s.vectors for s in shards)
    code_bytes = ops.code_size(ops.deserialize(w.trained))
    docstore_rows = sum(d.rows for d in docstore)
    ledger = {**(accounting.from_stats(cfg) if counts is None else counts), "embeddings": source.n,
              "vectors": vectors}
    if cfg.publish.docstore:
        ledger.update(passages=count_rows(cfg.path("passages")), docstore_rows=docstore_rows)
    manifest = w.full_manifest(
        shards, docstore,
        encoder=source.fingerprint, question_encoder=question_fingerprint(cfg, source.fingerprint),
        metric=ops.METRIC, dim=dim, factory=plan.factory, factory_reason=plan.reason, nlist=plan.nlist,
        quantizer=quantizer, train_size=plan.train_size,
        training=None if reuse else {"method": plan.train_method, "sample_bytes": plan.train_bytes,
                                     "estimated_flops": plan.train_flops, "budget_bytes": train_budget(w.spark, cfg)},
        nprobe=choice.nprobe, k_factor=choice.k_factor or None,
        rerank={"store": "float16", "k_factor": choice.k_factor,
                "recall_by_nprobe_k_factor": {f"{p}/{kf}": r for (p, kf), r in choice.by.items()}}
        if with_store else None,
        memory={"resident_bytes_per_passage": code_bytes + ops.ID_BYTES,
                "disk_bytes_per_passage": 2 * dim + ops.ID_BYTES if with_store else 0,
                "flat_float32_bytes_per_passage": 4 * dim,
                **({"sparse_disk_bytes_per_passage": sparse["disk_bytes_per_passage"]} if sparse else {})},
        sparse=sparse, fusion=dict(DEFAULT_FUSION) if sparse else {},
        recall=recall,
        source={"passages": cfg.path("passages"), "embeddings": cfg.path("embeddings")},
        counts={"embeddings": source.n, "vectors_published": vectors},
        accounting=accounting.check(ledger, "merge job"),
        compaction=extra.get("compaction") or {"kind": "full", "reason": quantizer["reason"]},
        extra={key: v for key, v in extra.items() if key not in Manifest.field_names()})
    at = choice.by_nprobe.get(choice.nprobe)
    return w.publish(manifest, validation, force,
                     {"factory": plan.factory, "nprobe": choice.nprobe, "recall_at_nprobe": at,
                      "vectors": vectors, "shards": len(shards)},
                     f"{vectors} vectors in {len(shards)} shards, {plan.factory}, nprobe {choice.nprobe} gives "
                     f"recall@{k} {at or 0:.3f}")
