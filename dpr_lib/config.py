"""One typed, validated configuration model for every stage.

Loaded from a YAML file plus ``--set a.b=value`` overrides. Unknown keys, wrong types and
invalid values raise :class:`ConfigError` naming the key path before Spark starts.
Paths accept fsspec URLs (``file://``, ``s3://``, ``gs://``) or plain local paths; an empty
path is derived from ``paths.work_dir``.

No pyspark import here: search services load this module too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from dpr_lib.errors import ConfigError

# ---------------------------------------------------------------- constraints, declared on the fields

def choice(default: str, *others: str):
    """A string field whose value is ``default`` or one of ``others`` (checked by :func:`validate`)."""
    return field(default=default, metadata={"choices": (default, *others)})


def positive(default):
    """A number field that must be > 0."""
    return field(default=default, metadata={"min": 0, "exclusive": True})


def non_negative(default):
    """A number field that must be >= 0."""
    return field(default=default, metadata={"min": 0, "exclusive": False})


@dataclass
class SparkConfig:
    master: str = "local[*]"
    """Spark master URL; ``local[*]`` is the embedded default. Ignored under spark-submit if set there."""
    app_name: str = "dpr-index"
    """Spark application name (shown in the Spark UI and history server)."""
    conf: dict = field(default_factory=dict)
    """Extra Spark properties, passed to the SparkSession builder as strings."""


@dataclass
class PathsConfig:
    work_dir: str = "./work"
    """Root for derived paths below (local path or fsspec URL)."""
    passages: str = ""
    """Passages table (Parquet). Default: <work_dir>/passages."""
    rejects: str = ""
    """Rejected input records (Parquet). Default: <work_dir>/rejects."""
    embeddings: str = ""
    """Embeddings table (Parquet). Default: <work_dir>/embeddings."""
    stats: str = ""
    """Per-stage stats JSON files. Default: <work_dir>/stats."""
    index_root: str = ""
    """Where index versions are published (fsspec URL). Default: <work_dir>/index."""
    cache_dir: str = ""
    """Local cache for downloaded models and shards. Default: ~/.cache/dpr_lib."""


@dataclass
class CorpusConfig:
    input: str = ""
    """Corpus location (file, directory or glob). Empty: the embedded Python-docs corpus."""
    format: str = choice("auto", "jsonl", "parquet", "text", "tsv")
    """jsonl | tsv | parquet | text | auto (from the file extension)."""
    words: int = positive(100)
    """Words per passage (DPR uses 100)."""
    overlap: int = non_negative(0)
    """Words shared by consecutive passages of one document (0 <= overlap < words)."""
    num_files: int = positive(8)
    """Number of Parquet files of the Passages table (also the encode job's parallelism)."""
    max_reject_ratio: float = 0.05
    """Fail the job if rejects / input records exceeds this (rejects are written first)."""
    split_bytes: int = positive(64 * 1024 * 1024)
    """Large text inputs are read in byte ranges of this size (bytes), one Spark task each."""
    max_doc_bytes: int = positive(32 * 1024 * 1024)
    """Documents larger than this (bytes of text) are rejected as too_large."""
    default_corpus_limit: int = non_negative(0)
    """Keep at most this many documents of the embedded corpus (0 = all)."""


@dataclass
class EncoderConfig:
    model: str = ""
    """Passage encoder: local dir or fsspec URL of a transformers model. Empty: bundled all-MiniLM-L6-v2."""
    question_model: str = ""
    """Question encoder; empty means the passage encoder's weights (shared)."""
    pooling: str = choice("auto", "cls", "mean", "max", "lasttoken", "pooler")
    """auto | mean | cls | max | lasttoken | pooler. auto: DPR -> pooler, a sentence-transformers
    dir -> its 1_Pooling/config.json, else cls. lasttoken: the last real token's state (decoder
    embedders such as Qwen3-Embedding)."""
    normalize: str = choice("auto", "false", "true")
    """auto | true | false: L2-normalise vectors. auto follows a sentence-transformers Normalize module."""
    query_prompt: str = "auto"
    """Text put before every question. auto: the model's config_sentence_transformers.json (its
    "query" prompt, else its default prompt), else none; "" = none. A version records it, and the
    loader, dpr-search, dpr-serve, evaluation and the quality gate apply the recorded one."""
    passage_prompt: str = "auto"
    """Text put before every passage. auto: the model's "document", "passage" or "corpus" prompt,
    else its default prompt, else none; "" = none."""
    input_template: str = "auto"
    """How a passage's title and text become the encoder's input: pair (a sentence pair, DPR's
    convention) | text (the text alone) | a template with {title} and {text}, e.g. "{title} {text}"
    (sentence-transformers' and MTEB's convention for BEIR documents). auto: pair for DPR
    checkpoints and models without sentence-transformers files, "{title} {text}" for
    sentence-transformers models."""
    dimensions: int = non_negative(0)
    """Matryoshka truncation: keep the first N dimensions of every passage and question vector
    (L2-normalised again when the model normalises); 0 = the model's whole dimension."""
    max_length: int = non_negative(0)
    """Max tokens per passage (title + text); longer ones are truncated and counted. 0 = the
    model's sentence_bert_config.json max_seq_length, else 256 (never above its positions)."""
    dtype: str = choice("auto", "bf16", "fp32")
    """auto | fp32 | bf16: autocast dtype. auto picks bf16 only where the CPU has native bf16."""
    token_budget: int = positive(2048)
    """Max tokens (padded) per forward batch."""
    buffer_rows: int = positive(4096)
    """Rows read ahead and length-sorted at once within a partition (bounds memory)."""
    threads: int = non_negative(0)
    """Torch threads per task; 0 follows spark.task.cpus (1 in local mode per task)."""
    device: str = choice("auto", "cpu", "cuda")
    """auto | cpu | cuda."""
    backend: str = choice("torch", "auto", "onnx", "openvino")
    """torch | onnx | openvino | auto: what runs the passage encoder (onnx/openvino: pip install
    'dpr_lib[onnx]' / 'dpr_lib[openvino]'; the exported model is made once and kept under
    <work_dir>/encoders). auto: the fastest configuration (backend, int8 or not, bf16 or not) that
    keeps auto_min_cosine, measured once on the corpus's passages and kept for every later run
    (dpr_lib.encoder_choice). The question encoder always runs in torch (one question at a time)."""
    auto_min_cosine: float = 0.99
    """encoder.backend=auto: the mean cosine to torch fp32's vectors a configuration must keep on the
    measured sample (its worst passage at most 0.03 lower) to be chosen."""
    quantize: str = choice("none", "int8")
    """none | int8. int8: openvino -> static int8 (NNCF) calibrated on calibration_rows passages of
    the corpus itself; onnx -> int8 weights, activations quantised per batch (dynamic)."""
    calibration_rows: int = positive(300)
    """Passages of the corpus sampled (evenly over the Passages files) to calibrate int8."""


@dataclass
class IndexConfig:
    factory: str = "auto"
    """FAISS index_factory string, or auto (rule in docs/stages.md#index-rule)."""
    num_shards: int = non_negative(2)
    """Smallest number of shards; more are made when the vectors exceed num_shards x
    max_vectors_per_shard (0 = from max_vectors_per_shard alone)."""
    max_vectors_per_shard: int = positive(1_000_000)
    """Largest shard (vectors): one shard task holds this many codes in memory (3 GB at d=768, exact)."""
    task_memory_bytes: int = non_negative(0)
    """Memory a shard task may use (bytes): a shard whose codes + ids would not fit fails before it is
    built, naming the shard. 0 = spark.executor.pyspark.memory when set, else no check."""
    bytes_per_vector: int = non_negative(0)
    """Resident memory budget per passage for the auto rule (bytes: codes + the 8-byte id);
    0 = exact codes (IVF-Flat). 96 at d=384 = 1/16 of flat float32 (IVF-PQ + on-disk re-rank)."""
    rerank: str = choice("auto", "float16", "none")
    """On-disk re-rank store per shard: float16 (pid-sorted vectors, memory-mapped by the loader
    to re-score candidates exactly), none, or auto (float16 when the codes are lossy: PQ/SQ)."""
    k_factor: int = non_negative(0)
    """Candidates re-ranked per hit (k x k_factor); 0 = the smallest reaching recall_target."""
    train_per_list: int = positive(64)
    """Training points aimed for per inverted list (>= 39; FAISS uses up to 256). The sample is
    nlist x this, bounded by max_train_bytes."""
    max_train_sample: int = non_negative(0)
    """Upper bound of the training sample (vectors) held on the driver; 0 = what max_train_bytes holds."""
    max_train_bytes: int = non_negative(0)
    """Driver memory for the training sample (bytes of float32 vectors). 0 = half of
    spark.driver.memory (Spark's default 1g when unset). The auto rule never trains fewer than 39
    points per list: it lowers nlist when this budget cannot hold 39 x nlist vectors."""
    coarse: str = choice("flat", "hnsw")
    """Coarse quantizer of the auto rule: flat (BLAS scan of every centroid) | hnsw (IVFn_HNSW32: a
    graph walk instead). Measured at 200k x d=768, nlist 4096: hnsw added 5x slower and lost 0.13
    recall@10 at nprobe 16, so flat is the default; hnsw is for nlist well above 65536."""
    train_method: str = choice("auto", "flat", "two_level")
    """flat (one k-means over nlist centroids) | two_level (sqrt(nlist) coarse clusters, then k-means
    inside each: ~sqrt(nlist)/2 x fewer FLOPs) | auto (two_level from index.large_nlist lists)."""
    large_nlist: int = positive(4096)
    """nlist from which train_method=auto trains with two-level k-means."""
    min_nlist: int = positive(1)
    """Smallest nlist the auto rule may fall back to for small corpora."""
    exact_below: int = non_negative(10_000)
    """The auto rule builds an exact index (IVF1,Flat: one list, every query scans all vectors)
    below this many vectors with exact codes: a scan of 10k vectors costs about what probing an IVF
    does there, and an IVF on so few vectors loses recall. 0 = always the IVF rule."""
    recall_k: int = positive(10)
    """k of the recall check: nprobe is chosen for recall@recall_k, so set it to the deepest k the
    version's services ask for (e.g. 100 when a re-ranker takes the top 100)."""
    recall_report_k: int = non_negative(100)
    """A second depth recall is measured and recorded at (manifest recall.at_depth); 0 = none."""
    recall_target: float = 0.95
    """Recommended nprobe is the smallest reaching this recall@k."""
    recall_queries: int = positive(256)
    """Stored vectors used as recall queries."""
    recall_questions: str = ""
    """Real queries to measure recall with (path or URL: one per line, or .jsonl with a "question"
    field); up to max(recall_queries, 1024) of them are encoded by the question encoder. Empty =
    stored vectors, self excluded, which sit closer to their neighbours than questions do and so
    overstate the recall that questions get at the same nprobe."""
    nprobe: int = non_negative(0)
    """Force the recommended nprobe (0 = measured)."""
    validation_questions: str = ""
    """QA pairs with answers (JSON Lines {"question", "answers"} or DPR's question<TAB>[answers]),
    e.g. a judged sample of the query log: each version's top-k accuracy on them is recorded and
    gates its publication (publish.max_regression). Empty: no quality gate."""
    validation_k: int = positive(20)
    """k of the validation's top-k accuracy."""
    sparse: str = choice("auto", "false", "true")
    """BM25 shards beside the dense ones (same pids, corpus-wide statistics; dpr_lib.sparse) for
    ``search.mode`` bm25 and hybrid: true, false, or auto (true when the version has a docstore; both
    read the Passages table)."""
    add_batch: int = positive(8192)
    """Vectors added to FAISS per call on executors."""
    seed: int = 1234
    """Seed of the training sample, the recall queries and k-means: a rebuild of the same vectors gives the same index."""


@dataclass
class PublishConfig:
    keep_versions: int = positive(3)
    """Published versions to keep (older ones are removed after a successful publish)."""
    docstore_row_group: int = positive(1024)
    """Rows per Parquet row group of the docstore (smaller = cheaper single lookups)."""
    retries: int = positive(5)
    """Attempts for each storage operation on transient errors."""
    endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, Ceph, ...) of every s3:// URL: index, work dir, models, questions,
    checkpoints, training data; also Spark's s3a:// client. Credentials come from the standard AWS chain only."""
    storage_options: dict = field(default_factory=dict)
    """More fsspec options for object-store URLs (e.g. {client_kwargs: {region_name: eu-west-1}},
    {requester_pays: true}); credentials are refused here as anywhere in config."""
    max_regression: float = non_negative(0.01)
    """Largest drop (absolute) of the validation figure against the version LATEST names before the
    publish is stopped (exit 11; --force overrides)."""
    min_validation: float = non_negative(0.0)
    """Floor for the validation figure when there is no earlier one to compare with (0 = none)."""
    docstore: bool = True
    """Publish the passages' texts with the version; false publishes vectors only (texts served from
    elsewhere): the accounting then checks vectors against the Embeddings, not the Passages table."""


