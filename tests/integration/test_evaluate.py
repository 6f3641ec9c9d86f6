"""The evaluation job end to end on small datasets built here: real Spark stages, a tiny random
model (numbers low but computed), BM25 finding planted exact-match answers, report files."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_config, synthetic_docs

from dpr_lib import evaluate as ev
from dpr_lib import fusion, metrics, storage
from dpr_lib.index import exact_topk
from dpr_lib.index_ops import vectors_of


def _squad_from(docs):
    """A SQuAD v1.1 file: one article per 4 documents; each question names the document's planted
    'factN' token and its answer is the planted token plus the following word."""
    articles = []
    for a in range(0, len(docs), 4):
        paragraphs = []
        for d in docs[a:a + 4]:
            words = d["text"].split()
            i = next(j for j, w in enumerate(words) if w.startswith("fact"))
            answer = " ".join(words[i:i + 2])
            paragraphs.append({"context": d["text"], "qas": [
                {"id": d["id"], "question": f"which word follows {words[i]} here?",
                 "answers": [{"text": answer, "answer_start": d["text"].index(answer)}]}]})
        articles.append({"title": f"Article_{a // 4}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": articles}


@pytest.fixture(scope="module")
def squad_run(spark, tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    docs = synthetic_docs(40, words_per_doc=60, seed=3)
    data = _squad_from(docs)
    data["data"][0]["paragraphs"][0]["qas"].append({"id": "noans", "question": "unanswerable?", "answers": []})
    path = tmp / "squad.json"
    path.write_text(json.dumps(data))
    cfg = make_config(tmp, f"encoder.model={tiny_bert_dir}", "index.num_shards=2")
    report = ev.evaluate(spark, cfg, str(path), "squad", str(tmp / "out"))
    return cfg, report, tmp / "out", docs


def test_report_files_and_shape(squad_run):
    _, report, out, docs = squad_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["retrievers"] == report["retrievers"]
    assert set(report["retrievers"]) == {"bm25", "dense_exact", "dense_ivf", "hybrid"}
    assert report["n_questions"] == len(docs) and report["n_passages"] == len(docs)
    assert report["skipped"] == {"question_without_answers": 1}
    assert report["index"]["factory"].startswith("IVF") and report["index"]["nprobe"] >= 1
    assert report["encoder"]["id"] and report["seconds"] > 0
    for name, figures in report["retrievers"].items():
        assert set(figures) == {f"top{k}" for k in metrics.TOPS} | {f"gold_recall@{k}" for k in metrics.TOPS}
        assert all(0.0 <= v <= 1.0 for v in figures.values()), (name, figures)
        curve = report["curves"][name]
        assert len(curve) == len(docs) and curve == sorted(curve)
    md = (out / "report.md").read_text()
    assert "| bm25 |" in md and "| dense_ivf |" in md and "question_without_answers 1" in md
    assert (out / "topk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bm25_finds_planted_answers(squad_run):
    _, report, _, _ = squad_run
    bm25 = report["retrievers"]["bm25"]
    assert bm25["top1"] == 1.0 and bm25["gold_recall@1"] == 1.0


def test_dense_exact_figures_equal_an_independent_brute_force(squad_run):
    """dense_exact's top-k accuracy, recomputed outside the evaluation: the question encoder's
    vectors, numpy brute force over the Embeddings table, DPR's answer match on the passage text."""
    from dpr_lib.bm25 import Passages
    from dpr_lib.datasets import has_answer
    from dpr_lib.encoder import Encoder, resolve_spec

    cfg, report, _, docs = squad_run
    work = report["work_dir"]
    tables = [pq.read_table(f) for f in storage.list_files(os.path.join(work, "embeddings"), ".parquet")]
    pids = np.concatenate([t.column("pid").to_numpy() for t in tables])
    vecs = np.concatenate([vectors_of(t, 32) for t in tables])
    data = _squad_from(docs)
    qas = [qa for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question")
    q = Encoder(spec).encode(None, [qa["question"] for qa in qas])
    ranked = pids[np.argsort(-(q @ vecs.T), axis=1, kind="stable")]
    passages = Passages(os.path.join(work, "passages"))
    hit = np.array([[has_answer(passages.texts[passages.row_of[int(p)]], [a["text"] for a in qa["answers"]])
                     for p in row] for qa, row in zip(qas, ranked)])
    first = np.where(hit.any(1), hit.argmax(1), len(pids))
    for k in (1, 5, 20):
        want = round(float((first < k).mean()), 4)
        assert report["retrievers"]["dense_exact"][f"top{k}"] == pytest.approx(want, abs=1e-4), k
    # a random tiny encoder is far from perfect: the figure is informative, not 1.0 by construction
    assert report["retrievers"]["dense_exact"]["top1"] < 1.0


def test_exact_topk_matches_numpy_brute_force(squad_run, spark):
    _, report, _, _ = squad_run
    files = storage.list_files(os.path.join(report["work_dir"], "embeddings"), ".parquet")
    assert files
    tables = [pq.read_table(f) for f in files]
    pids = np.concatenate([t.column("pid").to_numpy() for t in tables])
    vecs = np.concatenate([vectors_of(t, 32) for t in tables])
    queries = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
    scores, ids = exact_topk(spark, files, queries, 5, 32)
    full = queries @ vecs.T
    want = pids[np.argsort(-full, axis=1, kind="stable")[:, :5]]
    assert (ids == want).all()
    assert np.allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_beir_dataset_end_to_end(spark, tiny_bert_dir, tmp_path):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    docs = synthetic_docs(12, words_per_doc=40, seed=5)
    with open(d / "corpus.jsonl", "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"_id": doc["id"], "title": doc["title"], "text": doc["text"]}) + "\n")
    with open(d / "queries.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"fact{i}"}) + "\n")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                          "".join(f"q{i}\tdoc-{i}\t1\n" for i in range(12)) + "q0\tdoc-99\t1\n")
    cfg = make_config(tmp_path, f"encoder.model={tiny_bert_dir}", "index.num_shards=1")
    report = ev.evaluate(spark, cfg, str(d), "beir", str(tmp_path / "out"), fusion="linear", alpha=0.3)
    assert report["kind"] == "qrels" and report["n_questions"] == 12
    assert report["skipped"] == {"qrels_unknown_doc": 1}
    bm25 = report["retrievers"]["bm25"]
    assert bm25["mrr@10"] == 1.0 and bm25["ndcg@10"] == 1.0 and bm25["recall@1"] == 1.0
    assert report["hybrid"] == {"fusion": "linear", "of": ["bm25", "dense_ivf"], "alpha_dense": 0.3}
    assert set(report["retrievers"]["dense_exact"]) == {"recall@1", "recall@5", "recall@20", "recall@100",
                                                        "mrr@10", "ndcg@10"}


def test_cli_rejects_bad_dataset_before_starting_spark(tmp_path):
    bad = tmp_path / "not-squad.json"
    bad.write_text('[{"question": "q", "answers": ["a"]}]')
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "evaluate.py"), "--dataset", str(bad),
                           "--format", "squad", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "not-squad.json: not a SQuAD file" in proc.stderr
    assert "Traceback" not in proc.stderr and "SparkContext" not in proc.stderr


def test_tune_fraction_chooses_on_some_questions_and_scores_on_the_others(spark, tiny_bert_dir, tmp_path):
    """--tune-fraction: the serving choice (dense, bm25, RRF k, linear alpha) is made on a seeded
    half of the questions; every reported figure, 'recommended' included, is on the other half."""
    docs = synthetic_docs(40, words_per_doc=60, seed=3)
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad_from(docs)))
    cfg = make_config(tmp_path, f"encoder.model={tiny_bert_dir}", "index.num_shards=2")
    report = ev.evaluate(spark, cfg, str(path), "squad", str(tmp_path / "out"), tune_fraction=0.5)
    tu = report["tuning"]
    assert tu["tuned_on"] == 20 and tu["scored_on"] == 20 == report["n_questions"]
    assert tu["metric"] == "top1, top5, top20" and set(report["retrievers"]) == {"bm25", "dense_exact", "dense_ivf", "hybrid",
                                                                      "recommended"}
    assert set(tu["on_tune"]) == {"dense", "bm25"} | {f"rrf_k{k}" for k in fusion.RRF_KS} | \
        {f"rrf_k{k}_d{w}" for k in fusion.RRF_KS for w in fusion.DENSE_WEIGHTS} | \
        {f"linear_a{a}" for a in fusion.ALPHAS}
    # the plain rule's choice, or the safer single retriever when the tuning half cannot tell them apart
    assert tu["plain_choice"] == fusion.choose_fusion(tu["on_tune"])
    assert tu["choice"]["name"] in (tu["plain_choice"], tu["safe_choice"])
    assert (tu["choice"]["name"] == tu["plain_choice"]) == (tu["warning"] is None or tu["plain_choice"] == tu["safe_choice"])
    # The tiny random encoder is near chance; BM25 finds every planted answer: the choice serves BM25
    # (alone or dominating a fusion), and it is scored on held-out questions only.
    assert tu["choice"]["mode"] in ("bm25", "hybrid") and tu["on_tune"]["bm25"]["top20"] > tu["on_tune"]["dense"]["top20"]
    if tu["choice"]["name"] == "bm25":
        assert report["retrievers"]["recommended"] == report["retrievers"]["bm25"]
    assert len(report["curves"]["recommended"]) == len(report["curves"]["bm25"])
    assert "chosen by top1, top5, top20 on a random 0.5 of the questions (20, seed" in (tmp_path / "out" / "report.md").read_text()
    again = ev.evaluate(spark, cfg, str(path), "squad", str(tmp_path / "out2"), tune_fraction=0.5)
    assert again["tuning"]["choice"] == tu["choice"] and again["retrievers"] == report["retrievers"], "seeded"
