"""`make bench`, nightly at scale (BENCH_ONLY=nightly_scale): a 1% change to a >= 1M-passage
Wikipedia corpus published as a delta segment vs the same snapshot compacted (`--compact`: today's
full shard rebuild from reused embeddings), and the same change on a 250k-passage corpus.

What is real and what is not:
- the corpus: the shared English Wikipedia (30,539 articles) split by the corpus stage into
  60-word passages (1.08M; 100-word passages would give 650k), and a 250k-passage subset of it;
- the change: the same articles (1% of the words) rewritten, 10 deleted, 10 added, on both corpora;
- every stage of both runs is the nightly job's (`run_nightly`), on Spark local[2];
- only the baseline's vectors are synthetic (as the scale benchmark's): encoding 1.08M passages
  with the real encoder would take ~2 h here. Each is a real all-MiniLM-L6-v2 Wikipedia vector
  plus noise, in the real encoder's space, written as the encode job writes them (its fingerprint,
  pid-sorted files), then indexed by the merge job as the first run would. The changed
  passages go through the real encoder in the measured runs.
- a serving node (`dpr-serve`'s IndexHolder) loads the baseline, then swaps to the delta version:
  the bytes it downloads are counted by its cache.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time

import numpy as np
from common import QUICK, REPO, TORCH, WIKI, WORK, equal_sets, log, squad_questions

OUT = os.path.join(WORK, "nightly-scale")
WORDS = 100 if QUICK else 60
CHANGED_FRACTION = 0.01
NOISE = 0.35 / np.sqrt(384)
NIGHTLY_SCALE_KEYS = frozenset({
    "nightly.scale_passages", "nightly.swap_download_fraction", "nightly.index_bytes_written_fraction",
    "nightly.index_stage_ratio", "nightly.delta_vs_compact_ratio", "nightly.post_diff_proportionality",
    "nightly.delta_top10_agreement", "nightly.changefeed_proportionality"})
NIGHTLY_CHANGEFEED_KEYS = frozenset({"nightly.changefeed_proportionality"})


def articles() -> list[dict]:
    out = []
    for i in range(4):
        with gzip.open(os.path.join(WIKI, f"enwiki-2015-part-{i}.jsonl.gz"), "rt") as fh:
            out.extend({"id": str(d["id"]), "title": d["title"], "text": d["text"]} for d in map(json.loads, fh))
            if QUICK and len(out) >= 400:
                return out[:400]
    return out


def plan_change(docs: list[dict], seed: int = 7) -> dict:
    """The same change for every corpus: articles holding ~1% of the words rewritten (a sentence
    before the first one: every passage of the article changes), 10 deleted, 10 added."""
    rng = np.random.default_rng(seed)
    words = np.array([len(d["text"].split()) for d in docs])
    order = rng.permutation(len(docs))
    cum = np.cumsum(words[order])
    n_changed = int(np.searchsorted(cum, CHANGED_FRACTION * words.sum())) + 1
    changed = set(order[:n_changed].tolist())
    deleted = set(order[n_changed:n_changed + 10].tolist())
    donors = order[n_changed + 10:n_changed + 20].tolist()
    added = [{"id": f"new-{i}", "title": docs[j]["title"] + " (new)",
              "text": "\n".join(reversed(docs[j]["text"].split("\n")))} for i, j in enumerate(donors)]
    return {"changed": changed, "deleted": deleted, "added": added,
            "changed_words": int(words[list(changed)].sum()), "total_words": int(words.sum())}


def write_change_set(docs: list[dict], change: dict, path: str) -> str:
    """The same change as a change set: the rewritten and added articles upserted, the deleted ones deleted."""
    with open(path, "w") as fh:
        for i in sorted(change["changed"]):
            d = docs[i]
            fh.write(json.dumps({"op": "upsert", **d, "text": "This article was revised overnight. " + d["text"]}) + "\n")
        for d in change["added"]:
            fh.write(json.dumps({"op": "upsert", **d}) + "\n")
        for i in sorted(change["deleted"]):
            fh.write(json.dumps({"op": "delete", "id": docs[i]["id"]}) + "\n")
    return path


def changefeed_run(spark, name: str, change_set: str) -> dict:
    """From the same baseline as the snapshot runs (its state restored, LATEST back on its
    version), the change given as a change set: the whole run's seconds."""
    from dpr_lib.config import load_config
    from dpr_lib.manifest import set_latest
    from dpr_lib.nightly import baseline_url, run_nightly, write_json

    work = os.path.join(OUT, name)
    base = json.load(open(os.path.join(work, "state", "base_success.json")))
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
        f"paths.work_dir={work}", f"paths.cache_dir={OUT}/cache", f"corpus.input={OUT}/{name}-v2.jsonl",
        f"corpus.words={WORDS}", f"index.recall_questions={OUT}/recall_questions.txt", "serve.warmup_queries=0",
        "publish.keep_versions=5", "nightly.keep_runs=5", "nightly.compact_ratio=1"])
    write_json(baseline_url(cfg), base)
    set_latest(cfg.path("index_root"), base["version"])
    t = time.time()
    report = run_nightly(spark, cfg, changes=change_set)
    wall = time.time() - t
    assert report["kind"] == "delta", report["summary"]
    return {"wall_s": round(wall, 1), "seconds": report["seconds"], "diff": report["diff"],
            "encoded": report["encoded"], "passages": report["passages"], "version": report["version"]}


