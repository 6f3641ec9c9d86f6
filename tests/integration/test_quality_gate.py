"""The quality gate before LATEST moves: a version whose validation figure regressed (here: a
broken Embeddings export, vectors shuffled among pids) is built but not published, kept and
marked rejected, the job exits 11 naming the metric and both values; --force publishes it; with no
earlier version the floor applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, encoder_sets, make_config, write_jsonl

from dpr_lib import storage
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.gate import REJECTED, QualityGateError
from dpr_lib.index import build_index
from dpr_lib.manifest import read_latest, read_manifest, version_url


def _docs(n: int) -> list[dict]:
    """Short documents (one passage, shorter than a question's max length) of random made-up
    words, each with its own marker 'factN': a question that is a document's text finds that
    document with any encoder while the index is sound."""
    import random

    rng = random.Random(7)
    docs = []
    for i in range(n):
        words = ["".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(2)) for _ in range(14)]
        words.insert(rng.randrange(len(words)), f"fact{i}")
        docs.append({"id": f"doc-{i}", "title": f"T{i}", "text": " ".join(words)})
    return docs


@pytest.fixture(scope="module")
def encoded(spark, tmp_path_factory):
    """60 documents encoded by the bundled model, and validation questions: a document's text,
    answered by its marker."""
    tmp = tmp_path_factory.mktemp("gate")
    docs = _docs(60)
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', docs)}")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    path = tmp / "validation.jsonl"
    path.write_text("\n".join(json.dumps({"question": d["text"], "answers": [f"fact{i}"]})
                              for i, d in enumerate(docs)) + "\n")
    return cfg, str(path)


def _cfg(encoded, tmp_path, *extra):
    base, questions = encoded
    return make_config(tmp_path, *encoder_sets(base), f"paths.passages={base.path('passages')}",
                       f"paths.embeddings={base.path('embeddings')}", f"paths.index_root={tmp_path}/index",
                       f"index.validation_questions={questions}", "index.validation_k=5", *extra)


def _broken_export(base, dest: str) -> str:
    """The Embeddings with every vector moved to another pid (same files, schema and fingerprint)."""
    os.makedirs(dest, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in storage.list_files(base.path("embeddings"), ".parquet"):
        t = pq.read_table(f)
        vec = t.column("vector").combine_chunks()
        shuffled = vec.take(pa.array(rng.permutation(len(vec))))
        pq.write_table(t.set_column(t.schema.get_field_index("vector"), t.schema.field("vector"), shuffled),
                       os.path.join(dest, os.path.basename(f)))
    return dest


def test_a_regression_is_built_not_published_and_force_publishes_it(spark, encoded, tmp_path):
    cfg = _cfg(encoded, tmp_path)
    first = build_index(spark, cfg)
    assert first.validation["metric"] == "top5_accuracy" and first.validation["questions"] == 60
    assert first.validation["value"] >= 0.9, first.validation
    assert first.gate["passed"] and first.gate["compared_with"] is None

    broken = _broken_export(encoded[0], str(tmp_path / "broken-embeddings"))
    root = cfg.path("index_root")
    sets = [f"paths.work_dir={tmp_path}/work", f"paths.cache_dir={tmp_path}/cache", *encoder_sets(encoded[0]),
            f"paths.passages={encoded[0].path('passages')}", f"paths.embeddings={broken}",
            f"paths.index_root={root}", f"index.validation_questions={encoded[1]}", "index.validation_k=5",
            "index.exact_below=0", "index.recall_queries=32", "spark.master=local[2]"]
    args = [sys.executable, os.path.join(REPO, "jobs", "build_index.py")] + [a for s in sets for a in ("--set", s)]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == QualityGateError.exit_code == 11, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: version ") and "was built but not published: top5_accuracy (dense) fell from " \
        f"{first.validation['value']:.4f} (version {first.version}, which LATEST names) to " in line, line
    assert "publish.max_regression=0.01" in line and "--force" in line
    assert read_latest(root) == first.version, "LATEST did not move"
    rejected = [v for v in os.listdir(os.path.join(root, "versions")) if v != first.version]
    assert len(rejected) == 1, "the rejected version is kept for inspection"
    vurl = version_url(root, rejected[0])
    reason = json.loads(storage.read_bytes(os.path.join(vurl, REJECTED)))["reason"]
    kept = read_manifest(os.path.join(vurl, "manifest.json"))
    assert reason in line and not kept.gate["passed"] and kept.validation["value"] < first.validation["value"] - 0.5

    forced = build_index(spark, _cfg(encoded, tmp_path, f"paths.embeddings={broken}"), force=True)
    assert read_latest(root) == forced.version
    assert sorted(os.listdir(os.path.join(root, "versions"))) == [first.version, forced.version], \
        "the rejected version is pruned once a newer one is published; the fallback is kept"
    assert forced.gate == {"passed": False, "forced": True, "reason": forced.gate["reason"],
                           "compared_with": first.version, "max_regression": 0.01}


def test_with_no_earlier_version_the_floor_applies(spark, encoded, tmp_path):
    with pytest.raises(QualityGateError, match=r"top5_accuracy 0\.\d{4} on 60 validation questions is below "
                                               r"publish\.min_validation=0\.99 \(no earlier figure"):
        build_index(spark, _cfg(encoded, tmp_path, "publish.min_validation=0.99",
                                f"paths.embeddings={_broken_export(encoded[0], str(tmp_path / 'b'))}"))
    assert read_latest(str(tmp_path / "index")) is None


def test_a_bad_validation_file_fails_before_any_stage(spark, encoded, tmp_path):
    from dpr_lib.errors import ConfigError

    bad = tmp_path / "v.jsonl"
    bad.write_text('{"question": "q", "answers": []}\n')
    with pytest.raises(ConfigError, match="index.validation_questions: .* line 1 is not a question"):
        build_index(spark, _cfg(encoded, tmp_path, f"index.validation_questions={bad}"))
    assert not os.path.exists(tmp_path / "index")


def test_judged_queries_gate_on_ndcg_at_10(spark, encoded, tmp_path):
    """BEIR-format validation (queries.jsonl + qrels/test.tsv, judged by doc id): nDCG@10 over the
    hits' documents is recorded and gated the same way."""
    base, qa = encoded
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    rows = [json.loads(line) for line in open(qa)]
    (beir / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": r["question"]})
                                                  for i, r in enumerate(rows)) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\tdoc-{i}\t1\n" for i in range(len(rows))))
    cfg = _cfg(encoded, tmp_path, f"index.validation_questions={beir}")
    first = build_index(spark, cfg)
    assert first.validation["metric"] == "ndcg@10" and first.validation["value"] >= 0.9, first.validation
    broken = _broken_export(base, str(tmp_path / "broken"))
    with pytest.raises(QualityGateError, match=rf"ndcg@10 \(dense\) fell from {first.validation['value']:.4f} "):
        build_index(spark, _cfg(encoded, tmp_path, f"index.validation_questions={beir}",
                                f"paths.embeddings={broken}"))
    assert read_latest(cfg.path("index_root")) == first.version


def test_a_random_encoder_is_refused_and_a_small_corpus_change_passes(spark, encoded, tmp_path, tiny_bert_dir):
    """The gate's cases on real stages: after a good version, one whose corpus changed a little
    (3 of 60 documents edited, re-sharded, re-encoded) passes and moves LATEST; one built with a
    randomly initialised encoder (passages and questions) is refused, LATEST keeps the last good
    version, and every mode's figure is on record."""
    base, questions = encoded
    cfg = _cfg(encoded, tmp_path)
    first = build_index(spark, cfg)
    root = cfg.path("index_root")

    docs = _docs(60)
    for i in (5, 17, 40):
        docs[i]["text"] += " an edited sentence of ordinary words"
    changed = make_config(tmp_path / "changed", *encoder_sets(base),
                          f"corpus.input={write_jsonl(tmp_path / 'changed.jsonl', docs)}")
    shard_corpus(spark, changed)
    encode_passages(spark, changed)
    second = build_index(spark, _cfg(encoded, tmp_path, f"paths.passages={changed.path('passages')}",
                                     f"paths.embeddings={changed.path('embeddings')}"))
    assert second.gate["passed"] and second.gate["compared_with"] == first.version
    assert read_latest(root) == second.version
    assert set(second.validation["by_mode"]) == {"dense", "bm25", "hybrid"}

    random_enc = make_config(tmp_path / "random", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                             "encoder.normalize=true", f"corpus.input={write_jsonl(tmp_path / 'r.jsonl', docs)}")
    shard_corpus(spark, random_enc)
    encode_passages(spark, random_enc)
    with pytest.raises(QualityGateError, match=r"top5_accuracy \(dense\) fell from "):
        build_index(spark, make_config(
            tmp_path, f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.normalize=true",
            f"paths.passages={random_enc.path('passages')}", f"paths.embeddings={random_enc.path('embeddings')}",
            f"paths.index_root={root}", f"index.validation_questions={questions}", "index.validation_k=5"))
    assert read_latest(root) == second.version, "LATEST keeps the last good version"
