"""The sparse side of a version and the three search modes: BM25 shards hold exactly the dense
shards' pids (whichever way the merge job learns them), score as the evaluation's BM25 does, and
dense / bm25 / hybrid are served by the loader and the CLI, the fusion tuned on validation data."""

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_config, synthetic_docs, write_jsonl

from dpr_lib import storage
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import check_embeddings, encode_passages
from dpr_lib.encoder import resolve_spec
from dpr_lib.errors import InputError
from dpr_lib.fusion import fuse_runs
from dpr_lib.index import build_index
from dpr_lib.manifest import open_manifest
from dpr_lib.search import Searcher
from dpr_lib.sparse import ArrayFile

N_DOCS = 120


@pytest.fixture(scope="module")
def encoded(spark, tmp_path_factory, tiny_bert_dir):
    """120 documents (240 passages) in 3 files, encoded with the tiny BERT."""
    tmp = tmp_path_factory.mktemp("hybrid")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(N_DOCS, seed=5))}",
                      f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.normalize=true",
                      "corpus.num_files=3", "index.num_shards=3", "index.recall_queries=64")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    return cfg


def _cfg(encoded, tmp_path, *extra):
    return make_config(tmp_path, f"encoder.model={encoded.encoder.model}", "encoder.pooling=mean",
                       "encoder.normalize=true", f"paths.passages={encoded.path('passages')}",
                       f"paths.embeddings={encoded.path('embeddings')}", f"paths.index_root={tmp_path}/index",
                       f"paths.cache_dir={encoded.path('cache_dir')}", "index.num_shards=3",
                       "index.recall_queries=64", *extra)


def _dense_ids(path: str) -> np.ndarray:
    index = faiss.read_index(path)  # kept referenced: the extracted IVF points into it
    ivf = faiss.extract_index_ivf(index)
    return np.sort(np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                                   for i in range(ivf.nlist)]))


def _check_sparse_matches_dense(manifest, vurl: str, passages: int):
    sp = manifest.sparse
    assert sp and sp["docs"] == passages and sp["method"] == "bm25"
    assert manifest.memory["sparse_disk_bytes_per_passage"] == sp["disk_bytes_per_passage"] > 0
    assert manifest.fusion["source"] == "default" and manifest.fusion["method"] == "rrf"
    for entry in [sp["vocab"], *sp["shards"]]:
        path = os.path.join(vurl, entry["path"])
        assert storage.sha256_file(path) == entry["sha256"] and os.path.getsize(path) == entry["bytes"]
    postings = 0
    for dense in manifest.shards:
        sparse = next(e for e in sp["shards"] if e["index"] == dense.index)
        f = ArrayFile(os.path.join(vurl, sparse["path"]))
        np.testing.assert_array_equal(np.asarray(f["pids"]), _dense_ids(os.path.join(vurl, dense.path)))
        df = np.asarray(f["df"]).astype(np.int64)
        postings += int(df.sum())
        assert np.all(np.diff(np.asarray(f["terms"])) > 0) and int(np.asarray(f["block_n"]).astype(np.int64).sum()) \
            == int(df.sum()) == sparse["postings"]
    vocab = ArrayFile(os.path.join(vurl, sp["vocab"]["path"]))
    assert int(np.asarray(vocab["df"]).sum()) == postings  # df summed over shards = every posting once


def _passages(cfg) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in storage.list_files(cfg.path("passages"), ".parquet"))


def test_sparse_shards_hold_the_dense_shards_pids_from_pid_sorted_files(spark, encoded, tmp_path):
    cfg = _cfg(encoded, tmp_path)
    manifest = build_index(spark, cfg)
    _, vurl = open_manifest(cfg.path("index_root"))
    _check_sparse_matches_dense(manifest, vurl.rstrip("/"), _passages(encoded))


def test_sparse_shards_follow_the_dense_shards_when_files_are_not_pid_sorted(spark, encoded, tmp_path):
    """Embeddings files in no pid order (not written by the encode job): the shards' pids are not
    intervals, so passages are joined with the shards' pids; still the same pids per shard."""
    out = tmp_path / "emb"
    out.mkdir()
    for i, f in enumerate(storage.list_files(encoded.path("embeddings"), ".parquet")):
        t = pq.read_table(f)
        order = np.random.default_rng(i).permutation(t.num_rows)
        pq.write_table(t.take(order), out / f"part-{i:05d}.parquet")  # schema metadata kept
    cfg = _cfg(encoded, tmp_path, f"paths.embeddings={out}")
    manifest = build_index(spark, cfg)
    _, vurl = open_manifest(cfg.path("index_root"))
    _check_sparse_matches_dense(manifest, vurl.rstrip("/"), _passages(encoded))


def test_sparse_shards_follow_hash_sharding_of_a_dataframe(spark, encoded, tmp_path):
    cfg = _cfg(encoded, tmp_path)
    files = storage.list_files(encoded.path("embeddings"), ".parquet")
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="passage")
    fingerprint, _ = check_embeddings(files, spec.fingerprint())
    df = spark.read.parquet(*files).select("pid", "vector")
    manifest = build_index(spark, cfg, embeddings_df=df, extra_manifest={"encoder": fingerprint})
    _, vurl = open_manifest(cfg.path("index_root"))
    _check_sparse_matches_dense(manifest, vurl.rstrip("/"), _passages(encoded))


