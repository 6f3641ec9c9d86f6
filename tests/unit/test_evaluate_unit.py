"""Evaluation metrics against hand-computed cases: DPR's answer normalisation, top-k accuracy,
fusion, and the qrels metrics (through pytrec_eval); dataset loaders' errors."""

import json
import math

import numpy as np
import pytest

from dpr_lib import bm25, datasets, fusion, metrics
from dpr_lib.errors import InputError


@pytest.mark.parametrize("passage, answers, expected", [
    ("The Denver Broncos won Super Bowl 50.", ["Denver Broncos"], True),
    ("the denver broncos", ["DENVER  BRONCOS"], True),                 # case and whitespace
    ("They played the Broncos.", ["the Broncos"], True),               # article in the answer
    ("They played Broncos.", ["The Broncos"], True),                   # article only in the answer
    ("a party in the city", ["art"], False),                           # no partial-token match
    ("In the U.S., taxes rose", ["U.S."], True),                       # punctuation both sides
    ("In the US taxes rose", ["U.S."], False),                         # "u s" is not "us"
    ("costs $5 million", ["5 million"], True),                         # symbols are separators
    ("Café society", ["CAFÉ"], True),                                  # NFD + lower case
    ("Cafe society", ["café"], False),                                 # marks are kept, as DPR does
    ("e\u0301tude", ["\u00e9tude"], True),                             # composed == decomposed
    ("The end.", ["the"], False),                                      # answer normalises to nothing
    ("1,000 people", ["1000"], False),
    ("1,000 people", ["1 000"], True),
    ("nothing here", ["missing", "here"], True),                       # any of several answers
])
def test_has_answer_normalisation(passage, answers, expected):
    assert datasets.has_answer(passage, answers) is expected


def test_normalize_tokens():
    assert datasets.normalize_tokens("The  Quick, brown—fox!") == ["quick", "brown", "fox"]
    assert datasets.normalize_tokens("An apple a day") == ["apple", "day"]
    assert datasets.normalize_tokens("") == []


def test_accuracy_curve_and_first_hit_ranks():
    pids = np.array([[5, 6, 7], [8, 9, -1], [1, 2, 3]])
    hits = {(0, 7), (1, 8), (2, 99)}
    ranks = metrics.first_hit_ranks(pids, lambda q, pid: (q, pid) in hits)
    assert ranks.tolist() == [3, 1, 0]
    assert metrics.accuracy_curve(ranks, 3) == [round(1 / 3, 4), round(1 / 3, 4), round(2 / 3, 4)]


def test_rrf_fusion_by_hand():
    bm25 = (np.array([[3.0, 2.0, 1.0]], np.float32), np.array([[10, 20, 30]]))
    dense = (np.array([[0.9, 0.8, 0.1]], np.float32), np.array([[20, 40, 10]]))
    scores, pids = fusion.fuse([bm25, dense], 4, "rrf", rrf_k=60)
    expect = {10: 1 / 61 + 1 / 63, 20: 1 / 62 + 1 / 61, 30: 1 / 63, 40: 1 / 62}
    order = sorted(expect, key=lambda p: (-expect[p], p))
    assert pids[0].tolist() == order == [20, 10, 40, 30]
    assert np.allclose(scores[0], [expect[p] for p in order])


def test_linear_fusion_by_hand_and_missing_hits():
    bm25 = (np.array([[4.0, 2.0, 0.0]], np.float32), np.array([[1, 2, 3]]))
    dense = (np.array([[0.5, 0.3, -1.0]], np.float32), np.array([[2, 4, -1]]))
    scores, pids = fusion.fuse([bm25, dense], 5, "linear", weights=[0.4, 0.6])
    # bm25 normalised: 1 -> 1, 2 -> .5, 3 -> 0; dense (pid -1 ignored): 2 -> 1, 4 -> 0
    expect = {1: 0.4, 2: 0.4 * 0.5 + 0.6, 3: 0.0, 4: 0.0}
    assert pids[0].tolist() == [2, 1, 3, 4, -1]
    assert np.allclose(scores[0][:4], [expect[p] for p in [2, 1, 3, 4]])
    with pytest.raises(InputError, match="fusion"):
        fusion.fuse([bm25], 2, "max")


