"""A version built with a query prompt and Matryoshka dimensions set explicitly is searched by the
loader, dpr-search and dpr-serve's holder without anyone passing them again: the manifest's record
is applied, and a configuration that contradicts it is refused naming what differs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_config, st_model_dir, synthetic_docs, write_jsonl

from dpr_lib.config import EncoderConfig
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.encoder import Encoder, resolve_spec
from dpr_lib.errors import IncompatibleIndexError
from dpr_lib.index import build_index
from dpr_lib.search import Searcher, ShardedIndex

pytest.importorskip("sentence_transformers")
QUESTIONS = ["alpha bravo charlie", "delta echo", "kilo lima mike november"]


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompts")
    model = st_model_dir(str(tmp), "bert", "mean", {"query": "query: ", "document": "passage: "})
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(60, seed=4))}",
                      f"encoder.model={model}", "encoder.dtype=fp32", "encoder.query_prompt=question: ",
                      "encoder.dimensions=16", "index.exact_below=100000")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    manifest = build_index(spark, cfg)
    return cfg, model, manifest


def test_the_manifest_records_and_the_loader_applies_prompt_and_dimensions(built, tmp_path):
    cfg, model, manifest = built
    assert manifest.dim == 16
    assert manifest.question_encoder["prompt"] == "question: " and manifest.question_encoder["dimensions"] == 16
    assert manifest.encoder["prompt"] == "passage: " and manifest.encoder["input_template"] == "{title} {text}"
    searcher = Searcher(cfg.path("index_root"), EncoderConfig(model=model, dtype="fp32"), cache_dir=str(tmp_path))
    assert (searcher.encoder.spec.prompt, searcher.encoder.spec.dim) == ("question: ", 16)
    explicit = Encoder(resolve_spec(EncoderConfig(model=model, dtype="fp32", query_prompt="question: ", dimensions=16),
                                    str(tmp_path), role="question"))
    want = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path)).search(explicit.encode(None, QUESTIONS), 5)[1]
    got = searcher.retrieve(QUESTIONS, 5, "dense")[1]
    np.testing.assert_array_equal(got, want)
    # without the prompt the ranking is another one: the test would notice a prompt not applied
    plain = Encoder(resolve_spec(EncoderConfig(model=model, dtype="fp32", query_prompt="", dimensions=16),
                                 str(tmp_path), role="question"))
    assert not np.array_equal(ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path))
                              .search(plain.encode(None, QUESTIONS), 5)[1], want)
    with pytest.raises(IncompatibleIndexError, match="differ in prompt"):
        Searcher(cfg.path("index_root"), EncoderConfig(model=model, dtype="fp32", query_prompt="query: "),
                 cache_dir=str(tmp_path))

    out = subprocess.run([sys.executable, "-m", "dpr_lib.search", "--index", cfg.path("index_root"), *QUESTIONS,
                          "-k", "5", "--json", "--mode", "dense", "--set", f"paths.cache_dir={tmp_path}",
                          "--set", f"encoder.model={model}", "--set", "encoder.dtype=fp32"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    cli = [[h["pid"] for h in r["hits"]] for r in json.loads(out.stdout)["results"]]
    assert cli == want.tolist()


def test_the_service_health_shows_how_the_version_encodes(built, tmp_path):
    from dpr_lib.config import load_config
    from dpr_lib.serve import IndexHolder, health_body

    cfg, model, _ = built
    scfg = load_config(None, [f"paths.cache_dir={tmp_path}", f"encoder.model={model}", "encoder.dtype=fp32",
                              "serve.warmup_queries=2"])
    holder = IndexHolder(scfg, cfg.path("index_root"))
    assert holder.poll_once()
    enc = health_body(holder)["encoder"]
    assert enc["query_prompt"] == "question: " and enc["passage_prompt"] == "passage: "
    assert (enc["dim"], enc["matryoshka"], enc["pooling"], enc["input_template"]) == (16, True, "mean", "{title} {text}")
    assert holder.current.searcher.encoder.spec.prompt == "question: "
