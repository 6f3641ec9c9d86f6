"""`BENCH_ONLY=scale make bench`: the merge job at millions of vectors of d = 768, against plain FAISS.

1. The corpus stage on the whole Wikipedia subset of ../shared/data/wiki (gzipped JSON Lines,
   read directly): passages/s.
2. Real vectors: N_REAL of those passages encoded once by the bundled all-MiniLM-L6-v2 (384-d),
   cached under work/bench/scale.
3. A generator calibrated on them (:class:`Generator`): a real vector moved part of the way to
   one of its nearest real neighbours, plus Gaussian noise. Its two parameters are chosen so that
   the recall@10-vs-nprobe curve of an IVF index over the synthetic set matches the real one at
   the same N and nlist. Both curves are recorded.
4. Lift to 768-d with a random orthogonal map (it preserves every inner product, so the recall
   curves are those of the 384-d vectors) and write Embeddings tables of N = 250k, 1M, 2M.
5. For each N, in fresh processes: the real merge job (Spark local, the auto rule) and plain
   FAISS with the same factory and sample size in one process. Driver peak RSS, each shard task's
   peak RSS, recall@10 on held-out query vectors, bytes published.
6. Two-level vs flat k-means at the same nlist on the same sample (1M): training time and
   recall@10 at equal nprobe.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import common
import numpy as np
from common import QUICK, REPO, TORCH, WIKI, log

WORK = os.path.join(common.WORK, "scale")
DIM = 768
N_REAL = 6_000 if QUICK else 51_000   # encoded real passages (1,000 held out as queries)
N_QUERIES = 1_000
SIZES = (20_000, 40_000, 80_000) if QUICK else (250_000, 1_000_000, 2_000_000)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
# The generator's grid: nearest real neighbours to move towards, isotropic noise per dimension.
# Tried on 50k real vectors (nlist 1024), max |recall@10 difference| over nprobe 1..128: 0.033 at
# (20, 0.05), 0.034 at (50, 0.05). Before it: k-means centroids + mixed residuals of a cluster,
# best 0.043 (recall too low at nprobe 1, too high at 4-16); Gaussian clusters with a pooled
# covariance made each cluster's members equidistant (off by >= 0.1); the old real-vector + 0.05
# noise generator is off by 0.09 at this N.
GRID = [(k, s) for k in (20, 30) for s in (0.045, 0.05, 0.055)]
DRIVER_MEMORY = "4g"  # conf/local.yaml's: a training budget of 2 GiB


# ---------------------------------------------------------------- real text and vectors

def corpus_stage(spark) -> tuple[dict, str]:
    """The real corpus stage on the Wikipedia subset (quick: one of its four files)."""
    from dpr_lib.config import load_config
    from dpr_lib.corpus import shard_corpus

    files = sorted(glob.glob(os.path.join(WIKI, "*.jsonl.gz")))
    src = files[0] if QUICK else WIKI
    cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [TORCH,
        f"paths.work_dir={WORK}/corpus", f"corpus.input={src}", "corpus.num_files=8"])
    t = time.perf_counter()
    stats = shard_corpus(spark, cfg)
    seconds = time.perf_counter() - t
    stats = {k: stats[k] for k in ("input_records", "docs", "passages", "rejects")}
    stats.update(seconds=round(seconds, 1), passages_per_s=round(stats["passages"] / seconds, 1),
                 input=os.path.relpath(src, os.path.dirname(REPO)))
    log(f"scale: corpus stage {stats['passages']} passages from {stats['docs']} articles in {seconds:.1f}s "
        f"({stats['passages_per_s']:.0f} passages/s)")
    return stats, cfg.path("passages")


def real_vectors(passages_url: str) -> tuple[np.ndarray, dict]:
    """N_REAL passages spread over the whole table, encoded by the bundled model (cached)."""
    import pyarrow.parquet as pq

    from dpr_lib import storage
    from dpr_lib.config import EncoderConfig
    from dpr_lib.encoder import Encoder, resolve_spec

    cache = os.path.join(WORK, f"real-{N_REAL}.npy")
    if os.path.exists(cache):
        meta = json.load(open(cache + ".json"))
        return np.load(cache), meta
    files = storage.list_files(passages_url, ".parquet")
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    pick = np.sort(np.random.default_rng(0).choice(total, N_REAL, replace=False))
    titles, texts, offset = [], [], 0
    for f in files:
        table = pq.read_table(f, columns=["title", "text"])
        local = pick[(pick >= offset) & (pick < offset + table.num_rows)] - offset
        titles += table.column("title").take(local).to_pylist()
        texts += table.column("text").take(local).to_pylist()
        offset += table.num_rows
    spec = resolve_spec(EncoderConfig(threads=os.cpu_count() or 1), os.path.join(WORK, "cache"))
    enc = Encoder(spec)
    t = time.perf_counter()
    vectors = np.vstack([enc.encode(titles[i:i + 2000], texts[i:i + 2000]) for i in range(0, N_REAL, 2000)])
    seconds = time.perf_counter() - t
    meta = {"passages": N_REAL, "seconds": round(seconds, 1), "passages_per_s": round(N_REAL / seconds, 1),
            "model": spec.model_id, "dtype": spec.dtype, "dim": spec.dim}
    os.makedirs(WORK, exist_ok=True)
    np.save(cache, vectors.astype(np.float32))
    json.dump(meta, open(cache + ".json", "w"))
    log(f"scale: {N_REAL} real passages encoded in {seconds:.0f}s ({meta['passages_per_s']:.0f}/s, {spec.dtype})")
    return vectors.astype(np.float32), meta


# ---------------------------------------------------------------- the generator

class Generator:
    """Synthetic unit vectors on the real vectors' manifold: a real vector moved a uniform
    fraction of the way towards one of its ``k`` nearest real neighbours, plus isotropic Gaussian
    noise (``noise`` per dimension), renormalised. The neighbours keep the local geometry; the
    noise keeps copies of one real vector apart."""

    K_MAX = 50

    def __init__(self, real: np.ndarray):
        from dpr_lib.index_ops import topk_block

        self.real = real
        self.nn = np.empty((len(real), self.K_MAX), np.int64)
        ids = np.arange(len(real))
        for start in range(0, len(real), 5000):
            block = real[start:start + 5000] @ real.T
            block[np.arange(len(block)), ids[start:start + 5000]] = -np.inf  # not itself
            self.nn[start:start + 5000] = topk_block(block, ids, self.K_MAX)[1]

    def sample(self, n: int, k: int, noise: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, len(self.real), n)
        j = self.nn[i, rng.integers(0, k, n)]
        lam = rng.uniform(0, 1, n).astype(np.float32)[:, None]
        x = self.real[i] + lam * (self.real[j] - self.real[i])
        x += noise * rng.standard_normal(x.shape).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_curve(base: np.ndarray, queries: np.ndarray, nlist: int, nprobes=NPROBES) -> dict:
    """recall@10 of an IVF-Flat (inner product) over ``base`` at each nprobe, vs exact search."""
    from dpr_lib import index_ops as ix

    sample = base[np.random.default_rng(1).choice(len(base), min(len(base), nlist * 64), replace=False)]
    index = ix.train_quantizer(sample, f"IVF{nlist},Flat", 1)
    index.add(base)
    exact = ix.topk_block(queries @ base.T, np.arange(len(base)), 10)[1]
    out = {}
    for p in nprobes:
        ix.set_nprobe(index, p)
        out[p] = round(ix.recall_at_k(index.search(queries, 10)[1], exact), 4)
    return out


def calibrate(real: np.ndarray) -> tuple[Generator, tuple[int, float], dict]:
    """The (neighbours, noise) of GRID whose recall curve is closest (max |difference| over
    nprobes) to the real vectors' at the same N and nlist."""
    from dpr_lib.index_ops import choose_factory

    base, queries = real[:-N_QUERIES], real[-N_QUERIES:]
    nlist = choose_factory(len(base), real.shape[1]).nlist
    real_curve = recall_curve(base, queries, nlist)
    gen, tried = Generator(base), {}
    for setting in GRID:
        syn = gen.sample(len(base) + N_QUERIES, *setting, seed=7)
        tried[setting] = recall_curve(syn[:-N_QUERIES], syn[-N_QUERIES:], nlist)
    diff = {key: max(abs(curve[p] - real_curve[p]) for p in NPROBES) for key, curve in tried.items()}
    best = min(diff, key=diff.get)
    # the old generator (a real vector + Gaussian noise 0.05, as bench_index uses) for comparison
    rng = np.random.default_rng(3)
    old = base[rng.integers(0, len(base), len(real))] + 0.05 * rng.standard_normal(real.shape).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    old_curve = recall_curve(old[:-N_QUERIES], old[-N_QUERIES:], nlist)
    report = {"n": len(base), "nlist": nlist, "queries": N_QUERIES, "neighbours": best[0], "noise": best[1],
              "real": real_curve, "synthetic": tried[best], "max_abs_diff": round(diff[best], 4),
              "max_abs_diff_by_setting": {"/".join(map(str, k)): round(d, 4) for k, d in diff.items()},
              "old_noise_generator": old_curve,
              "old_noise_generator_max_abs_diff": round(max(abs(old_curve[p] - real_curve[p]) for p in NPROBES), 4)}
    log(f"scale: generator calibrated at n={len(base)}, nlist={nlist}: neighbours/noise {best}, max |recall "
        f"difference| {diff[best]:.3f}; real {real_curve}, synthetic {tried[best]}, old generator {old_curve}")
    return gen, best, report


