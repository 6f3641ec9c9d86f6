"""BM25 over a closed corpus, the evaluation's sparse baseline: the Passages table read with
pyarrow (:class:`Passages`) and ``bm25s`` (Lucene variant, English stop words, Snowball stemming)
over ``title + text``. Memory: the corpus and its index live in this process (QA-sized corpora).
"""

from __future__ import annotations

import numpy as np

from dpr_lib.datasets import passage_key


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
