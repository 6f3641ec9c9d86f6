"""The sparse side: its BM25 equals bm25s' (the evaluation's), shards merge exactly, files round-trip."""

import numpy as np
import pytest

from dpr_lib.bm25 import tokens as bm25_tokens
from dpr_lib.postings import WINDOW
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


# ---------------------------------------------------------------- pruned scoring == exhaustive

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dpr_lib.errors import IndexIntegrityError  # noqa: E402

WORDS = ["apple", "river", "castle", "engine", "violin", "harbor", "glacier", "lantern", "meadow", "orbit",
         "pepper", "quartz", "saddle", "timber", "velvet", "walnut", "yonder", "zephyr", "basalt", "cobalt"]


def random_corpus(rng, n_docs: int, vocab: int, dup_every: int) -> list[str]:
    """Zipf-distributed words (long posting lists over many blocks, short ones), varied lengths,
    and exact duplicates every ``dup_every`` documents (equal scores: ties broken by pid)."""
    words = WORDS[:vocab]
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    texts = []
    for i in range(n_docs):
        if dup_every and i % dup_every == dup_every - 1:
            texts.append(texts[i - 1])
            continue
        texts.append(" ".join(rng.choice(words, size=int(rng.integers(1, 40)), p=p)))
    return texts


def pair(tmp_path, pids, texts, num_shards, dead=None, vocab=None, stats=None, window=WINDOW):
    built = build_local(str(tmp_path), pids, texts, lambda p: p % num_shards, num_shards)
    docs, avg = stats or (built["docs"], built["avg_doc_len"])
    make = [SparseIndex(vocab or built["vocab"], built["shards"], docs, avg, dead=dead, exact=exact, window=window)
            for exact in (False, True)]
    return make


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_docs=st.integers(1, 900), vocab=st.integers(2, 20),
       shards=st.integers(1, 3), k=st.sampled_from([1, 3, 10, 100]), dup_every=st.sampled_from([0, 2, 7]),
       dead_fraction=st.sampled_from([0.0, 0.1, 0.5]), window=st.sampled_from([64, 128, WINDOW]))
def test_pruned_top_k_equals_the_exhaustive_scorer(tmp_path_factory, seed, n_docs, vocab, shards, k, dup_every,
                                                   dead_fraction, window):
    """Windows of 64 and 128 rows: many windows per shard, rows of one block in several windows."""
    rng = np.random.default_rng(seed)
    texts = random_corpus(rng, n_docs, vocab, dup_every)
    pids = rng.permutation(10 * n_docs)[:n_docs].astype(np.int64)
    dead_pids = pids[rng.random(n_docs) < dead_fraction]
    pruned, exact = pair(tmp_path_factory.mktemp("c"), pids, texts, shards, dead=[dead_pids] * shards, window=window)
    questions = [" ".join(rng.choice(WORDS[:vocab], size=int(rng.integers(1, 8)))) for _ in range(12)]
    ps, pp = pruned.search(questions, k)
    es, ep = exact.search(questions, k)
    np.testing.assert_array_equal(pp, ep)
    np.testing.assert_array_equal(ps, es)
    assert not np.isin(pp[pp >= 0], dead_pids).any()


def test_pruned_equals_exhaustive_on_real_text_with_ties(tmp_path):
    texts = CORPUS * 40  # every passage 40 times: long lists, and every score tied 40 ways
    pids = np.arange(len(texts), dtype=np.int64)[::-1].copy()
    for window in (64, WINDOW):
        pruned, exact = pair(tmp_path / str(window), pids, texts, 2, window=window)
        for k in (1, 5, 39, 41, 100):
            ps, pp = pruned.search(QUESTIONS, k)
            es, ep = exact.search(QUESTIONS, k)
            np.testing.assert_array_equal(pp, ep)
            np.testing.assert_array_equal(ps, es)
    # ties go to the smaller pid
    _, top = pruned.search(["eiffel"], 40)
    assert list(top[0][:3]) == sorted(top[0][:3])


def test_a_delta_with_tombstones_scores_as_a_fresh_build_of_the_live_passages(tmp_path):
    """Base shards with some pids tombstoned + a delta shard holding their new text, under the live
    corpus's statistics (df, N, avgdl changed by the delta: the stored block bounds stay safe)."""
    rng = np.random.default_rng(3)
    base_texts = random_corpus(rng, 700, 12, 5)
    base_pids = np.arange(700, dtype=np.int64)
    changed = base_pids[rng.random(700) < 0.2]
    delta_texts = [" ".join(rng.choice(WORDS[:12], size=30)) for _ in changed]  # longer: avgdl moves
    live = dict(zip(base_pids.tolist(), base_texts))
    live.update(zip(changed.tolist(), delta_texts))
    fresh = build_local(str(tmp_path / "fresh"), np.array(list(live)), list(live.values()))
    base = build_local(str(tmp_path / "base"), base_pids, base_texts, lambda p: p % 2, 2)
    delta = build_local(str(tmp_path / "delta"), changed, delta_texts)
    questions = [" ".join(rng.choice(WORDS[:12], size=int(rng.integers(1, 6)))) for _ in range(30)]
    want = SparseIndex(fresh["vocab"], fresh["shards"], fresh["docs"], fresh["avg_doc_len"], exact=True)
    for exact in (False, True):
        merged = SparseIndex(fresh["vocab"], base["shards"] + delta["shards"], fresh["docs"], fresh["avg_doc_len"],
                             dead=[changed, changed, None], exact=exact)
        for k in (10, 100):
            ws, wp = want.search(questions, k)
            gs, gp = merged.search(questions, k)
            np.testing.assert_array_equal(gp, wp)
            np.testing.assert_allclose(gs, ws, rtol=1e-6)