@dataclass
class SearchConfig:
    k: int = positive(10)
    """Passages returned per question when a request does not say."""
    nprobe: int = non_negative(0)
    """0 = the manifest's recommended nprobe."""
    mmap: bool = False
    """Memory-map shards instead of reading them into RAM."""
    max_k: int = positive(1000)
    """Largest k the loader and dpr-search accept."""
    k_factor: int = non_negative(0)
    """0 = the manifest's recommended re-rank factor (versions with a re-rank store)."""
    docstore_cache_mb: float = non_negative(64)
    """Decoded docstore row groups kept in memory (LRU) for hit texts; 0 = read them each time."""
    mode: str = choice("auto", "bm25", "dense", "hybrid")
    """dense | bm25 | hybrid | auto (what the version's manifest recommends: its tuned choice, else
    hybrid when it has a sparse side, else dense)."""
    sparse_exact: bool = False
    """Score every posting of every question term on the BM25 side (the reference) instead of the
    pruned scorer, whose top k are the same (dpr_lib.postings) at a fraction of the cost."""
    verify_cache: bool = False
    """Re-hash cached shard files on every load. Off: files are verified when downloaded and named
    by their sha256, so an entry present is trusted (a version loads without reading every byte twice)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address dpr-serve listens on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = positive(8080)
    """TCP port of dpr-serve."""
    poll_s: float = positive(30.0)
    """How often the service reads LATEST for a new version (seconds)."""
    max_batch: int = positive(64)
    """Questions per /search request."""
    max_k: int = positive(100)
    """Largest k a /search request may ask for."""
    max_question_chars: int = positive(2000)
    """Longer questions are refused (400)."""
    warmup_queries: int = non_negative(16)
    """Questions searched on a freshly loaded version before it takes traffic."""
    batch_questions: int = positive(64)
    """Most questions of concurrent requests answered by one forward pass and one search."""
    batch_wait_ms: float = non_negative(0.0)
    """How long a batch waits for more requests once the first is queued; 0 = it takes what queued
    while the previous batch ran (no added latency for a lone client)."""
    threads: int = non_negative(0)
    """torch and FAISS threads of the service's one compute thread; 0 = the machine's cores less one
    (left to the HTTP event loop), at least 1."""
    max_body_bytes: int = positive(1 << 20)
    """Largest /search body (bytes). A longer one gets a 413 as soon as its Content-Length (or, when
    chunked, the bytes received) passes the limit: it is never read whole."""
    max_json_depth: int = positive(8)
    """Deepest nesting of arrays and objects in a body (a valid request nests 2 deep); deeper: 400."""
    max_number_chars: int = positive(32)
    """Longest number literal in a body (characters); longer: 400 (Python parses huge integers in
    quadratic time)."""
    max_header_bytes: int = positive(16384)
    """Request line plus headers (bytes); more: 431."""
    header_timeout_s: float = positive(10.0)
    """A request's line and headers must arrive within this many seconds of its first byte (or of the
    connection); else 408 and the connection is closed."""
    body_timeout_s: float = positive(30.0)
    """A request's body must arrive within this many seconds of its headers; else 408 and the
    connection is closed."""
    max_connections: int = positive(512)
    """Open connections; one more is answered 503 (Retry-After: 1) and closed at once."""
    docs: bool = False
    """Serve FastAPI's /docs page. Its assets come from a CDN, which air-gapped deployments cannot
    reach, so it is off by default; /openapi.json is always served."""


@dataclass
class NightlyConfig:
    max_shrink: float = 0.2
    """Stop before publishing if the snapshot has this fraction fewer passages than the last run (0..1)."""
    retrain_growth: float = positive(2.0)
    """Retrain the quantizer when the vector count exceeds this factor times the previous version's."""
    max_nprobe_growth: float = positive(2.0)
    """Retrain when the reused quantizer needs more than this factor times the nprobe the previous
    version served with to reach index.recall_target (it has drifted from the corpus)."""
    lock: bool = True
    """Take the index root's lock (an exclusive create) for the run. false only where the store has no
    conditional writes and the scheduler guarantees one run at a time."""
    stale_lock_s: int = positive(6 * 3600)
    """A lock older than this (seconds) is considered left by a dead run and taken over."""
    keep_runs: int = positive(2)
    """Per-run work directories kept under <work_dir>/runs (the last successful one is the next baseline;
    runs whose Embeddings tables a delta chain still uses are kept as well)."""
    changes: str = ""
    """A change set to apply instead of reading corpus.input in full (JSON Lines or Parquet with op =
    upsert | delete, id, title, text; or table:<name>): only those documents are split and diffed.
    Usually given per run with jobs/nightly.py --changes URL."""
    compact_ratio: float = 0.2
    """Publish a delta segment (new and changed passages + tombstones) while tombstones plus vectors in
    delta segments stay within this fraction of the corpus; past it, compact into a fresh full version.
    0 compacts every night (today's full shard rebuild from reused embeddings)."""


