"""Retrieval metrics and rank fusion, Spark-free: DPR's top-k accuracy (first answer-bearing
rank), gold-passage recall, qrels metrics through ``pytrec_eval`` (recall@k, MRR@10, nDCG@10, by
document: MaxP), and fusion of ranked lists (reciprocal rank fusion, min-max normalised linear).

Arrays: ``pids`` int64 [questions, k] (-1 = no hit), ``scores`` float32 of the same shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dpr_lib.datasets import Dataset, Question, answer_keys
from dpr_lib.errors import InputError

if TYPE_CHECKING:
    from dpr_lib.bm25 import Passages

FUSIONS = ("rrf", "linear")
TOPS = (1, 5, 20, 100)

def fuse(runs: list[tuple[np.ndarray, np.ndarray]], k: int, method: str = "rrf", rrf_k: int = 60,
         weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked lists (scores [q, k_i], pids [q, k_i]; pid -1 = no hit) into one top-k.

    ``rrf``: sum of 1 / (rrf_k + rank), rank from 1 (Cormack et al., 2009). ``linear``: weighted
    sum of per-query min-max normalised scores, a pid missing from a list scoring 0 there.
    Ties are broken by pid.
    """
    if method not in FUSIONS:
        raise InputError(f"fusion must be one of {', '.join(FUSIONS)}, got {method!r}")
    weights = weights or [1.0] * len(runs)
    nq = runs[0][1].shape[0]
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_p = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        acc: dict[int, float] = {}
        for (scores, pids), w in zip(runs, weights):
            valid = pids[q] >= 0
            p, s = pids[q][valid], scores[q][valid].astype(np.float64)
            if method == "rrf":
                contrib = w / (rrf_k + np.arange(1, len(p) + 1))
            else:
                span = s.max() - s.min() if len(s) else 0.0
                contrib = w * ((s - s.min()) / span if span > 0 else np.ones_like(s))
            for pid, c in zip(p.tolist(), contrib.tolist()):
                acc[pid] = acc.get(pid, 0.0) + c
        ranked = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (pid, score) in enumerate(ranked):
            out_p[q, j], out_s[q, j] = pid, score
    return out_s, out_p


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


# ---------------------------------------------------------------- fusion tuning

RRF_KS = (10, 30, 60, 100)
ALPHAS = tuple(round(a / 10, 1) for a in range(1, 10))
DENSE_WEIGHTS = (0.5, 0.7, 1.4, 2.0)   # weighted RRF: the dense list's weight, BM25's being 1


def fusion_candidates(bm25, dense, k: int) -> dict[str, tuple[dict, tuple[np.ndarray, np.ndarray]]]:
    """Every retriever a version could serve from a BM25 and a dense top-k: each alone, RRF over
    ``RRF_KS`` (equal weights, and the dense list weighted by ``DENSE_WEIGHTS``) and convex
    combinations of min-max normalised scores over ``ALPHAS`` (weight of dense).
    {name: (its settings, (scores, pids))}."""
    out = {"dense": ({"mode": "dense"}, dense), "bm25": ({"mode": "bm25"}, bm25)}
    for rk in RRF_KS:
        out[f"rrf_k{rk}"] = ({"mode": "hybrid", "fusion": "rrf", "rrf_k": rk}, fuse([bm25, dense], k, "rrf", rk))
        for w in DENSE_WEIGHTS:
            out[f"rrf_k{rk}_d{w}"] = ({"mode": "hybrid", "fusion": "rrf", "rrf_k": rk, "dense_weight": w},
                                      fuse([bm25, dense], k, "rrf", rk, weights=[1.0, w]))
    for a in ALPHAS:
        out[f"linear_a{a}"] = ({"mode": "hybrid", "fusion": "linear", "alpha_dense": a},
                               fuse([bm25, dense], k, "linear", weights=[1.0 - a, a]))
    return out


def tuning_metrics(kind: str, k: int) -> tuple[str, ...]:
    """The figures a fusion is chosen by: the cutoffs a search team reads (QA: top-1, top-5, top-20
    accuracy; judged queries: nDCG@10 and recall@20), capped at the lists' depth k."""
    if kind == "qa":
        return tuple(dict.fromkeys(f"top{min(c, k)}" for c in (1, 5, 20)))
    return ("ndcg@10", f"recall@{min(20, k)}")


def choose_fusion(figures: dict[str, dict[str, float]], singles: tuple[str, ...] = ("bm25", "dense")) -> str:
    """The candidate to serve: the one whose worst margin over the better single retriever, across
    the tuning figures, is largest (never worse than BM25 or dense at any cutoff, if any candidate
    manages that), then the best mean figure, then the simplest (dense, bm25, a fusion).
    ``figures``: {candidate: {metric: value}}, holding ``singles``."""
    metrics = list(next(iter(figures.values())))
    best_single = {m: max(figures[s][m] for s in singles if s in figures) for m in metrics}
    rank = {"dense": 2, "bm25": 1}

    def key(name: str):
        f = figures[name]
        margin = min(f[m] - best_single[m] for m in metrics)
        return round(margin, 6), round(float(np.mean([f[m] for m in metrics])), 6), rank.get(name, 0)

    return max(figures, key=key)


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
