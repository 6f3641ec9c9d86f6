"""`make bench`, serve part: resident bytes per passage, recall of compact shards, dpr-serve under load and swaps."""

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
    SQUAD,
    TORCH,
    WORK,
    log,
    squad_questions,
    synthetic_embeddings,
    wait_until_serving,
    write_embeddings,
)

SERVE_BUDGET = 96  # bytes per passage resident: 1/16 of float32 at d = 384


def anon_bytes_after_load(root: str, cache: str, nprobe: int, k_factor: int) -> dict:
    """Anonymous (private, not file-backed) memory of a fresh process after loading a version with
    the service's loader and searching it (Linux /proc/self/status RssAnon). Both sizes search with
    the same nprobe and k_factor, and freed heap is handed back (malloc_trim) before reading, so
    the difference between sizes is what the index holds, not allocator retention."""
    code = f"""
import ctypes, json, sys
import numpy as np
sys.path.insert(0, {REPO!r})
from dpr_lib.serve import process_memory
from dpr_lib.search import ShardedIndex
import faiss
imported = process_memory()["RssAnon"]
idx = ShardedIndex({root!r}, cache_dir={cache!r}, nprobe={nprobe}, k_factor={k_factor})
q = np.random.default_rng(0).standard_normal((64, idx.dim)).astype(np.float32)
idx.search(q, 10)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({{"imported": imported, "loaded": process_memory()["RssAnon"], "vectors": idx.ntotal,
                  "store_bytes": idx.memory()["rerank_store_bytes"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadgen(url: str, questions_file: str, clients: int, seconds: float, mode: str = "dense") -> dict:
    """bench/loadgen.py against a running service: one question per request from ``clients`` clients."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "loadgen.py"), "--url", url, "--questions",
                          questions_file, "--clients", str(clients), "--seconds", str(seconds), "--mode", mode],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["failed"]:
        raise RuntimeError(f"{got['failed']} of {got['requests']} requests failed under load: {got}")
    return got