@dataclass
class TrainConfig:
    """Training data mining (jobs/build_training_data.py) and the bi-encoder trainer (jobs/train_encoder.py)."""

    mine_k: int = positive(30)
    """BM25 candidates per question when mining positives and hard negatives."""
    hard_negatives_kept: int = non_negative(10)
    """Hard negatives written per question (top BM25 passages without an answer)."""
    model: str = ""
    """Start from this model (dir or fsspec URL); empty: encoder.model (the bundled model when empty too)."""
    shared_encoder: bool = False
    """One set of weights for questions and passages; false trains two encoders as DPR does."""
    batch_size: int = positive(32)
    """Questions per global batch (split evenly across processes)."""
    hard_negatives: int = non_negative(1)
    """Hard negatives per question in a batch, drawn from the top hard_negative_pool of each question."""
    hard_negative_pool: int = positive(5)
    """Hard negatives are drawn from this many of each question's first-ranked mined negatives."""
    epochs: float = positive(1.0)
    """Passes over the training questions (fractions allowed)."""
    max_steps: int = non_negative(0)
    """Stop after this many optimizer steps (0 = epochs decide)."""
    lr: float = positive(2e-5)
    """Peak learning rate of AdamW (after warm-up)."""
    warmup_steps: int = non_negative(100)
    """Linear warm-up, then linear decay to 0 at the last step."""
    weight_decay: float = non_negative(0.0)
    """AdamW weight decay."""
    max_grad_norm: float = positive(2.0)
    """Gradients are clipped to this L2 norm."""
    similarity: str = choice("auto", "cosine", "dot")
    """dot | cosine | auto (cosine when the encoder L2-normalises its vectors, as the index then does)."""
    scale: float = positive(20.0)
    """Scores are multiplied by this for cosine similarity (a temperature of 1/scale)."""
    dropout: float = -1.0
    """Dropout of the encoders while training; < 0 keeps the model's own."""
    dtype: str = choice("fp32", "bf16")
    """fp32 | bf16 (autocast)."""
    max_question_length: int = positive(64)
    """Max tokens per question (longer ones are truncated)."""
    seed: int = 42
    """Seed of the weights' random init, shuffling, hard-negative draws and the validation split."""
    val_fraction: float = 0.05
    """Held-out questions for validation (average rank and top-k of the positive among their passages)."""
    val_every: int = non_negative(200)
    """Validate every this many steps (and at the end); 0 = only at the end."""
    checkpoint_every: int = non_negative(500)
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = positive(2)
    """Periodic checkpoints kept (older ones are removed once a newer one is complete)."""
    log_every: int = positive(10)
    """Log the loss every this many steps."""
    num_processes: int = positive(1)
    """Training processes under TorchDistributor (DDP over gloo on CPU); passage embeddings are
    all-gathered so every question sees the whole global batch as negatives."""
    local_mode: bool = True
    """TorchDistributor local_mode: processes on the driver (true) or in Spark barrier tasks (false)."""
    threads: int = non_negative(0)
    """Torch threads per process; 0 = the machine's cores / num_processes."""
    device: str = choice("auto", "cpu", "cuda")
    """auto | cpu | cuda: auto trains on the process's GPU (LOCAL_RANK) where CUDA works, else CPU."""


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def path(self, name: str) -> str:
        """A derived path: the configured value or <work_dir>/<name>."""
        value = getattr(self.paths, name)
        if value:
            return value
        if name == "cache_dir":
            return os.path.join(os.path.expanduser("~"), ".cache", "dpr_lib")
        name = "index" if name == "index_root" else name
        return join_url(self.paths.work_dir, name)

    def train_budget_bytes(self, live_driver_memory: str | None = None) -> int:
        """index.max_train_bytes, or half of spark.driver.memory (the sample lives in the driver's
        container beside a mostly idle JVM heap): the running session's value when given (it
        includes spark-submit's --driver-memory), else this config's, else Spark's default 1g."""
        if self.index.max_train_bytes:
            return self.index.max_train_bytes
        value = live_driver_memory or self.spark.conf.get("spark.driver.memory", "1g")
        return parse_memory(str(value), "spark.driver.memory") // 2

    def sparse_enabled(self) -> bool:
        """Whether the merge job builds the BM25 side (index.sparse; auto follows publish.docstore)."""
        return self.index.sparse == "true" or (self.index.sparse == "auto" and self.publish.docstore)

    def task_memory_bytes(self) -> int:
        """index.task_memory_bytes, or spark.executor.pyspark.memory; 0 = unknown (no check)."""
        if self.index.task_memory_bytes:
            return self.index.task_memory_bytes
        value = self.spark.conf.get("spark.executor.pyspark.memory")
        return parse_memory(str(value), "spark.executor.pyspark.memory") if value else 0

    def storage_options(self) -> dict:
        """fsspec options of every object-store URL the product reads or writes (the one source:
        jobs bind them with dpr_lib.spark.bind_storage). Never contains credentials."""
        opts = copy.deepcopy(self.publish.storage_options)
        if self.publish.endpoint_url:
            opts.setdefault("client_kwargs", {})["endpoint_url"] = self.publish.endpoint_url
        return opts


