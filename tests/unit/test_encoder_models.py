"""The encoders teams pick today, judged against sentence-transformers itself: prompts, the input
template, Matryoshka dimensions and every pooling mode (cls, mean, max, lasttoken), read from the
model's own files. Small randomly initialised models saved in sentence-transformers' format: a
BERT-like encoder and a 2-layer Qwen3 decoder (last-token pooling, end-of-text appended)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import PASSAGES, QUESTIONS, st_model_dir

from dpr_lib.config import EncoderConfig
from dpr_lib.encoder import Encoder, fill_template, resolve_spec
from dpr_lib.errors import EncoderError

pytest.importorskip("sentence_transformers")

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


E5 = {"query": "query: ", "document": "passage: "}
BGE = {"query": "Represent this sentence for searching relevant passages: "}


@pytest.mark.parametrize("kind,pooling,prompts,dims", [
    ("bert", "cls", E5, 16), ("bert", "mean", BGE, 0), ("bert", "max", E5, 0), ("bert", "lasttoken", {}, 24),
    ("qwen", "lasttoken", BGE, 16), ("qwen", "mean", E5, 0)])
def test_vectors_equal_sentence_transformers(tmp_path, kind, pooling, prompts, dims):
    from sentence_transformers import SentenceTransformer

    path = st_model_dir(str(tmp_path), kind, pooling, prompts)
    ecfg = EncoderConfig(model=path, dtype="fp32", dimensions=dims)
    pspec = resolve_spec(ecfg, str(tmp_path / "cache"), role="passage")
    qspec = resolve_spec(ecfg, str(tmp_path / "cache"), role="question")
    # read from the model's files: pooling, prompts, template, max length, normalisation
    assert (pspec.pooling, pspec.template, pspec.max_length, pspec.normalize) == (pooling, "{title} {text}", 64, True)
    assert (qspec.prompt, pspec.prompt) == (prompts.get("query", ""), prompts.get("document", ""))
    assert pspec.dim == qspec.dim == (dims or 32)
    fp = pspec.fingerprint()
    assert fp.get("prompt", "") == pspec.prompt and fp["input_template"] == "{title} {text}"
    assert fp.get("dimensions", 0) == dims

    st = SentenceTransformer(path, device="cpu")
    docs = [fill_template("{title} {text}", t, x) for t, x in PASSAGES]
    want_p = st.encode(docs, prompt_name="document" if "document" in prompts else None, truncate_dim=dims or None)
    want_q = st.encode(QUESTIONS, prompt_name="query" if "query" in prompts else None, truncate_dim=dims or None)
    got_p = Encoder(pspec).encode([t for t, _ in PASSAGES], [x for _, x in PASSAGES])
    got_q = Encoder(qspec).encode(None, QUESTIONS)
    assert got_p.shape == want_p.shape and got_q.shape == want_q.shape
    assert cosines(got_p, want_p).min() >= 0.99999
    assert cosines(got_q, want_q).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got_p, axis=1), 1.0, rtol=1e-5)  # re-normalised after truncation
    # the prompt matters: without it the question vectors move
    if qspec.prompt:
        plain = Encoder(resolve_spec(EncoderConfig(model=path, dtype="fp32", dimensions=dims, query_prompt=""),
                                     str(tmp_path / "cache"), role="question")).encode(None, QUESTIONS)
        assert cosines(plain, want_q).min() < 0.9999


def test_explicit_keys_win_and_the_template_is_applied(tmp_path):
    path = st_model_dir(str(tmp_path), "bert", "mean", E5)
    cache = str(tmp_path / "cache")
    spec = resolve_spec(EncoderConfig(model=path, dtype="fp32", passage_prompt="", input_template="pair",
                                      max_length=32, pooling="cls"), cache)
    assert (spec.prompt, spec.template, spec.max_length, spec.pooling) == ("", "pair", 32, "cls")
    assert "prompt" not in spec.fingerprint() and "input_template" not in spec.fingerprint()
    text_only = resolve_spec(EncoderConfig(model=path, dtype="fp32", input_template="text"), cache)
    a = Encoder(text_only).encode(["A title"], ["the same text"])
    b = Encoder(text_only).encode(["Another title"], ["the same text"])
    np.testing.assert_allclose(a, b, rtol=1e-6)  # the title is not read
    custom = resolve_spec(EncoderConfig(model=path, dtype="fp32", input_template="Title: {title}. {text}"), cache)
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(path, device="cpu").encode(["passage: Title: Paris. Capital of France."])
    got = Encoder(custom).encode(["Paris"], ["Capital of France."])
    assert cosines(got, want).min() >= 0.99999
    # a version's record fills what the configuration leaves to auto (the question side of a loaded index)
    recorded = {"prompt": "question: ", "dimensions": 8}
    q = resolve_spec(EncoderConfig(model=path), cache, role="question", recorded=recorded)
    assert (q.prompt, q.dim) == ("question: ", 8)
    assert resolve_spec(EncoderConfig(model=path, query_prompt=""), cache, role="question", recorded=recorded).prompt == ""


def test_what_the_product_cannot_run_is_refused_naming_the_file(tmp_path):
    path = st_model_dir(str(tmp_path), "bert", "mean", {})
    with pytest.raises(EncoderError, match="encoder.dimensions=64 is larger than the model's dimension"):
        resolve_spec(EncoderConfig(model=path, dimensions=64), str(tmp_path / "cache"))
    pool_cfg = os.path.join(path, "1_Pooling", "config.json")
    cfg = json.load(open(pool_cfg))
    json.dump({**cfg, "pooling_mode": "weightedmean"}, open(pool_cfg, "w"))
    with pytest.raises(EncoderError, match=r"1_Pooling/config.json pools by weightedmean"):
        resolve_spec(EncoderConfig(model=path), str(tmp_path / "cache"))
    json.dump({**cfg, "include_prompt": False}, open(pool_cfg, "w"))
    with pytest.raises(EncoderError, match="include_prompt=false"):
        resolve_spec(EncoderConfig(model=path, passage_prompt="passage: "), str(tmp_path / "cache"))
    json.dump(cfg, open(pool_cfg, "w"))
    modules = json.load(open(os.path.join(path, "modules.json")))
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    json.dump(modules, open(os.path.join(path, "modules.json"), "w"))
    with pytest.raises(EncoderError, match="modules.json lists Dense"):
        resolve_spec(EncoderConfig(model=path), str(tmp_path / "cache"))