def bench_nightly_changefeed(spark, results: dict, details: dict) -> None:
    """BENCH_ONLY=nightly_changefeed: the change-set runs alone, on the baselines nightly_scale left."""
    docs = articles()
    change = plan_change(docs)
    change_set = write_change_set(docs, change, os.path.join(OUT, "changes.jsonl"))
    runs = {name: changefeed_run(spark, name, change_set) for name in ("big", "small")}
    results["nightly.changefeed_proportionality"] = round(runs["big"]["wall_s"] / runs["small"]["wall_s"], 3)
    details["nightly_changefeed"] = runs
    log(f"nightly-scale: change set on {runs['big']['passages']} vs {runs['small']['passages']} passages: "
        f"{runs['big']['wall_s']}s vs {runs['small']['wall_s']}s -> {results['nightly.changefeed_proportionality']}")


def write_snapshots(docs: list[dict], keep: list[int], change: dict, path: str) -> tuple[str, str]:
    before, after = path + "-v1.jsonl", path + "-v2.jsonl"
    with open(before, "w") as a, open(after, "w") as b:
        for i in keep:
            d = docs[i]
            a.write(json.dumps(d) + "\n")
            if i in change["deleted"]:
                continue
            if i in change["changed"]:
                d = {**d, "text": "This article was revised overnight. " + d["text"]}
            b.write(json.dumps(d) + "\n")
        for d in change["added"]:
            b.write(json.dumps(d) + "\n")
    return before, after


def real_vectors(cfg) -> np.ndarray:
    """all-MiniLM-L6-v2 vectors of real Wikipedia passages: the encode benchmark's, else 3,000 encoded now."""
    import pyarrow.parquet as pq

    emb = os.path.join(WORK, "encode-20k", "embeddings")
    if os.path.isdir(emb) and not QUICK:
        return np.concatenate([np.stack(pq.read_table(os.path.join(emb, f), columns=["vector"]).column("vector")
                                        .to_numpy(zero_copy_only=False)) for f in sorted(os.listdir(emb))
                               if f.endswith(".parquet")]).astype(np.float32)
    from dpr_lib.encoder import Encoder, resolve_spec

    docs = articles()[:300]
    texts = [" ".join(d["text"].split()[i:i + 100]) for d in docs for i in range(0, 1000, 100)][:3000]
    return Encoder(resolve_spec(cfg.encoder, cfg.path("cache_dir"))).encode(None, texts)