class _Table(bm25.Passages):
    """A Passages table built in memory (the loader reads Parquet; the metrics only need lookups)."""

    def __init__(self, rows):
        self.pids = np.array([r[0] for r in rows], np.int64)
        self.doc_ids = [r[1] for r in rows]
        self.titles = ["" for _ in rows]
        self.texts = [r[2] for r in rows]
        self.row_of = {int(p): i for i, p in enumerate(self.pids)}
        self._keys = {}


def test_qa_metrics_topk_and_gold_recall():
    table = _Table([(1, "d1", "paris is the capital"), (2, "d2", "berlin is big"), (3, "d1", "more on paris")])
    qs = [datasets.Question("a", "capital of france?", ["Paris"], frozenset({"d1"})),
          datasets.Question("b", "capital of germany?", ["Berlin"], frozenset({"d2"}))]
    pids = np.array([[2, 1, 3], [1, 3, 2]])
    out = metrics.qa_metrics(table, qs, pids, 3)
    assert out["curve"] == [0.0, 0.5, 1.0]
    assert out["metrics"]["top1"] == 0.0 and out["metrics"]["top5"] == 1.0  # k beyond the list = k_max
    assert out["metrics"]["gold_recall@1"] == 0.0 and out["metrics"]["gold_recall@20"] == 1.0


def test_qrels_metrics_by_hand():
    table = _Table([(1, "A", "x"), (2, "A", "y"), (3, "B", "z"), (4, "C", "w"), (5, "D", "v")])
    ds = datasets.Dataset("t", "qrels", "", "jsonl",
                    [datasets.Question("q1", "?", gold=frozenset({"B"})), datasets.Question("q2", "?", gold=frozenset({"A", "D"}))],
                    qrels={"q1": {"B": 1, "C": 0}, "q2": {"A": 1, "D": 1}})
    # q1: docs A (pid 1), A (pid 2, MaxP drops it), B, C -> B at document rank 2
    # q2: D, C, A -> relevant at ranks 1 and 3
    pids = np.array([[1, 2, 3, 4], [5, 4, 1, -1]])
    out = metrics.qrels_metrics(table, ds, pids, 4)["metrics"]
    assert out["mrr@10"] == round((1 / 2 + 1) / 2, 4)
    assert out["recall@1"] == round((0 + 0.5) / 2, 4)
    assert out["recall@5"] == 1.0
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert out["ndcg@10"] == round((ndcg_q1 + ndcg_q2) / 2, 4)


def _squad(tmp_path, data) -> str:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_squad_loader_counts_questions_without_answers(tmp_path):
    data = {"version": "1.1", "data": [{"title": "Some_Title", "paragraphs": [
        {"context": "Alpha beta gamma.", "qas": [
            {"id": "1", "question": "what?", "answers": [{"text": "beta", "answer_start": 6}]},
            {"id": "2", "question": "none?", "answers": []},
            {"id": "3", "question": "the?", "answers": [{"text": "the", "answer_start": 0}]}]}]}]}
    ds = datasets.load_squad(_squad(tmp_path, data), str(tmp_path / "work"))
    assert [q.qid for q in ds.questions] == ["1"]
    assert ds.questions[0].gold == frozenset({"Some Title#0"})
    assert ds.skipped == {"question_without_answers": 2}
    line = json.loads(open(ds.corpus_url).readline())
    assert line == {"id": "Some Title#0", "title": "Some Title", "text": "Alpha beta gamma."}


