"""`BENCH_ONLY=sparse`: the BM25 side at Wikipedia scale, pruned against exhaustive in the same run.

- the shared Wikipedia subset cut into 60-word passages (1.08M) by the real corpus stage, and a
  quarter of it (one of its four Passages files, ~270k); the sparse side built by the merge job's
  own code (``build_sparse`` on Spark; the 1.08M one inside a whole version: dense vectors are the
  calibrated synthetic ones of the nightly-at-scale bench, the text is real);
- 1,000 real questions (SQuAD dev part a), one at a time, one thread: p50/p99 ms at k=10 and
  k=100, the pruned scorer and the exhaustive one interleaved question by question, three rounds
  (a question's time: its median); top-k agreement (identical pids and scores, in order, every
  round); bytes per passage on disk;
- ``dpr-serve`` over the 1.08M version, 16 clients, hybrid against dense (same service, same run).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from common import QUICK, REPO, TORCH, WIKI, WORK, log, squad_questions, wait_until_serving

OUT = os.path.join(WORK, "sparse")
WORDS = 60
SPARSE_KEYS = frozenset({
    "sparse.topk_agreement", "sparse.p50_ms_1m", "sparse.p99_ms_1m", "sparse.p50_ms_1m_k100",
    "sparse.exhaustive_p50_ms_1m", "sparse.speedup_vs_exhaustive_1m", "sparse.speedup_vs_exhaustive_1m_k100",
    "sparse.p50_ms_small", "sparse.growth_4x", "sparse.bytes_per_passage_1m", "sparse.passages_1m",
    "sparse.passages_small", "serve.hybrid_qps_ratio_1m", "serve.hybrid_p99_ratio_1m", "sparse.oracle_growth_4x",
    "sparse.oracle_live_fraction_1m"})


def percentile(ms, q: float) -> float:
    return round(float(np.percentile(ms, q)), 3)


def big_version(spark, questions_file: str) -> tuple[object, str]:
    """The 1.08M-passage version (built once; a rerun reuses it when its marker is there)."""
    from nightly_scale import baseline, real_vectors

    from dpr_lib.config import load_config

    work = os.path.join(OUT, "big")
    files = sorted(glob.glob(os.path.join(WIKI, "*.jsonl.gz")))
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
        f"paths.work_dir={work}", f"paths.cache_dir={OUT}/cache", f"corpus.input={files[0] if QUICK else WIKI}",
        f"corpus.words={WORDS}", f"index.recall_questions={questions_file}", "serve.warmup_queries=0"])
    marker = os.path.join(work, "built.json")
    if os.path.exists(marker) and json.load(open(marker)).get("quick") == QUICK:
        log(f"sparse: reusing the version under {work}")
        return cfg, json.load(open(marker))["version"]
    shutil.rmtree(work, ignore_errors=True)
    real = real_vectors(cfg)
    t = time.time()
    base = baseline(spark, cfg, real)
    log(f"sparse: version of {base['passages']} passages in {time.time() - t:.0f}s {base['seconds']}")
    with open(marker, "w") as fh:
        json.dump({"version": base["version"], "quick": QUICK, "passages": base["passages"]}, fh)
    return cfg, base["version"]


def small_sparse(spark, cfg, num_shards: int) -> dict:
    """The sparse side of one of the big corpus's four Passages files, built by ``build_sparse``."""
    from dpr_lib.config import join_url
    from dpr_lib.sparse import build_sparse

    work = os.path.join(OUT, "small")
    from dpr_lib import storage

    tables = glob.glob(os.path.join(cfg.path("work_dir"), "runs", "*", "passages"))
    passages = sorted(glob.glob(os.path.join(storage.resolve_table(tables[0]), "*.parquet"))) if tables else []
    if not passages:
        raise RuntimeError(f"no Passages files under {cfg.path('work_dir')}/runs")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "passages"))
    shutil.copy(passages[0], os.path.join(work, "passages", os.path.basename(passages[0])))
    import copy

    small_cfg = copy.deepcopy(cfg)
    small_cfg.paths.passages = os.path.join(work, "passages")
    vurl = os.path.join(work, "version")
    section = build_sparse(spark, small_cfg, vurl, num_shards, assign=lambda pids: pids % num_shards)
    return {"vocab": join_url(vurl, section["vocab"]["path"]),
            "shards": [join_url(vurl, s["path"]) for s in section["shards"]],
            "docs": section["docs"], "avg_doc_len": section["avg_doc_len"],
            "bytes_per_passage": section["disk_bytes_per_passage"]}


def big_sparse(cfg, version: str) -> dict:
    from dpr_lib.config import join_url
    from dpr_lib.manifest import MANIFEST, read_manifest, version_url

    vurl = version_url(cfg.path("index_root"), version)
    sp = read_manifest(join_url(vurl, MANIFEST)).sparse
    return {"vocab": join_url(vurl, sp["vocab"]["path"]), "shards": [join_url(vurl, s["path"]) for s in sp["shards"]],
            "docs": sp["docs"], "avg_doc_len": sp["avg_doc_len"], "bytes_per_passage": sp["disk_bytes_per_passage"],
            "postings": sum(s["postings"] for s in sp["shards"]), "terms": sp["vocab"]["terms"],
            "shard_terms": sum(s["terms"] for s in sp["shards"])}