def lift(dim_in: int, dim_out: int = DIM, seed: int = 5) -> np.ndarray:
    """A [dim_out, dim_in] matrix with orthonormal columns: x -> x @ Q.T keeps every inner product."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim_out, dim_in)))
    return q.astype(np.float32)


def write_table(path: str, n: int, gen: Generator, setting: tuple[float, float], q_lift: np.ndarray, metadata: dict,
                files: int, seed: int) -> None:
    """An Embeddings table of n lifted synthetic vectors (pid-sorted files, as the encode job writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpr_lib.schemas import embeddings_schema

    done = os.path.join(path, "_DONE")
    key = json.dumps([n, list(setting), metadata, seed], sort_keys=True)
    if os.path.exists(done) and open(done).read() == key:
        return
    os.makedirs(path, exist_ok=True)
    schema = embeddings_schema(DIM).with_metadata(metadata)
    bounds = np.linspace(0, n, files + 1).astype(np.int64)
    for i in range(files):
        with pq.ParquetWriter(os.path.join(path, f"part-{i:05d}.parquet"), schema) as writer:
            for start in range(bounds[i], bounds[i + 1], 50_000):
                stop = min(start + 50_000, bounds[i + 1])
                x = gen.sample(stop - start, *setting, seed=seed * 1_000_003 + start) @ q_lift.T
                flat = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), DIM)
                pids = pa.array(np.arange(start, stop, dtype=np.int64) * 7919 + 1)
                writer.write_table(pa.Table.from_arrays([pids, pa.array(["h"] * (stop - start)), flat], schema=schema))
    with open(done, "w") as fh:
        fh.write(key)


