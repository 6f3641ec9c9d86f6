"""Evaluation: retrieval accuracy of the published index against BM25 and a hybrid.

Given a QA dataset, the evaluation builds a closed corpus from it and runs the real stages on it
(shard -> encode -> index + publish), then answers every question through the loader
(:class:`dpr_lib.search.Searcher`: the manifest's question encoder + the published IVF shards) and
scores four retrievers over the same passages:

- ``bm25``: BM25 (Lucene variant, bm25s' analyzer: English stop words and Snowball stemming) over
  ``title + text`` of each passage: the version's own sparse side (:mod:`dpr_lib.sparse`), what a
  service answers in mode ``bm25``;
- ``dense_exact``: exact inner-product search over the Embeddings table (one Spark task per
  file, only top-k lists reach the driver), i.e. what the encoder achieves without approximation;
- ``dense_ivf``: the published IVF shards at the manifest's nprobe, i.e. what a search service
  answers; the gap to ``dense_exact`` is the index's approximation loss;
- ``hybrid``: a fusion of ``bm25`` and ``dense_ivf``: by default the label-free fusion a version
  without validation data serves (RRF, k = 60), or ``--fusion``/``--rrf-k``/``--alpha``;
- ``recommended`` (with ``--tune-fraction``): the fusion (or single retriever) chosen on a seeded
  fraction of the questions, scored with everything else on the rest only.

QA datasets (``squad``, ``dpr``) are scored with DPR's top-k accuracy: a question is answered at k
if one of its top-k passages contains an answer string, compared as tokens after DPR-style
normalisation (:func:`normalize_tokens`); where the gold paragraph is known, gold-passage recall@k
is reported too. Qrels datasets (``beir``) are scored with ``pytrec_eval`` (recall@k, MRR@10,
nDCG@10), passages mapped back to their documents by their best-ranked passage (MaxP).

Memory: the questions, their top-k lists and the BM25 index of the passages live on the driver
(an evaluation corpus is QA-sized); the embeddings never do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing

import numpy as np

from dpr_lib.bm25 import Passages, bm25_topk
from dpr_lib.config import Config
from dpr_lib.datasets import load_dataset
from dpr_lib.errors import InputError
from dpr_lib.fusion import (
    BOOTSTRAP_SAMPLES,
    CONFIDENCE,
    FUSIONS,
    choose_with_evidence,
    fuse,
    fusion_candidates,
    tuning_metrics,
)
from dpr_lib.metrics import per_question, qa_metrics, qrels_metrics, split_questions, write_trec_run

log = logging.getLogger("dpr_lib.evaluate")

# ------------------------------------------------------------------ report

LABELS = {"bm25": "BM25", "dense_exact": "dense, exact search", "dense_ivf": "dense, published IVF shards",
          "hybrid": "hybrid (BM25 + dense IVF)"}


def tune_on_split(runs: dict, ds, table, k: int, fraction: float, seed: int):
    """Choose what a version should serve (dense, bm25 or a fusion and its parameters) on a seeded
    random ``fraction`` of the questions, then keep only the other questions: every figure the
    report gives (including ``recommended``, the choice) is measured on questions it never saw."""
    tune_rows, held_rows = split_questions(len(ds.questions), fraction, seed)
    metrics = tuning_metrics(ds.kind, k)

    def subset(rows):
        questions = [ds.questions[i] for i in rows]
        return dataclasses.replace(ds, questions=questions)

    tune_ds = subset(tune_rows)
    candidates = fusion_candidates(runs["bm25"], runs["dense_ivf"], k)
    per_q = {name: per_question(ds.kind, table, tune_ds, run[1][tune_rows], metrics)
             for name, (_, run) in candidates.items()}
    on_tune = {name: {m: round(float(v.mean()), 4) for m, v in figs.items()} for name, figs in per_q.items()}
    chosen = choose_with_evidence(per_q, seed)
    best = chosen["name"]
    metric = ", ".join(metrics)
    held = {name: (run[0][held_rows], run[1][held_rows]) for name, run in runs.items()}
    held["recommended"] = tuple(a[held_rows] for a in candidates[best][1])
    tuning = {"fraction": fraction, "seed": seed, "metric": metric, "tuned_on": len(tune_rows),
              "scored_on": len(held_rows), "choice": {"name": best, **candidates[best][0]},
              "rule": f"the better of bm25 and dense unless another candidate's worst-case margin over it across "
                      f"the metrics is above 0 at {CONFIDENCE:.0%} confidence (paired bootstrap over the questions, "
                      f"{BOOTSTRAP_SAMPLES} samples); among those, the largest worst-case margin, then the best mean; "
                      f"when bm25 and dense themselves are not told apart, the largest worst-case margin",
              "plain_choice": chosen["plain"], "safe_choice": chosen["safe"], "warning": chosen["warning"],
              "intervals": chosen["intervals"], "singles_interval": chosen["singles_interval"], "on_tune": on_tune}
    if chosen["warning"]:
        log.warning("tuning: %s", chosen["warning"])
    log.info("tuned on %d questions: %s (%s on them: %s); every figure below is on the other %d",
             len(tune_rows), best, metric, on_tune[best], len(held_rows))
    return held, subset(held_rows), tuning


def encoding_line(e: dict) -> str:
    """How the version's passages and questions were encoded, in one line of the report."""
    return (f"Encoding: {e.get('pooling')} pooling, {e.get('dim')} dimensions"
            f"{' (Matryoshka truncation)' if e.get('matryoshka') else ''}, max {e.get('max_length')} tokens; "
            f"input {e.get('input_template')!r}; query prompt {e.get('query_prompt', '')!r}; passage prompt "
            f"{e.get('passage_prompt', '')!r}.")