ROUNDS = 1 if QUICK else 3


def measure(files: dict, questions: list[str]) -> dict:
    """Both scorers over the same memory-mapped files, question by question, interleaved (each
    scorer runs after the other has evicted what it cached). :data:`ROUNDS` rounds over the
    questions: a question's time is its median over the rounds (a neighbour's burst on a shared
    machine moves one round, not the figure); agreement is checked in every round."""
    from dpr_lib.sparse import SparseIndex

    pruned, exact = (SparseIndex(files["vocab"], files["shards"], files["docs"], files["avg_doc_len"], exact=e)
                     for e in (False, True))
    for q in questions:  # compile the kernels, page the files in
        pruned.search([q], 100)
        exact.search([q], 10)
    out = {}
    for k in (10, 100):
        times = {"pruned": np.zeros((ROUNDS, len(questions))), "exhaustive": np.zeros((ROUNDS, len(questions)))}
        agree = np.ones(len(questions), bool)
        for r in range(ROUNDS):
            for x, q in enumerate(questions):
                got = {}
                for name, index in (("exhaustive", exact), ("pruned", pruned)):
                    t = time.perf_counter()
                    got[name] = index.search([q], k)
                    times[name][r, x] = (time.perf_counter() - t) * 1000
                agree[x] &= bool(np.array_equal(got["pruned"][1], got["exhaustive"][1])
                                 and np.array_equal(got["pruned"][0], got["exhaustive"][0]))
        out[k] = {name: {"p50_ms": percentile(np.median(ms, axis=0), 50), "p99_ms": percentile(np.median(ms, axis=0), 99),
                         "mean_ms": round(float(np.mean(ms)), 3)} for name, ms in times.items()}
        out[k]["agreement"] = float(agree.mean())
        out[k]["speedup_p50"] = round(out[k]["exhaustive"]["p50_ms"] / out[k]["pruned"]["p50_ms"], 2)
        log(f"sparse: {files['docs']} passages k={k}: pruned p50 {out[k]['pruned']['p50_ms']} ms p99 "
            f"{out[k]['pruned']['p99_ms']} | exhaustive p50 {out[k]['exhaustive']['p50_ms']} ms p99 "
            f"{out[k]['exhaustive']['p99_ms']} | agreement {out[k]['agreement']}")
    return out


