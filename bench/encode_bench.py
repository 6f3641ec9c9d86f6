"""`make bench`, encode part: the encode job vs sentence-transformers on the same SQuAD passages."""

from __future__ import annotations

import os
import time

import numpy as np
from common import N_PASSAGES, QUICK, REPO, WIKI, WORK, log, model_flops_per_token, squad_jsonl

OVERHEAD_PASSAGES = 20_000  # the Spark overhead is judged where fixed per-worker costs are amortised


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
        "encode.spark_overhead_ratio_small": round((job_s / job_n) / (lib_s / n), 3),
        "encode.library_one_process_passages_per_s": round(n / lib_s, 2),
    })
    details["encode"] = {"passages": n, "mean_tokens": round(tokens, 1), "gflop_per_passage": round(flops / 1e9, 3),
                         "job_seconds": round(job_s, 2), "st_seconds": round(st_s, 2), "lib_seconds": round(lib_s, 2),
                         "dtype": spec.dtype, "token_budget": spec.token_budget}
    log(f"encode: job {job_pps:.1f} p/s, sentence-transformers {n / st_s:.1f} p/s, one process {n / lib_s:.1f} p/s")
    if not QUICK and os.path.isdir(WIKI):
        spark_overhead(spark, results, details, mach)
    return cfg, emb


def spark_overhead(spark, results: dict, details: dict, mach: dict) -> None:
    """The encode job vs the same encoder in one process (all cores as torch threads) on exactly the
    same >= 20k Wikipedia passages: what Spark costs once each worker's start (imports, model load:
    ~5 s per Python worker, measured) is spread over real work."""
    import dataclasses
    import gzip
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpr_lib import storage
    from dpr_lib.config import load_config
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import Encoder, encode_passages, resolve_spec

    work = os.path.join(WORK, "encode-20k")
    src = os.path.join(work, "wiki.jsonl")
    if not os.path.exists(src):
        os.makedirs(work, exist_ok=True)
        words = 0
        parts = sorted(f for f in os.listdir(WIKI) if f.endswith(".jsonl.gz"))
        with gzip.open(os.path.join(WIKI, parts[min(1, len(parts) - 1)]), "rt") as fh, open(src + ".tmp", "w") as out:
            for line in fh:
                out.write(line)
                words += len(json.loads(line)["text"].split())
                if words > OVERHEAD_PASSAGES * 100:
                    break
        os.replace(src + ".tmp", src)
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [
        f"paths.work_dir={work}", f"corpus.input={src}", "corpus.num_files=8"])
    shard_corpus(spark, cfg)
    shutil.rmtree(cfg.path("embeddings"), ignore_errors=True)
    t = time.perf_counter()
    stats = encode_passages(spark, cfg)
    job_s = time.perf_counter() - t
    passages = pa.concat_tables(pq.read_table(f) for f in storage.list_files(cfg.path("passages"), ".parquet"))
    titles, texts = passages.column("title").to_pylist(), passages.column("text").to_pylist()
    enc = Encoder(dataclasses.replace(resolve_spec(cfg.encoder, cfg.path("cache_dir")), threads=mach["cores"]))
    enc.encode(titles[:16], texts[:16])
    t = time.perf_counter()
    enc.encode(titles, texts)
    lib_s = time.perf_counter() - t
    n = stats["passages_encoded"]
    results["encode.spark_overhead_ratio"] = round(job_s / lib_s, 3)
    details["encode_overhead"] = {"passages": n, "job_seconds": round(job_s, 2), "one_process_seconds": round(lib_s, 2),
                                  "job_passages_per_s": round(n / job_s, 1),
                                  "one_process_passages_per_s": round(n / lib_s, 1),
                                  "first_task_seconds": [x["seconds"] for x in stats["tasks"][:2]]}
    log(f"encode: Spark overhead at {n} passages {job_s / lib_s:.3f} (job {n / job_s:.1f} p/s, one process "
        f"{n / lib_s:.1f} p/s)")
