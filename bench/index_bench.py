"""`make bench`, index part: the merge job vs plain FAISS and autofaiss; search QPS; driver memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from common import (
    N_VECTORS,
    QUICK,
    REPO,
    RSS_SAMPLE,
    TORCH,
    WORK,
    log,
    squad_questions,
    synthetic_embeddings,
    write_embeddings,
)


def bench_index(spark, enc_cfg, emb, results: dict, details: dict) -> None:
    import faiss
    import pyarrow.parquet as pq

    from dpr_lib import index_ops as ix
    from dpr_lib import storage
    from dpr_lib.config import load_config
    from dpr_lib.index import build_index
    from dpr_lib.search import ShardedIndex

    real = np.stack(emb.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors = synthetic_embeddings(real, N_VECTORS)
    emb_dir = os.path.join(WORK, "index", "embeddings")
    write_embeddings(emb_dir, vectors, emb.schema.metadata)
    overrides = [f"paths.work_dir={WORK}/index", f"paths.embeddings={emb_dir}",
                 f"paths.passages={enc_cfg.path('passages')}", "index.num_shards=4",
                 "publish.docstore=false"]  # synthetic pids: vectors only, as the FAISS baseline
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH, *overrides])
    log(f"index: merge job on {N_VECTORS} synthetic vectors (real SQuAD embeddings + noise)")
    t = time.perf_counter()
    manifest = build_index(spark, cfg)
    merge_s = time.perf_counter() - t

    # Baseline: plain FAISS, same factory and training size, one process: read, train, add, write.
    t = time.perf_counter()
    tables = [pq.read_table(f) for f in storage.list_files(emb_dir, ".parquet")]
    x = np.vstack([ix.vectors_of(tb, real.shape[1]) for tb in tables])
    ids = np.concatenate([tb.column("pid").to_numpy() for tb in tables])
    rng = np.random.default_rng(0)
    sample = x[rng.choice(len(x), manifest.train_size, replace=False)]
    plain = ix.train_quantizer(sample, manifest.factory)
    plain.add_with_ids(x, ids)
    faiss.write_index(plain, os.path.join(WORK, "index", "plain.faiss"))
    plain_s = time.perf_counter() - t
    auto_s = autofaiss_seconds(x, manifest.factory)
    if auto_s is not None:
        results["index.autofaiss_s"] = round(auto_s, 2)
        results["index.ratio_vs_autofaiss"] = round(merge_s / auto_s, 3)
    results.update({
        "index.merge_job_s": round(merge_s, 2), "index.plain_faiss_s": round(plain_s, 2),
        "index.ratio_vs_plain_faiss": round(merge_s / plain_s, 3),
        "index.recall_at_10": manifest.recall["at_nprobe"],
    })
    details["index"] = {"vectors": N_VECTORS, "factory": manifest.factory, "nprobe": manifest.nprobe,
                        "merge_timings": manifest.timings, "recall_by_nprobe": manifest.recall["by_nprobe"]}
    log(f"index: merge job {merge_s:.1f}s, plain FAISS {plain_s:.1f}s")

    # Search: batched QPS and sharded vs one merged index at the same nprobe.
    loaded = ShardedIndex(cfg.path("index_root"), cache_dir=os.path.join(WORK, "cache"))
    faiss.extract_index_ivf(plain).nprobe = loaded.nprobe
    q = synthetic_embeddings(real, 1000 if not QUICK else 200, seed=1)
    loaded.search(q[:10], 10)
    t = time.perf_counter()
    loaded.search(q, 10)
    sharded_s = time.perf_counter() - t
    t = time.perf_counter()
    plain.search(q, 10)
    single_s = time.perf_counter() - t
    results.update({"search.qps_batch": round(len(q) / sharded_s, 1),
                    "search.sharded_vs_single_ratio": round(sharded_s / single_s, 3)})
    return cfg


AUTOFAISS_VENV = os.path.join(REPO, "work", "autofaiss-venv")


def autofaiss_seconds(x: np.ndarray, factory: str) -> float | None:
    """autofaiss.build_index (train + add + its nprobe tuning) on the same vectors with the same factory,
    in its own virtualenv (it pins numpy<2). None, with the reason logged, if it cannot be installed."""
    py = os.path.join(AUTOFAISS_VENV, "bin", "python")
    if not os.path.exists(py):
        log("autofaiss: creating its virtualenv (pip install autofaiss)")
        made = subprocess.run(f"python3 -m venv {AUTOFAISS_VENV} && {py} -m pip install -q autofaiss \"pyarrow<16\"",
                              shell=True, capture_output=True, text=True)
        if made.returncode != 0:
            log(f"autofaiss: cannot be installed here, skipped: {made.stderr[-300:]}")
            return None
    npy = os.path.join(WORK, "index", "vectors.npy")
    np.save(npy, x)
    code = f"""
