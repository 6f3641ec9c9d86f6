"""The sparse side: its BM25 equals bm25s' (the evaluation's), shards merge exactly, files round-trip."""

import numpy as np
import pytest

from dpr_lib.bm25 import tokens as bm25_tokens
from dpr_lib.sparse import ArrayFile, SparseIndex, build_local

CORPUS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Paris is the capital and most populous city of France.",
    "The Great Wall of China is a series of fortifications built across northern China.",
    "Gustave Eiffel's company designed and built the tower for the 1889 World's Fair.",
    "Berlin is the capital of Germany; its wall fell in 1989.",
    "The Louvre in Paris is the world's most visited museum, home of the Mona Lisa.",
    "Tower Bridge crosses the River Thames in London, close to the Tower of London.",
    "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    "",
    "Towers towers TOWER: a tower of towers in a towering city.",
]
QUESTIONS = ["who built the eiffel tower", "capital of france", "great wall china", "highest mountain",
             "tower of london bridge", "zzzz unknownword"]


def bm25s_topk(texts, questions, k):
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=__import__("Stemmer").Stemmer("english"),
                                   show_progress=False), show_progress=False)
    scores = np.zeros((len(questions), len(texts)), np.float32)
    for i, toks in enumerate(bm25_tokens(questions)):
        vocab = retriever.vocab_dict
        ids = [vocab[t] for t in toks if t in vocab]
        scores[i] = retriever.get_scores(ids) if ids else 0.0
    return scores


@pytest.mark.parametrize("num_shards", [1, 3])
def test_bm25_scores_equal_bm25s_and_shards_merge_exactly(tmp_path, num_shards):
    pids = np.arange(100, 100 + len(CORPUS), dtype=np.int64) * 7919
    built = build_local(str(tmp_path), pids, CORPUS, lambda p: p % num_shards, num_shards)
    assert len(built["shards"]) == num_shards
    index = SparseIndex(built["vocab"], built["shards"], built["docs"], built["avg_doc_len"])
    k = len(CORPUS)
    scores, found = index.search(QUESTIONS, k)
    reference = bm25s_topk(CORPUS, QUESTIONS, k)
    for q in range(len(QUESTIONS)):
        got = {int(p): float(s) for p, s in zip(found[q], scores[q]) if p >= 0}
        want = {int(pids[i]): float(reference[q, i]) for i in range(len(CORPUS)) if reference[q, i] > 0}
        assert set(got) == set(want), QUESTIONS[q]
        for pid, s in want.items():
            assert got[pid] == pytest.approx(s, rel=1e-5), (QUESTIONS[q], pid)
        assert list(scores[q][:len(got)]) == sorted(scores[q][:len(got)], reverse=True)
    assert (found[-1] == -1).all() and np.isneginf(scores[-1]).all()  # no known term: no hit
    # The top hit of the Eiffel question is the passage about who built it.
    assert found[0, 0] == pids[3]


def test_a_shard_subset_keeps_corpus_wide_scores(tmp_path):
    pids = np.arange(len(CORPUS), dtype=np.int64)
    built = build_local(str(tmp_path), pids, CORPUS, lambda p: p % 2, 2)
    whole = SparseIndex(built["vocab"], built["shards"], built["docs"], built["avg_doc_len"])
    half = SparseIndex(built["vocab"], built["shards"][:1], built["docs"], built["avg_doc_len"])
    ws, wp = whole.search(QUESTIONS, 10)
    hs, hp = half.search(QUESTIONS, 10)
    for q in range(len(QUESTIONS)):
        even = {int(p): float(s) for p, s in zip(wp[q], ws[q]) if p >= 0 and p % 2 == 0}
        assert {int(p): float(s) for p, s in zip(hp[q], hs[q]) if p >= 0} == even


def test_array_file_round_trip_mmap_and_ram(tmp_path):
    arrays = {"a": np.arange(10, dtype=np.int64), "b": np.array([1.5, 2.5], np.float32),
              "empty": np.zeros(0, np.int32), "m": np.arange(12, dtype=np.uint16).reshape(3, 4)}
    path = str(tmp_path / "x.bm25")
    ArrayFile.write(path, arrays, {"hello": 1})
    for mmap in (True, False):
        f = ArrayFile(path, mmap)
        assert f.meta == {"hello": 1}
        for name, a in arrays.items():
            assert f[name].dtype == a.dtype and f[name].shape == a.shape
            np.testing.assert_array_equal(f[name], a)
    (tmp_path / "bad.bm25").write_bytes(b"not an array file at all")
    with pytest.raises(Exception, match="bad magic"):
        ArrayFile(str(tmp_path / "bad.bm25"))