def report_markdown(report: dict) -> str:
    metrics = list(next(iter(report["retrievers"].values())).keys())
    lines = [f"# Retrieval evaluation: {report['dataset']}", "",
             f"{report['n_questions']} questions over {report['n_passages']} passages; encoder "
             f"`{report['encoder'].get('model_id')}` ({report['encoder'].get('id')}); index "
             f"`{report['index']['factory']}`, nprobe {report['index']['nprobe']} (recall@"
             f"{report['index']['recall_k']} vs exact {report['index']['recall']}); hybrid = "
             f"{report['hybrid']['fusion']}"
             f"{' k=60, the label-free default' if report['hybrid'].get('rrf_k') == 60 else ''}; "
             f"{report['seconds']} s.", "", encoding_line(report.get("encoding") or {}), "",
             "| retriever | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, m in report["retrievers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in metrics) + " |")
    if report.get("tuning"):
        tu = report["tuning"]
        lines += ["", f"`recommended` = {tu['choice']['name']}, chosen by {tu['metric']} on a random {tu['fraction']:g} "
                      f"of the questions ({tu['tuned_on']}, seed {tu['seed']}); every row above is scored on the other "
                      f"{tu['scored_on']}."]
        if tu.get("warning"):
            lines += ["", f"**Warning:** {tu['warning']}."]
    if report.get("skipped"):
        lines += ["", "Skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[float]], path: str, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=LABELS.get(name, name), linewidth=1.8)
    ax.set_xscale("log")
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ the job

@dataclasses.dataclass
class EvaluationRuns:
    """Every retriever's ranked lists over one dataset's closed corpus, before scoring."""

    ds: typing.Any                 # the dataset (questions, kind, qrels)
    table: Passages
    runs: dict                     # retriever -> (scores [q, k], pids [q, k])
    k: int
    manifest: typing.Any
    searcher: typing.Any
    corpus_stats: dict
    encode_stats: dict
    timings: dict
    work: str


def evaluation_runs(spark, cfg: Config, dataset: str, fmt: str, out_dir: str, passages: str | None = None,
                    qrels: str | None = None, fusion: str = "rrf", rrf_k: int = 60, alpha: float = 0.5,
                    k_max: int = 100) -> EvaluationRuns:
    """Build a closed corpus from ``dataset``, run the stages on it (corpus, encode, merge job) and
    every retriever over it: bm25, dense_exact, dense_ivf and the fixed ``fusion`` (``hybrid``).

    ``spark`` is a SparkSession or a function returning one (called once the dataset has been
    read and checked, so bad input fails before a JVM starts)."""
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages
    from dpr_lib.encoder import get_encoder, resolve_spec
    from dpr_lib.index import build_index
    from dpr_lib.search import Searcher

    if fusion not in FUSIONS:
        raise InputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1], got {alpha}")
    out_dir = os.path.abspath(out_dir)
    work = os.path.join(out_dir, "work")
    os.makedirs(work, exist_ok=True)
    ds = load_dataset(fmt, dataset, work, passages, qrels)
    log.info("evaluation of %s: %d questions (skipped %s)", ds.name, len(ds.questions), ds.skipped or "none")
    if callable(spark):
        spark = spark()
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    cfg = dataclasses.replace(
        cfg, paths=dataclasses.replace(cfg.paths, work_dir=work),
        corpus=dataclasses.replace(cfg.corpus, input=ds.corpus_url, format=ds.corpus_format,
                                   default_corpus_limit=0))
    timings = {}
    t = time.time()
    corpus_stats = shard_corpus(spark, cfg)
    encode_stats = encode_passages(spark, cfg)
    timings["corpus_encode"] = round(time.time() - t, 1)
    t = time.time()
    texts = [q.text for q in ds.questions]
    qspec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options())
    log.info("encoding %d questions with %s", len(texts), qspec.fingerprint()["model_id"])
    encoder = get_encoder(qspec)
    qvecs = np.concatenate([encoder.encode(None, texts[i:i + 1024]) for i in range(0, len(texts), 1024)])
    timings["encode_questions"] = round(time.time() - t, 1)
    t = time.time()
    # The index's recall (and so its nprobe) is measured on these questions, not on stored vectors.
    manifest = build_index(spark, cfg, question_vectors=qvecs)
    timings["index"] = round(time.time() - t, 1)

    table = Passages(cfg.path("passages"))
    if not len(table):
        raise InputError(f"{dataset}: the corpus stage produced no passages (rejects: {corpus_stats['rejects']})")
    k = min(k_max, len(table))
    searcher = Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir"),
                        storage_options=cfg.storage_options(), max_k=max(k, cfg.search.max_k))

    runs = _retriever_runs(spark, cfg, searcher, table, texts, qvecs, k, manifest.dim, timings)
    weights = [1.0 - alpha, alpha] if fusion == "linear" else [1.0, 1.0]
    runs["hybrid"] = fuse([runs["bm25"], runs["dense_ivf"]], k, fusion, rrf_k, weights)
    return EvaluationRuns(ds, table, runs, k, manifest, searcher, corpus_stats, encode_stats, timings, work)