_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "t": 2**40, "tb": 2**40}


def parse_memory(value: str, key: str) -> int:
    """Bytes of a Spark memory string ("4g", "512m"; a bare number is MiB, as Spark reads it)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{key} must be a size such as 4g or 512m, got {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def join_url(base: str, *parts: str) -> str:
    base = base.rstrip("/") if base not in ("/", "") else base
    return "/".join([base, *[p.strip("/") for p in parts]])


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotated type; strings from --set are parsed."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            return str(value).lower()
    elif typ is dict:
        if isinstance(value, dict):
            if key == "publish.storage_options":  # fsspec options nest and keep their types
                return copy.deepcopy(value)
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key} must be of type {tname}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!s} (known keys in {prefix.rstrip('.') or 'top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Value checks beyond types. Raises ConfigError naming the key."""
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            key = f"{section.name}.{f.name}"
            value = getattr(sec, f.name)
            allowed = f.metadata.get("choices")
            if allowed and value not in allowed:
                raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {value!r}")
            if "min" in f.metadata and f.metadata["exclusive"] and value <= f.metadata["min"]:
                raise ConfigError(f"{key} must be > 0, got {value}")
            if "min" in f.metadata and not f.metadata["exclusive"] and value < f.metadata["min"]:
                raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.corpus.overlap >= cfg.corpus.words:
        raise ConfigError(
            f"corpus.overlap must be < corpus.words, got overlap={cfg.corpus.overlap}, words={cfg.corpus.words}"
        )
    if not 0.0 <= cfg.corpus.max_reject_ratio <= 1.0:
        raise ConfigError(f"corpus.max_reject_ratio must be within [0, 1], got {cfg.corpus.max_reject_ratio}")
    if cfg.nightly.compact_ratio < 0:
        raise ConfigError(f"nightly.compact_ratio must be >= 0, got {cfg.nightly.compact_ratio}")
    if not 0.0 <= cfg.nightly.max_shrink <= 1.0:
        raise ConfigError(f"nightly.max_shrink must be within [0, 1], got {cfg.nightly.max_shrink}")
    if not 0.0 < cfg.index.recall_target <= 1.0:
        raise ConfigError(f"index.recall_target must be within (0, 1], got {cfg.index.recall_target}")
    if cfg.index.train_per_list < 39:
        raise ConfigError(f"index.train_per_list must be >= 39 (FAISS's k-means needs 39 points per list), "
                          f"got {cfg.index.train_per_list}")
    if "spark.driver.memory" in cfg.spark.conf:
        parse_memory(str(cfg.spark.conf["spark.driver.memory"]), "spark.conf.spark.driver.memory")
    if cfg.search.k > cfg.search.max_k:
        raise ConfigError(f"search.k must be <= search.max_k ({cfg.search.max_k}), got {cfg.search.k}")
    if not 0.0 <= cfg.train.val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be within [0, 1), got {cfg.train.val_fraction}")
    if cfg.train.batch_size % cfg.train.num_processes:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of train.num_processes "
                          f"({cfg.train.num_processes})")
    if cfg.train.dropout >= 1.0:
        raise ConfigError(f"train.dropout must be < 1, got {cfg.train.dropout}")
    if not cfg.paths.work_dir:
        raise ConfigError("paths.work_dir must not be empty")
    if cfg.encoder.quantize != "none" and cfg.encoder.backend == "torch":
        raise ConfigError("encoder.quantize=int8 needs encoder.backend onnx or openvino (torch runs fp32/bf16)")
    if cfg.encoder.quantize != "none" and cfg.encoder.backend == "auto":
        raise ConfigError("encoder.backend=auto chooses the quantisation itself (int8 only where it keeps "
                          "encoder.auto_min_cosine): leave encoder.quantize=none, or name the backend")
    t = cfg.encoder.input_template
    if t not in ("auto", "pair", "text") and "{text}" not in t:
        raise ConfigError(f"encoder.input_template must be auto, pair, text or a template holding {{text}} (and "
                          f"optionally {{title}}), e.g. '{{title}} {{text}}'; got {t!r}")
    if not 0.0 < cfg.encoder.auto_min_cosine <= 1.0:
        raise ConfigError(f"encoder.auto_min_cosine must be within (0, 1], got {cfg.encoder.auto_min_cosine}")
    if cfg.encoder.backend not in ("torch", "auto") and cfg.encoder.device == "cuda":
        raise ConfigError(f"encoder.backend={cfg.encoder.backend} runs on CPUs; encoder.device=cuda needs "
                          "encoder.backend=torch")
    if cfg.encoder.backend == "onnx" and cfg.encoder.dtype == "bf16":
        raise ConfigError("encoder.dtype=bf16 is not available with encoder.backend=onnx (ONNX Runtime's CPU "
                          "kernels are fp32/int8): use dtype auto or fp32, or backend torch/openvino")
    _no_credentials(cfg)
    return cfg


