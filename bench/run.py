"""`make bench`: every stage against its baseline, measured side by side in one run on this machine.

Writes bench/results/latest.json (flat dotted keys, numbers), latest.md and ratios.png.
BENCH_QUICK=1 shrinks every size for a smoke run (CI) that only proves the harness works.

Data: real passages = SQuAD paragraphs from ../shared/data/squad (through the real corpus stage);
index scaling uses synthetic vectors: the real embeddings of those passages plus Gaussian noise,
renormalised, repeated to the target count (encoding 200k real passages would take hours here).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

QUICK = os.environ.get("BENCH_QUICK") == "1"
SQUAD = os.path.join(os.path.dirname(REPO), "shared", "data", "squad")
OUT = os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench", "results")
WORK = os.path.join(REPO, "work", "bench")
N_PASSAGES = 200 if QUICK else 2400
N_VECTORS = 20_000 if QUICK else 200_000
RSS_SAMPLE = 4096 if QUICK else 20_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- machine

def matmul_gflops(dtype, threads: int, n: int = 1024, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps = reps if dtype == torch.float32 else 2
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = os.cpu_count() or 1
    from dpr_lib.encode import cpu_has_native_bf16

    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "native_bf16": cpu_has_native_bf16(),
            "fp32_gflops": round(matmul_gflops(torch.float32, cores), 1),
            "bf16_gflops": round(matmul_gflops(torch.bfloat16, cores), 1)}


# ---------------------------------------------------------------- data

def squad_jsonl(path: str, limit: int) -> int:
    docs = []
    for name in ("train-v1.1-subset.json", "dev-v1.1-part-a.json"):
        for art in json.load(open(os.path.join(SQUAD, name)))["data"]:
            for i, para in enumerate(art["paragraphs"]):
                docs.append({"id": f"{name[:5]}:{art['title']}:{i}", "title": art["title"].replace("_", " "),
                             "text": para["context"]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for d in docs[:limit]:
            fh.write(json.dumps(d) + "\n")
    return min(limit, len(docs))


def squad_sentences() -> list[tuple[str, list[str]]]:
    """(title, sentences in reading order) for every SQuAD article in the shared files."""
    articles = []
    for name in ("train-v1.1-subset.json", "dev-v1.1-part-a.json"):
        for art in json.load(open(os.path.join(SQUAD, name)))["data"]:
            articles.append((art["title"].replace("_", " "),
                             [s.strip() + "." for para in art["paragraphs"] for s in para["context"].split(". ")
                              if len(s.split()) > 3]))
    return articles


def squad_remix_jsonl(path: str, n: int, words: int = 95, seed: int = 0, by_article: bool = True) -> int:
    """``n`` documents of ``words`` words (one passage each) made of real SQuAD sentences: a corpus
    size SQuAD's 3,343 paragraphs do not reach. ``by_article``: each document draws its sentences
    from one article (weighted by size) and keeps them in reading order, so passages are about one
    topic, as encyclopedia passages are; otherwise sentences come from anywhere (no topical
    structure at all: the hardest case for an IVF index)."""
    articles = squad_sentences()
    pool = [s for _, sents in articles for s in sents]
    sizes = np.array([len(sents) for _, sents in articles], dtype=np.float64)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            if by_article:
                title, sents = articles[rng.choice(len(articles), p=sizes / sizes.sum())]
                picked, count = [], 0
                for j in rng.permutation(len(sents)):
                    picked.append(j)
                    count += len(sents[j].split())
                    if count >= words:
                        break
                text = " ".join(sents[j] for j in sorted(picked)).split()
            else:
                title, text = articles[rng.integers(len(articles))][0], []
                while len(text) < words:
                    text += pool[rng.integers(len(pool))].split()
            fh.write(json.dumps({"id": f"remix-{i}", "title": title, "text": " ".join(text[:words])}) + "\n")
    return n


def squad_questions(name: str, limit: int, per_paragraph: int | None = None) -> list[str]:
    """The first ``limit`` questions of a SQuAD file (at most ``per_paragraph`` from each paragraph)."""
    questions = []
    for art in json.load(open(os.path.join(SQUAD, name)))["data"]:
        for para in art["paragraphs"]:
            questions.extend(qa["question"] for qa in para["qas"][:per_paragraph])
    return questions[:limit]


def model_flops_per_token(model_dir: str, tokens: float) -> float:
    """2 * non-embedding parameters per token + attention (QK^T and AV): 4 * layers * T * d."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    params = layers * (4 * d * d + 2 * d * inter)
    return 2 * params + 4 * layers * tokens * d


# ---------------------------------------------------------------- encode

