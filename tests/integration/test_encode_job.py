"""The encode job on real Spark: contract, equality with the in-process encoder, resume, refusals."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_config, synthetic_docs, write_jsonl

from dpr_lib import schemas, storage
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import check_embeddings, encode_passages, output_name
from dpr_lib.encoder import Encoder, resolve_spec
from dpr_lib.errors import IncompatibleIndexError, InputError


@pytest.fixture(scope="module")
def corpus_cfg(spark, tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("encode")
    docs = synthetic_docs(30, words_per_doc=150, seed=5)
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', docs)}", "corpus.num_files=3",
                      f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean")
    shard_corpus(spark, cfg)
    return cfg


def read_embeddings(cfg):
    files = sorted(os.listdir(cfg.path("embeddings")))
    return {f: pq.read_table(os.path.join(cfg.path("embeddings"), f)) for f in files}


def test_embeddings_contract_and_equality_with_one_process(spark, corpus_cfg):
    stats = encode_passages(spark, corpus_cfg)
    assert stats["passages_encoded"] == 60 and stats["files"] == 3 and stats["files_skipped"] == 0
    spec = resolve_spec(corpus_cfg.encoder, corpus_cfg.path("cache_dir"))
    tables = read_embeddings(corpus_cfg)
    assert len(tables) == 3
    for name, table in tables.items():
        assert table.schema.names == ["pid", "content_hash", "vector"]
        assert table.schema.field("vector").type == schemas.embeddings_schema(spec.dim).field("vector").type
        meta = table.schema.metadata
        assert json.loads(meta[schemas.META_FINGERPRINT])["id"] == spec.fingerprint_id()
        assert int(meta[schemas.META_DIM]) == spec.dim
        passages = [pq.read_table(f) for f in storage.list_files(corpus_cfg.path("passages"), ".parquet")
                    if output_name(f) == name][0]
        assert table.column("pid").equals(passages.column("pid"))
        want = Encoder(spec).encode(passages.column("title").to_pylist(), passages.column("text").to_pylist())
        got = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert stats["executor_python"], "tasks report their interpreter"


def test_resume_skips_complete_files_and_reproduces_the_rest(spark, corpus_cfg):
    encode_passages(spark, corpus_cfg)
    before = read_embeddings(corpus_cfg)
    names = sorted(before)
    # A crash mid-job: one output never appeared, another is a truncated leftover.
    os.remove(os.path.join(corpus_cfg.path("embeddings"), names[0]))
    with open(os.path.join(corpus_cfg.path("embeddings"), names[1]), "r+b") as fh:
        fh.truncate(100)
    stats = encode_passages(spark, corpus_cfg)
    assert stats["files_skipped"] == 1
    assert stats["passages_encoded"] == before[names[0]].num_rows + before[names[1]].num_rows
    after = read_embeddings(corpus_cfg)
    for name in names:
        assert after[name].equals(before[name]), f"{name} differs after resume"
        assert after[name].column("vector").to_numpy(zero_copy_only=False)[0].tobytes() == \
            before[name].column("vector").to_numpy(zero_copy_only=False)[0].tobytes()


def test_fingerprint_mismatch_is_refused(spark, corpus_cfg, tmp_path):
    encode_passages(spark, corpus_cfg)
    files = [os.path.join(corpus_cfg.path("embeddings"), f) for f in sorted(os.listdir(corpus_cfg.path("embeddings")))]
    fp, n = check_embeddings(files)
    assert n == 60
    other = dict(fp, id="0000000000000000", model_id="another-model")
    with pytest.raises(IncompatibleIndexError, match="expected 0000000000000000"):
        check_embeddings(files, other)
    # A file written by another encoder mixed into the table.
    table = pq.read_table(files[0])
    meta = dict(table.schema.metadata)
    meta[schemas.META_FINGERPRINT] = json.dumps(other).encode()
    mixed = str(tmp_path / "mixed.parquet")
    pq.write_table(table.replace_schema_metadata(meta), mixed)
    with pytest.raises(IncompatibleIndexError, match="mix encoder fingerprints"):
        check_embeddings(files + [mixed])


def test_dpr_checkpoint_through_the_job(spark, corpus_cfg, tiny_dpr_dir, tmp_path):
    cfg = make_config(tmp_path, f"encoder.model={tiny_dpr_dir}", f"paths.passages={corpus_cfg.path('passages')}")
    stats = encode_passages(spark, cfg)
    assert stats["fingerprint"]["family"] == "dpr" and stats["fingerprint"]["pooling"] == "pooler"
    assert sum(t.num_rows for t in read_embeddings(cfg).values()) == 60


def test_empty_passage_text_never_reaches_the_model(spark, corpus_cfg, tmp_path):
    passages = pq.read_table(storage.list_files(corpus_cfg.path("passages"), ".parquet")[0])
    bad = passages.set_column(4, "text", __import__("pyarrow").array([" "] + passages.column("text").to_pylist()[1:]))
    os.makedirs(tmp_path / "passages")
    pq.write_table(bad, tmp_path / "passages" / "part-00000.parquet")
    cfg = make_config(tmp_path, f"encoder.model={corpus_cfg.encoder.model}", f"paths.passages={tmp_path}/passages")
    with pytest.raises(InputError, match=f"empty text reached the encoder \\(pids \\[{passages.column('pid')[0].as_py()}\\]"):
        encode_passages(spark, cfg)


def test_missing_passages_is_a_clear_error(spark, tmp_path, tiny_bert_dir):
    with pytest.raises(InputError, match="run the corpus stage first"):
        encode_passages(spark, make_config(tmp_path, f"encoder.model={tiny_bert_dir}"))


def test_model_from_object_storage(s3_endpoint, tiny_bert_dir, tmp_path):
    import fsspec
    from faultproxy import FaultProxy

    from dpr_lib.config import EncoderConfig

    fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint}).put(
        tiny_bert_dir.rstrip("/") + "/", "dpr-test/models/tiny/", recursive=True)
    with FaultProxy(s3_endpoint) as proxy:  # counts every request the model download makes
        opts = {"client_kwargs": {"endpoint_url": proxy.url}}
        remote = resolve_spec(EncoderConfig(model="s3://dpr-test/models/tiny"), str(tmp_path), storage_options=opts)
        weights = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith("/models/tiny/model.safetensors")]
        assert len(weights) >= 1, proxy.requests
        seen = len(proxy.requests)
        again = resolve_spec(EncoderConfig(model="s3://dpr-test/models/tiny"), str(tmp_path), storage_options=opts)
        assert proxy.requests[seen:] == [], "the second resolve is served from the cache: no request at all"
    local = resolve_spec(EncoderConfig(model=tiny_bert_dir), str(tmp_path))
    assert remote.model_dir.startswith(str(tmp_path)) and os.path.exists(os.path.join(remote.model_dir, "config.json"))
    assert remote.weights_sha256 == local.weights_sha256 and again.weights_sha256 == local.weights_sha256
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    from dpr_lib.errors import EncoderError

    with pytest.raises(EncoderError, match="not found: s3://dpr-test/models/none"):
        resolve_spec(EncoderConfig(model="s3://dpr-test/models/none"), str(tmp_path), storage_options=opts)