_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*@", re.IGNORECASE)


_SECRET_KEYS = re.compile(r"^(key|secret|token|password|aws_access_key_id|aws_secret_access_key|"
                          r"aws_session_token|session_token|access_key|secret_key)$", re.IGNORECASE)


def _secret_key_in(options: Any, where: str) -> str | None:
    if isinstance(options, dict):
        for k, v in options.items():
            if _SECRET_KEYS.match(str(k)):
                return f"{where}.{k}"
            found = _secret_key_in(v, f"{where}.{k}")
            if found:
                return found
    return None


def _no_credentials(cfg: Config) -> None:
    """Credentials never live in config (it is logged, copied into reports and checked into repos):
    a URL with ``user:secret@`` in any string key is refused, naming the key, not the value."""
    secret = _secret_key_in(cfg.publish.storage_options, "publish.storage_options")
    if secret:
        raise ConfigError(f"{secret} is a credential; give it through the standard chains instead "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, an instance role, "
                          "GOOGLE_APPLICATION_CREDENTIALS)")
    for section in fields(cfg):
        for f in fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            values = value.values() if isinstance(value, dict) else [value]
            if any(isinstance(v, str) and _USERINFO.match(v.strip()) for v in values):
                raise ConfigError(
                    f"{section.name}.{f.name} contains credentials in a URL (user:secret@); give them through "
                    "the standard chains instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                    "an instance role, GOOGLE_APPLICATION_CREDENTIALS)")


def _set_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set key must look like section.name, got {key!r}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    # YAML parsing gives numbers, booleans and {a: b} maps; type checks happen in _build. A text
    # key keeps the text as typed (a prompt such as "query: " is not a map).
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = raw if isinstance(value, str) or _is_text_key(parts) else value


def _is_text_key(parts: list[str]) -> bool:
    """Whether section.name is a field typed str (its --set value is never parsed as YAML)."""
    section = typing.get_type_hints(Config).get(parts[0])
    if len(parts) != 2 or not dataclasses.is_dataclass(section):
        return False
    return typing.get_type_hints(section).get(parts[1]) is str


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML, optional) and apply ``key=value`` overrides; validate everything."""
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    for assignment in overrides:
        _set_override(data, assignment)
    return validate(_build(Config, data, ""))