def bench_encode(spark, results: dict, details: dict, mach: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from dpr_lib import storage
    from dpr_lib.config import load_config
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import Encoder, encode_passages, resolve_spec

    corpus = os.path.join(WORK, "squad.jsonl")
    n_docs = squad_jsonl(corpus, N_PASSAGES)
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [
        f"paths.work_dir={WORK}/encode", f"corpus.input={corpus}", "corpus.num_files=8"])
    shard_corpus(spark, cfg)
    passages = pa.concat_tables(pq.read_table(f) for f in storage.list_files(cfg.path("passages"), ".parquet"))
    passages = passages.slice(0, N_PASSAGES)
    n = passages.num_rows
    titles, texts = passages.column("title").to_pylist(), passages.column("text").to_pylist()
    log(f"encode: {n} passages from {n_docs} SQuAD paragraphs")

    # Baseline: sentence-transformers, default settings, batch 32, fp32.
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"))
    st = SentenceTransformer(spec.model_dir, device="cpu")
    joined = [f"{t} {x}" for t, x in zip(titles, texts)]
    st.encode(joined[:32], batch_size=32)
    t = time.perf_counter()
    st_vecs = st.encode(joined, batch_size=32, convert_to_numpy=True)
    st_s = time.perf_counter() - t
    del st

    # The encode job end to end (Spark local, all cores), on exactly these passages.
    storage.get_fs(cfg.path("embeddings"))[0].rm(cfg.path("embeddings"), recursive=True) \
        if os.path.exists(cfg.path("embeddings")) else None
    t = time.perf_counter()
    stats = encode_passages(spark, cfg)
    job_s = time.perf_counter() - t
    job_n = stats["passages_encoded"]
    emb = pa.concat_tables(pq.read_table(f) for f in storage.list_files(cfg.path("embeddings"), ".parquet"))
    job_vecs = dict(zip(emb.column("pid").to_pylist(), np.stack(emb.column("vector").to_numpy(zero_copy_only=False))))

    # The same library encoder in one process (all cores as torch threads).
    import dataclasses

    enc = Encoder(dataclasses.replace(spec, threads=mach["cores"]))
    enc.encode(titles[:16], texts[:16])
    t = time.perf_counter()
    enc.encode(titles, texts)
    lib_s = time.perf_counter() - t
    # fp32 reference without batching effects: one passage at a time.
    ref_idx = range(0, n, max(1, n // 200))
    ref = np.vstack([enc.encode([titles[i]], [texts[i]]) for i in ref_idx])
    job_sub = np.stack([job_vecs[p] for p in passages.column("pid").to_pylist()])[list(ref_idx)]
    cos = (job_sub * ref).sum(1) / np.linalg.norm(job_sub, axis=1) / np.linalg.norm(ref, axis=1)
    # Parity with sentence-transformers on identical input strings.
    same_input = enc.encode(None, joined[:200])
    cos_st = (same_input * st_vecs[:200]).sum(1) / np.linalg.norm(same_input, axis=1) / np.linalg.norm(
        st_vecs[:200], axis=1)

    ids = enc.tokenize(titles, texts)[0]
    tokens = float(np.mean([len(x) for x in ids]))
    flops = model_flops_per_token(spec.model_dir, tokens) * tokens
    job_pps = job_n / job_s
    results.update({
        "encode.passages_per_s": round(job_pps, 2),
        "encode.baseline_st_passages_per_s": round(n / st_s, 2),
        "encode.ratio_vs_sentence_transformers": round(job_pps / (n / st_s), 3),
        "encode.min_cosine_vs_fp32": round(float(cos.min()), 6),
        "encode.min_cosine_vs_sentence_transformers": round(float(cos_st.min()), 6),
        "encode.fraction_of_bf16_roofline": round(job_pps * flops / 1e9 / mach["bf16_gflops"], 3),
        "encode.fraction_of_fp32_roofline": round(job_pps * flops / 1e9 / mach["fp32_gflops"], 3),
        # per passage: the job encodes every passage of the paragraphs, the one-process run the first n
        "encode.spark_overhead_ratio": round((job_s / job_n) / (lib_s / n), 3),
        "encode.library_one_process_passages_per_s": round(n / lib_s, 2),
    })
    details["encode"] = {"passages": n, "mean_tokens": round(tokens, 1), "gflop_per_passage": round(flops / 1e9, 3),
                         "job_seconds": round(job_s, 2), "st_seconds": round(st_s, 2), "lib_seconds": round(lib_s, 2),
                         "dtype": spec.dtype, "token_budget": spec.token_budget}
    log(f"encode: job {job_pps:.1f} p/s, sentence-transformers {n / st_s:.1f} p/s, one process {n / lib_s:.1f} p/s")
    return cfg, emb


# ---------------------------------------------------------------- index

def synthetic_embeddings(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = real[rng.integers(0, len(real), n)]
    noisy = base + rng.standard_normal(base.shape).astype(np.float32) * 0.05
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(path: str, vectors: np.ndarray, metadata: dict, files: int = 8) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpr_lib.schemas import embeddings_schema

    os.makedirs(path, exist_ok=True)
    d = vectors.shape[1]
    schema = embeddings_schema(d).with_metadata(metadata)
    pids = np.arange(len(vectors), dtype=np.int64) * 7919 + 1
    for i, chunk in enumerate(np.array_split(np.arange(len(vectors)), files)):
        flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors[chunk].reshape(-1)), d)
        pq.write_table(pa.Table.from_arrays([pa.array(pids[chunk]), pa.array(["h"] * len(chunk)), flat],
                                            schema=schema), os.path.join(path, f"part-{i:05d}.parquet"))


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
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), overrides)
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
import json, resource, sys
sys.path.insert(0, {REPO!r})
from dpr_lib.config import load_config
from dpr_lib.index import build_index
from dpr_lib.spark import get_session
cfg = load_config({os.path.join(REPO, 'conf', 'local.yaml')!r}, ['paths.work_dir={d}', 'paths.embeddings={emb_dir}',
    'paths.passages={os.path.join(WORK, 'encode', 'passages')}', 'index.max_train_sample={RSS_SAMPLE}',
    'index.factory=IVF256,Flat', 'index.recall_queries=64', 'publish.docstore=false'])
