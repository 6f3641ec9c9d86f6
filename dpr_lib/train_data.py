"""Retrieval training data from QA datasets, mined with BM25 on Spark (DPR's biencoder format).

For every question: one positive passage (the gold paragraph's passage that contains an answer
when the gold paragraph is known, else the best-scoring BM25 passage that contains an answer) and
hard negatives (the top BM25 passages that contain no answer and are not from the gold
paragraph). Output: JSON Lines, one record per question, with DPR's fields ``question``,
``answers``, ``positive_ctxs``, ``hard_negative_ctxs``, ``negative_ctxs`` (left empty: the trainer's
random negatives are the other questions' passages in the batch) plus ``qid``. Questions without
a positive go to ``no_positive/`` with the reason, and are counted.

BM25 runs where the passages are (Lucene's formula, the tokenisation of the evaluation's bm25s:
English stop words and Snowball stemming): one pass over the Passages table counts document
frequencies of the questions' terms, a second scores each partition's passages against every
question in blocks and keeps a per-question top-k; only those candidates are shuffled. The driver
holds the questions (a QA dataset) and the questions' vocabulary, never the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

from dpr_lib import bm25, storage
from dpr_lib.bm25 import K1, B
from dpr_lib.bm25 import tokens as bm25_tokens
from dpr_lib.config import Config, join_url
from dpr_lib.errors import InputError

log = logging.getLogger("dpr_lib.train_data")

SCORE_CELLS = 16_000_000       # questions x passages scored at once in a task (64 MB of float32)


@dataclasses.dataclass
class QuestionTerms:
    """The questions as a sparse term-count matrix over their own vocabulary (shipped to tasks)."""

    vocab: dict[str, int]
    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray

    @classmethod
    def build(cls, questions: list[str]) -> QuestionTerms:
        vocab: dict[str, int] = {}
        indptr, indices, counts = [0], [], []
        for toks in bm25_tokens(questions):
            terms: dict[int, int] = {}
            for t in toks:
                col = vocab.setdefault(t, len(vocab))
                terms[col] = terms.get(col, 0) + 1
            indices += terms.keys()
            counts += terms.values()
            indptr.append(len(indices))
        return cls(vocab, np.array(indptr, np.int64), np.array(indices, np.int64), np.array(counts, np.float32))

    def matrix(self):
        import scipy.sparse as sp

        return sp.csr_matrix((self.counts, self.indices, self.indptr), shape=(len(self.indptr) - 1, len(self.vocab)))


def _term_counts(terms: QuestionTerms, texts: list[str]) -> tuple[list[dict[int, int]], np.ndarray]:
    """Per passage: counts of the questions' terms in it, and its length in tokens."""
    rows, lengths = [], np.zeros(len(texts), np.float32)
    for i, toks in enumerate(bm25_tokens(texts)):
        lengths[i] = len(toks)
        counts: dict[int, int] = {}
        for t in toks:
            col = terms.vocab.get(t)
            if col is not None:
                counts[col] = counts.get(col, 0) + 1
        rows.append(counts)
    return rows, lengths


def _blocks(rows, size: int):
    block = []
    for r in rows:
        block.append(r)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def corpus_stats(passages_df, terms: QuestionTerms) -> tuple[int, float, np.ndarray]:
    """(passages, average length, document frequency of every question term), counted on executors."""
    def count(rows):
        n, total, df = 0, 0.0, np.zeros(len(terms.vocab), np.int64)
        for block in _blocks(rows, 1024):
            counts, lengths = _term_counts(terms, [f"{r.title} {r.text}" for r in block])
            n += len(block)
            total += float(lengths.sum())
            for c in counts:
                df[list(c)] += 1
        yield n, total, df

    n, total, df = passages_df.select("title", "text").rdd.mapPartitions(count).treeReduce(
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]))
    return n, (total / n if n else 0.0), df


