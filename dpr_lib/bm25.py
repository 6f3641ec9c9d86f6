"""BM25, the one home of it: the analyzer (lower-cased word tokens without English stop words,
Snowball-stemmed, as ``bm25s`` tokenizes; title + " " + text for passages), term hashes, ``K1``,
``B`` and idf (Lucene's variant), used by the sparse side of a version (:mod:`dpr_lib.sparse`),
the training data's hard-negative miner (:mod:`dpr_lib.train_data`) and the evaluation.

Also the evaluation's closed-corpus baseline: the Passages table read with pyarrow
(:class:`Passages`) and ``bm25s`` over it (:func:`bm25_topk`). Memory: that corpus and its index
live in this process (QA-sized corpora).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from dpr_lib.datasets import passage_key

K1, B = 1.5, 0.75              # bm25s / Lucene defaults
ANALYZER = "bm25s-en-snowball/title+text"
_STEMMER: list = []
_HASH_CACHE: dict[str, int] = {}
_HASH_CACHE_MAX = 2_000_000


def tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words, Snowball-stemmed (as bm25s tokenizes)."""
    import bm25s
    import Stemmer

    if not _STEMMER:
        _STEMMER.append(Stemmer.Stemmer("english"))
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER[0], return_ids=False, show_progress=False)


def term_hash(token: str) -> int:
    """A stable signed 64-bit hash of a token (cached per process)."""
    h = _HASH_CACHE.get(token)
    if h is None:
        h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
        if len(_HASH_CACHE) >= _HASH_CACHE_MAX:
            _HASH_CACHE.clear()
        _HASH_CACHE[token] = h
    return h


def analyze(texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per text: (term hashes int64, term frequencies int32, length in tokens)."""
    out = []
    for toks in tokens(texts):
        counts = Counter(t for t in toks if t)
        out.append((np.fromiter((term_hash(t) for t in counts), np.int64, len(counts)),
                    np.fromiter(counts.values(), np.int32, len(counts)), sum(counts.values())))
    return out


def analyze_passages(titles: list, texts: list) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """:func:`analyze` of passages as the sparse side indexes them: title + " " + text."""
    return analyze([f"{t or ''} {x or ''}" for t, x in zip(titles, texts)])


def idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    df = df.astype(np.float64)
    return np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


class Passages:
    """pid -> (doc_id, title, text) of the Passages table, read with pyarrow (closed corpus)."""

    def __init__(self, passages_url: str):
        import pyarrow.parquet as pq

        from dpr_lib import storage

        pids, self.doc_ids, self.titles, self.texts = [], [], [], []
        for url in storage.list_files(passages_url, ".parquet"):
            fs, p = storage.get_fs(url)
            with fs.open(p, "rb") as fh:
                t = pq.read_table(fh, columns=["pid", "doc_id", "title", "text"])
            pids.append(t.column("pid").to_numpy())
            self.doc_ids += t.column("doc_id").to_pylist()
            self.titles += t.column("title").to_pylist()
            self.texts += t.column("text").to_pylist()
        self.pids = np.concatenate(pids) if pids else np.zeros(0, np.int64)
        self.row_of = {int(p): i for i, p in enumerate(self.pids)}
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.pids)

    def key(self, pid: int) -> str:
        """The normalised token string of a passage's text (cached)."""
        k = self._keys.get(pid)
        if k is None:
            k = self._keys[pid] = passage_key(self.texts[self.row_of[pid]])
        return k

    def doc_id(self, pid: int) -> str | None:
        row = self.row_of.get(int(pid))
        return None if row is None else self.doc_ids[row]


def bm25_topk(passages: Passages, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    corpus = [f"{t} {x}" for t, x in zip(passages.titles, passages.texts)]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    tokens = bm25s.tokenize(questions, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    rows, scores = retriever.retrieve(tokens, k=k, show_progress=False)
    return scores.astype(np.float32), passages.pids[rows].astype(np.int64)
