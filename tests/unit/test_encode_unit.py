import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from dpr_lib.config import EncoderConfig
from dpr_lib.encode import check_vectors
from dpr_lib.encoder import Encoder, length_batches, resolve_spec
from dpr_lib.errors import EncoderError

TITLES = ["Alpha", "Bravo", "Charlie", "Delta"]
TEXTS = ["the first passage is short", "a second passage " * 12, "third", "fourth passage with a few more words"]


def spec_for(path, tmp_path, **kw):
    """A spec pinned to fp32 unless the test asks otherwise: ``dtype: auto`` is bf16 on CPUs with
    native bf16, and the comparisons below are against an fp32 forward at fp32 tolerances."""
    kw.setdefault("dtype", "fp32")
    return resolve_spec(EncoderConfig(model=path, **kw), str(tmp_path))


def manual_embeddings(model, tokenizer, pooling, titles, texts):
    out = []
    for t, x in zip(titles, texts):
        enc = tokenizer(t, x, return_tensors="pt")
        with torch.no_grad():
            o = model(**enc)
        if pooling == "mean":
            out.append(o.last_hidden_state[0].mean(0))
        elif pooling == "cls":
            out.append(o.last_hidden_state[0, 0])
        else:
            out.append(o.pooler_output[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_family_pooling_matches_unbatched_forward(tiny_bert_dir, tmp_path, pooling):
    enc = Encoder(spec_for(tiny_bert_dir, tmp_path, pooling=pooling, normalize="false", token_budget=64))
    got = enc.encode(TITLES, TEXTS)
    want = manual_embeddings(enc.model, enc.tokenizer, pooling, TITLES, TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_normalisation_gives_unit_vectors(tiny_bert_dir, tmp_path):
    enc = Encoder(spec_for(tiny_bert_dir, tmp_path, pooling="mean", normalize="true"))
    v = enc.encode(TITLES, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_dpr_family_uses_pooler_output(tiny_dpr_dir, tmp_path):
    spec = spec_for(tiny_dpr_dir, tmp_path)
    assert (spec.family, spec.pooling, spec.normalize, spec.dim) == ("dpr", "pooler", False, 32)
    enc = Encoder(spec)
    assert type(enc.model).__name__ == "DPRContextEncoder"
    got = enc.encode(TITLES, TEXTS)
    want = manual_embeddings(enc.model, enc.tokenizer, "pooler", TITLES, TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_path_is_correct_on_any_cpu(tiny_bert_dir, tmp_path):
    """bf16 asked for explicitly runs in bf16 (emulated where the CPU has no native bf16: slow but
    correct), says so in the fingerprint, and stays within bf16's precision of the fp32 forward."""
    spec = spec_for(tiny_bert_dir, tmp_path, pooling="mean", normalize="false", dtype="bf16")
    assert spec.dtype == "bf16" and spec.fingerprint()["dtype"] == "bf16"
    assert spec.fingerprint_id() != spec_for(tiny_bert_dir, tmp_path, pooling="mean", normalize="false").fingerprint_id()
    enc = Encoder(spec)
    got = enc.encode(TITLES, TEXTS)
    ref = Encoder(spec_for(tiny_bert_dir, tmp_path, pooling="mean", normalize="false", dtype="fp32"))
    want = manual_embeddings(ref.model, ref.tokenizer, "mean", TITLES, TEXTS)
    assert not np.allclose(got, want, rtol=1e-6, atol=0)  # it did run in bf16, not fp32
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16, torch.float32}, \
        "Linear weights held in bf16 (cast once), embeddings and LayerNorm in fp32"
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999  # bf16 keeps 8 bits of mantissa: ~0.4% per value, far less on a mean
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def test_auto_dtype_follows_the_cpu(tiny_bert_dir, tmp_path):
    from dpr_lib.encoder import cpu_has_native_bf16

    spec = spec_for(tiny_bert_dir, tmp_path, dtype="auto", device="cpu")
    assert spec.dtype == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_bundled_model_is_detected_as_mean_pooled_and_normalised(tmp_path):
    spec = resolve_spec(EncoderConfig(), str(tmp_path))
    assert (spec.family, spec.pooling, spec.normalize, spec.dim) == ("sentence", "mean", True, 384)
    assert len(spec.fingerprint_id()) == 16


def test_batching_does_not_change_vectors(tiny_bert_dir, tmp_path):
    spec = spec_for(tiny_bert_dir, tmp_path, pooling="mean", normalize="false")
    big = Encoder(dataclasses.replace(spec, token_budget=100000)).encode(TITLES, TEXTS)
    one_by_one = np.vstack([Encoder(spec).encode([t], [x]) for t, x in zip(TITLES, TEXTS)])
    np.testing.assert_allclose(big, one_by_one, rtol=1e-4, atol=1e-5)


def test_long_passages_are_truncated_and_counted(tiny_bert_dir, tmp_path):
    enc = Encoder(spec_for(tiny_bert_dir, tmp_path, max_length=16))
    ids, _ = enc.tokenize(["t", "t"], ["short", "word " * 50])
    assert len(ids[1]) == 16 and ids[1][-1] == enc.tokenizer.sep_token_id
    assert enc.truncated == 1


def test_fingerprint_changes_with_settings(tiny_bert_dir, tmp_path):
    a = spec_for(tiny_bert_dir, tmp_path, pooling="mean").fingerprint_id()
    assert a == spec_for(tiny_bert_dir, tmp_path, pooling="mean").fingerprint_id()
    assert a != spec_for(tiny_bert_dir, tmp_path, pooling="cls").fingerprint_id()
    assert a != spec_for(tiny_bert_dir, tmp_path, pooling="mean", max_length=64).fingerprint_id()


def test_length_batches_respect_the_token_budget():
    lengths = np.array([5, 100, 30, 30, 7, 64, 64, 1])
    batches = length_batches(lengths, 128)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 128
    assert length_batches(np.array([500]), 128)[0].tolist() == [0]  # over budget alone


def test_bad_model_directories_fail_clearly(tiny_bert_dir, tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        resolve_spec(EncoderConfig(model=str(tmp_path / "nope")), str(tmp_path))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_bert_dir, no_weights)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(EncoderError, match="has no weights"):
        resolve_spec(EncoderConfig(model=str(no_weights)), str(tmp_path))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_bert_dir, no_tok)
    for f in ("tokenizer.json", "vocab.txt"):
        if (no_tok / f).exists():
            os.remove(no_tok / f)
    with pytest.raises(EncoderError, match="has no tokenizer"):
        resolve_spec(EncoderConfig(model=str(no_tok)), str(tmp_path))


def test_mismatched_tokenizer_fails_at_load(tmp_path):
    from conftest import _save_tokenizer
    from transformers import BertConfig, BertModel

    path = str(tmp_path / "small_vocab")
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    _save_tokenizer(path)  # 30522 tokens for a 100-token vocabulary
    with pytest.raises(EncoderError, match="tokenizer and weights do not match"):
        Encoder(spec_for(path, tmp_path))


def test_nan_and_dimension_checks_name_the_pid():
    pids = np.array([11, 22, 33])
    v = np.ones((3, 4), dtype=np.float32)
    v[1, 2] = np.nan
    with pytest.raises(EncoderError, match=r"pid\(s\) \[22\]"):
        check_vectors(v, pids, 4)
    with pytest.raises(EncoderError, match=r"expected \[n, 8\]"):
        check_vectors(np.ones((3, 4), np.float32), pids, 8)


def test_cuda_device_of_a_spark_gpu_address():
    from dpr_lib.encoder import cuda_device

    assert cuda_device("", 0) == "cuda" and cuda_device("1", 2) == "cuda:1"
    with pytest.raises(EncoderError, match=r"Spark assigned GPU address '2', but this node has 2 CUDA device\(s\)"):
        cuda_device("2", 2)
    with pytest.raises(EncoderError, match="address 'gpu-a'"):
        cuda_device("gpu-a", 4)
