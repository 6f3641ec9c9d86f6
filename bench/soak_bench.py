"""`BENCH_ONLY=soak`: thirty nights in a row while `dpr-serve` answers a steady load and swaps to
every version published.

- Corpus: English Wikipedia articles from ../shared/data/wiki split into 100-word passages, enough
  for >= 100,000 passages (5,000 in the quick mode). The first run's vectors are synthetic (as the
  nightly-at-scale bench's: a real all-MiniLM-L6-v2 Wikipedia vector plus noise, written as the
  encode job writes them); every later night's changed passages go through the real encoder.
- Each night: a change set (`--changes`) of edited, added and deleted articles through
  `run_nightly`, a delta segment or, when the garbage passes `nightly.compact_ratio`, a
  compaction. One night first tries a run with another encoder configuration, which a change set
  must refuse (every passage would need encoding again).
- `dpr-serve` (its own process, polling LATEST) answers 2 clients throughout (bench/loadgen.py,
  a steady paced load); after each night the bench waits for it to serve the new version.
- Measured every night: the service's RSS and open file descriptors, bytes under the index root
  (against the version directories `publish.keep_versions` allows: the newest ones and those whose
  segments they reference) and in the service's shard cache, and recall@10 at the served nprobe against exact search (every list probed) on 1,000
  held-apart SQuAD questions, beside the recall the manifest claims (measured on other questions,
  `index.recall_questions`).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from common import QUICK, REPO, TORCH, WIKI, WORK, log, squad_questions, wait_until_serving

OUT = os.path.join(WORK, "soak")
NIGHTS = 3 if QUICK else 30
PASSAGES = 5_000 if QUICK else 100_000
EDITS, DELETES, ADDS = (3, 1, 1) if QUICK else (12, 2, 2)
REFUSED_NIGHT = max(2, NIGHTS * 2 // 3)
SOAK_KEYS = frozenset({"soak.nights", "soak.failed_requests", "soak.serve_rss_growth", "soak.open_fds_growth",
                       "soak.index_root_bytes_ratio", "soak.max_recall_claim_error", "soak.min_recall_margin",
                       "soak.passages", "soak.compactions", "soak.refused_nights", "soak.requests"})


def corpus(path: str) -> list[dict]:
    """Whole articles, in file order, until their 100-word passages reach PASSAGES."""
    import gzip

    docs, passages = [], 0
    for i in range(4):
        with gzip.open(os.path.join(WIKI, f"enwiki-2015-part-{i}.jsonl.gz"), "rt") as fh:
            for d in map(json.loads, fh):
                docs.append({"id": str(d["id"]), "title": d["title"], "text": d["text"]})
                passages += -(-len(d["text"].split()) // 100)
                if passages >= PASSAGES:
                    with open(path, "w") as out:
                        out.writelines(json.dumps(x) + "\n" for x in docs)
                    return docs
    raise RuntimeError(f"{WIKI} holds fewer than {PASSAGES} passages")


def change_set(live: dict, night: int, rng, path: str) -> str:
    """Edited, added and deleted articles (``live`` is updated to the state after the change)."""
    ids = sorted(live)
    picked = rng.choice(len(ids), EDITS + DELETES + 1, replace=False)
    edited, deleted, donor = [ids[i] for i in picked[:EDITS]], [ids[i] for i in picked[EDITS:-1]], ids[picked[-1]]
    rows = []
    for i in edited:
        live[i] = {**live[i], "text": f"Revised on night {night}. " + live[i]["text"]}
        rows.append({"op": "upsert", **live[i]})
    for j in range(ADDS):
        d = {"id": f"soak-{night}-{j}", "title": live[donor]["title"] + f" (night {night})",
             "text": "\n".join(reversed(live[donor]["text"].split("\n")))}
        live[d["id"]] = d
        rows.append({"op": "upsert", **d})
    for i in deleted:
        live.pop(i)
        rows.append({"op": "delete", "id": i})
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def allowed_bytes(root: str, keep: int) -> tuple[int, int]:
    """(bytes of the version directories ``publish.keep_versions`` allows: the ``keep`` newest
    published versions and the older ones whose segments they reference; of those, the bytes of
    files no kept version references: an older version's own manifest, quantizer, vocabulary and
    recall lists, kept with its segments)."""
    from dpr_lib.config import join_url
    from dpr_lib.manifest import MANIFEST, REJECTED, list_versions, read_manifest, version_url

    kept = [v for v in list_versions(root) if os.path.exists(join_url(version_url(root, v), MANIFEST))
            and not os.path.exists(join_url(version_url(root, v), REJECTED))][-keep:]
    referenced: set[tuple[str, str]] = set()
    versions = set(kept)
    for v in kept:
        m = read_manifest(join_url(version_url(root, v), MANIFEST))
        versions |= m.referenced_versions()
        referenced |= {(version, f.path) for version, f in m.files_by_version()}
        referenced.add((m.trained_holder(), m.trained.path))
        referenced |= {(v, p) for p in [MANIFEST] + ([m.recall["lists"]["path"]]
                                                                     if m.recall.get("lists") else [])}
    total = unreferenced = 0
    for v in versions:
        base = version_url(root, v)
        for d, _, fs in os.walk(base):
            for f in fs:
                size = os.path.getsize(os.path.join(d, f))
                total += size
                unreferenced += size if (v, os.path.relpath(os.path.join(d, f), base)) not in referenced else 0
    return total, unreferenced


def measured_recall(cfg, version: str, qvecs: np.ndarray) -> tuple[float, dict]:
    """recall@10 at the version's nprobe against exact search (nprobe = nlist, exact codes), and its manifest."""
    from dpr_lib.config import join_url
    from dpr_lib.index_ops import recall_at_k
    from dpr_lib.manifest import MANIFEST, version_url
    from dpr_lib.search import ShardedIndex

    url = join_url(version_url(cfg.path("index_root"), version), MANIFEST)
    cache = os.path.join(OUT, "bench-cache")
    served = ShardedIndex(url, cache_dir=cache, nprobe=None)
    m = served.manifest
    found = served.search(qvecs, 10)[1]
    del served
    exact = ShardedIndex(url, cache_dir=cache, nprobe=max(1, m.nlist)).search(qvecs, 10)[1]
    gc.collect()
    return recall_at_k(found, exact), m


