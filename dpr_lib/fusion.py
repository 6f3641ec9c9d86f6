"""Rank fusion, the one home of it: how two ranked lists (BM25 and dense) become one, for the
merge job's tuning (:mod:`dpr_lib.gate`), the evaluation's ``--tune-fraction``, and what a search
service serves in mode ``hybrid`` (:mod:`dpr_lib.search`). Spark-free, numpy only.

- :func:`fuse`: reciprocal rank fusion (optionally weighted) or a convex combination of min-max
  normalised scores;
- ``DEFAULT_FUSION``: the label-free fusion a version without validation data serves;
- :func:`fusion_candidates` and :func:`choose_fusion`: every fusion a version could serve, and
  the rule that picks one on labelled questions.

Arrays: ``pids`` int64 [questions, k] (-1 = no hit), ``scores`` float32 of the same shape.
"""

from __future__ import annotations

import numpy as np

from dpr_lib.errors import InputError

FUSIONS = ("rrf", "linear")

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


DEFAULT_FUSION = {"mode": "hybrid", "method": "rrf", "rrf_k": 60, "fetch_k_factor": 2, "source": "default"}
"""The label-free fusion (no validation data): reciprocal rank fusion with Cormack et al.'s k = 60
over each side's top 2k. See docs for how it compares with tuned fusions."""


def fusion_of(manifest) -> dict:
    """The fusion a version serves: its manifest's (tuned or default), else the label-free default."""
    return {**DEFAULT_FUSION, **(manifest.fusion or {})} if manifest.sparse else {"mode": "dense"}


def fuse_runs(fusion: dict, sparse: tuple, dense: tuple, k: int) -> tuple[np.ndarray, np.ndarray]:
    if fusion.get("method") == "linear":
        a = float(fusion.get("alpha_dense", 0.5))
        return fuse([sparse, dense], k, "linear", weights=[1.0 - a, a])
    return fuse([sparse, dense], k, "rrf", int(fusion.get("rrf_k", 60)),
                weights=[1.0, float(fusion.get("dense_weight", 1.0))])


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


# ---------------------------------------------------------------- a choice that knows its uncertainty

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.9   # two-sided: a candidate replaces the safe choice when the lower 5% bound of its margin is > 0


def margin_differences(per_question: dict[str, dict[str, np.ndarray]], candidate: str, safe: str) -> np.ndarray:
    """float64 [metrics, questions]: the candidate's per-question figure minus ``safe``'s, per
    tuning metric. Its worst margin is the minimum over metrics of the row means."""
    return np.stack([np.asarray(per_question[candidate][m], np.float64) - np.asarray(per_question[safe][m], np.float64)
                     for m in per_question[safe]])


def choose_with_evidence(per_question: dict[str, dict[str, np.ndarray]], seed: int = 0,
                         singles: tuple[str, ...] = ("bm25", "dense"), samples: int = BOOTSTRAP_SAMPLES,
                         confidence: float = CONFIDENCE) -> dict:
    """:func:`choose_fusion` on per-question figures ({candidate: {metric: [n] per question}}),
    moving away from the safer choice only when the evidence says so.

    The safe choice is the better single retriever (by :func:`choose_fusion` over the singles).
    Every other candidate's worst margin over it (across the metrics) gets a paired bootstrap
    interval over the questions (the same resampled questions for every candidate). The plain
    choice stands if it is the safe one or its interval's lower bound is above 0; else the
    candidate with the best mean margin among those whose lower bound is above 0; else the safe
    choice, with a warning giving about how many questions would separate the plain choice from it
    (normal approximation, from the per-question spread of its margin). A safe choice must itself
    be told apart from the other single retriever (``singles_interval``, its worst margin over it):
    when it is not, neither single is known to be safer, and the plain choice serves, with a warning
    (measured on 43 MS MARCO queries tuned on 9: retreating to a single chosen by noise cost 0.009
    nDCG@10 on average, the plain choice 0.004; bench/choice_bench.py).

    Returns {"name", "plain", "safe", "questions", "intervals": {candidate: [mean, low, high]}, "singles_interval",
    "warning": str | None}."""
    means = {name: {m: float(np.mean(v)) for m, v in figs.items()} for name, figs in per_question.items()}
    plain = choose_fusion(means, singles)
    safe = choose_fusion({s: means[s] for s in singles if s in means}, singles)
    n = len(next(iter(per_question[safe].values())))
    rows = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    alpha = (1.0 - confidence) / 2

    def interval(candidate: str, over: str) -> list[float]:
        """[mean, low, high] of ``candidate``'s worst margin over ``over`` (the same resamples for all)."""
        diffs = margin_differences(per_question, candidate, over)
        boot = diffs[:, rows].mean(axis=2).min(axis=0)  # [samples]: the worst margin of each resample
        return [round(float(diffs.mean(axis=1).min()), 4),
                round(float(np.quantile(boot, alpha)), 4), round(float(np.quantile(boot, 1 - alpha)), 4)]

    intervals = {name: interval(name, safe) for name in per_question if name != safe}
    supported = [c for c, (_, low, _) in intervals.items() if low > 0]
    other = next((s for s in singles if s in per_question and s != safe), None)
    # is the safe choice itself told apart from the other single?
    singles_apart = interval(safe, other) if other is not None else None
    if plain == safe or plain in supported:
        name = plain
    elif supported:
        name = max(supported, key=lambda c: (intervals[c][0], c))
    elif singles_apart is not None and singles_apart[1] <= 0:
        name = plain  # no single retriever is known to be the safer one: the best estimate serves
    else:
        name = safe
    warning = None
    if name != plain or (singles_apart is not None and singles_apart[1] <= 0 and plain != safe):
        a, b, (mean, low, high) = (plain, safe, intervals[plain]) if name == safe else (safe, other, singles_apart)
        spread = (high - low) / (2 * 1.645) * np.sqrt(n)  # per-question standard deviation of the margin
        needed = int(np.ceil((1.645 * spread / mean) ** 2)) if mean > 0 else None
        warning = (f"{n} questions cannot separate {a} (margin {mean:+.4f}, {confidence:.0%} interval "
                   f"[{low:+.4f}, {high:+.4f}]) from {b}: "
                   + (f"kept {safe}" if name == safe else f"neither is the safe choice, so {name} (the best on "
                      "them) serves")
                   + (f"; about {needed} questions would separate them at this margin" if needed else ""))
    return {"name": name, "plain": plain, "safe": safe, "questions": n, "intervals": intervals,
            "singles_interval": singles_apart, "warning": warning}