def evaluate(spark, cfg: Config, dataset: str, fmt: str, out_dir: str, passages: str | None = None,
             qrels: str | None = None, fusion: str = "rrf", rrf_k: int = 60, alpha: float = 0.5,
             k_max: int = 100, tune_fraction: float = 0.0) -> dict:
    """Build a closed corpus from ``dataset``, run the stages on it, score every retriever and
    write report.json, report.md and topk.png to ``out_dir``. Returns the report.

    ``spark`` is a SparkSession or a function returning one (called once the dataset has been
    read and checked, so bad input fails before a JVM starts)."""
    from dpr_lib.encoder import describe
    from dpr_lib.index_ops import recall_at_k

    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    ev = evaluation_runs(spark, cfg, dataset, fmt, out_dir, passages, qrels, fusion, rrf_k, alpha, k_max)
    ds, table, runs, k, manifest, searcher = ev.ds, ev.table, ev.runs, ev.k, ev.manifest, ev.searcher
    corpus_stats, encode_stats, timings, work = ev.corpus_stats, ev.encode_stats, ev.timings, ev.work
    t = time.time()
    ivf_recall = recall_at_k(runs["dense_ivf"][1][:, :10], runs["dense_exact"][1][:, :10])
    tuning = None
    if tune_fraction:
        runs, ds, tuning = tune_on_split(runs, ds, table, k, tune_fraction, cfg.index.seed)
    scored = {name: (qa_metrics(table, ds.questions, pids, k) if ds.kind == "qa"
                     else qrels_metrics(table, ds, pids, k)) for name, (_, pids) in runs.items()}
    timings["score"] = round(time.time() - t, 1)
    if ds.kind != "qa":  # judged queries: each retriever's top-10 documents, for other tools
        write_runs(os.path.join(out_dir, "runs"), runs, table, [q.qid for q in ds.questions])
    report = {
        "dataset": ds.name,
        "dataset_path": os.path.abspath(dataset),
        "format": fmt,
        "kind": ds.kind,
        "n_questions": len(ds.questions),
        **({"tuning": tuning} if tuning else {}),
        "n_passages": len(table),
        "n_documents": corpus_stats.get("docs"),
        "retrievers": {name: s["metrics"] for name, s in scored.items()},
        "encoder": manifest.encoder,
        "question_encoder": manifest.question_encoder,
        "encoding": describe(manifest.encoder, manifest.question_encoder),
        "index": {"version": manifest.version, "factory": manifest.factory, "nprobe": searcher.index.nprobe,
                  "recall_k": 10, "recall": round(ivf_recall, 4)},
        "hybrid": {"fusion": fusion, "of": ["bm25", "dense_ivf"],
                   **({"rrf_k": rrf_k} if fusion == "rrf" else {"alpha_dense": alpha})},
        "skipped": ds.skipped,
        "rejects": corpus_stats.get("rejects", 0),
        "curves": {name: s["curve"] for name, s in scored.items()},
        "work_dir": work,
        "timings": timings,
        "encode_passages_per_s": encode_stats.get("passages_per_s"),
        "seconds": round(time.time() - t0, 1),
    }
    write_report(out_dir, report, f"{ds.name}: {len(ds.questions)} questions")
    log.info("evaluation written to %s (%.1fs)", out_dir, report["seconds"])
    return report