def score_partition(rows, terms: QuestionTerms, idf: np.ndarray, avgdl: float, k: int,
                    gold_docs: dict[str, list[int]]):
    """BM25 top-k of every question within one partition's passages, plus every (question, passage
    of its gold document) pair whatever its score. Yields (qidx, pid, score, gold)."""
    import scipy.sparse as sp

    q = terms.matrix()
    nq, nv = q.shape
    top_s = np.full((nq, k), -np.inf, np.float32)
    top_p = np.full((nq, k), -1, np.int64)
    block_size = max(64, SCORE_CELLS // max(1, nq))
    for block in _blocks(rows, block_size):
        counts, lengths = _term_counts(terms, [f"{r.title} {r.text}" for r in block])
        norm = K1 * (1.0 - B + B * lengths / max(avgdl, 1e-9))
        data, cols, ptr = [], [], [0]
        for i, c in enumerate(counts):
            tf = np.fromiter(c.values(), np.float32, len(c))
            cidx = np.fromiter(c.keys(), np.int64, len(c))
            data.append(idf[cidx] * tf / (tf + norm[i]))   # Lucene 8+ / bm25s: no (k1 + 1) factor
            cols.append(cidx)
            ptr.append(ptr[-1] + len(c))
        w = sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                           np.concatenate(cols) if cols else np.zeros(0, np.int64), np.array(ptr)),
                          shape=(len(block), nv))
        scores = (q @ w.T).toarray().astype(np.float32)       # [nq, block]
        pids = np.array([r.pid for r in block], np.int64)
        for j, r in enumerate(block):
            for qi in gold_docs.get(r.doc_id, ()):
                yield int(qi), int(r.pid), float(scores[qi, j]), True
        scores[scores <= 0.0] = -np.inf                        # no shared term: not a candidate
        both_s = np.concatenate([top_s, scores], axis=1)
        both_p = np.concatenate([top_p, np.broadcast_to(pids, scores.shape)], axis=1)
        keep = np.argpartition(-both_s, k - 1, axis=1)[:, :k] if both_s.shape[1] > k else \
            np.arange(both_s.shape[1])[None, :].repeat(nq, 0)
        top_s = np.take_along_axis(both_s, keep, 1)
        top_p = np.take_along_axis(both_p, keep, 1)
    for qi, j in zip(*np.nonzero(np.isfinite(top_s))):
        yield int(qi), int(top_p[qi, j]), float(top_s[qi, j]), False


def make_record(question, cands: list, n_hard: int) -> tuple[dict, str | None]:
    """The biencoder record of one question from its candidates (pid, score, gold, doc_id, title,
    text), and None or the reason it has no positive."""
    from dpr_lib.datasets import answer_keys, passage_key

    keys = answer_keys(question.answers)
    scored = []
    for c in sorted(cands, key=lambda c: (-c["score"], c["pid"])):
        key = passage_key(c["text"])
        scored.append((c, any(a in key for a in keys)))
    ctx = [{"title": c["title"], "text": c["text"], "passage_id": str(c["pid"]), "score": round(c["score"], 4)}
           for c, _ in scored]
    gold_pos = [i for i, (c, hit) in enumerate(scored) if hit and c["gold"]]
    any_pos = [i for i, (c, hit) in enumerate(scored) if hit and not c["gold"]]
    gold_docs = {c["doc_id"] for c in cands if c["gold"]}
    hard = [i for i, (c, hit) in enumerate(scored) if not hit and c["doc_id"] not in gold_docs][:n_hard]
    positives = gold_pos or any_pos
    record = {"qid": question.qid, "question": question.text, "answers": question.answers,
              "positive_ctxs": [ctx[i] for i in positives[:1]], "hard_negative_ctxs": [ctx[i] for i in hard],
              "negative_ctxs": []}
    if positives:
        return record, None
    if question.gold and not gold_docs:
        reason = "gold_paragraph_not_in_passages"
    elif question.gold:
        reason = "no_gold_passage_contains_an_answer"
    else:
        reason = "no_candidate_contains_an_answer"
    return record, reason