def baseline(spark, cfg, real: np.ndarray) -> dict:
    """The first run, with synthetic vectors for the passages: the nightly's shard stage, an
    Embeddings table as the encode job writes it, the merge job, and the state a run leaves."""
    from dpr_lib import storage
    from dpr_lib.changes import merge_embeddings
    from dpr_lib.config import join_url
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encoder import resolve_spec
    from dpr_lib.index import build_index
    from dpr_lib.nightly import corpus_counts, record_baseline, resume_key, run_paths, write_json

    fp = resolve_spec(cfg.encoder, cfg.path("cache_dir")).fingerprint()
    run = "00000000T000000Z-base00"
    run_dir = join_url(cfg.path("work_dir"), "runs", run)
    run_cfg = run_paths(cfg, run_dir)
    t = time.time()
    corpus = corpus_counts(shard_corpus(spark, run_cfg))
    shard_s = time.time() - t
    bc = spark.sparkContext.broadcast(real)
    dim = real.shape[1]

    def vectors(batches):
        import pyarrow as pa

        for b in batches:
            pids = b.column("pid").to_numpy()
            rng = np.random.default_rng(int(pids[0]) & 0x7FFFFFFF if len(pids) else 0)
            base = bc.value[rng.integers(0, len(bc.value), len(pids))]
            # noise of norm ~0.35 (cosine ~0.94 to the real vector): nearby, as real near-duplicates
            # are; more noise makes the synthetic base unlike the real changed passages and questions
            v = base + rng.standard_normal(base.shape).astype(np.float32) * NOISE
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            offsets = pa.array(np.arange(len(pids) + 1, dtype=np.int32) * dim)
            yield pa.RecordBatch.from_arrays(
                [b.column("pid"), b.column("content_hash"),
                 pa.ListArray.from_arrays(offsets, pa.array(v.reshape(-1).astype(np.float32)))],
                names=["pid", "content_hash", "vector"])

    passages = spark.read.parquet(storage.resolve_table(run_cfg.path("passages"))).select("pid", "content_hash")
    schema = "pid long, content_hash string, vector array<float>"
    t = time.time()
    emb_url = merge_embeddings(spark, run_dir, lambda: passages.mapInArrow(vectors, schema), fp)
    emb_s = time.time() - t
    t = time.time()
    counts = {"input_records": corpus["input_records"], "docs": corpus["docs"], "rejects": corpus["rejects"],
              "corpus_passages": corpus["passages"], "embedded": corpus["passages"], "reused": 0}
    manifest = build_index(spark, run_cfg, None, {"encoder": fp, "compaction": {"kind": "full", "reason": "first run"}},
                           counts=counts)
    index_s = time.time() - t
    write_json(join_url(run_dir, "state.json"), {"run": run, "key": resume_key(cfg, fp["id"]),
                                                  "done": ["shard", "diff", "encode", "publish"],
                                                  "seconds": {}, "published": True})
    record_baseline(cfg, run, run_cfg.path("passages"), corpus["passages"], [emb_url], fp, manifest.version)
    return {"passages": corpus["passages"], "version": manifest.version, "factory": manifest.factory,
            "nprobe": manifest.nprobe, "k_factor": manifest.k_factor,
            "seconds": {"shard": round(shard_s, 1), "embeddings": round(emb_s, 1), "index": round(index_s, 1)}}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def one_size(spark, name: str, snapshots: tuple[str, str], real: np.ndarray, questions_file: str,
             serve_check: bool) -> dict:
    from dpr_lib.config import join_url, load_config
    from dpr_lib.manifest import MANIFEST, read_manifest, set_latest, version_url
    from dpr_lib.nightly import baseline_url, run_nightly, write_json

    work = os.path.join(OUT, name)
    shutil.rmtree(work, ignore_errors=True)
    before, after = snapshots
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
        f"paths.work_dir={work}", f"paths.cache_dir={OUT}/cache", f"corpus.input={before}",
        f"corpus.words={WORDS}", f"index.recall_questions={questions_file}", "serve.warmup_queries=0",
        "publish.keep_versions=5", "nightly.keep_runs=5", "nightly.compact_ratio=1"])  # the delta is what is measured
    root = cfg.path("index_root")
    t = time.time()
    base = baseline(spark, cfg, real)
    log(f"nightly-scale {name}: baseline of {base['passages']} passages ({base['factory']}) in {time.time() - t:.0f}s "
        f"{base['seconds']}")
    holder = None
    if serve_check:
        from dpr_lib.serve import IndexHolder

        node_cache = os.path.join(work, "node-cache")
        holder = IndexHolder(load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
            f"paths.cache_dir={node_cache}", "serve.warmup_queries=0"]), root)
        assert holder.poll_once()
        base_download = holder.current.downloaded_bytes
    saved = open(os.path.join(work, "state", "last_success.json")).read()
    with open(os.path.join(work, "state", "base_success.json"), "w") as fh:  # the change-set run starts here too
        fh.write(saved)
    cfg.corpus.input = after
    t = time.time()
    delta = run_nightly(spark, cfg)
    delta_s = time.time() - t
    assert delta["kind"] == "delta", delta["summary"]
    out = {"passages": delta["passages"], "base": base, "delta": {k: delta[k] for k in (
        "version", "diff", "encoded", "seconds", "kind", "compaction_reason")}, "delta_wall_s": round(delta_s, 1)}
    dv = read_manifest(join_url(version_url(root, delta["version"]), MANIFEST))
    out["delta_manifest"] = {"tombstones": dv.tombstones["count"], "delta_vectors": sum(s.vectors for s in dv.shards),
                             "compaction": dv.compaction}
    if holder is not None:
        assert holder.poll_once()
        out["swap"] = {"downloaded_bytes": holder.current.downloaded_bytes, "reused_shards": holder.current.reused_shards,
                       "load_s": holder.current.load_seconds, "base_downloaded_bytes": base_download,
                       "version_bytes": sum(f.bytes for _, f in dv.files_by_version())}
    out["delta_written_bytes"] = dir_bytes(version_url(root, delta["version"]))
    # The same snapshot compacted: the delta run's first three stages are shared (restored as an
    # unfinished run that the next run resumes), its publish stage is today's full rebuild.
    write_json(baseline_url(cfg), json.loads(saved))
    set_latest(root, base["version"])
    run_dir = os.path.join(work, "runs", delta["run"])
    state = json.load(open(os.path.join(run_dir, "state.json")))
    state.update(published=False, done=["shard", "diff", "encode"])
    state.pop("publish", None)
    state["seconds"].pop("publish", None)
    write_json(os.path.join(run_dir, "state.json"), state)
    # The rebuild keeps the quantizer whatever its recall sweep says (the drift check would retrain
    # when the synthetic base and the real changed passages differ): the comparison is with the
    # same quantizer, as the delta has.
    cfg.nightly.max_nprobe_growth = 1e9
    t = time.time()
    full = run_nightly(spark, cfg, compact=True)
    full_s = time.time() - t
    assert full["run"] == delta["run"] and full["kind"] == "full", full["summary"]
    fv = read_manifest(join_url(version_url(root, full["version"]), MANIFEST))
    out["compact"] = {"version": full["version"], "seconds": full["seconds"], "quantizer": full["quantizer"],
                      "wall_s": round(full_s, 1), "nprobe": fv.nprobe, "k_factor": fv.k_factor}
    out["full_version_bytes"] = dir_bytes(version_url(root, full["version"]))
    out["cfg"] = cfg
    return out