def test_a_corrupted_postings_block_is_refused_naming_the_file(tmp_path):
    texts = CORPUS * 30
    built = build_local(str(tmp_path), np.arange(len(texts), dtype=np.int64), texts)
    path = built["shards"][0]
    f = ArrayFile(path)
    # the first block of the term "tower": flip one bit of its packed words
    term = SparseIndex(built["vocab"], [path], built["docs"], built["avg_doc_len"]).query_terms(["tower"])[0][0][0]
    t = int(np.searchsorted(f["terms"], term))
    block = int(f["term_blocks"][t])
    word = int(f["block_words"][block])
    offset = f.offsets["packed"] + 4 * word
    del f
    raw = bytearray(open(path, "rb").read())
    raw[offset] ^= 0x10
    open(path, "wb").write(bytes(raw))
    for exact in (False, True):
        index = SparseIndex(built["vocab"], [path], built["docs"], built["avg_doc_len"], exact=exact)
        with pytest.raises(IndexIntegrityError, match=rf"{path}: postings block {block} fails its checksum"):
            index.search(["tower"], 10)
    # a truncated block table is refused when the file is opened
    raw = bytearray(open(path, "rb").read())
    f = ArrayFile(path)
    bad = ArrayFile.write
    arrays = {n: np.asarray(a) for n, a in f.arrays.items()}
    arrays["block_words"] = arrays["block_words"][:-1]
    bad(str(tmp_path / "short.bm25"), arrays, f.meta)
    with pytest.raises(IndexIntegrityError, match="short.bm25: the sparse shard's block tables are inconsistent"):
        SparseIndex(built["vocab"], [str(tmp_path / "short.bm25")], built["docs"], built["avg_doc_len"])


def test_shards_written_before_compression_are_still_read(tmp_path):
    from dpr_lib.bm25 import ANALYZER, analyze
    from dpr_lib.sparse import inverted, pack_docs, unpack_docs

    pids = np.arange(len(CORPUS), dtype=np.int64)
    built = build_local(str(tmp_path / "new"), pids, CORPUS)
    row = next(pack_docs(pids, np.zeros(len(pids), np.int64), analyze(CORPUS)))
    old = str(tmp_path / "old.bm25")
    ArrayFile.write(old, inverted(*unpack_docs([row])), {"kind": "bm25-shard", "shard": 0, "analyzer": ANALYZER})
    a = SparseIndex(built["vocab"], built["shards"], built["docs"], built["avg_doc_len"]).search(QUESTIONS, 5)
    b = SparseIndex(built["vocab"], [old], built["docs"], built["avg_doc_len"]).search(QUESTIONS, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_an_array_file_holds_one_descriptor_whatever_its_arrays(tmp_path, monkeypatch):
    """Memory-mapped as one mapping: a shard file of 15 arrays costs a service one open file, not 15."""
    import os

    texts = CORPUS * 30
    built = build_local(str(tmp_path), np.arange(len(texts), dtype=np.int64), texts)
    from dpr_lib import sparse

    before = len(os.listdir("/proc/self/fd"))
    small = [ArrayFile(built["shards"][0]) for _ in range(5)]  # under MMAP_MIN_BYTES: read, no descriptor
    assert len(os.listdir("/proc/self/fd")) == before
    monkeypatch.setattr(sparse, "MMAP_MIN_BYTES", 0)
    files = [ArrayFile(built["shards"][0]) for _ in range(5)]
    assert len(files[0].arrays) >= 10
    assert len(os.listdir("/proc/self/fd")) - before == 5
    for f in (small[0], files[0]):
        assert all(not a.flags.writeable for a in f.arrays.values() if a.size)
        assert all(np.array_equal(f[n], small[0][n]) for n in f.arrays)
    # a truncated file is refused naming it
    raw = open(built["shards"][0], "rb").read()
    short = tmp_path / "short.bm25"
    short.write_bytes(raw[: len(raw) - 64])
    with pytest.raises(IndexIntegrityError, match="short.bm25: array .* runs past the end of the file"):
        ArrayFile(str(short))