def bench_serve(spark, enc_cfg, emb, results: dict, details: dict) -> None:
    """Compact shards: memory slope per passage (N vs 4N), recall vs exact on real questions, top-20
    loss through the evaluation job; the HTTP service: QPS, p99, and three swaps under load."""
    import shutil
    import threading

    import httpx

    from dpr_lib.config import load_config
    from dpr_lib.encoder import get_encoder, resolve_spec
    from dpr_lib.index import build_index
    from dpr_lib.manifest import set_latest
    from dpr_lib.search import ShardedIndex

    real = np.stack(emb.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    d = real.shape[1]
    # The serving configuration: 96 B/passage, and nprobe/k_factor chosen for recall@20 >= 0.995,
    # as a service returning 20 passages should: on SQuAD each point of recall lost costs about a
    # point of top-20 accuracy (recall@20 0.9915 lost 1.07 points; the merge job's default,
    # recall@10 >= 0.95, about 3).
    compact = [TORCH, f"index.bytes_per_vector={SERVE_BUDGET}", "index.num_shards=2", "index.recall_target=0.995",
               "index.recall_k=20"]
    qtexts = squad_questions("dev-v1.1-part-a.json", 200 if QUICK else 1000)
    qvecs = get_encoder(resolve_spec(enc_cfg.encoder, enc_cfg.path("cache_dir"), role="question")).encode(None, qtexts)

    # 1. Memory per passage: the slope between N and 4N vectors, and recall at 4N on real questions.
    small = 10_000 if QUICK else N_VECTORS // 4  # both sizes above PQ's training minimum (9,984)
    anon, manifests, big = {}, {}, None
    for n in (small, small * 4):
        vectors = synthetic_embeddings(real, n, seed=3)
        emb_dir = os.path.join(WORK, "serve", f"emb-{n}")
        shutil.rmtree(os.path.join(WORK, "serve", f"idx-{n}"), ignore_errors=True)
        write_embeddings(emb_dir, vectors, emb.schema.metadata)
        cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), compact + [
            f"paths.work_dir={WORK}/serve/idx-{n}", f"paths.embeddings={emb_dir}",
            f"paths.passages={enc_cfg.path('passages')}", "publish.docstore=false"])
        log(f"serve: compact index of {n} vectors")
        manifests[n] = build_index(spark, cfg, question_vectors=qvecs)
        if n == small * 4:
            big = (cfg, vectors)
    served = manifests[small * 4]  # both sizes searched as the larger one is served
    for n in (small, small * 4):
        anon[n] = anon_bytes_after_load(os.path.join(WORK, "serve", f"idx-{n}", "index"),
                                        os.path.join(WORK, "serve", "cache"), served.nprobe, served.k_factor or 1)
    slope = (anon[small * 4]["loaded"] - anon[small]["loaded"]) / (3 * small)
    cfg, vectors = big
    pids = np.arange(len(vectors), dtype=np.int64) * 7919 + 1  # as write_embeddings assigns them
    exact = pids[np.argsort(-(qvecs @ vectors.T), axis=1)[:, :10]]
    found = ShardedIndex(cfg.path("index_root"), cache_dir=os.path.join(WORK, "serve", "cache")).search(qvecs, 10)[1]
    from dpr_lib.index_ops import recall_at_k

    m = manifests[small * 4]
    results.update({"serve.resident_bytes_per_passage": round(slope, 1),
                    "serve.memory_ratio_vs_flat": round(slope / (4 * d), 4),
                    "serve.recall_at_10": round(recall_at_k(found, exact), 4)})
    details["serve_memory"] = {"factory": m.factory, "nprobe": m.nprobe, "k_factor": m.k_factor,
                               "manifest_memory": m.memory, "anon_bytes": {str(k): v for k, v in anon.items()},
                               "recall_by_nprobe_k_factor": m.rerank["recall_by_nprobe_k_factor"]}
    del vectors, big
    log(f"serve: {slope:.1f} B/passage resident ({m.factory}, k_factor {m.k_factor}), "
        f"recall@10 {results['serve.recall_at_10']}")

    # 2. Top-20 accuracy lost by the compact index, through the evaluation job (SQuAD dev part a).
    from dpr_lib.evaluate import evaluate

    ev_cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), compact)
    dataset = os.path.join(SQUAD, "dev-v1.1-part-a.json")
    if QUICK:
        sliced = json.load(open(dataset))
        sliced["data"] = sliced["data"][:2]
        dataset = os.path.join(WORK, "serve", "dev-slice.json")
        with open(dataset, "w") as fh:
            json.dump(sliced, fh)
    report = evaluate(spark, ev_cfg, dataset, "squad", os.path.join(WORK, "serve", "eval"))
    ret = report["retrievers"]
    results["serve.top20_delta_vs_exact"] = round(ret["dense_ivf"]["top20"] - ret["dense_exact"]["top20"], 4)
    details["serve_eval"] = {"dense_exact": ret["dense_exact"], "dense_ivf": ret["dense_ivf"],
                             "index": report["index"], "questions": report["n_questions"]}

    # 3. The HTTP service on the SQuAD passages, compact; four versions published beforehand so
    # that a swap measures the service (download, verify, load, warm), not a Spark job beside it.
    root = os.path.join(WORK, "serve", "http-index")
    shutil.rmtree(root, ignore_errors=True)
    srv_cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), compact + [
        f"paths.work_dir={WORK}/encode", f"paths.index_root={root}", "publish.keep_versions=5"])
    versions = [build_index(spark, srv_cfg, question_vectors=qvecs).version for _ in range(4)]
    set_latest(root, versions[0])
    port = 18000 + os.getpid() % 1000
    cache = os.path.join(WORK, "serve", "http-cache")
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dpr-serve"), "--index", root,
                             "--port", str(port), "--conf", os.path.join(REPO, "conf", "local.yaml"),
                             "--set", f"paths.cache_dir={cache}", "--set", "serve.poll_s=0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)

        def load(seconds: float, batch: int, clients: int = 2, during=None):
            lat, failed, stop = [], [], threading.Event()

            def client(i):
                with httpx.Client(base_url=url, timeout=60) as c:
                    n = i
                    while not stop.is_set():
                        qs = [qtexts[(n + j) % len(qtexts)] for j in range(batch)]
                        n += batch * clients
                        t = time.perf_counter()
                        try:
                            r = c.post("/search", json={"questions": qs, "k": 10, "mode": "dense"})
                            ok = r.status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        lat.append((time.perf_counter() - t) * 1000)
                        if not ok:
                            failed.append(1)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            if during:
                during()
            else:
                time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join()
            return lat, len(failed), time.perf_counter() - t0

        lat, _, secs = load(3 if QUICK else 15, batch=16)
        results["serve.qps_http"] = round(len(lat) * 16 / secs, 1)
        # One question per request: one client, then 16 at once (micro-batched by the service). The
        # load runs in its own process (bench/loadgen.py, asyncio) so client threads do not share
        # this interpreter; both measured back to back on the same version.
        qfile = os.path.join(WORK, "serve", "questions.txt")
        with open(qfile, "w", encoding="utf-8") as fh:
            fh.write("\n".join(q.replace("\n", " ") for q in qtexts))
        conc = {c: loadgen(url, qfile, c, 3 if QUICK else 10) for c in (1, 16)}
        results.update({"serve.qps_single_client": conc[1]["qps"], "serve.p99_ms_single_client": conc[1]["p99_ms"],
                        "serve.qps_concurrent": conc[16]["qps"], "serve.p99_ms_concurrent": conc[16]["p99_ms"],
                        "serve.concurrency_qps_ratio": round(conc[16]["qps"] / conc[1]["qps"], 2),
                        "serve.concurrency_p99_ratio": round(conc[16]["p99_ms"] / conc[1]["p99_ms"], 2)})
        details["serve_concurrency"] = conc
        log(f"serve: 1 client {conc[1]['qps']} q/s (p99 {conc[1]['p99_ms']} ms), 16 clients {conc[16]['qps']} q/s "
            f"(p99 {conc[16]['p99_ms']} ms)")
        # Hybrid (BM25 shards + dense, fused as the manifest says) against dense, same load, same run.
        hyb = {c: loadgen(url, qfile, c, 3 if QUICK else 10, mode="hybrid") for c in (1, 16)}
        results.update({"serve.hybrid_qps_ratio": round(hyb[16]["qps"] / conc[16]["qps"], 3),
                        "serve.hybrid_p99_ratio": round(hyb[16]["p99_ms"] / conc[16]["p99_ms"], 3)})
        with httpx.Client(base_url=url, timeout=60) as c:
            health = c.get("/health").json()
        from dpr_lib.manifest import MANIFEST, read_manifest, version_url

        mem = read_manifest(os.path.join(version_url(root, versions[0]), MANIFEST)).memory
        results["serve.sparse_disk_bytes_per_passage"] = mem.get("sparse_disk_bytes_per_passage")
        details["serve_hybrid"] = {"hybrid": hyb, "dense": conc, "modes": health["modes"], "manifest_memory": mem,
                                   "single_client_qps_ratio": round(hyb[1]["qps"] / conc[1]["qps"], 3),
                                   "single_client_p99_ratio": round(hyb[1]["p99_ms"] / conc[1]["p99_ms"], 3)}
        log(f"serve: hybrid 16 clients {hyb[16]['qps']} q/s (p99 {hyb[16]['p99_ms']} ms) = "
            f"{results['serve.hybrid_qps_ratio']}x dense q/s, p99 {results['serve.hybrid_p99_ratio']}x")
        lat, _, _ = load(3 if QUICK else 15, batch=1)
        steady_p99 = float(np.percentile(lat, 99))
        results["serve.p99_ms"] = round(steady_p99, 1)

        def swaps():
            with httpx.Client(base_url=url, timeout=60) as c:
                for v in versions[1:]:
                    set_latest(root, v)
                    deadline = time.time() + 120
                    while c.get("/health").json()["version"] != v and time.time() < deadline:
                        time.sleep(0.1)
                    time.sleep(1.0)

        lat, failed, _ = load(0, batch=1, during=swaps)
        with httpx.Client(base_url=url, timeout=60) as c:
            final = c.get("/health").json()
        results["serve.failed_requests_during_swaps"] = failed + (0 if final["version"] == versions[-1] else 1)
        results["serve.p99_ratio_during_swap"] = round(float(np.percentile(lat, 99)) / steady_p99, 3)
        details["serve_http"] = {"passages": final["vectors"], "swaps": final["swaps"],
                                 "requests_during_swaps": len(lat), "steady_p99_ms": round(steady_p99, 1),
                                 "swap_p99_ms": round(float(np.percentile(lat, 99)), 1)}
        log(f"serve: {results['serve.qps_http']} q/s batched, p99 {steady_p99:.0f} ms, "
            f"{failed} failed requests over 3 swaps, p99 ratio {results['serve.p99_ratio_during_swap']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