def _write_jsonl(spark, lines_rdd, url: str) -> None:
    """Write an RDD of JSON strings as a new version of the table ``url`` (part-NNNNN.jsonl files)."""
    from dpr_lib.outputs import commit_table, new_table_version

    version = new_table_version(url)
    spark.createDataFrame(lines_rdd.map(lambda s: (s,)), "value string").write.mode("overwrite").text(version)
    _name_jsonl(version)
    commit_table(url, version, suffix=".jsonl")


def _name_jsonl(version_url: str) -> None:
    """Spark's text writer names its files part-NNNNN-<id>-c000.txt; training data readers (and
    users) expect .jsonl. Renamed inside the unpublished version, before its pointer exists."""
    from dpr_lib.outputs import spark_part

    fs, path = storage.get_fs(version_url)
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".txt") and spark_part(name):
            fs.mv(p, f"{path}/{spark_part(name)}.jsonl")


def _write_records(spark, made, questions: list, n_hard: int, out: str) -> tuple[int, dict]:
    """Write the mined records (``made``: cached (reason, qidx, JSON) rows) to ``out``/data and
    those without a positive to ``out``/no_positive; (records written, {reason: count})."""
    try:
        _write_jsonl(spark, made.filter(lambda r: r[0] is None).map(lambda r: r[2]), join_url(out, "data"))
        n_ok = made.filter(lambda r: r[0] is None).count()
        reasons = dict(made.filter(lambda r: r[0] is not None).map(lambda r: (r[0], 1)).reduceByKey(
            lambda a, b: a + b).collect())
        # A question none of whose terms occurs in any passage (and without a gold passage) has no
        # candidate row at all: it is written and counted like the others (ids: QA-sized, not corpus).
        seen = set(made.map(lambda r: r[1]).collect())
        lost = [json.dumps({**make_record(q, [], n_hard)[0], "reason": "no_bm25_candidate"}, ensure_ascii=False)
                for i, q in enumerate(questions) if i not in seen]
        if lost:
            reasons["no_bm25_candidate"] = len(lost)
        if reasons:
            rejected = made.filter(lambda r: r[0] is not None).map(lambda r: r[2])
            _write_jsonl(spark, rejected.union(spark.sparkContext.parallelize(lost, 1)), join_url(out, "no_positive"))
    finally:
        made.unpersist()
    return n_ok, reasons


def _passages_table(spark, cfg: Config, ds, passages_table: str | None):
    """(cfg, table URL, corpus stats, DataFrame [pid, doc_id, title, text]) of the corpus to mine:
    an existing Passages table, or the dataset's own corpus through the corpus stage."""
    from dpr_lib.corpus import shard_corpus

    if passages_table:
        table_url = passages_table
        corpus = {"source": passages_table}
    else:
        cfg = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, input=ds.corpus_url,
                                                                    format=ds.corpus_format, default_corpus_limit=0))
        corpus = shard_corpus(spark, cfg)
        table_url = cfg.path("passages")
    pdf = spark.read.parquet(storage.resolve_table(table_url))
    missing = {"pid", "doc_id", "title", "text"} - set(pdf.columns)
    if missing:
        raise InputError(f"{table_url}: not a Passages table (missing columns {sorted(missing)})")
    return cfg, table_url, corpus, pdf.select("pid", "doc_id", "title", "text")