def write_runs(out_dir: str, runs: dict, table, qids: list[str]) -> None:
    """Each retriever's top-10 documents per query as a TREC run file: ``<out_dir>/<retriever>.trec``."""
    os.makedirs(out_dir, exist_ok=True)
    for name, (_, pids) in runs.items():
        write_trec_run(os.path.join(out_dir, f"{name}.trec"), table, qids, pids, name)


def _retriever_runs(spark, cfg: Config, searcher, table, texts: list[str], qvecs: np.ndarray, k: int, dim: int,
                    timings: dict) -> dict:
    """Each retriever's top-k of the questions: bm25, dense_exact (brute force on executors), dense_ivf."""
    from dpr_lib import storage
    from dpr_lib.index import exact_topk
    from dpr_lib.spark import task_errors

    runs = {}
    t = time.time()
    # The version's own BM25 (its sparse side: what a service answers in mode bm25); bm25s for a
    # version built without one (same analyzer and formula, tests/unit/test_sparse_unit.py).
    runs["bm25"] = searcher.index.search_sparse(texts, k) if searcher.index.sparse is not None else \
        bm25_topk(table, texts, k)
    timings["bm25"] = round(time.time() - t, 1)
    t = time.time()
    with task_errors():
        runs["dense_exact"] = exact_topk(spark, storage.list_files(cfg.path("embeddings"), ".parquet"), qvecs, k, dim)
    timings["dense_exact"] = round(time.time() - t, 1)
    t = time.time()
    runs["dense_ivf"] = searcher.index.search(qvecs, k)
    timings["dense_ivf"] = round(time.time() - t, 1)
    return runs


def write_report(out_dir: str, report: dict, title: str) -> None:
    """report.json, report.md and topk.png of an evaluation."""
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report_markdown(report))
    ylabel = "top-k accuracy (answer in a top-k passage)" if report["kind"] == "qa" else "recall@k"
    plot_curves(report["curves"], os.path.join(out_dir, "topk.png"), title, ylabel)