def start_service(root: str, port: int, questions_file: str):
    import psutil

    cache = os.path.join(OUT, "serve-cache")
    log_path = os.path.join(OUT, "serve.log")
    bindir = os.path.dirname(sys.executable)
    serve = subprocess.Popen([os.path.join(bindir, "dpr-serve"), "--index", root, "--port", str(port),
                              "--set", TORCH, "--set", f"paths.cache_dir={cache}", "--set", "serve.poll_s=2",
                              "--set", "serve.warmup_queries=4"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, serve)
    stop_file = os.path.join(OUT, "stop-load")
    load = subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "loadgen.py"), "--url", url, "--questions",
                             questions_file, "--clients", "2", "--seconds", "86400", "--pause", "0.1",
                             "--stop-file", stop_file], stdout=subprocess.PIPE, text=True)
    return serve, psutil.Process(serve.pid), url, cache, load, stop_file


def wait_for_version(url: str, version: str, timeout_s: float = 300) -> float:
    import httpx

    t = time.time()
    while time.time() - t < timeout_s:
        try:
            if httpx.get(url + "/health", timeout=10).json().get("version") == version:
                return time.time() - t
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dpr-serve did not swap to {version} within {timeout_s:.0f}s")


def bench_soak(spark, results: dict, details: dict) -> None:
    if not os.path.isdir(WIKI):
        log(f"soak: {WIKI} not found; skipped")
        return
    from nightly_scale import baseline, real_vectors

    from dpr_lib.config import load_config
    from dpr_lib.encoder import Encoder, resolve_spec
    from dpr_lib.errors import InputError
    from dpr_lib.nightly import run_nightly

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    docs = corpus(os.path.join(OUT, "snapshot.jsonl"))
    questions = squad_questions("dev-v1.1-part-a.json", 2048 if not QUICK else 400, per_paragraph=2)
    half = len(questions) // 2
    claim_file, load_file = os.path.join(OUT, "recall-questions.txt"), os.path.join(OUT, "load-questions.txt")
    for path, qs in ((claim_file, questions[:half]), (load_file, questions)):
        with open(path, "w") as fh:
            fh.writelines(q.replace("\n", " ") + "\n" for q in qs)
    held_apart = questions[half:]
    keep = 3
    overrides = [TORCH, f"paths.work_dir={OUT}/work", f"paths.cache_dir={OUT}/cache",
                 f"corpus.input={OUT}/snapshot.jsonl", "corpus.words=100", f"index.recall_questions={claim_file}",
                 f"publish.keep_versions={keep}", f"nightly.keep_runs={keep}", "nightly.compact_ratio=0.1",
                 "serve.warmup_queries=0"]
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), overrides)
    other_encoder = load_config(os.path.join(REPO, "conf", "local.yaml"), overrides + ["encoder.max_length=128"])
    t0 = time.time()
    base = baseline(spark, cfg, real_vectors(cfg))
    log(f"soak: baseline of {base['passages']} passages ({base['factory']}, nprobe {base['nprobe']}) "
        f"in {time.time() - t0:.0f}s")
    qvecs = Encoder(resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question")).encode(None, held_apart)
    root = cfg.path("index_root")
    serve, proc, url, serve_cache, load, stop_file = start_service(root, 18931, load_file)
    live = {d["id"]: d for d in docs}
    rng = np.random.default_rng(5)
    nights, refused = [], 0
    try:
        for night in range(1, NIGHTS + 1):
            path = change_set(live, night, rng, os.path.join(OUT, f"changes-{night:02d}.jsonl"))
            if night == REFUSED_NIGHT:
                try:
                    run_nightly(spark, other_encoder, changes=path)
                    raise RuntimeError("a change set with another encoder was not refused")
                except InputError as exc:
                    refused += 1
                    log(f"soak: night {night}: refused as expected: {exc}")
            t = time.time()
            report = run_nightly(spark, cfg, changes=path)
            run_s = time.time() - t
            swap_s = wait_for_version(url, report["version"])
            recall, m = measured_recall(cfg, report["version"], qvecs)
            mem = proc.memory_info().rss
            night_row = {
                "night": night, "kind": report["kind"], "version": report["version"], "run_s": round(run_s, 1),
                "swap_s": round(swap_s, 1), "encoded": report["encoded"], "passages": report["passages"],
                "nprobe": m.nprobe, "claimed": m.recall.get("at_nprobe"), "measured": round(recall, 4),
                "target": m.recall.get("target"), "rule": m.recall.get("rule"),
                "recall_source": m.recall.get("measured") or ("carried" if m.recall.get("carried_from") else "built"),
                "rss": mem, "fds": proc.num_fds(), "root_bytes": dir_bytes(root), "cache_bytes": dir_bytes(serve_cache)}
            night_row["allowed_bytes"], night_row["unreferenced_bytes"] = allowed_bytes(root, keep)
            nights.append(night_row)
            log(f"soak: night {night}: {json.dumps({k: v for k, v in night_row.items() if k != 'version'})}")
    finally:
        open(stop_file, "w").close()
        out, _ = load.communicate(timeout=120)
        serve.terminate()
        serve.wait(timeout=60)
    load_report = json.loads(out.strip().splitlines()[-1])
    third = nights[min(2, len(nights) - 1)]
    last = nights[-1]
    results.update({
        "soak.nights": len(nights), "soak.passages": last["passages"],
        "soak.failed_requests": int(load_report["failed"]), "soak.requests": int(load_report["requests"]),
        "soak.serve_rss_growth": round(last["rss"] / third["rss"], 3),
        "soak.open_fds_growth": round(last["fds"] / third["fds"], 3),
        "soak.index_root_bytes_ratio": round(last["root_bytes"] / last["allowed_bytes"], 4),
        "soak.max_recall_claim_error": round(max(n["claimed"] - n["measured"] for n in nights), 4),
        "soak.min_recall_margin": round(min(n["measured"] - n["target"] for n in nights), 4),
        "soak.compactions": sum(n["kind"] == "full" for n in nights), "soak.refused_nights": refused})
    details["soak"] = {"base": base, "nights": nights, "load": load_report, "held_apart_questions": len(held_apart),
                       "claim_questions": half, "keep_versions": keep, "seconds": round(time.time() - t0, 1),
                       "quick": QUICK}
