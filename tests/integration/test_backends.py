"""encoder.backend onnx / openvino and encoder.quantize int8: real exports of a real (tiny,
randomly initialised) transformers model, run through the encode job on real Spark."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_config, st_model_dir, synthetic_docs, write_jsonl

from dpr_lib import backends, runtimes, storage
from dpr_lib.config import load_config
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import check_embeddings, encode_passages
from dpr_lib.encoder import Encoder, default_model_dir, resolve_spec
from dpr_lib.encoder_choice import passage_spec
from dpr_lib.errors import ConfigError, EncoderError, IncompatibleIndexError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'dpr_lib[onnx]'")
pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'dpr_lib[openvino]'")


BUNDLED = default_model_dir()


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("backends")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(40, 150, seed=9))}",
                      "corpus.num_files=3", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                      "encoder.dtype=fp32")
    shard_corpus(spark, cfg)
    return cfg


def with_backend(cfg, tmp_path, backend, quantize="none", model=None, **extra):
    sets = [f"paths.work_dir={tmp_path}/work", f"paths.cache_dir={tmp_path}/cache",
            f"paths.passages={cfg.path('passages')}", f"encoder.model={model or cfg.encoder.model}",
            f"encoder.pooling={'auto' if model else 'mean'}", "encoder.dtype=fp32", f"encoder.backend={backend}",
            f"encoder.quantize={quantize}", "index.exact_below=100000"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, sets)


def vectors(cfg) -> dict[int, np.ndarray]:
    out = {}
    for f in storage.list_files(cfg.path("embeddings"), ".parquet"):
        t = pq.read_table(f)
        out.update(zip(t.column("pid").to_pylist(), np.stack(t.column("vector").to_numpy(zero_copy_only=False))))
    return out


def torch_vectors(cfg, model=None) -> dict[int, np.ndarray]:
    spec = resolve_spec(load_config(None, [f"encoder.model={model or cfg.encoder.model}", "encoder.dtype=fp32",
                                           f"encoder.pooling={'auto' if model else 'mean'}"]).encoder,
                        cfg.path("cache_dir"))
    enc, out = Encoder(spec), {}
    for f in storage.list_files(cfg.path("passages"), ".parquet"):
        t = pq.read_table(f)
        out.update(zip(t.column("pid").to_pylist(),
                       enc.encode(t.column("title").to_pylist(), t.column("text").to_pylist())))
    return out


def cosines(a: dict, b: dict) -> np.ndarray:
    assert a.keys() == b.keys()
    x, y = np.stack([a[p] for p in sorted(a)]), np.stack([b[p] for p in sorted(a)])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_fp32_backend_gives_the_torch_vectors(spark, corpus, tmp_path, backend):
    cfg = with_backend(corpus, tmp_path, backend)
    stats = encode_passages(spark, cfg)
    fp = stats["fingerprint"]
    assert fp["backend"] == backend and fp["quantize"] == "none" and len(fp["artifact_sha256"]) == 64
    assert fp["calibration"] == ""
    meta_url = os.path.join(backends.artifact_url(cfg, passage_spec(cfg)), runtimes.META)
    meta = json.loads(open(meta_url).read())
    assert sorted(meta["files"]) == sorted(runtimes.FILES[backend])
    want, got = torch_vectors(corpus), vectors(cfg)
    np.testing.assert_allclose(np.stack([got[p] for p in sorted(want)]), np.stack([want[p] for p in sorted(want)]),
                               rtol=1e-4, atol=1e-5)
    # A second run reuses the export (same files, same fingerprint) and so every Embeddings file.
    mtime = os.path.getmtime(meta_url)
    again = encode_passages(spark, cfg)
    assert again["fingerprint"]["id"] == fp["id"] and again["files_skipped"] == again["files"]
    assert os.path.getmtime(meta_url) == mtime, "the export is made once"


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exports_honour_prompt_template_pooling_and_dimensions(spark, corpus, tmp_path, backend):
    """A sentence-transformers model with a passage prompt, max pooling and a Matryoshka cut: the
    exported backend gives the torch encoder's vectors (prompt and template apply before the
    tokenizer, pooling and the cut after the exported graph)."""
    model = st_model_dir(str(tmp_path), "bert", "max", {"query": "query: ", "document": "passage: "})
    cfg = with_backend(corpus, tmp_path, backend, model=model, **{"encoder.dimensions": 16})
    fp = encode_passages(spark, cfg)["fingerprint"]
    assert (fp["pooling"], fp["prompt"], fp["input_template"], fp["dimensions"], fp["dim"]) == \
        ("max", "passage: ", "{title} {text}", 16, 16)
    spec = resolve_spec(load_config(None, [f"encoder.model={model}", "encoder.dtype=fp32", "encoder.dimensions=16"]
                                    ).encoder, cfg.path("cache_dir"))
    enc, want = Encoder(spec), {}
    for f in storage.list_files(corpus.path("passages"), ".parquet"):
        t = pq.read_table(f)
        want.update(zip(t.column("pid").to_pylist(), enc.encode(t.column("title").to_pylist(),
                                                              t.column("text").to_pylist())))
    assert cosines(vectors(cfg), want).min() > 0.9999


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_int8_is_close_to_fp32_and_never_mixed_with_it(spark, corpus, tmp_path, backend):
    cfg = with_backend(corpus, tmp_path, backend, "int8", model=BUNDLED, **{"encoder.calibration_rows": 50})
    stats = encode_passages(spark, cfg)
    fp = stats["fingerprint"]
    assert fp["quantize"] == "int8"
    if backend == "openvino":
        # Static int8: calibrated on the corpus's own passages, named by their hash in the fingerprint.
        titles, texts = backends.calibration_sample(cfg.path("passages"), 50)
        assert len(texts) == 50 and len(set(texts)) == 50
        import hashlib

        assert fp["calibration"] == hashlib.sha256(json.dumps([titles, texts]).encode()).hexdigest()
    else:
        assert fp["calibration"] == "", "dynamic int8 quantises activations per batch: nothing calibrated"
    cos = cosines(vectors(cfg), torch_vectors(corpus, BUNDLED))
    # The real all-MiniLM-L6-v2 (a tiny random model with wide weights says little about int8).
    assert cos.min() > 0.97 and cos.mean() > 0.98, (cos.min(), cos.mean())  # word-soup test passages
    assert cos.min() < 0.99999, "the vectors did come from the int8 model, not the fp32 one"
    fp32 = passage_spec(with_backend(corpus, tmp_path, backend, model=BUNDLED)).fingerprint()
    assert fp32["id"] != fp["id"]
    files = storage.list_files(cfg.path("embeddings"), ".parquet")
    with pytest.raises(IncompatibleIndexError, match="expected"):
        check_embeddings(files, fp32)
    torch_fp = passage_spec(with_backend(corpus, tmp_path, "torch")).fingerprint()
    assert "backend" not in torch_fp, "torch fingerprints are unchanged: existing Embeddings stay valid"


def test_index_of_an_exported_encoder_says_how_questions_are_encoded(spark, corpus, tmp_path):
    from dpr_lib.index import build_index
    from dpr_lib.search import Searcher

    cfg = with_backend(corpus, tmp_path, "onnx", "int8")
    encode_passages(spark, cfg)
    manifest = build_index(spark, cfg)
    assert manifest.encoder["backend"] == "onnx" and manifest.encoder["quantize"] == "int8"
    assert manifest.question_encoder.get("backend", "torch") == "torch"
    assert "torch" in manifest.question_encoder["note"]
    hits = Searcher(cfg.path("index_root"), cfg.encoder, cache_dir=str(tmp_path / "c"), mode="dense").ask(
        ["Title 3 fact3"], k=5)[0]
    assert len(hits) == 5


def test_dpr_checkpoint_through_onnx(spark, corpus, tmp_path, tiny_dpr_dir):
    cfg = with_backend(corpus, tmp_path, "onnx", model=tiny_dpr_dir)
    stats = encode_passages(spark, cfg)
    assert stats["fingerprint"]["pooling"] == "pooler" and stats["fingerprint"]["family"] == "dpr"
    want, got = torch_vectors(corpus, tiny_dpr_dir), vectors(cfg)
    np.testing.assert_allclose(np.stack([got[p] for p in sorted(want)]), np.stack([want[p] for p in sorted(want)]),
                               rtol=1e-4, atol=1e-5)


def test_executors_copy_the_export_from_object_storage_and_check_it(corpus, tmp_path, s3_endpoint):
    cfg = with_backend(corpus, tmp_path, "onnx", **{"paths.work_dir": "s3://dpr-test/backends/work",
                                                     "publish.endpoint_url": s3_endpoint})
    spec = passage_spec(cfg, build=True)
    assert spec.artifact_url.startswith("s3://dpr-test/backends/work/encoders/")
    local = runtimes.local_dir(spec)
    assert os.path.exists(os.path.join(local, "model.onnx")) and not local.startswith("s3")
    assert runtimes.local_dir(spec) == local, "downloaded once per sha256"
    import dataclasses

    wrong = dataclasses.replace(spec, artifact_sha256="0" * 64)
    with pytest.raises(EncoderError, match="not the one the driver fingerprinted"):
        runtimes.local_dir(wrong)


def test_bad_backend_settings_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="encoder.quantize=int8 needs encoder.backend"):
        make_config(tmp_path, "encoder.quantize=int8")
    with pytest.raises(ConfigError, match="encoder.backend"):
        make_config(tmp_path, "encoder.backend=tensorrt")
    with pytest.raises(ConfigError, match="encoder.dtype=bf16 is not available with encoder.backend=onnx"):
        make_config(tmp_path, "encoder.backend=onnx", "encoder.dtype=bf16")
    with pytest.raises(ConfigError, match="encoder.device=cuda needs encoder.backend=torch"):
        make_config(tmp_path, "encoder.backend=openvino", "encoder.device=cuda")


def test_int8_without_passages_is_a_clear_error(corpus, tmp_path):
    cfg = with_backend(corpus, tmp_path, "openvino", "int8", **{"paths.passages": str(tmp_path / "none")})
    os.makedirs(tmp_path / "none")
    with pytest.raises(EncoderError, match="calibrates on the corpus's passages"):
        passage_spec(cfg, build=True)


def test_a_changed_local_export_is_refused(corpus, tmp_path):
    spec = passage_spec(with_backend(corpus, tmp_path, "onnx"), build=True)
    assert runtimes.local_dir(spec) == spec.artifact_url
    with open(os.path.join(spec.artifact_url, "model.onnx"), "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(EncoderError, match="does not match the sha256 in its meta.json"):
        Encoder(spec)


def test_nightly_exports_once_and_then_reuses_every_vector(spark, tmp_path, tiny_bert_dir):
    """The first nightly run with an int8 backend calibrates on its snapshot's passages; the next
    night finds the same export, so the same fingerprint, and encodes nothing."""
    from dpr_lib.manifest import MANIFEST, read_manifest, version_url
    from dpr_lib.nightly import run_nightly

    snapshot = write_jsonl(tmp_path / "snapshot.jsonl", synthetic_docs(30, 150, seed=4))
    cfg = make_config(tmp_path, f"corpus.input={snapshot}", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                      "encoder.backend=openvino", "encoder.quantize=int8", "encoder.calibration_rows=40",
                      "encoder.dtype=fp32", "index.exact_below=100000")
    first = run_nightly(spark, cfg)
    assert first["encoded"] == 60
    spec = passage_spec(cfg)
    assert spec.artifact_sha256 and spec.calibration
    meta_url = os.path.join(spec.artifact_url, runtimes.META)
    mtime = os.path.getmtime(meta_url)
    second = run_nightly(spark, cfg)
    assert second["encoded"] == 0 and second["reused"] == 60
    assert os.path.getmtime(meta_url) == mtime
    manifest = read_manifest(os.path.join(version_url(cfg.path("index_root"), second["version"]), MANIFEST))
    assert manifest.encoder["id"] == spec.fingerprint_id() and manifest.encoder["backend"] == "openvino"


def test_openvino_threads_are_not_pinned_to_cores(corpus, tmp_path):
    """Each concurrent Spark task is its own Python worker: pinned threads would all land on the
    same cores (two 1-thread tasks measured 40 + 40 passages/s where one alone did 80)."""
    enc = Encoder(passage_spec(with_backend(corpus, tmp_path, "openvino"), build=True))
    assert enc.runner.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_auto_measures_once_picks_the_fastest_that_keeps_quality_and_keeps_it(spark, corpus, tmp_path):
    from dpr_lib import encoder_choice
    from dpr_lib.index import build_index

    cfg = with_backend(corpus, tmp_path, "auto")
    with pytest.raises(EncoderError, match="no recorded choice"):
        passage_spec(cfg)  # the merge job before any encode: nothing chosen yet
    spec = passage_spec(cfg, build=True)
    url = encoder_choice.record_url(cfg, resolve_spec(with_backend(corpus, tmp_path, "torch").encoder,
                                                      cfg.path("cache_dir")))
    record = json.loads(storage.read_bytes(url))
    measured = [r for r in record["measured"] if "passages_per_s" in r]
    assert [(r["backend"], r["quantize"]) for r in measured] == [
        ("torch", "none"), ("onnx", "int8"), ("openvino", "none"), ("openvino", "int8")]  # fp32: no bf16 rows
    qualifying = [r for r in measured if r is measured[0] or (r["mean_cosine"] >= 0.99 and r["min_cosine"] >= 0.96)]
    best = max(qualifying, key=lambda r: r["passages_per_s"])
    assert (spec.backend, spec.quantize, spec.dtype) == (best["backend"], best["quantize"], best["dtype"])
    assert record["cpu"]["kind"] in ("amx", "avx512_bf16", "avx512", "avx2", "other") and record["threads"] == 1
    fp = spec.fingerprint()
    assert fp["chosen_by"].startswith(f"auto on {record['cpu']['kind']}")
    explicit = passage_spec(with_backend(corpus, tmp_path, best["backend"], best["quantize"]))
    assert explicit.fingerprint_id() == fp["id"], "the same vectors as naming that configuration"
    mtime = os.path.getmtime(url)
    assert passage_spec(cfg).fingerprint_id() == fp["id"] and os.path.getmtime(url) == mtime, "kept, not re-measured"
    encode_passages(spark, cfg)
    manifest = build_index(spark, cfg)
    assert manifest.encoder["id"] == fp["id"] and manifest.encoder["chosen_by"] == fp["chosen_by"]
    # A floor no lossy configuration reaches: only lossless ones qualify.
    strict = passage_spec(with_backend(corpus, tmp_path / "strict", "auto", **{"encoder.auto_min_cosine": 1.0}),
                          build=True)
    assert strict.quantize == "none"


def test_auto_settings_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="encoder.backend=auto chooses the quantisation itself"):
        make_config(tmp_path, "encoder.backend=auto", "encoder.quantize=int8")
    with pytest.raises(ConfigError, match="encoder.auto_min_cosine must be within"):
        make_config(tmp_path, "encoder.backend=auto", "encoder.auto_min_cosine=0")


def test_nightly_with_auto_chooses_on_the_first_night_and_keeps_the_choice(spark, tmp_path, tiny_bert_dir):
    from dpr_lib import encoder_choice
    from dpr_lib.nightly import run_nightly

    snapshot = write_jsonl(tmp_path / "snapshot.jsonl", synthetic_docs(30, 150, seed=5))
    cfg = make_config(tmp_path, f"corpus.input={snapshot}", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                      "encoder.backend=auto", "encoder.calibration_rows=40", "encoder.dtype=fp32",
                      "index.exact_below=100000")
    first = run_nightly(spark, cfg)
    assert first["encoded"] == 60
    chosen = passage_spec(cfg)
    url = encoder_choice.record_url(cfg, resolve_spec(load_config(None, [
        f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.dtype=fp32"]).encoder, cfg.path("cache_dir")))
    mtime = os.path.getmtime(url)
    second = run_nightly(spark, cfg)
    assert second["encoded"] == 0 and second["reused"] == 60, "the same choice, so every vector is reused"
    assert os.path.getmtime(url) == mtime and passage_spec(cfg).fingerprint_id() == chosen.fingerprint_id()
