"""`make bench`, nightly part: an incremental run vs a full rebuild, top-10 agreement."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from common import QUICK, REPO, TORCH, WORK, equal_sets, log, squad_jsonl, squad_questions, squad_remix_jsonl


def bench_nightly(spark, results: dict, details: dict) -> None:
    """5% of documents changed: incremental run vs a full rebuild of the same snapshot, both through
    jobs' library entry point (run_nightly), and top-10 agreement of the two indexes."""
    from dpr_lib.config import load_config
    from dpr_lib.encoder import Encoder, resolve_spec
    from dpr_lib.nightly import run_nightly
    from dpr_lib.search import ShardedIndex

    # Full mode: 20,000 one-passage documents of real SQuAD sentences, each drawn from one article
    # (BENCH_NIGHTLY_CORPUS=mixed: from anywhere); an IVF index (above index.exact_below), where
    # fixed per-stage costs no longer dominate. Both indexes pick nprobe for recall@10 >= 0.999 on
    # 1,024 SQuAD dev questions (index.recall_questions); agreement is measured on 300 other
    # (training-set) questions at the nprobe each index serves, at what each index's recall sweep
    # (in its manifest) recommends for lower targets, and over a sweep of nprobe against exact search.
    n_docs = 150 if QUICK else int(os.environ.get("BENCH_NIGHTLY_DOCS", "20000"))
    corpus = os.environ.get("BENCH_NIGHTLY_CORPUS", "article")
    snap = os.path.join(WORK, "nightly", "snapshot.jsonl")
    if QUICK:
        squad_jsonl(snap, n_docs)
    else:
        squad_remix_jsonl(snap, n_docs, by_article=corpus == "article")
    docs = [json.loads(line) for line in open(snap)]
    calibration = os.path.join(WORK, "nightly", "dev_questions.txt")
    with open(calibration, "w") as fh:
        fh.writelines(q.replace("\n", " ") + "\n" for q in squad_questions("dev-v1.1-part-a.json", 10**6))
    target = float(os.environ.get("BENCH_NIGHTLY_TARGET", "0.999"))

    def cfg_for(name):
        return load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
            f"paths.work_dir={WORK}/nightly/{name}", f"corpus.input={snap}", "index.num_shards=2",
            f"paths.cache_dir={WORK}/cache", f"index.recall_questions={calibration}",
            f"index.recall_target={target}"])

    import shutil

    for name in ("incremental", "full"):
        shutil.rmtree(os.path.join(WORK, "nightly", name), ignore_errors=True)
    run_nightly(spark, cfg_for("incremental"))  # yesterday's run
    rng = np.random.default_rng(0)
    for i in rng.choice(len(docs), max(1, len(docs) // 20), replace=False):
        docs[i]["text"] = docs[i]["text"] + " (revised)"
    with open(snap, "w") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    t = time.perf_counter()
    inc = run_nightly(spark, cfg_for("incremental"))
    inc_s = time.perf_counter() - t
    t = time.perf_counter()
    full = run_nightly(spark, cfg_for("full"))
    full_s = time.perf_counter() - t

    questions = squad_questions("train-v1.1-subset.json", 50 if QUICK else 300, per_paragraph=1)
    cfg = cfg_for("full")
    q = Encoder(resolve_spec(cfg.encoder, cfg.path("cache_dir"))).encode(None, questions)
    cache = os.path.join(WORK, "cache")
    indexes = {name: ShardedIndex(cfg_for(name).path("index_root"), cache_dir=cache)
               for name in ("incremental", "full")}

    def top10(name: str, nprobe: int) -> np.ndarray:
        ix = indexes[name]
        ix.nprobe = nprobe
        return ix.search(q, 10)[1]

    nlist = max(ix.manifest.nlist for ix in indexes.values())
    exact = top10("full", nlist)  # every list probed: exact search (IVF-Flat)
    agree = equal_sets
    def recall(a) -> float:
        return round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, exact)])), 4)

    sweep = {}
    for p in sorted({1 << i for i in range(nlist.bit_length())} | {nlist}):
        a, b = top10("incremental", p), top10("full", p)
        sweep[p] = {"agreement": agree(a, b), "recall_incremental": recall(a), "recall_full": recall(b)}
    by_target = {}  # what each index's own recall sweep recommends for a target, and the agreement there
    for goal in (0.95, 0.99, 0.995, 0.999):
        chosen = {}
        for name, ix in indexes.items():
            curve = {int(p): r for p, r in ix.manifest.recall["by_nprobe"].items()}
            chosen[name] = min([p for p, r in curve.items() if r >= goal] or [max(curve)])
        by_target[str(goal)] = {"nprobe": chosen, "nlist": nlist, "agreement": agree(
            top10("incremental", chosen["incremental"]), top10("full", chosen["full"]))}
    served = {"nprobe": {"incremental": inc["nprobe"], "full": full["nprobe"]}, "nlist": nlist, "target": target,
              "agreement": agree(top10("incremental", inc["nprobe"]), top10("full", full["nprobe"]))}
    results.update({"nightly.incremental_ratio_5pct": round(inc_s / full_s, 3),
                    "nightly.top10_agreement": served["agreement"],
                    "nightly.top10_agreement_at_recall_095": by_target["0.95"]["agreement"],
                    "nightly.top10_agreement_exhaustive": sweep[nlist]["agreement"]})
    details["nightly"] = {"docs": n_docs, "corpus": "squad" if QUICK else corpus,
                          "served": served, "agreement_by_recall_target": by_target, "sweep": sweep,
                          "recall_at_nprobe": {"incremental": inc["recall_at_nprobe"],
                                               "full": full["recall_at_nprobe"]},
                          "incremental_s": round(inc_s, 2), "full_s": round(full_s, 2),
                          "incremental_stage_s": inc["seconds"], "full_stage_s": full["seconds"],
                          "diff": inc["diff"], "encoded": inc["encoded"], "quantizer": inc["quantizer"]}
    log(f"nightly: incremental {inc_s:.1f}s vs full {full_s:.1f}s; top-10 agreement as served (recall "
        f"target {target} on questions): {served['agreement']:.3f} (nprobe {served['nprobe']} of {nlist}), at "
        f"0.95: {by_target['0.95']['agreement']:.3f}; exhaustive {sweep[nlist]['agreement']:.3f}")