# ---------------------------------------------------------------- runs in fresh processes

MERGE = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from dpr_lib.index_ops import peak_rss, reset_peak_rss
reset_peak_rss()  # this process's own peak, not the bench's it inherited at fork
from dpr_lib.cli import setup_logging
from dpr_lib.config import load_config
from dpr_lib.index import build_index
from dpr_lib.spark import get_session
setup_logging(False)
cfg = load_config({conf!r}, {overrides!r})
spark = get_session(cfg)
q = np.load({queries!r})
t = time.perf_counter()
m = build_index(spark, cfg, question_vectors=q, questions_source="held-out synthetic vectors")
seconds = time.perf_counter() - t
spark.stop()
print(json.dumps({{"seconds": seconds, "driver_peak_rss": peak_rss(),
                  "manifest": m.to_dict()}}))
"""

PLAIN = """
import json, sys, time
import faiss, numpy as np, pyarrow.parquet as pq
sys.path.insert(0, {repo!r})
from dpr_lib.index_ops import peak_rss, reset_peak_rss
reset_peak_rss()
from dpr_lib import index_ops as ix
files, factory, train_size, method, out = {files!r}, {factory!r}, {train_size!r}, {method!r}, {out!r}
t = time.perf_counter()
rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
pick = np.sort(np.random.default_rng(0).choice(sum(rows), train_size, replace=False))
sample, offset = [], 0
for f, r in zip(files, rows):  # pass 1: the training sample, one file in memory at a time
    local = pick[(pick >= offset) & (pick < offset + r)] - offset
    sample.append(ix.vectors_of(pq.read_table(f, columns=["vector"]).take(local), {dim}))
    offset += r