def build_training_data(spark, cfg: Config, dataset: str, fmt: str, out: str, passages: str | None = None,
                        passages_table: str | None = None) -> dict:
    """Mine DPR training records for every question of ``dataset`` into ``out`` (JSON Lines).

    The corpus is the dataset's own paragraphs (SQuAD; DPR JSON contexts), the ``passages`` file
    (DPR TSV / JSONL, run through the corpus stage), or an existing Passages table
    (``passages_table``). ``spark`` may be a function returning the session (called after the
    dataset has been read and checked)."""
    from pyspark.sql import functions as F

    from dpr_lib.datasets import load_dataset
    from dpr_lib.outputs import write_stats

    t0 = time.time()
    out = out.rstrip("/")
    work = join_url(out, "work")
    if storage.is_local(out):
        os.makedirs(storage.local_path(work), exist_ok=True)
    if fmt not in ("squad", "dpr"):
        raise InputError(f"--format must be squad or dpr for training data, got {fmt!r}")
    ds = load_dataset(fmt, dataset, storage.local_path(work) if storage.is_local(work) else work, passages)
    log.info("training data from %s: %d questions (skipped %s)", ds.name, len(ds.questions), ds.skipped or "none")
    if callable(spark):
        spark = spark()
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, work_dir=work))
    timings = {}
    t = time.time()
    cfg, table_url, corpus, pdf = _passages_table(spark, cfg, ds, passages_table)
    timings["corpus"] = round(time.time() - t, 1)

    t = time.time()
    terms = QuestionTerms.build([q.text for q in ds.questions])
    b_terms = spark.sparkContext.broadcast(terms)
    n, avgdl, df = corpus_stats(pdf, terms)
    if n == 0:
        raise InputError(f"{table_url}: no passages to mine")

    idf = bm25.idf(df, n).astype(np.float32)
    timings["bm25_stats"] = round(time.time() - t, 1)
    log.info("BM25 over %d passages (average %.1f tokens), %d question terms", n, avgdl, len(terms.vocab))

    t = time.time()
    k = min(cfg.train.mine_k, n)
    gold_docs: dict[str, list[int]] = {}
    for i, q in enumerate(ds.questions):
        for d in q.gold:
            gold_docs.setdefault(d, []).append(i)
    b_idf, b_gold = spark.sparkContext.broadcast(idf), spark.sparkContext.broadcast(gold_docs)

    def score(rows):
        return score_partition(rows, b_terms.value, b_idf.value, avgdl, k, b_gold.value)

    cands = spark.createDataFrame(pdf.rdd.mapPartitions(score), "qidx int, pid long, score float, gold boolean")
    cands = cands.groupBy("qidx", "pid").agg(F.max("score").alias("score"), F.max("gold").alias("gold"))
    # Only the k best per question (plus its gold passages) reach the records.
    from pyspark.sql.window import Window

    rank = F.row_number().over(Window.partitionBy("qidx").orderBy(F.desc("score"), "pid"))
    cands = cands.withColumn("rank", rank).where((F.col("rank") <= k) | F.col("gold")).drop("rank")
    grouped = cands.join(pdf, "pid").groupBy("qidx").agg(
        F.collect_list(F.struct("pid", "score", "gold", "doc_id", "title", "text")).alias("cands"))
    b_questions = spark.sparkContext.broadcast(ds.questions)
    n_hard = cfg.train.hard_negatives_kept

    def records(row):
        rec, reason = make_record(b_questions.value[row.qidx], [c.asDict() for c in row.cands], n_hard)
        return reason, row.qidx, json.dumps(rec if reason is None else {**rec, "reason": reason}, ensure_ascii=False)

    n_ok, reasons = _write_records(spark, grouped.rdd.map(records).cache(), ds.questions, n_hard, out)
    timings["mine"] = round(time.time() - t, 1)
    stats = {
        "stage": "build_training_data", "dataset": os.path.abspath(dataset) if storage.is_local(dataset) else dataset,
        "format": fmt, "questions": len(ds.questions), "records": n_ok,
        "no_positive": sum(reasons.values()), "no_positive_reasons": reasons, "skipped": ds.skipped,
        "passages": n, "passages_table": table_url, "corpus": {k_: v for k_, v in corpus.items() if k_ != "tasks"},
        "mine_k": k, "hard_negatives_kept": n_hard, "data_url": join_url(out, "data"),
        "timings": timings, "seconds": round(time.time() - t0, 1),
    }
    stats["stats_url"] = write_stats(cfg, "build_training_data", stats)
    storage.write_bytes_atomic(join_url(out, "stats.json"), json.dumps(stats, indent=2, default=str).encode())
    log.info("training data: %d records, %d questions without a positive %s -> %s (%.1fs)", n_ok,
             stats["no_positive"], reasons or "", stats["data_url"], stats["seconds"])
    return stats
