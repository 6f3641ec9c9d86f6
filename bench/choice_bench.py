"""`BENCH_ONLY=choice`: what the served retriever's choice costs when validation is small.

The BEIR-format MS MARCO subset (5,000 passages, 43 judged queries, graded judgments), the bundled
all-MiniLM-L6-v2 (torch fp32): every retriever is run once through the evaluation job's own code
(:func:`dpr_lib.evaluate.evaluation_runs`), then the evaluation job's ``--tune-fraction 0.2`` choice
(:func:`dpr_lib.evaluate.tune_on_split`: tune on a seeded 20% of the queries, score on the rest) is
made for 20 seeds. Per seed, the regret is nDCG@10 of the chosen retriever on the held-out queries
minus that of the better of dense and BM25 there (an oracle the choice cannot know); the figure is
its mean. The baseline in the same run is the plain rule (the largest worst-case margin on the
tuning queries, no interval), which the bootstrap rule replaced.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from common import QUICK, WORK, log
from peer_bench import BEIR, msmarco_config

OUT = os.path.join(WORK, "choice")
SEEDS = 5 if QUICK else 20
FRACTION = 0.2
CHOICE_KEYS = frozenset({"eval.choice_regret_small", "eval.choice_regret_small_plain",
                         "eval.choice_worst_regret_small"})


def held_ndcg(ev, rows: np.ndarray, pids: np.ndarray) -> float:
    """Mean nDCG@10 of ``pids`` (the held-out queries' lists) over the queries ``rows``."""
    from dpr_lib.metrics import per_question

    held = dataclasses.replace(ev.ds, questions=[ev.ds.questions[i] for i in rows])
    return float(per_question(ev.ds.kind, ev.table, held, pids, ("ndcg@10",))["ndcg@10"].mean())


def bench_choice(spark, results: dict, details: dict) -> None:
    if not os.path.isdir(BEIR):
        log(f"choice: {BEIR} not found; skipped")
        return
    from dpr_lib.evaluate import evaluation_runs, tune_on_split
    from dpr_lib.fusion import fusion_candidates
    from dpr_lib.metrics import split_questions

    ev = evaluation_runs(spark, msmarco_config(OUT), BEIR, "beir", os.path.join(OUT, "eval"), k_max=100)
    candidates = fusion_candidates(ev.runs["bm25"], ev.runs["dense_ivf"], ev.k)
    per_seed = []
    for seed in range(SEEDS):
        _, held_rows = split_questions(len(ev.ds.questions), FRACTION, seed)
        _, _, tuning = tune_on_split(ev.runs, ev.ds, ev.table, ev.k, FRACTION, seed)
        figure = {name: held_ndcg(ev, held_rows, run[1][held_rows]) for name, (_, run) in candidates.items()}
        best_single = max(figure["dense"], figure["bm25"])
        per_seed.append({"seed": seed, "choice": tuning["choice"]["name"], "plain": tuning["plain_choice"],
                         "regret": round(figure[tuning["choice"]["name"]] - best_single, 4),
                         "plain_regret": round(figure[tuning["plain_choice"]] - best_single, 4),
                         "warning": tuning["warning"], "dense": round(figure["dense"], 4),
                         "bm25": round(figure["bm25"], 4)})
        log(f"choice: seed {seed}: {per_seed[-1]}")
    regrets = [s["regret"] for s in per_seed]
    results.update({"eval.choice_regret_small": round(float(np.mean(regrets)), 4),
                    "eval.choice_regret_small_plain": round(float(np.mean([s["plain_regret"] for s in per_seed])), 4),
                    "eval.choice_worst_regret_small": round(float(min(regrets)), 4)})
    details["choice"] = {"dataset": "beir/msmarco subset", "queries": len(ev.ds.questions), "fraction": FRACTION,
                         "seeds": per_seed, "candidates": sorted(candidates), "quick": QUICK}