t_read = time.perf_counter() - t
index = ix.train_quantizer(np.vstack(sample), factory, 1234, method)
del sample
t_train = time.perf_counter() - t - t_read
for f in files:  # pass 2: add every vector with its pid
    table = pq.read_table(f)
    index.add_with_ids(ix.vectors_of(table, {dim}), table.column("pid").to_numpy().astype(np.int64))
    del table
faiss.write_index(index, out)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "train_seconds": t_train, "peak_rss": peak_rss()}}))
"""


def _run(code: str, timeout: int = 3600) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_job(emb_dir: str, n: int, queries_npy: str) -> dict:
    work = os.path.join(WORK, f"run-{n}")
    overrides = [TORCH, f"paths.work_dir={work}", f"paths.embeddings={emb_dir}", "publish.docstore=false",
                 f"spark.conf={{spark.ui.enabled: 'false', spark.driver.memory: {DRIVER_MEMORY}}}",
                 "index.num_shards=2", "publish.keep_versions=1"]
    got = _run(MERGE.format(repo=REPO, conf=os.path.join(REPO, "conf", "local.yaml"), overrides=overrides,
                            queries=queries_npy))
    m = got["manifest"]
    largest = max(m["shards"], key=lambda s: s["bytes"])
    return {"seconds": round(got["seconds"], 2), "driver_peak_rss": got["driver_peak_rss"],
            "factory": m["factory"], "nlist": m["nlist"], "train_size": m["train_size"],
            "training": m["training"], "nprobe": m["nprobe"], "recall_at_10": m["recall"]["at_nprobe"],
            "recall_by_nprobe": m["recall"]["by_nprobe"], "timings": m["timings"],
            "bytes_published": m["totals"]["bytes"] + m["trained"]["bytes"],
            "shards": [{"vectors": s["vectors"], "bytes": s["bytes"], "task_peak_rss": s["task_peak_rss"]}
                       for s in m["shards"]],
            "largest_shard_bytes": largest["bytes"], "largest_shard_task_peak_rss": largest["task_peak_rss"],
            "task_rss_ratio": round(max(s["task_peak_rss"] / s["bytes"] for s in m["shards"]), 3)}


def plain_faiss(emb_dir: str, factory: str, train_size: int, method: str) -> dict:
    files = sorted(glob.glob(os.path.join(emb_dir, "*.parquet")))
    out = os.path.join(WORK, "plain.faiss")
    got = _run(PLAIN.format(repo=REPO, files=files, factory=factory, train_size=train_size, method=method,
                            out=out, dim=DIM))
    got["bytes"] = os.path.getsize(out)
    os.remove(out)
    return got


def train_compare(emb_dir: str, queries: np.ndarray, nlist: int, train_size: int) -> dict:
    """Flat vs two-level k-means on the same sample: training seconds and recall@10 at equal nprobe
    over the same vectors (read whole: at most 1M x 768 floats here)."""
    import pyarrow.parquet as pq

    from dpr_lib import index_ops as ix

    x = np.vstack([ix.vectors_of(pq.read_table(f, columns=["vector"]), DIM)
                   for f in sorted(glob.glob(os.path.join(emb_dir, "*.parquet")))])
    sample = x[np.sort(np.random.default_rng(0).choice(len(x), train_size, replace=False))]
    exact = np.full((len(queries), 10), -1, np.int64)
    best = (np.full((len(queries), 10), -np.inf, np.float32), exact)
    for start in range(0, len(x), 100_000):
        block = ix.topk_block(queries @ x[start:start + 100_000].T, np.arange(start, min(start + 100_000, len(x))), 10)
        best = ix.merge_topk([best[0], block[0]], [best[1], block[1]], 10)
    out = {"n": len(x), "nlist": nlist, "train_size": train_size}
    # flat_seed2: flat k-means from another seed, the yardstick of what "equal" means here
    for name, method, seed in (("flat", "flat", 1234), ("two_level", "two_level", 1234), ("flat_seed2", "flat", 4321)):
        t = time.perf_counter()
        index = ix.train_quantizer(sample, f"IVF{nlist},Flat", seed, method)
        train_s = time.perf_counter() - t
        index.add(x)
        curve = {}
        for p in NPROBES:
            ix.set_nprobe(index, p)
            curve[p] = round(ix.recall_at_k(index.search(queries, 10)[1], best[1]), 4)
        out[name] = {"train_seconds": round(train_s, 2), "recall_by_nprobe": curve, "seed": seed}
        del index
        log(f"scale: {name} k-means, nlist {nlist}, {train_size} points: {train_s:.1f}s; recall@10 {curve}")
    gap = {p: round(out["flat"]["recall_by_nprobe"][p] - out["two_level"]["recall_by_nprobe"][p], 4) for p in NPROBES}
    out["recall_gap_by_nprobe"] = gap  # flat minus two-level, same seed
    out["max_recall_gap"] = max(abs(v) for v in gap.values())
    out["flat_seed_gap"] = round(max(abs(out["flat"]["recall_by_nprobe"][p] - out["flat_seed2"]["recall_by_nprobe"][p])
                                     for p in NPROBES), 4)
    out["speedup"] = round(out["flat"]["train_seconds"] / out["two_level"]["train_seconds"], 2)
    return out


# ---------------------------------------------------------------- the benchmark

def bench_scale(spark, results: dict, details: dict) -> None:
    from dpr_lib.index_ops import rule_table

    if not os.path.isdir(WIKI):
        log(f"scale: {WIKI} not found, skipped")
        return
    os.makedirs(WORK, exist_ok=True)
    # The rule at d = 768 with conf/local.yaml's 4g driver (2 GiB budget) and a 16g one (8 GiB).
    rules = {f"{b}GiB": rule_table(DIM, b * 2**30) for b in (2, 8)}
    big = [r for rows in rules.values() for r in rows if r["n"] in (1_000_000, 21_000_000, 100_000_000)]
    results["scale.min_train_points_per_list"] = min(r["points_per_list"] for r in big)
    details["scale_rule"] = rules

    corpus, passages_url = corpus_stage(spark)
    results["scale.corpus_passages_per_s"] = corpus["passages_per_s"]
    details["scale_corpus"] = corpus
    real, real_meta = real_vectors(passages_url)
    details["scale_real_vectors"] = real_meta
    gen, setting, calib = calibrate(real)
    details["scale_generator"] = calib
    results["scale.generator_max_recall_diff"] = calib["max_abs_diff"]

    q_lift = lift(real.shape[1])
    # The configured (bundled) encoder's fingerprint, so the merge job accepts the table; dim 768.
    from dpr_lib.config import EncoderConfig
    from dpr_lib.encoder import resolve_spec

    fingerprint = {**resolve_spec(EncoderConfig(), os.path.join(WORK, "cache")).fingerprint(), "dim": DIM}
    metadata = {"dpr.fingerprint": json.dumps(fingerprint)}
    queries = gen.sample(N_QUERIES, *setting, seed=999) @ q_lift.T  # held apart: never indexed
    queries_npy = os.path.join(WORK, "queries.npy")
    np.save(queries_npy, queries.astype(np.float32))
    runs = {}
    for i, n in enumerate(SIZES):
        emb_dir = os.path.join(WORK, f"emb-{n}")
        t = time.perf_counter()
        write_table(emb_dir, n, gen, setting, q_lift, metadata, files=max(4, n // 125_000), seed=11 + i)
        log(f"scale: {n} vectors of d={DIM} ready ({time.perf_counter() - t:.0f}s)")
        merge = merge_job(emb_dir, n, queries_npy)
        log(f"scale: merge job {n}: {merge['seconds']:.1f}s, {merge['factory']}, nprobe {merge['nprobe']}, "
            f"recall@10 {merge['recall_at_10']}, driver peak {merge['driver_peak_rss'] / 2**20:.0f} MiB, "
            f"largest task {merge['largest_shard_task_peak_rss'] / 2**20:.0f} MiB for a "
            f"{merge['largest_shard_bytes'] / 2**20:.0f} MiB shard")
        plain = plain_faiss(emb_dir, merge["factory"], merge["train_size"], merge["training"]["method"])
        log(f"scale: plain FAISS {n}: {plain['seconds']:.1f}s (train {plain['train_seconds']:.1f}s)")
        runs[n] = {"merge": merge, "plain": plain,
                   "s_per_million": round(merge["seconds"] / (n / 1e6), 2),
                   "ratio_vs_plain_faiss": round(merge["seconds"] / plain["seconds"], 3),
                   "driver_rss_beyond_sample": merge["driver_peak_rss"] - merge["training"]["sample_bytes"]}
        if n == SIZES[1]:
            details["scale_two_level"] = train_compare(emb_dir, queries, merge["nlist"], merge["train_size"])
            results["scale.two_level_recall_gap"] = details["scale_two_level"]["max_recall_gap"]
            results["scale.two_level_train_speedup"] = details["scale_two_level"]["speedup"]
        if n != SIZES[-1]:
            subprocess.run(["rm", "-rf", emb_dir])  # disk: keep only what the next size needs
    small, large = runs[SIZES[0]], runs[SIZES[-1]]
    results.update({
        "scale.s_per_million_growth": round(large["s_per_million"] / small["s_per_million"], 3),
        "scale.ratio_vs_plain_faiss_2m": large["ratio_vs_plain_faiss"],
        "scale.recall_at_10_2m": large["merge"]["recall_at_10"],
        "scale.driver_rss_growth": round(large["driver_rss_beyond_sample"] / small["driver_rss_beyond_sample"], 3),
        "scale.driver_rss_growth_with_sample": round(large["merge"]["driver_peak_rss"] /
                                                     small["merge"]["driver_peak_rss"], 3),
        "scale.task_rss_ratio": large["merge"]["task_rss_ratio"],
        "scale.merge_s_per_million_2m": large["s_per_million"],
    })
    details["scale_runs"] = {str(n): r for n, r in runs.items()}
    details["scale_sizes"] = list(SIZES)
    details["scale_cost_model"] = cost_model(details, *encoder_shape(passages_url))


# ---------------------------------------------------------------- cost model

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072}  # DPR's encoders
CLUSTER_CORES = 16 * 8       # 16 executors x 8 CPU cores
DRIVER_CORES = 16
GPUS = 8
H200_BF16_PEAK = 989e12      # dense bf16 FLOP/s of one H200 (vendor figure)
GPU_UTILISATION = 0.3        # assumed, not measured: no GPU was lent to the run that wrote this model


def encoder_shape(passages_url: str) -> tuple[float, dict]:
    """Mean tokens of 2,000 Wikipedia passages (title + text) and the bundled model's config."""
    import pyarrow.parquet as pq

    from dpr_lib import storage
    from dpr_lib.config import EncoderConfig
    from dpr_lib.encoder import Encoder, resolve_spec

    spec = resolve_spec(EncoderConfig(), os.path.join(WORK, "cache"))
    first = pq.read_table(storage.list_files(passages_url, ".parquet")[0], columns=["title", "text"]).slice(0, 2000)
    ids, _ = Encoder(spec).tokenize(first.column("title").to_pylist(), first.column("text").to_pylist())
    return float(np.mean([len(x) for x in ids])), json.load(open(os.path.join(spec.model_dir, "config.json")))


