"""Evaluation: retrieval accuracy of the published index against BM25 and a hybrid.

Given a QA dataset, the evaluation builds a closed corpus from it and runs the real stages on it
(shard -> encode -> index + publish), then answers every question through the loader
(:class:`dpr_lib.search.Searcher`: the manifest's question encoder + the published IVF shards) and
scores four retrievers over the same passages:

- ``bm25``: BM25 (``bm25s``, Lucene variant, English stop words and Snowball stemming) over
  ``title + text`` of each passage;
- ``dense_exact``: exact inner-product search over the Embeddings table (one Spark task per
  file, only top-k lists reach the driver), i.e. what the encoder achieves without approximation;
- ``dense_ivf``: the published IVF shards at the manifest's nprobe, i.e. what a search service
  answers; the gap to ``dense_exact`` is the index's approximation loss;
- ``hybrid``: a fusion of ``bm25`` and ``dense_ivf`` (reciprocal rank fusion by default, or a
  min-max normalised linear combination).

QA datasets (``squad``, ``dpr``) are scored with DPR's top-k accuracy: a question is answered at k
if one of its top-k passages contains an answer string, compared as tokens after DPR-style
normalisation (:func:`normalize_tokens`); where the gold paragraph is known, gold-passage recall@k
is reported too. Qrels datasets (``beir``) are scored with ``pytrec_eval`` (recall@k, MRR@10,
nDCG@10), passages mapped back to their documents by their best-ranked passage (MaxP).

Memory: the questions, their top-k lists and the BM25 index of the passages live on the driver
(an evaluation corpus is QA-sized); the embeddings never do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from dpr_lib.config import Config, join_url
from dpr_lib.errors import InputError

log = logging.getLogger("dpr_lib.evaluate")

FORMATS = ("squad", "dpr", "beir")
FUSIONS = ("rrf", "linear")
TOPS = (1, 5, 20, 100)
ARTICLES = frozenset({"a", "an", "the"})
MAX_BAD_FRACTION = 0.05  # more bad records than this (and more than MAX_BAD_ABS) fails the run
MAX_BAD_ABS = 10


# ------------------------------------------------------------------ answer matching

def normalize_tokens(text: str) -> list[str]:
    """DPR-style answer normalisation: unicode NFD, lower case, punctuation and symbols replaced by
    spaces, whitespace tokens, the articles a/an/the removed.

    Combining marks are kept (as DPR's tokenizer keeps them), so "café" matches "Café" and "CAFÉ"
    but not "cafe".
    """
    text = unicodedata.normalize("NFD", text).lower()
    chars = [" " if unicodedata.category(c)[0] in "PSZC" else c for c in text]
    return [t for t in "".join(chars).split() if t not in ARTICLES]


def answer_keys(answers: list[str]) -> list[str]:
    """Answers as space-joined normalised token strings; answers that normalise to nothing are dropped."""
    keys = []
    for a in answers:
        toks = normalize_tokens(a)
        if toks:
            keys.append(" " + " ".join(toks) + " ")
    return keys


def passage_key(text: str) -> str:
    return " " + " ".join(normalize_tokens(text)) + " "


def has_answer(passage: str, answers: list[str]) -> bool:
    """True if a normalised answer occurs as a contiguous token sequence of the normalised passage."""
    key = passage_key(passage)
    return any(a in key for a in answer_keys(answers))


# ------------------------------------------------------------------ datasets

@dataclass
class Question:
    qid: str
    text: str
    answers: list[str] = field(default_factory=list)
    gold: frozenset = frozenset()  # doc_ids of the gold paragraph(s)/passage(s), when known


@dataclass
class Dataset:
    name: str
    kind: str                     # "qa" (answer strings) or "qrels" (relevance judgements)
    corpus_url: str               # input of the corpus stage
    corpus_format: str
    questions: list[Question]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def _count(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _bad(skipped: dict, reason: str, where: str, what: str) -> None:
    _count(skipped, reason)
    if skipped[reason] <= 3:
        log.warning("skipped %s (%s): %s", where, reason, what)


def _check_bad(skipped: dict, total: int, path: str) -> None:
    bad = sum(skipped.values())
    if bad > MAX_BAD_ABS and bad > MAX_BAD_FRACTION * max(1, total):
        raise InputError(f"{path}: {bad} of {total} records are bad ({skipped}); is this the announced format?")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputError(f"dataset not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None


def _write_corpus(docs, path: str) -> int:
    """Write (doc_id, title, text) records as the corpus stage's JSONL; returns the count."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for doc_id, title, text in docs:
            fh.write(json.dumps({"id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


def load_squad(path: str, work_dir: str) -> Dataset:
    """SQuAD v1.1 JSON: every paragraph becomes a corpus document ``<title>#<paragraph no>``
    (its gold passage), every question with at least one answer a question."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    skipped: dict[str, int] = {}
    docs, questions, total = [], [], 0
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise InputError(f"{path}: data[{a}] is not a SQuAD article (no 'paragraphs' list)")
        title = str(article.get("title") or f"article {a}").replace("_", " ")
        for p, para in enumerate(article["paragraphs"]):
            total += 1
            where = f"data[{a}].paragraphs[{p}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                _bad(skipped, "paragraph_without_context", where, "no 'context' text")
                continue
            doc_id = f"{title}#{p}"
            docs.append((doc_id, title, context))
            for j, qa in enumerate(para.get("qas") or []):
                total += 1
                qwhere = f"{where}.qas[{j}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
                    _bad(skipped, "question_without_text", qwhere, "no 'question' text")
                    continue
                answers = [x.get("text") for x in qa.get("answers") or [] if isinstance(x, dict)]
                answers = [x for x in answers if isinstance(x, str) and answer_keys([x])]
                if not answers:
                    _count(skipped, "question_without_answers")
                    continue
                questions.append(Question(str(qa.get("id") or f"{a}.{p}.{j}"), qa["question"].strip(),
                                          list(dict.fromkeys(answers)), frozenset({doc_id})))
    _check_bad({k: v for k, v in skipped.items() if k != "question_without_answers"}, total, path)
    corpus = join_url(work_dir, "corpus.jsonl")
    if not _write_corpus(docs, corpus):
        raise InputError(f"{path}: the dataset has no paragraphs: empty corpus")
    return Dataset(os.path.basename(path), "qa", corpus, "jsonl", questions, skipped=skipped)


def _read_qa_tsv(path: str, skipped: dict) -> list[Question]:
    """DPR's ``*.qa.csv``: question <TAB> python-literal list of answers, no header."""
    import ast

    questions = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                _bad(skipped, "bad_columns", f"{path}:{line_no}", f"expected 2 tab-separated columns, got {len(parts)}")
                continue
            try:
                answers = ast.literal_eval(parts[1])
            except (ValueError, SyntaxError):
                _bad(skipped, "bad_answers", f"{path}:{line_no}", "answers are not a list literal")
                continue
            answers = [a for a in answers if isinstance(a, str) and answer_keys([a])] if isinstance(answers, list) else []
            if not answers:
                _count(skipped, "question_without_answers")
                continue
            questions.append(Question(f"q{line_no}", parts[0].strip(), answers))
    return questions


def load_dpr(path: str, work_dir: str, passages: str | None = None) -> Dataset:
    """DPR retriever data: a JSON list of {question, answers, positive_ctxs, ...} (or a ``.qa.csv``
    / ``.tsv`` of question and answers), plus a passages file (DPR TSV ``id, text, title`` or
    JSONL). Without a passages file the corpus is every context named in the JSON."""
    skipped: dict[str, int] = {}
    if path.endswith((".csv", ".tsv")):
        questions = _read_qa_tsv(path, skipped)
        if passages is None:
            raise InputError(f"{path}: a question/answer TSV needs --passages (DPR's psgs_w100.tsv or JSONL)")
        total = len(questions) + sum(skipped.values())
        contexts = {}
    else:
        data = _load_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: not DPR retriever JSON (expected a list of {{question, answers, ...}})")
        questions, contexts, total = [], {}, len(data)
        for i, rec in enumerate(data):
            where = f"{path}[{i}]"
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
                _bad(skipped, "question_without_text", where, "no 'question' text")
                continue
            answers = [a for a in rec.get("answers") or [] if isinstance(a, str) and answer_keys([a])]
            gold = set()
            for key in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
                for ctx in rec.get(key) or []:
                    if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
                        continue
                    cid = str(ctx.get("passage_id") or ctx.get("psg_id") or ctx.get("id") or "")
                    if not cid:
                        continue
                    contexts.setdefault(cid, (cid, str(ctx.get("title") or ""), ctx["text"]))
                    if key == "positive_ctxs":
                        gold.add(cid)
            if not answers:
                _count(skipped, "question_without_answers")
                continue
            questions.append(Question(str(rec.get("id") or rec.get("qid") or i), rec["question"].strip(), answers,
                                      frozenset(gold)))
    _check_bad({k: v for k, v in skipped.items() if k != "question_without_answers"}, total, path)
    if passages is not None:
        if not os.path.exists(passages):
            raise InputError(f"passages file not found: {passages}")
        corpus, fmt = os.path.abspath(passages), "auto"
    else:
        corpus, fmt = join_url(work_dir, "corpus.jsonl"), "jsonl"
        if not _write_corpus(contexts.values(), corpus):
            raise InputError(f"{path}: no contexts with a passage_id and no --passages file: empty corpus")
    return Dataset(os.path.basename(path), "qa", corpus, fmt, questions, skipped=skipped)


def _read_jsonl(path: str):
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"not found: {path}") from None
    with fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "_id" not in obj:
                raise InputError(f"{path}, line {line_no}: expected a JSON object with '_id'")
            yield line_no, obj


def load_beir(path: str, work_dir: str, qrels: str | None = None) -> Dataset:
    """A BEIR dataset directory: corpus.jsonl (_id, title, text), queries.jsonl (_id, text) and
    qrels/test.tsv (query-id, corpus-id, score; header line), or ``qrels`` naming the TSV."""
    if not os.path.isdir(path):
        raise InputError(f"{path}: a BEIR dataset is a directory with corpus.jsonl, queries.jsonl and qrels/")
    qrels_path = qrels or os.path.join(path, "qrels", "test.tsv")
    skipped: dict[str, int] = {}
    doc_ids: set[str] = set()

    def docs():
        for line_no, obj in _read_jsonl(os.path.join(path, "corpus.jsonl")):
            text = obj.get("text")
            if not isinstance(text, str) or not text.strip():
                _bad(skipped, "doc_without_text", f"corpus.jsonl:{line_no}", "no 'text'")
                continue
            doc_ids.add(str(obj["_id"]))
            yield str(obj["_id"]), str(obj.get("title") or ""), text

    corpus = join_url(work_dir, "corpus.jsonl")
    if not _write_corpus(docs(), corpus):
        raise InputError(f"{path}/corpus.jsonl: empty corpus")
    queries = {}
    for line_no, obj in _read_jsonl(os.path.join(path, "queries.jsonl")):
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            _bad(skipped, "query_without_text", f"queries.jsonl:{line_no}", "no 'text'")
            continue
        queries[str(obj["_id"])] = obj["text"].strip()
    if not os.path.exists(qrels_path):
        raise InputError(f"qrels file not found: {qrels_path}")
    judged: dict[str, dict[str, int]] = {}
    lines = 0
    with open(qrels_path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if line_no == 1 and parts[:2] == ["query-id", "corpus-id"]:
                continue
            if not line.strip():
                continue
            lines += 1
            if len(parts) != 3:
                raise InputError(f"{qrels_path}, line {line_no}: expected query-id, corpus-id, score "
                                 f"(tab-separated), got {len(parts)} columns")
            qid, did, score = parts
            try:
                rel = int(score)
            except ValueError:
                raise InputError(f"{qrels_path}, line {line_no}: score {score!r} is not an integer") from None
            if qid not in queries:
                _bad(skipped, "qrels_unknown_query", f"{qrels_path}:{line_no}", f"query id {qid!r} not in queries.jsonl")
                continue
            if did not in doc_ids:
                _bad(skipped, "qrels_unknown_doc", f"{qrels_path}:{line_no}", f"corpus id {did!r} not in corpus.jsonl")
                continue
            judged.setdefault(qid, {})[did] = rel
    _check_bad({k: v for k, v in skipped.items() if k.startswith("qrels_")}, lines, qrels_path)
    questions = [Question(qid, queries[qid], gold=frozenset(d for d, r in rel.items() if r > 0))
                 for qid, rel in judged.items() if any(r > 0 for r in rel.values())]
    return Dataset(os.path.basename(os.path.normpath(path)), "qrels", corpus, "jsonl", questions, judged, skipped)


def load_dataset(fmt: str, path: str, work_dir: str, passages: str | None = None,
                 qrels: str | None = None) -> Dataset:
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "squad":
        ds = load_squad(path, work_dir)
    elif fmt == "dpr":
        ds = load_dpr(path, work_dir, passages)
    else:
        ds = load_beir(path, work_dir, qrels)
    if not ds.questions:
        raise InputError(f"{path}: no usable questions (skipped: {ds.skipped or 'none'})")
    return ds


# ------------------------------------------------------------------ retrievers

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


def fuse(runs: list[tuple[np.ndarray, np.ndarray]], k: int, method: str = "rrf", rrf_k: int = 60,
         weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked lists (scores [q, k_i], pids [q, k_i]; pid -1 = no hit) into one top-k.

    ``rrf``: sum of 1 / (rrf_k + rank), rank from 1 (Cormack et al., 2009). ``linear``: weighted
    sum of per-query min-max normalised scores, a pid missing from a list scoring 0 there.
    Ties are broken by pid.
    """
    if method not in FUSIONS:
        raise InputError(f"fusion must be one of {', '.join(FUSIONS)}, got {method!r}")
    weights = weights or [1.0] * len(runs)
    nq = runs[0][1].shape[0]
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_p = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        acc: dict[int, float] = {}
        for (scores, pids), w in zip(runs, weights):
            valid = pids[q] >= 0
            p, s = pids[q][valid], scores[q][valid].astype(np.float64)
            if method == "rrf":
                contrib = w / (rrf_k + np.arange(1, len(p) + 1))
            else:
                span = s.max() - s.min() if len(s) else 0.0
                contrib = w * ((s - s.min()) / span if span > 0 else np.ones_like(s))
            for pid, c in zip(p.tolist(), contrib.tolist()):
                acc[pid] = acc.get(pid, 0.0) + c
        ranked = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (pid, score) in enumerate(ranked):
            out_p[q, j], out_s[q, j] = pid, score
    return out_s, out_p


# ------------------------------------------------------------------ metrics

def first_hit_ranks(pids: np.ndarray, hit) -> np.ndarray:
    """1-based rank of each query's first pid for which ``hit(q, pid)`` holds; 0 when none."""
    ranks = np.zeros(len(pids), np.int64)
    for q, row in enumerate(pids):
        for r, pid in enumerate(row.tolist(), 1):
            if pid >= 0 and hit(q, pid):
                ranks[q] = r
                break
    return ranks


def accuracy_curve(ranks: np.ndarray, k_max: int) -> list[float]:
    """Top-k accuracy for k = 1..k_max from first-hit ranks (0 = never)."""
    found = ranks[ranks > 0]
    counts = np.bincount(found, minlength=k_max + 1)[1:k_max + 1]
    return (np.cumsum(counts) / max(1, len(ranks))).round(4).tolist()


def qa_metrics(passages: Passages, questions: list[Question], pids: np.ndarray, k_max: int) -> dict:
    keys = [answer_keys(q.answers) for q in questions]
    ranks = first_hit_ranks(pids, lambda q, pid: any(a in passages.key(pid) for a in keys[q]))
    curve = accuracy_curve(ranks, k_max)
    out = {f"top{k}": curve[min(k, k_max) - 1] for k in TOPS}
    if all(q.gold for q in questions):
        gold_ranks = first_hit_ranks(pids, lambda q, pid: passages.doc_id(pid) in questions[q].gold)
        gold_curve = accuracy_curve(gold_ranks, k_max)
        out.update({f"gold_recall@{k}": gold_curve[min(k, k_max) - 1] for k in TOPS})
    return {"metrics": out, "curve": curve}


def doc_run(passages: Passages, questions: list[Question], pids: np.ndarray) -> dict[str, dict[str, float]]:
    """Passage top-k -> a document run (MaxP: a document ranks at its best passage's rank); the
    score is a decreasing function of rank so trec_eval's tie-breaking cannot reorder it."""
    run = {}
    for q, row in zip(questions, pids):
        docs: dict[str, float] = {}
        for r, pid in enumerate(row.tolist()):
            d = passages.doc_id(pid) if pid >= 0 else None
            if d is not None and d not in docs:
                docs[d] = float(len(row) - r)
        run[q.qid] = docs
    return run


def qrels_metrics(passages: Passages, ds: Dataset, pids: np.ndarray, k_max: int) -> dict:
    import pytrec_eval

    qrels = {q.qid: ds.qrels[q.qid] for q in ds.questions}
    run = doc_run(passages, ds.questions, pids)
    cutoffs = ",".join(str(k) for k in range(1, k_max + 1))
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"recall.{cutoffs}", "ndcg_cut.10"}).evaluate(run)
    top10 = {qid: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for qid, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)

    def mean(measure: str, results=per_query) -> float:
        return round(float(np.mean([results.get(q.qid, {}).get(measure, 0.0) for q in ds.questions])), 4)

    curve = [mean(f"recall_{k}") for k in range(1, k_max + 1)]
    out = {f"recall@{k}": curve[min(k, k_max) - 1] for k in TOPS}
    out["mrr@10"] = mean("recip_rank", rr)
    out["ndcg@10"] = mean("ndcg_cut_10")
    return {"metrics": out, "curve": curve}


# ------------------------------------------------------------------ report

LABELS = {"bm25": "BM25", "dense_exact": "dense, exact search", "dense_ivf": "dense, published IVF shards",
          "hybrid": "hybrid (BM25 + dense IVF)"}


def report_markdown(report: dict) -> str:
    metrics = list(next(iter(report["retrievers"].values())).keys())
    lines = [f"# Retrieval evaluation: {report['dataset']}", "",
             f"{report['n_questions']} questions over {report['n_passages']} passages; encoder "
             f"`{report['encoder'].get('model_id')}` ({report['encoder'].get('id')}); index "
             f"`{report['index']['factory']}`, nprobe {report['index']['nprobe']} (recall@"
             f"{report['index']['recall_k']} vs exact {report['index']['recall']}); hybrid = "
             f"{report['hybrid']['fusion']}; {report['seconds']} s.", "",
             "| retriever | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, m in report["retrievers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in metrics) + " |")
    if report.get("skipped"):
        lines += ["", "Skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[float]], path: str, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=LABELS.get(name, name), linewidth=1.8)
    ax.set_xscale("log")
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ the job

def evaluate(spark, cfg: Config, dataset: str, fmt: str, out_dir: str, passages: str | None = None,
             qrels: str | None = None, fusion: str = "rrf", rrf_k: int = 60, alpha: float = 0.5,
             k_max: int = 100) -> dict:
    """Build a closed corpus from ``dataset``, run the stages on it, score every retriever and
    write report.json, report.md and topk.png to ``out_dir``. Returns the report.

    ``spark`` is a SparkSession or a function returning one (called once the dataset has been
    read and checked, so bad input fails before a JVM starts)."""
    from dpr_lib import index as ix
    from dpr_lib import storage
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages, get_encoder, resolve_spec
    from dpr_lib.index import build_index
    from dpr_lib.search import Searcher
    from dpr_lib.spark import task_errors

    if fusion not in FUSIONS:
        raise InputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1], got {alpha}")
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    work = os.path.join(out_dir, "work")
    os.makedirs(work, exist_ok=True)
    ds = load_dataset(fmt, dataset, work, passages, qrels)
    log.info("evaluation of %s: %d questions (skipped %s)", ds.name, len(ds.questions), ds.skipped or "none")
    if callable(spark):
        spark = spark()
    cfg = dataclasses.replace(
        cfg, paths=dataclasses.replace(cfg.paths, work_dir=work),
        corpus=dataclasses.replace(cfg.corpus, input=ds.corpus_url, format=ds.corpus_format,
                                   default_corpus_limit=0))
    timings = {}
    t = time.time()
    corpus_stats = shard_corpus(spark, cfg)
    encode_stats = encode_passages(spark, cfg)
    timings["corpus_encode"] = round(time.time() - t, 1)
    t = time.time()
    texts = [q.text for q in ds.questions]
    qspec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options())
    log.info("encoding %d questions with %s", len(texts), qspec.fingerprint()["model_id"])
    encoder = get_encoder(qspec)
    qvecs = np.concatenate([encoder.encode(None, texts[i:i + 1024]) for i in range(0, len(texts), 1024)])
    timings["encode_questions"] = round(time.time() - t, 1)
    t = time.time()
    # The index's recall (and so its nprobe) is measured on these questions, not on stored vectors.
    manifest = build_index(spark, cfg, question_vectors=qvecs)
    timings["index"] = round(time.time() - t, 1)

    table = Passages(cfg.path("passages"))
    if not len(table):
        raise InputError(f"{dataset}: the corpus stage produced no passages (rejects: {corpus_stats['rejects']})")
    k = min(k_max, len(table))
    searcher = Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir"),
                        storage_options=cfg.storage_options(), max_k=max(k, cfg.search.max_k))

    runs = {}
    t = time.time()
    runs["bm25"] = bm25_topk(table, texts, k)
    timings["bm25"] = round(time.time() - t, 1)
    t = time.time()
    with task_errors():
        runs["dense_exact"] = ix.exact_topk(spark, storage.list_files(cfg.path("embeddings"), ".parquet"), qvecs, k,
                                            manifest.dim)
    timings["dense_exact"] = round(time.time() - t, 1)
    t = time.time()
    runs["dense_ivf"] = searcher.index.search(qvecs, k)
    timings["dense_ivf"] = round(time.time() - t, 1)
    weights = [1.0 - alpha, alpha] if fusion == "linear" else [1.0, 1.0]
    runs["hybrid"] = fuse([runs["bm25"], runs["dense_ivf"]], k, fusion, rrf_k, weights)

    t = time.time()
    scored = {name: (qa_metrics(table, ds.questions, pids, k) if ds.kind == "qa"
                     else qrels_metrics(table, ds, pids, k)) for name, (_, pids) in runs.items()}
    timings["score"] = round(time.time() - t, 1)
    ivf_recall = ix.recall_at_k(runs["dense_ivf"][1][:, :10], runs["dense_exact"][1][:, :10])
    report = {
        "dataset": ds.name,
        "dataset_path": os.path.abspath(dataset),
        "format": fmt,
        "kind": ds.kind,
        "n_questions": len(ds.questions),
        "n_passages": len(table),
        "n_documents": corpus_stats.get("docs"),
        "retrievers": {name: s["metrics"] for name, s in scored.items()},
        "encoder": manifest.encoder,
        "question_encoder": manifest.question_encoder,
        "index": {"version": manifest.version, "factory": manifest.factory, "nprobe": searcher.index.nprobe,
                  "recall_k": 10, "recall": round(ivf_recall, 4)},
        "hybrid": {"fusion": fusion, "of": ["bm25", "dense_ivf"],
                   **({"rrf_k": rrf_k} if fusion == "rrf" else {"alpha_dense": alpha})},
        "skipped": ds.skipped,
        "rejects": corpus_stats.get("rejects", 0),
        "curves": {name: s["curve"] for name, s in scored.items()},
        "work_dir": work,
        "timings": timings,
        "encode_passages_per_s": encode_stats.get("passages_per_s"),
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report_markdown(report))
    ylabel = "top-k accuracy (answer in a top-k passage)" if ds.kind == "qa" else "recall@k"
    plot_curves(report["curves"], os.path.join(out_dir, "topk.png"), f"{ds.name}: {len(ds.questions)} questions",
                ylabel)
    log.info("evaluation written to %s (%.1fs)", out_dir, report["seconds"])
    return report
