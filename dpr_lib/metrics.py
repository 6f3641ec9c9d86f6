"""Retrieval metrics, Spark-free: DPR's top-k accuracy (first answer-bearing rank), gold-passage
recall, qrels metrics through ``pytrec_eval`` (recall@k, MRR@10, nDCG@10, by document: MaxP), and
the seeded tune/held-out split of evaluation. Fusion of ranked lists is :mod:`dpr_lib.fusion`.

Arrays: ``pids`` int64 [questions, k] (-1 = no hit), ``scores`` float32 of the same shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dpr_lib.datasets import Dataset, Question, answer_keys
from dpr_lib.errors import InputError

if TYPE_CHECKING:
    from dpr_lib.bm25 import Passages

TOPS = (1, 5, 20, 100)


def first_hit_ranks(pids: np.ndarray, hit) -> np.ndarray:
    """1-based rank of each query's first pid for which ``hit(q, pid)`` holds; 0 when none."""
    ranks = np.zeros(len(pids), np.int64)
    for q, row in enumerate(pids):
        for r, pid in enumerate(row.tolist(), 1):
            if pid >= 0 and hit(q, pid):
                ranks[q] = r
                break
    return ranks


def accuracy_curve(ranks: np.ndarray, k_max: int) -> list[float]:
    """Top-k accuracy for k = 1..k_max from first-hit ranks (0 = never)."""
    found = ranks[ranks > 0]
    counts = np.bincount(found, minlength=k_max + 1)[1:k_max + 1]
    return (np.cumsum(counts) / max(1, len(ranks))).round(4).tolist()


def qa_metrics(passages: Passages, questions: list[Question], pids: np.ndarray, k_max: int) -> dict:
    keys = [answer_keys(q.answers) for q in questions]
    ranks = first_hit_ranks(pids, lambda q, pid: any(a in passages.key(pid) for a in keys[q]))
    curve = accuracy_curve(ranks, k_max)
    out = {f"top{k}": curve[min(k, k_max) - 1] for k in TOPS}
    if all(q.gold for q in questions):
        gold_ranks = first_hit_ranks(pids, lambda q, pid: passages.doc_id(pid) in questions[q].gold)
        gold_curve = accuracy_curve(gold_ranks, k_max)
        out.update({f"gold_recall@{k}": gold_curve[min(k, k_max) - 1] for k in TOPS})
    return {"metrics": out, "curve": curve}


def doc_run(doc_of, qids: list[str], pids: np.ndarray) -> dict[str, dict[str, float]]:
    """Passage top-k -> a document run (MaxP: a document ranks at its best passage's rank); the
    score is a decreasing function of rank so trec_eval's tie-breaking cannot reorder it.
    ``doc_of(pid)``: the passage's document id, or None."""
    run = {}
    for qid, row in zip(qids, pids):
        docs: dict[str, float] = {}
        for r, pid in enumerate(row.tolist()):
            d = doc_of(pid) if pid >= 0 else None
            if d is not None and d not in docs:
                docs[d] = float(len(row) - r)
        run[qid] = docs
    return run


def write_trec_run(path: str, passages: Passages, qids: list[str], pids: np.ndarray, tag: str, depth: int = 10) -> None:
    """A retriever's document ranking of each query in TREC run format (``qid Q0 doc rank score
    tag``), its top ``depth``: for trec_eval, ir_measures, or a comparison with another system."""
    run = doc_run(passages.doc_id, qids, pids)
    with open(path, "w", encoding="utf-8") as fh:
        for qid in qids:
            ranked = sorted(run.get(qid, {}).items(), key=lambda kv: -kv[1])[:depth]
            fh.writelines(f"{qid} Q0 {doc} {rank} {score:g} {tag}\n" for rank, (doc, score) in enumerate(ranked, 1))


def qrels_metrics(passages: Passages, ds: Dataset, pids: np.ndarray, k_max: int) -> dict:
    import pytrec_eval

    qrels = {q.qid: ds.qrels[q.qid] for q in ds.questions}
    run = doc_run(passages.doc_id, [q.qid for q in ds.questions], pids)
    cutoffs = ",".join(str(k) for k in range(1, k_max + 1))
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"recall.{cutoffs}", "ndcg_cut.10"}).evaluate(run)
    top10 = {qid: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for qid, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)

    def mean(measure: str, results=per_query) -> float:
        return round(float(np.mean([results.get(q.qid, {}).get(measure, 0.0) for q in ds.questions])), 4)

    curve = [mean(f"recall_{k}") for k in range(1, k_max + 1)]
    out = {f"recall@{k}": curve[min(k, k_max) - 1] for k in TOPS}
    out["mrr@10"] = mean("recip_rank", rr)
    out["ndcg@10"] = mean("ndcg_cut_10")
    return {"metrics": out, "curve": curve}


def per_question(kind: str, passages: Passages, ds: Dataset, pids: np.ndarray, metrics: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
    """Each question's value of each of ``metrics`` (``topN`` for QA: 1 when an answer is in the
    top N; ``ndcg@10`` / ``recall@N`` for judged queries): what a paired bootstrap resamples."""
    if kind == "qa":
        keys = [answer_keys(q.answers) for q in ds.questions]
        ranks = first_hit_ranks(pids, lambda q, pid: any(a in passages.key(pid) for a in keys[q]))
        return {m: ((ranks > 0) & (ranks <= int(m[3:]))).astype(np.float64) for m in metrics}
    import pytrec_eval

    qrels = {q.qid: ds.qrels[q.qid] for q in ds.questions}
    run = doc_run(passages.doc_id, [q.qid for q in ds.questions], pids)
    measures = {m: "ndcg_cut_10" if m == "ndcg@10" else f"recall_{m.split('@')[1]}" for m in metrics}
    names = {"ndcg_cut.10"} | {f"recall.{m.split('@')[1]}" for m in metrics if m.startswith("recall@")}
    results = pytrec_eval.RelevanceEvaluator(qrels, names).evaluate(run)
    return {m: np.array([results.get(q.qid, {}).get(measures[m], 0.0) for q in ds.questions]) for m in metrics}


def split_questions(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tune, held-out) row indices: a seeded random ``fraction`` of ``n`` to tune on, the rest to
    score on; both sorted and non-empty."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"--tune-fraction must be between 0 and 1 (exclusive), got {fraction}")
    n_tune = int(round(n * fraction))
    if n_tune < 1 or n_tune > n - 1:
        raise InputError(f"--tune-fraction {fraction} of {n} questions leaves no question to "
                         f"{'tune on' if n_tune < 1 else 'score on'}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_tune]), np.sort(order[n_tune:])