import time, numpy as np
from autofaiss import build_index
t = time.perf_counter()
x = np.load({npy!r})
build_index(embeddings=x, index_path={os.path.join(WORK, 'index', 'autofaiss.index')!r},
            index_infos_path={os.path.join(WORK, 'index', 'autofaiss.json')!r}, index_key={factory!r},
            metric_type="ip", save_on_disk=True, nb_cores={os.cpu_count() or 1}, verbose=30)
print(time.perf_counter() - t)
"""
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        log(f"autofaiss: failed, skipped: {out.stderr[-500:]}")
        return None
    return float(out.stdout.strip().splitlines()[-1])


def bench_search_single(enc_cfg, results: dict) -> None:
    """p50 latency of one question end to end (encode + search + docstore lookup) on the SQuAD index."""
    from dpr_lib.search import Searcher

    questions = squad_questions("dev-v1.1-part-a.json", 20 if QUICK else 100, per_paragraph=1)
    searcher = Searcher(enc_cfg.path("index_root"), enc_cfg.encoder, cache_dir=os.path.join(WORK, "cache"))
    searcher.ask(questions[:2], 10)
    lat = []
    for qtext in questions:
        t = time.perf_counter()
        searcher.ask([qtext], 10)
        lat.append((time.perf_counter() - t) * 1000)
    results["search.p50_ms_single"] = round(float(np.percentile(lat, 50)), 2)
    results["search.p99_ms_single"] = round(float(np.percentile(lat, 99)), 2)


def driver_rss(emb_dir: str, n: int) -> float:
    """Peak RSS (MB) of a fresh driver process running only the merge job on ``emb_dir`` (n vectors),
    with the training sample size held fixed."""
    d = os.path.join(WORK, "rss", str(n))
    code = f"""
import json, sys
sys.path.insert(0, {REPO!r})
from dpr_lib.index_ops import peak_rss, reset_peak_rss
reset_peak_rss()  # this process's own peak, not the bench's it inherited at fork
from dpr_lib.config import load_config
from dpr_lib.index import build_index
from dpr_lib.spark import get_session
cfg = load_config({os.path.join(REPO, 'conf', 'local.yaml')!r}, ['{TORCH}', 'paths.work_dir={d}', 'paths.embeddings={emb_dir}',
    'paths.passages={os.path.join(WORK, 'encode', 'passages')}', 'index.max_train_sample={RSS_SAMPLE}',
    'index.factory=IVF{64 if QUICK else 256},Flat', 'index.recall_queries=64', 'publish.docstore=false'])
build_index(get_session(cfg), cfg)
print(json.dumps({{'peak_mb': peak_rss() / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def bench_driver_rss(emb, results: dict, details: dict) -> None:
    real = np.stack(emb.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    small = N_VECTORS // 4
    peaks = {}
    for n in (small, small * 4):
        emb_dir = os.path.join(WORK, "rss", f"emb-{n}")
        write_embeddings(emb_dir, synthetic_embeddings(real, n, seed=2), emb.schema.metadata)
        peaks[n] = driver_rss(emb_dir, n)
    results["index.driver_rss_growth_4x"] = round(peaks[small * 4] / peaks[small], 3)
    details["driver_rss_mb"] = {str(k): round(v, 1) for k, v in peaks.items()}
    details["driver_rss_mb"]["train_sample"] = RSS_SAMPLE
    log(f"driver peak RSS: {peaks[small]:.0f} MB at {small} vectors, {peaks[small * 4]:.0f} MB at {small * 4}")
