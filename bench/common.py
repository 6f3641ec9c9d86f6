"""What every benchmark of `make bench` shares: paths and sizes, the machine's figures, SQuAD-derived
corpora and questions, synthetic embeddings. The benchmarks: encode_bench, index_bench,
nightly_bench, serve_bench, cluster_bench, scale; run.py runs them and writes the report.

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
WIKI = os.path.join(os.path.dirname(REPO), "shared", "data", "wiki")
OUT = os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench", "results")
WORK = os.path.join(REPO, "work", "bench")
N_PASSAGES = 200 if QUICK else 2400
TORCH = "encoder.backend=torch"
"""An override for every part but encode: they keep the torch encoder their baselines and earlier
figures were measured with (encode_bench measures conf/local.yaml's encoder.backend=auto)."""
N_VECTORS = 20_000 if QUICK else 200_000
RSS_SAMPLE = 4096 if QUICK else 20_000


def equal_sets(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose id sets are equal (top-k agreement of two result lists [q, k])."""
    return round(float(np.mean([set(x) == set(y) for x, y in zip(a, b)])), 4)


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
    from dpr_lib.encoder import cpu_has_native_bf16
    from dpr_lib.encoder_choice import cpu_kind

    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "native_bf16": cpu_has_native_bf16(), "cpu_kind": cpu_kind(),
            "fp32_gflops": round(matmul_gflops(torch.float32, cores), 1),
            "bf16_gflops": round(matmul_gflops(torch.bfloat16, cores), 1)}


# ---------------------------------------------------------------- data

SQUAD_FILES = ("train-v1.1-subset.json", "dev-v1.1-part-a.json")


def squad_jsonl(path: str, limit: int) -> int:
    """The first ``limit`` SQuAD paragraphs (training subset, then dev part a) as a JSON Lines corpus."""
    from dpr_lib.datasets import squad_paragraphs

    docs = [{"id": f"{name[:5]}:{title}:{p}", "title": title, "text": context}
            for name in SQUAD_FILES for title, p, context, _ in squad_paragraphs(os.path.join(SQUAD, name))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for d in docs[:limit]:
            fh.write(json.dumps(d) + "\n")
    return min(limit, len(docs))


def squad_sentences() -> list[tuple[str, list[str]]]:
    """(title, sentences in reading order) for every SQuAD article in the shared files."""
    from dpr_lib.datasets import squad_paragraphs

    articles: dict[tuple[str, str], list[str]] = {}
    for name in SQUAD_FILES:
        for title, _, context, _ in squad_paragraphs(os.path.join(SQUAD, name)):
            articles.setdefault((name, title), []).extend(
                s.strip() + "." for s in context.split(". ") if len(s.split()) > 3)
    return [(title, sents) for (_, title), sents in articles.items()]


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
    from dpr_lib.datasets import squad_paragraphs

    questions = []
    for _, _, _, qas in squad_paragraphs(os.path.join(SQUAD, name)):
        questions.extend(qa["question"] for qa in qas[:per_paragraph])
    return questions[:limit]


def model_flops_per_token(model_dir: str, tokens: float) -> float:
    """2 * non-embedding parameters per token + attention (QK^T and AV): 4 * layers * T * d."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    params = layers * (4 * d * d + 2 * d * inter)
    return 2 * params + 4 * layers * tokens * d


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


def wait_until_serving(url: str, proc, timeout_s: float = 180) -> None:
    """Until dpr-serve at ``url`` answers /health with 200; raises if it exits or the time is up."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"dpr-serve at {url} did not become ready")
        time.sleep(0.5)
