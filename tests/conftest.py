"""Shared fixtures: a real local SparkSession, a real S3 server (moto) on 127.0.0.1, and tiny
randomly initialised BERT and DPR models built from a config (no download)."""

from __future__ import annotations

import json
import os
import sys

# Before anything starts a JVM or a Python worker: offline models, loopback Spark, test credentials
# for the S3 server (executors inherit this environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)


import pytest  # noqa: E402

from dpr_lib.config import Config, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@pytest.fixture(scope="session")
def spark():
    from dpr_lib.spark import get_session

    cfg = load_config(None, ["spark.master=local[2]", "spark.app_name=dpr-tests"])
    cfg.spark.conf.update({"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4",
                           "spark.driver.memory": "2g", "spark.ui.showConsoleProgress": "false"})
    session = get_session(cfg)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto server mode) on 127.0.0.1 with bucket ``dpr-test``."""
    from s3server import start_s3_server

    server, url = start_s3_server("dpr-test")
    yield url
    server.stop()


def _save_tokenizer(path: str) -> None:
    """The bundled model's real WordPiece tokenizer (30522 tokens), saved beside a tiny model."""
    from transformers import AutoTokenizer

    from dpr_lib.encoder import default_model_dir

    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)


def _tiny_config_kwargs() -> dict:
    return dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128,
                initializer_range=0.5)  # wider than BERT's 0.02, so random vectors are not all alike


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    path = str(tmp_path_factory.mktemp("tiny_bert"))
    torch.manual_seed(0)
    BertModel(BertConfig(**_tiny_config_kwargs())).save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_dpr_dir(tmp_path_factory) -> str:
    import torch
    from transformers import DPRConfig, DPRContextEncoder

    path = str(tmp_path_factory.mktemp("tiny_dpr"))
    torch.manual_seed(1)
    DPRContextEncoder(DPRConfig(**_tiny_config_kwargs(), projection_dim=0)).save_pretrained(path)
    _save_tokenizer(path)
    return path


def make_config(tmp_path, *overrides: str) -> Config:
    """A Config for tests: everything under tmp_path, small files, the given overrides."""
    # The IVF machinery (training, nprobe, recall) is what most tests exercise: small test corpora
    # would otherwise get the exact index (index.exact_below), tested on its own.
    base = [f"paths.work_dir={tmp_path}/work", f"paths.cache_dir={tmp_path}/cache", "corpus.num_files=2",
            "index.recall_queries=32", "index.exact_below=0"]
    return load_config(None, base + list(overrides))


def encoder_sets(cfg: Config) -> list[str]:
    """``--set`` overrides naming ``cfg``'s encoder: another stage's config reads the same vectors."""
    return [f"encoder.{k}={getattr(cfg.encoder, k)}" for k in ("model", "pooling", "normalize", "backend")]


def synthetic_docs(n: int, words_per_doc: int = 120, seed: int = 0) -> list[dict]:
    """Deterministic documents of known words; doc i mentions the token 'factN' once."""
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = [rng.choice(WORDS) for _ in range(words_per_doc)]
        body[rng.randrange(words_per_doc)] = f"fact{i}"
        docs.append({"id": f"doc-{i}", "title": f"Title {i}", "text": " ".join(body)})
    return docs


def write_jsonl(path, docs) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    return str(path)


def read_table(url: str, **kwargs):
    """A table written by a stage, as readers see it: the files of its current version (a table
    published by pointer) or of a plain directory, concatenated in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpr_lib import storage

    return pa.concat_tables([pq.read_table(f, **kwargs) for f in storage.list_files(url, ".parquet")])


def wait_until_serving(client, proc, log_path, timeout: float = 120) -> None:
    """Poll a started ``dpr-serve``'s /health until it answers 200; fail with its log's tail (the
    process killed) if it exits or the timeout passes first."""
    import time

    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("dpr-serve did not become ready:\n" + open(log_path).read()[-3000:])
        time.sleep(0.3)


# ---------------------------------------------------------------- sentence-transformers models

PASSAGES = [("Eiffel Tower", "The tower was built by Gustave Eiffel's company for the 1889 World's Fair in Paris."),
            ("", "A passage without a title: the template leaves no leading space."),
            ("Mount Everest", "Earth's highest mountain above sea level, in the Himalayas, on the border of Nepal."),
            ("Braces {text}", "Curly braces in a title are kept as they are, {title} too.")]
QUESTIONS = ["who built the eiffel tower", "what is the highest mountain", "where is the louvre"]
ST_WORDS = sorted({w for t, x in PASSAGES for w in (t + " " + x).lower().replace(".", " ").replace(",", " ").split()}
               | {w for q in QUESTIONS for w in q.split()} | {"query:", "passage:", "represent", "this", "for",
                                                               "searching", "relevant", "passages:", "question:"})


def _bert(path: str, seed: int) -> int:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dpr_lib.encoder import default_model_dir

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    return 32


def _qwen(path: str, seed: int) -> int:
    """A 2-layer Qwen3 decoder with a word-level tokenizer that appends <|endoftext|>, as
    Qwen3-Embedding's does (its last token is what last-token pooling reads)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(ST_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    Qwen3Model(Qwen3Config(vocab_size=len(vocab) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           initializer_range=0.5)).save_pretrained(path)
    return 32


def st_model_dir(root, kind: str, pooling: str, prompts: dict, normalize: bool = True, seed: int = 0) -> str:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    hf = os.path.join(root, f"{kind}-hf")
    dim = (_bert if kind == "bert" else _qwen)(hf, seed)
    out = os.path.join(root, f"{kind}-{pooling}")
    modules = [Transformer(hf, max_seq_length=64), Pooling(dim, pooling)] + ([Normalize()] if normalize else [])
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(out)
    return out