def test_loaders_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n  {"title": "x",\n  "paragraphs": [}\n]}')
    with pytest.raises(InputError, match=r"bad\.json, line 3: not valid JSON"):
        datasets.load_dataset("squad", str(bad), str(tmp_path / "w"))
    with pytest.raises(InputError, match="not a SQuAD file"):
        datasets.load_dataset("squad", _squad(tmp_path, [{"question": "q", "answers": ["a"]}]), str(tmp_path / "w"))
    with pytest.raises(InputError, match="no paragraphs: empty corpus"):
        datasets.load_dataset("squad", _squad(tmp_path, {"data": []}), str(tmp_path / "w"))
    with pytest.raises(InputError, match="no usable questions"):
        datasets.load_dataset("squad", _squad(tmp_path, {"data": [{"title": "t", "paragraphs": [
            {"context": "text", "qas": [{"id": "1", "question": "q", "answers": []}]}]}]}), str(tmp_path / "w"))
    with pytest.raises(InputError, match="--format must be one of"):
        datasets.load_dataset("msmarco", str(bad), str(tmp_path / "w"))


def test_dpr_loader_builds_corpus_from_contexts(tmp_path):
    data = [{"question": "who?", "answers": ["Ada"],
             "positive_ctxs": [{"passage_id": "7", "title": "T7", "text": "Ada wrote it"}],
             "hard_negative_ctxs": [{"passage_id": "8", "title": "T8", "text": "Bob did not"}]},
            {"question": "none?", "answers": []}]
    path = tmp_path / "dpr.json"
    path.write_text(json.dumps(data))
    ds = datasets.load_dataset("dpr", str(path), str(tmp_path / "w"))
    assert len(ds.questions) == 1 and ds.questions[0].gold == frozenset({"7"})
    assert [json.loads(x)["id"] for x in open(ds.corpus_url)] == ["7", "8"]
    assert ds.skipped == {"question_without_answers": 1}


def _beir(tmp_path, qrels_lines):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"})
                                              for i in range(3)))
    (d / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "doc one"}) + "\n")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(qrels_lines))
    return str(d)


def test_beir_loader_and_unknown_ids(tmp_path):
    ds = datasets.load_dataset("beir", _beir(tmp_path, ["q1\td1\t1\n", "q1\td9\t1\n"]), str(tmp_path / "w"))
    assert ds.qrels == {"q1": {"d1": 1}} and ds.skipped == {"qrels_unknown_doc": 1}
    lines = [f"q1\tnope{i}\t1\n" for i in range(12)]
    with pytest.raises(InputError, match=r"test\.tsv: 12 of 12 records are bad"):
        datasets.load_dataset("beir", _beir(tmp_path / "b", lines), str(tmp_path / "w2"))
    with pytest.raises(InputError, match=r"test\.tsv, line 2: expected query-id, corpus-id, score"):
        datasets.load_dataset("beir", _beir(tmp_path / "c", ["q1 d1 1\n"]), str(tmp_path / "w3"))


def test_split_questions_is_seeded_disjoint_and_refuses_empty_sides():
    from dpr_lib.errors import InputError
    from dpr_lib.metrics import split_questions

    tune, held = split_questions(10, 0.3, seed=1)
    assert len(tune) == 3 and len(held) == 7 and not set(tune) & set(held)
    assert sorted([*tune, *held]) == list(range(10))
    assert [a.tolist() for a in split_questions(10, 0.3, seed=1)] == [tune.tolist(), held.tolist()]
    for bad in (0.0, 1.0, 0.01, 0.99):
        with pytest.raises(InputError, match="tune-fraction"):
            split_questions(10, bad, seed=1)


def test_choose_fusion_prefers_never_worse_than_the_better_single_retriever():
    from dpr_lib.fusion import choose_fusion

    figures = {
        "bm25": {"top1": 0.78, "top5": 0.93, "top20": 0.97},
        "dense": {"top1": 0.60, "top5": 0.86, "top20": 0.96},
        # best at top-20 but 0.02 behind BM25 at top-1: its worst margin is -0.02
        "rrf_k10": {"top1": 0.76, "top5": 0.95, "top20": 0.985},
        # never behind: worst margin +0.002 (top-1)
        "rrf_k60_d0.5": {"top1": 0.782, "top5": 0.945, "top20": 0.98},
    }
    assert choose_fusion(figures) == "rrf_k60_d0.5"
    # no fusion keeps up with BM25 anywhere: BM25 itself (margin 0) wins
    assert choose_fusion({k: figures[k] for k in ("bm25", "dense", "rrf_k10")}) == "bm25"
    # ties on every figure: the simplest retriever
    same = {"top1": 0.5, "top5": 0.7, "top20": 0.9}
    assert choose_fusion({"bm25": same, "dense": same, "rrf_k60": same}) == "dense"