def flops_per_token(cfg: dict, tokens: float) -> float:
    """2 x non-embedding parameters + attention (QK^T, AV): as bench/run.py's model_flops_per_token."""
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    return 2 * layers * (4 * d * d + 2 * d * inter) + 4 * layers * tokens * d


def cost_model(details: dict, mean_tokens: float, minilm_cfg: dict) -> dict:
    """Wall time and core-hours of a full build and of a nightly run with 1% changed, at 21M and
    100M passages, from the rates this run measured on 2 cores:

    - corpus stage: passages/s per core (whole Wikipedia subset);
    - encoding: the bundled MiniLM's passages/s per core here, scaled to BERT-base (DPR) by FLOPs
      per passage at the same token count; GPUs: H200 bf16 peak x an assumed utilisation;
    - merge job: shard-pass seconds fitted as a*N + b*N*nlist over the three sizes (reading, plus the
      flat assignment to nlist lists), training at the FLOP rate two-level k-means reached here,
      sample pass per vector, all on the cluster's cores (training on the driver's)."""
    runs = {int(n): r for n, r in details["scale_runs"].items()}
    cores_here = 2
    corpus_rate = details["scale_corpus"]["passages_per_s"] / cores_here            # passages/s/core
    minilm_rate = details["scale_real_vectors"]["passages_per_s"] / cores_here      # passages/s/core
    ratio = flops_per_token(BERT_BASE, mean_tokens) / flops_per_token(minilm_cfg, mean_tokens)
    dpr_rate = minilm_rate / ratio
    gpu_rate = H200_BF16_PEAK * GPU_UTILISATION / (flops_per_token(BERT_BASE, mean_tokens) * mean_tokens)
    # shard pass: core-seconds = a*N + b*N*nlist (least squares over the measured sizes)
    rows = [(n, r["merge"]["nlist"], r["merge"]["timings"]["add_write"] * cores_here) for n, r in runs.items()]
    A = np.array([[n, n * nl] for n, nl, _ in rows], np.float64)
    y = np.array([s for _, _, s in rows], np.float64)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    a, b = max(a, 0.0), max(b, 0.0)
    big = runs[max(runs)]["merge"]
    train_rate = big["training"]["estimated_flops"] / max(big["timings"]["train"], 1e-9) / cores_here  # FLOP/s/core
    sample_rate = big["timings"]["sample"] * cores_here / max(runs)                   # core-s per vector
    from dpr_lib.index_ops import choose_factory

    out = {"assumptions": {
        "cluster": f"{CLUSTER_CORES // 8} executors x 8 CPU cores, driver {DRIVER_CORES} cores with 16g "
                   f"(8 GiB training budget); GPU variant: {GPUS} x H200 for encoding",
        "encoder": "BERT-base (DPR), FLOPs per passage scaled from the measured MiniLM rate",
        "mean_tokens": round(mean_tokens, 1), "bert_base_over_minilm_flops": round(ratio, 2),
        "corpus_passages_per_core_s": round(corpus_rate, 1), "minilm_passages_per_core_s": round(minilm_rate, 1),
        "dpr_passages_per_core_s": round(dpr_rate, 2), "gpu_passages_per_s_assumed": round(gpu_rate),
        "gpu_utilisation_assumed": GPU_UTILISATION,
        "shard_core_s_per_vector": a, "shard_core_s_per_vector_per_list": b,
        "train_flop_per_core_s": train_rate, "sample_core_s_per_vector": sample_rate}}
    for n in (21_000_000, 100_000_000):
        plan = choose_factory(n, DIM, max_train_bytes=8 * 2**30)
        stages = {  # core-seconds
            "corpus": n / corpus_rate,
            "encode_cpu": n / dpr_rate,
            "merge_sample": n * sample_rate,
            "merge_shards": a * n + b * n * plan.nlist,
        }
        train_s = plan.train_flops / (train_rate * DRIVER_CORES)
        wall_cpu = (stages["corpus"] + stages["encode_cpu"] + stages["merge_sample"] + stages["merge_shards"]) \
            / CLUSTER_CORES + train_s
        encode_gpu_s = n / (gpu_rate * GPUS)
        wall_gpu = (stages["corpus"] + stages["merge_sample"] + stages["merge_shards"]) / CLUSTER_CORES \
            + train_s + encode_gpu_s
        changed = n // 100
        # nightly today (snapshot mode, quantizer reused): the whole snapshot is split (the diff's
        # join is not in this model), 1% re-encoded, every shard rebuilt from reused embeddings.
        nightly = {"corpus": n / corpus_rate, "encode_cpu": changed / dpr_rate,
                   "merge_shards": stages["merge_shards"] + stages["merge_sample"]}
        nightly_wall = sum(nightly.values()) / CLUSTER_CORES
        out[str(n)] = {
            "factory": plan.factory, "nlist": plan.nlist, "train_size": plan.train_size,
            "full_core_hours": {k: round(v / 3600, 1) for k, v in stages.items()},
            "full_train_driver_s": round(train_s),
            "full_wall_h_cpu_cluster": round(wall_cpu / 3600, 2),
            "full_wall_h_gpu_encode": round(wall_gpu / 3600, 2), "gpu_hours": round(encode_gpu_s * GPUS / 3600, 2),
            "nightly_1pct_core_hours": {k: round(v / 3600, 2) for k, v in nightly.items()},
            "nightly_1pct_wall_h": round(nightly_wall / 3600, 2),
            "dominant_full": max(stages, key=stages.get), "dominant_nightly": max(nightly, key=nightly.get),
        }
    return out


def main() -> int:
    """`python bench/scale.py --cost-model [latest.json]`: (re)compute the cost model from the
    figures a scale run recorded, and store it in that file's details."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--cost-model", action="store_true", required=True)
    parser.add_argument("results", nargs="?", default=os.path.join(REPO, "bench", "results", "latest.json"))
    args = parser.parse_args()
    doc = json.load(open(args.results))
    details = doc["details"]
    model = cost_model(details, *encoder_shape(os.path.join(WORK, "corpus", "passages")))
    details["scale_cost_model"] = model
    with open(args.results, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    print(json.dumps(model, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