build_index(get_session(cfg), cfg)
print(json.dumps({{'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
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


# ---------------------------------------------------------------- nightly

def bench_nightly(spark, results: dict, details: dict) -> None:
    """5% of documents changed: incremental run vs a full rebuild of the same snapshot, both through
    jobs' library entry point (run_nightly), and top-10 agreement of the two indexes."""
    from dpr_lib.config import load_config
    from dpr_lib.encode import Encoder, resolve_spec
    from dpr_lib.index_ops import set_nprobe
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
        return load_config(os.path.join(REPO, "conf", "local.yaml"), [
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
        for shard in ix.shards:
            set_nprobe(shard, nprobe)
        return ix.search(q, 10)[1]

    nlist = max(ix.manifest.nlist for ix in indexes.values())
    exact = top10("full", nlist)  # every list probed: exact search (IVF-Flat)
    def agree(a, b) -> float:
        return round(float(np.mean([set(x) == set(y) for x, y in zip(a, b)])), 4)
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


# ---------------------------------------------------------------- serve

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
from dpr_lib.serve import _memory
from dpr_lib.search import ShardedIndex
import faiss
imported = _memory()["RssAnon"]
idx = ShardedIndex({root!r}, cache_dir={cache!r}, nprobe={nprobe}, k_factor={k_factor})
q = np.random.default_rng(0).standard_normal((64, idx.dim)).astype(np.float32)
idx.search(q, 10)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({{"imported": imported, "loaded": _memory()["RssAnon"], "vectors": idx.ntotal,
                  "store_bytes": idx.memory()["rerank_store_bytes"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_serve(spark, enc_cfg, emb, results: dict, details: dict) -> None:
    """Compact shards: memory slope per passage (N vs 4N), recall vs exact on real questions, top-20
    loss through the evaluation job; the HTTP service: QPS, p99, and three swaps under load."""
    import shutil
    import threading

    import httpx

    from dpr_lib.config import load_config
    from dpr_lib.encode import get_encoder, resolve_spec
    from dpr_lib.index import build_index
    from dpr_lib.manifest import set_latest
    from dpr_lib.search import ShardedIndex

    real = np.stack(emb.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    d = real.shape[1]
    # The serving configuration: 96 B/passage, and nprobe/k_factor chosen for recall@20 >= 0.995,
    # as a service returning 20 passages should: on SQuAD each point of recall lost costs about a
    # point of top-20 accuracy (recall@20 0.9915 lost 1.07 points; the merge job's default,
    # recall@10 >= 0.95, about 3).
    compact = [f"index.bytes_per_vector={SERVE_BUDGET}", "index.num_shards=2", "index.recall_target=0.995",
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
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.time() + 180
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("dpr-serve did not become ready")
                time.sleep(0.5)

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
                            r = c.post("/search", json={"questions": qs, "k": 10})
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


# ---------------------------------------------------------------- cluster (issue 13)

def bench_cluster(results: dict, details: dict) -> None:
    """`make cluster-test`: the pipeline by spark-submit on local-cluster[2,1,2048] from the packed
    environment, against the same pipeline in local[2] (both timed by the script, same run)."""
    log("cluster: make cluster-test (package + local-cluster + local[2])")
    t = time.time()
    proc = subprocess.run(["make", "cluster-test"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"make cluster-test failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rep = json.load(open(os.path.join(REPO, "work-cluster", "cluster-test.json")))
    results["cluster.make_cluster_test_s"] = round(time.time() - t, 1)
    results["cluster.local_cluster_pipeline_s"] = rep["cluster"]["seconds"]
    results["cluster.local2_pipeline_s"] = rep["local"]["seconds"]
    results["cluster.pipeline_ratio_vs_local2"] = round(rep["cluster"]["seconds"] / rep["local"]["seconds"], 2)
    results["cluster.executors"] = len(rep["cluster"]["executor_python"])
    results["cluster.archive_mib"] = round(rep["archive_bytes"] / 2**20)
    details["cluster"] = {"executor_python": rep["cluster"]["executor_python"],
                          "stages": {"local-cluster": rep["cluster"]["stages"], "local[2]": rep["local"]["stages"]}}


# ---------------------------------------------------------------- report

ONLY = os.environ.get("BENCH_ONLY", "")  # serve / index / nightly / scale / cluster: that part, merged into latest.json


def write_report(results: dict, details: dict, mach: dict, seconds: float) -> None:
    os.makedirs(OUT, exist_ok=True)
    previous = os.path.join(OUT, "latest.json")
    if ONLY and os.path.exists(previous):
        old = json.load(open(previous))
        keep = {k: v for k, v in old.items() if "." in k and not k.startswith(ONLY + ".")}
        results = {**keep, **results}
        full_date = old.get("details", {}).get("full_run_date") or old.get("date")
        details = {**old.get("details", {}), **details, "full_run_date": full_date,
                   "partial_run": f"{ONLY}.* measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
                                  f"other figures from the full run of {full_date}"}
    doc = {**results, "machine": mach, "details": details, "quick": QUICK, "seconds": round(seconds, 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(OUT, "latest.json"), "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    lines = [f"# Benchmark results ({'quick' if QUICK else 'full'} run, {doc['date']})", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, fp32 matmul {mach['fp32_gflops']} GFLOP/s, "
             f"bf16 matmul {mach['bf16_gflops']} GFLOP/s (native bf16: {mach['native_bf16']}).", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in sorted(results.items())]
    with open(os.path.join(OUT, "latest.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {k: v for k, v in results.items() if "ratio" in k}
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(ratios)))
    ax.barh(list(ratios), list(ratios.values()), color="#4477aa")
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_xlabel("ratio (this product ÷ baseline, same run)")
    ax.set_title(f"dpr_lib benchmark ratios — {mach['cpu']}, {mach['cores']} cores")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "ratios.png"), dpi=100)


def main() -> int:
    from dpr_lib.cli import setup_logging
    from dpr_lib.config import load_config
    from dpr_lib.index import build_index
    from dpr_lib.spark import get_session

    if not os.path.isdir(SQUAD):
        print(f"bench needs the SQuAD files under {SQUAD}", file=sys.stderr)
        return 2
    setup_logging(False)
    t0 = time.time()
    results: dict = {}
    details: dict = {}
    mach = machine()
    log(f"machine: {mach}")
    if ONLY == "cluster":
        bench_cluster(results, details)
        write_report(results, details, mach, time.time() - t0)
        print(open(os.path.join(OUT, "latest.md")).read())
        return 0
    spark = get_session(load_config(os.path.join(REPO, "conf", "local.yaml"),
                                    ["spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 6g}"]))
    if ONLY == "scale":  # needs nothing from the encode benchmark
        from scale import bench_scale

        bench_scale(spark, results, details)
        spark.stop()
        write_report(results, details, mach, time.time() - t0)
        print(open(os.path.join(OUT, "latest.md")).read())
        return 0
    if ONLY == "nightly":  # needs nothing from the encode benchmark
        bench_nightly(spark, results, details)
        spark.stop()
        write_report(results, details, mach, time.time() - t0)
        print(open(os.path.join(OUT, "latest.md")).read())
        return 0
    enc_cfg, emb = bench_encode(spark, results, details, mach)
    if ONLY:
        results = {k: v for k, v in results.items() if k.startswith(ONLY + ".")}
        details.pop("encode", None)
    if not ONLY:
        build_index(spark, enc_cfg)  # the SQuAD index for single-question latency
        bench_search_single(enc_cfg, results)
        bench_index(spark, enc_cfg, emb, results, details)
        bench_nightly(spark, results, details)
        from scale import bench_scale

        bench_scale(spark, results, details)
    if ONLY == "index":
        bench_index(spark, enc_cfg, emb, results, details)
    if ONLY in ("", "serve"):
        bench_serve(spark, enc_cfg, emb, results, details)
    spark.stop()
    if ONLY in ("", "index"):
        bench_driver_rss(emb, results, details)
    if not ONLY and not QUICK:
        bench_cluster(results, details)
    write_report(results, details, mach, time.time() - t0)
    log(f"done in {time.time() - t0:.0f}s -> {OUT}/latest.json")
    print(open(os.path.join(OUT, "latest.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