def _figures(rng, n, means):
    """Per-question 0/1 hits with the given hit rates per candidate and metric."""
    return {name: {m: (rng.random(n) < p).astype(float) for m, p in per.items()} for name, per in means.items()}


def test_the_bootstrap_choice_equals_the_plain_one_when_the_evidence_is_overwhelming():
    from dpr_lib.fusion import choose_fusion, choose_with_evidence

    rng = np.random.default_rng(0)
    per_q = _figures(rng, 4000, {"dense": {"top1": 0.40, "top5": 0.60}, "bm25": {"top1": 0.35, "top5": 0.55},
                                 "rrf_k60": {"top1": 0.50, "top5": 0.72}, "rrf_k10": {"top1": 0.46, "top5": 0.69}})
    means = {c: {m: float(v.mean()) for m, v in f.items()} for c, f in per_q.items()}
    got = choose_with_evidence(per_q, seed=1)
    assert got["name"] == got["plain"] == choose_fusion(means) == "rrf_k60"
    assert got["safe"] == "dense" and got["warning"] is None
    mean, low, high = got["intervals"]["rrf_k60"]
    assert 0 < low < mean < high


def test_too_few_questions_keep_the_safe_choice_and_warn_how_many_would_do():
    from dpr_lib.fusion import choose_with_evidence

    rng = np.random.default_rng(3)
    # a small true gain of a fusion, on 8 questions: the plain rule would take noise for it
    per_q = _figures(rng, 8, {"dense": {"ndcg@10": 0.5}, "bm25": {"ndcg@10": 0.3}, "rrf_k60": {"ndcg@10": 0.52}})
    per_q["rrf_k60"]["ndcg@10"] = per_q["dense"]["ndcg@10"].copy()
    per_q["rrf_k60"]["ndcg@10"][np.argmin(per_q["dense"]["ndcg@10"])] = 1.0  # better on one question only
    got = choose_with_evidence(per_q, seed=0)
    assert got["plain"] == "rrf_k60" and got["name"] == got["safe"] == "dense"
    assert got["warning"].startswith("8 questions cannot separate rrf_k60") and "questions would separate" in got["warning"]
    assert got["intervals"]["rrf_k60"][1] <= 0 < got["intervals"]["rrf_k60"][0]


def test_when_neither_single_is_told_apart_the_plain_choice_serves_with_a_warning():
    """9 questions on which dense and BM25 trade places: no single retriever is the safe one, so
    the best on them (the plain rule) serves, and the warning says which could not be separated."""
    from dpr_lib.fusion import choose_with_evidence

    rng = np.random.default_rng(4)
    per_q = _figures(rng, 9, {"dense": {"ndcg@10": 0.5}, "bm25": {"ndcg@10": 0.5}, "rrf_k60": {"ndcg@10": 0.5}})
    per_q["bm25"]["ndcg@10"] = per_q["dense"]["ndcg@10"][::-1].copy()
    per_q["rrf_k60"]["ndcg@10"] = (per_q["dense"]["ndcg@10"] + per_q["bm25"]["ndcg@10"]) / 2 + 0.01
    got = choose_with_evidence(per_q, seed=0)
    assert got["plain"] == "rrf_k60" and got["name"] == "rrf_k60"
    assert got["singles_interval"][1] <= 0
    assert got["warning"].startswith(f"9 questions cannot separate {got['safe']}") and "neither is the safe" in got["warning"]