def oracle_live_postings(files: dict, questions: list[str], cell: int = 64) -> tuple[float, float]:
    """Per question, the postings an exact bound-based scorer could not skip even with an oracle:
    each ``cell``-row range's largest actual contribution per term and the final k-th score
    (k = 10) known up front; the postings in cells whose per-term maxima sum to that score or more.
    Its growth between two sizes bounds how far exact dynamic pruning can bend the cost's growth.
    Returns (those postings, all postings of the questions' terms), per question."""
    from dpr_lib import postings
    from dpr_lib.bm25 import K1, B
    from dpr_lib.sparse import SparseIndex

    index = SparseIndex(files["vocab"], files["shards"], files["docs"], files["avg_doc_len"], exact=True)
    f32 = (np.float32(K1), np.float32(1.0 - B), np.float32(B / files["avg_doc_len"]))
    live = total = 0
    for q in questions:
        scores, _ = index.search([q], 10)
        theta = float(scores[0, -1])
        terms, weights = index.query_terms([q])[0]
        for shard, blocks in zip(index.shards, index.blocks):
            st = shard["terms"]
            pos = np.minimum(np.searchsorted(st, terms), len(st) - 1)
            found = st[pos] == terms
            counts = np.asarray(shard["df"])[pos[found]].astype(np.int64)
            rows, tf = np.empty(counts.sum(), np.int64), np.empty(counts.sum(), np.int64)
            postings.decode_terms(pos[found].astype(np.int64), blocks, rows, tf)
            norm = postings.norms(np.asarray(shard["doc_len"])[rows], *f32)
            t = tf.astype(np.float32)
            contrib = np.repeat(weights[found].astype(np.float32), counts) * t / (t + norm)
            cells = np.zeros(((len(shard["pids"]) + cell - 1) // cell, int(found.sum())))
            np.maximum.at(cells, (rows // cell, np.repeat(np.arange(int(found.sum())), counts)), contrib)
            live += int((cells.sum(axis=1) >= theta)[rows // cell].sum())
            total += len(rows)
    return live / len(questions), total / len(questions)


def serve_modes(cfg, qfile: str) -> dict:
    """dpr-serve over the big version: 1 and 16 clients, dense then hybrid (questions: ``qfile``)."""
    import socket

    from serve_bench import loadgen

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dpr-serve"), "--index",
                             cfg.path("index_root"), "--port", str(port), "--conf",
                             os.path.join(REPO, "conf", "local.yaml"), "--set", f"paths.cache_dir={OUT}/serve-cache"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, 600)
        seconds = 3 if QUICK else 15
        out = {mode: {c: loadgen(url, qfile, c, seconds, mode=mode) for c in (1, 16)} for mode in ("dense", "hybrid")}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log(f"sparse: dpr-serve 16 clients dense {out['dense'][16]['qps']} q/s, hybrid {out['hybrid'][16]['qps']} q/s")
    return out


def bench_sparse(spark, results: dict, details: dict) -> None:
    if not os.path.isdir(WIKI):
        log(f"sparse: {WIKI} not found; skipped")
        return
    os.makedirs(OUT, exist_ok=True)
    questions = squad_questions("dev-v1.1-part-a.json", 100 if QUICK else 1000)
    qfile = os.path.join(OUT, "recall_questions.txt")
    with open(qfile, "w", encoding="utf-8") as fh:  # the recall questions, and the service's load
        fh.writelines(q.replace("\n", " ") + "\n" for q in questions)
    cfg, version = big_version(spark, qfile)
    big = big_sparse(cfg, version)
    small = small_sparse(spark, cfg, len(big["shards"]))
    spark.catalog.clearCache()
    runs = {"big": measure(big, questions), "small": measure(small, questions)}
    b, s = runs["big"], runs["small"]
    oq = questions[:50 if QUICK else 200]
    oracle = {"big": oracle_live_postings(big, oq), "small": oracle_live_postings(small, oq)}
    log(f"sparse: oracle: {oracle['big'][0]:.0f} of {oracle['big'][1]:.0f} postings per question left at 1.1M, "
        f"{oracle['small'][0]:.0f} of {oracle['small'][1]:.0f} at the small size")
    results.update({
        "sparse.passages_1m": big["docs"], "sparse.passages_small": small["docs"],
        "sparse.topk_agreement": min(r[k]["agreement"] for r in runs.values() for k in (10, 100)),
        "sparse.p50_ms_1m": b[10]["pruned"]["p50_ms"], "sparse.p99_ms_1m": b[10]["pruned"]["p99_ms"],
        "sparse.p50_ms_1m_k100": b[100]["pruned"]["p50_ms"], "sparse.exhaustive_p50_ms_1m": b[10]["exhaustive"]["p50_ms"],
        "sparse.speedup_vs_exhaustive_1m": b[10]["speedup_p50"],
        "sparse.speedup_vs_exhaustive_1m_k100": b[100]["speedup_p50"],
        "sparse.p50_ms_small": s[10]["pruned"]["p50_ms"],
        "sparse.growth_4x": round(b[10]["pruned"]["p50_ms"] / s[10]["pruned"]["p50_ms"], 3),
        "sparse.bytes_per_passage_1m": big["bytes_per_passage"],
        "sparse.oracle_growth_4x": round(oracle["big"][0] / oracle["small"][0], 3),
        "sparse.oracle_live_fraction_1m": round(oracle["big"][0] / oracle["big"][1], 3)})
    # the same postings uncompressed (the layout before blocks): 8 B term + 8 B offset per shard
    # term, 6 B per posting (row int32 + tf uint16), pid + doc_len per passage, and the vocabulary
    old = (16 * big["shard_terms"] + 6 * big["postings"] + 10 * big["docs"] + 12 * big["terms"]) / big["docs"]
    served = serve_modes(cfg, qfile)
    results["serve.hybrid_qps_ratio_1m"] = round(served["hybrid"][16]["qps"] / served["dense"][16]["qps"], 3)
    results["serve.hybrid_p99_ratio_1m"] = round(served["hybrid"][16]["p99_ms"] / served["dense"][16]["p99_ms"], 3)
    growth = b[10]["pruned"]["p50_ms"] / s[10]["pruned"]["p50_ms"]
    alpha = float(np.log(max(growth, 1e-9)) / np.log(big["docs"] / small["docs"]))
    details["sparse"] = {"runs": {name: {str(k): v for k, v in r.items()} for name, r in runs.items()},
                         "passages": {"big": big["docs"], "small": small["docs"]}, "shards": len(big["shards"]),
                         "words_per_passage": WORDS, "postings_1m": big["postings"], "terms_1m": big["terms"],
                         "uncompressed_bytes_per_passage_1m": round(old, 1),
                         "bytes_per_passage_small": small["bytes_per_passage"],
                         "p50_exponent": round(alpha, 3),
                         "projected_p50_ms": {n: round(b[10]["pruned"]["p50_ms"] * (n / big["docs"]) ** alpha, 2)
                                              for n in (21_000_000, 100_000_000)},
                         "projected_exhaustive_p50_ms": {
                             n: round(b[10]["exhaustive"]["p50_ms"] * n / big["docs"], 1)
                             for n in (21_000_000, 100_000_000)},
                         "serve": {m: {str(c): v for c, v in r.items()} for m, r in served.items()},
                         "questions": len(questions), "quick": QUICK}