@pytest.fixture(scope="module")
def published(spark, encoded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid-index")
    cfg = _cfg(encoded, tmp)
    build_index(spark, cfg)
    return cfg


def test_bm25_mode_scores_as_the_evaluation_bm25(published):
    from dpr_lib.bm25 import Passages, bm25_topk

    questions = [f"fact{i} title {i}" for i in range(0, N_DOCS, 7)] + ["title 3 of the words"]
    k = 10
    want_s, want_p = bm25_topk(Passages(published.path("passages")), questions, k)
    searcher = Searcher(published.path("index_root"), published.encoder, published.path("cache_dir"), mode="bm25")
    got_s, got_p = searcher.retrieve(questions, k)
    for q in range(len(questions)):
        np.testing.assert_allclose(got_s[q], want_s[q], rtol=1e-5)
        cut = want_s[q][-1] + 1e-4  # above the k-th score no tie can reorder the sets
        assert {p for p, s in zip(got_p[q], got_s[q]) if s > cut} == {p for p, s in zip(want_p[q], want_s[q]) if s > cut}


def test_modes_hybrid_is_the_manifests_fusion_of_both(published):
    idx = published.path("index_root")
    auto = Searcher(idx, published.encoder, published.path("cache_dir"))
    assert auto.mode == "hybrid" and auto.fusion["rrf_k"] == 60  # no validation data: the label-free default
    questions = ["fact17 and more", "fact42 words", "Title 99"]
    k = 5
    hybrid = auto.retrieve(questions, k)
    dense = auto.index.search(auto.encoder.encode(None, questions), 2 * k)
    bm25 = auto.index.search_sparse(questions, 2 * k)
    expected = fuse_runs(auto.fusion, bm25, dense, k)
    np.testing.assert_array_equal(hybrid[1], expected[1])
    np.testing.assert_allclose(hybrid[0], expected[0])
    hits = auto.ask(questions, k, mode="bm25")
    assert hits[0][0].doc_id == "doc-17" and hits[1][0].doc_id == "doc-42"  # the marker term finds its doc
    assert [h.pid for h in auto.ask(questions, k, mode="dense")[0]] == dense[1][0][:k].tolist()
    with pytest.raises(InputError, match="mode must be one of dense, bm25, hybrid"):
        auto.ask(questions, k, mode="sparse")


def test_cli_mode_flag(published):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "dpr_lib.search", "--index", published.path("index_root"),
                          "--set", f"encoder.model={published.encoder.model}", "--set", "encoder.pooling=mean",
                          "--set", "encoder.normalize=true", "--set", f"paths.cache_dir={published.path('cache_dir')}",
                          "--mode", "bm25", "--json", "-k", "3", "fact8 please"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["mode"] == "bm25" and body["results"][0]["hits"][0]["doc_id"] == "doc-8"


def test_dense_only_version_refuses_sparse_modes_clearly(spark, encoded, tmp_path):
    cfg = _cfg(encoded, tmp_path, "index.sparse=false")
    manifest = build_index(spark, cfg)
    assert manifest.sparse is None and not manifest.fusion
    assert Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir")).mode == "dense"
    with pytest.raises(InputError, match="has no sparse side .*only mode 'dense'"):
        Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir"), mode="hybrid")


def test_fusion_is_tuned_on_validation_questions(spark, encoded, tmp_path):
    """QA validation pairs whose answer is a document's marker: BM25 finds markers, the tiny random
    BERT does not, so the tuned choice must not be dense; the figures of every candidate are kept."""
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps({"question": f"which passage says fact{i}", "answers": [f"fact{i}"]}) + "\n"
                            for i in range(0, N_DOCS, 3)))
    cfg = _cfg(encoded, tmp_path, f"index.validation_questions={path}", "index.validation_k=5")
    manifest = build_index(spark, cfg)
    fusion, figures = manifest.fusion, manifest.validation
    assert fusion["source"] == "tuned" and fusion["metric"] == "top5_accuracy" and fusion["questions"] == 40
    assert {"dense", "bm25", "rrf_k10", "rrf_k60", "rrf_k60_d0.5", "linear_a0.5"} <= set(fusion["figures"])
    assert fusion["chosen_by"] == ["top1", "top5"]
    assert figures["by_mode"]["bm25"] > figures["by_mode"]["dense"]
    from dpr_lib.fusion import choose_fusion

    assert fusion["plain_choice"] == choose_fusion(fusion["figures"])
    best = fusion["plain_choice"] if fusion["warning"] is None else fusion["safe_choice"]
    assert fusion["mode"] == ("hybrid" if best not in ("bm25", "dense") else best) != "dense"
    assert fusion["safe_choice"] == "bm25" and all(len(v) == 3 for v in fusion["intervals"].values())
    assert fusion["method"] in ("rrf", "linear")
    served = Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir"))
    assert served.mode == fusion["mode"]