def agreement(cfg, a_version: str, b_version: str, questions: list[str], nprobe: int, k_factor) -> dict:
    from dpr_lib.config import join_url
    from dpr_lib.manifest import MANIFEST, version_url
    from dpr_lib.search import Searcher

    root = cfg.path("index_root")
    out = {}
    runs = {}
    for name, v in (("delta", a_version), ("compact", b_version)):
        s = Searcher(join_url(version_url(root, v), MANIFEST), cfg.encoder, cfg.path("cache_dir"), nprobe=nprobe,
                     k_factor=k_factor, mode="dense")
        q = s.encoder.encode(None, questions)
        runs[name] = s.index.search(q, 10)[1]
    a, b = runs["delta"], runs["compact"]
    out["equal_top10_sets"] = equal_sets(a, b)
    out["mean_top10_overlap"] = round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])), 5)
    out["questions"] = len(questions)
    return out


def bench_nightly_scale(spark, results: dict, details: dict) -> None:
    if not os.path.isdir(WIKI):
        log(f"nightly-scale: {WIKI} not found; skipped")
        return
    os.makedirs(OUT, exist_ok=True)
    docs = articles()
    change = plan_change(docs)
    words = np.array([len(d["text"].split()) for d in docs])
    touched = change["changed"] | change["deleted"]
    rest = [i for i in range(len(docs)) if i not in touched]
    # The small corpus: the touched articles plus others up to a quarter of the words.
    rng = np.random.default_rng(3)
    budget = 0.25 * words.sum() - words[list(touched)].sum()
    perm = rng.permutation(rest)
    small_rest = perm[np.cumsum(words[perm]) <= budget].tolist()
    small = sorted(touched | set(small_rest))
    questions_file = os.path.join(OUT, "recall_questions.txt")
    with open(questions_file, "w") as fh:
        fh.writelines(q.replace("\n", " ") + "\n" for q in squad_questions("dev-v1.1-part-a.json", 1024))
    from dpr_lib.config import load_config

    real = real_vectors(load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH, f"paths.cache_dir={OUT}/cache"]))
    log(f"nightly-scale: {len(docs)} articles, {len(change['changed'])} rewritten ({change['changed_words']} of "
        f"{change['total_words']} words), 10 deleted, 10 added; {len(real)} real vectors")
    big = one_size(spark, "big", write_snapshots(docs, list(range(len(docs))), change, os.path.join(OUT, "big")),
                   real, questions_file, serve_check=True)
    small_run = one_size(spark, "small", write_snapshots(docs, small, change, os.path.join(OUT, "small")),
                         real, questions_file, serve_check=False)
    agree_q = squad_questions("train-v1.1-subset.json", 200 if QUICK else 1200, per_paragraph=1)
    cfg = big.pop("cfg")
    small_run.pop("cfg")
    served = agreement(cfg, big["delta"]["version"], big["compact"]["version"], agree_q, big["base"]["nprobe"],
                       big["base"]["k_factor"])

    def post_diff(r):
        s = r["delta"]["seconds"]
        return s.get("encode", 0) + s.get("publish", 0)

    d_pub, c_pub = big["delta"]["seconds"]["publish"], big["compact"]["seconds"]["publish"]
    shared = sum(big["delta"]["seconds"].get(k, 0) for k in ("shard", "diff", "encode"))
    swap = big["swap"]
    results.update({
        "nightly.scale_passages": big["passages"],
        "nightly.swap_download_fraction": round(swap["downloaded_bytes"] / big["full_version_bytes"], 4),
        "nightly.index_bytes_written_fraction": round(big["delta_written_bytes"] / big["full_version_bytes"], 4),
        "nightly.index_stage_ratio": round(d_pub / c_pub, 3),
        "nightly.delta_vs_compact_ratio": round((shared + d_pub) / (shared + c_pub), 3),
        "nightly.post_diff_proportionality": round(post_diff(big) / post_diff(small_run), 3),
        "nightly.delta_top10_agreement": served["equal_top10_sets"],
    })
    bench_nightly_changefeed(spark, results, details)
    details["nightly_scale"] = {"big": big, "small": small_run, "agreement": served,
                                "change": {k: v for k, v in change.items() if k in ("changed_words", "total_words")},
                                "words_per_passage": WORDS, "quick": QUICK}
    log(f"nightly-scale: {json.dumps({k: v for k, v in results.items() if k.startswith('nightly.')})}")
