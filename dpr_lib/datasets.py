"""Evaluation and training data: QA and retrieval datasets, and DPR's answer matching.

- Loaders: ``load_squad`` (SQuAD JSON), ``load_dpr`` (DPR's retriever JSON / ``.qa.csv`` with a
  passages TSV), ``load_beir`` (BEIR corpus + queries + qrels; qrels with or without a header),
  ``load_dataset`` for any of them. Each writes the closed corpus the questions are asked against
  (a JSON Lines file for the corpus stage) and returns a :class:`Dataset`.
- Answer matching as DPR does it: ``normalize_tokens`` (NFD, lower case, punctuation and
  articles dropped), ``has_answer``, ``answer_keys``/``passage_key``.
- The bad-record counter shared by every reader (``skip_bad``, ``check_bad``): a few bad records
  are skipped and counted; more than MAX_BAD_FRACTION of them fail the run.

Used by the evaluation job and by training-data mining. No pyspark.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Iterator

from dpr_lib.config import join_url
from dpr_lib.errors import InputError

log = logging.getLogger("dpr_lib.datasets")

FORMATS = ("squad", "dpr", "beir")
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


def count_skipped(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def skip_bad(skipped: dict, reason: str, where: str, what: str) -> None:
    count_skipped(skipped, reason)
    if skipped[reason] <= 3:
        log.warning("skipped %s (%s): %s", where, reason, what)


def check_bad(skipped: dict, total: int, path: str) -> None:
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


def squad_paragraphs(path: str) -> Iterator[tuple[str, int, object, list]]:
    """(title, paragraph number, context, qas) of every paragraph of a SQuAD v1.1 file, in file
    order; titles with spaces for underscores. A file that is not SQuAD's shape fails naming where."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise InputError(f"{path}: data[{a}] is not a SQuAD article (no 'paragraphs' list)")
        title = str(article.get("title") or f"article {a}").replace("_", " ")
        for p, para in enumerate(article["paragraphs"]):
            if isinstance(para, dict):
                yield title, p, para.get("context"), para.get("qas") or []
            else:
                yield title, p, None, []


def load_squad(path: str, work_dir: str) -> Dataset:
    """SQuAD v1.1 JSON: every paragraph becomes a corpus document ``<title>#<paragraph no>``
    (its gold passage), every question with at least one answer a question."""
    skipped: dict[str, int] = {}
    docs, questions, total = [], [], 0
    for title, p, context, qas in squad_paragraphs(path):
        total += 1
        where = f"{title}, paragraph {p}"
        if not isinstance(context, str) or not context.strip():
            skip_bad(skipped, "paragraph_without_context", where, "no 'context' text")
            continue
        doc_id = f"{title}#{p}"
        docs.append((doc_id, title, context))
        for j, qa in enumerate(qas):
            total += 1
            qwhere = f"{where}, question {j}"
            if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
                skip_bad(skipped, "question_without_text", qwhere, "no 'question' text")
                continue
            answers = [x.get("text") for x in qa.get("answers") or [] if isinstance(x, dict)]
            answers = [x for x in answers if isinstance(x, str) and answer_keys([x])]
            if not answers:
                count_skipped(skipped, "question_without_answers")
                continue
            questions.append(Question(str(qa.get("id") or f"{title}.{p}.{j}"), qa["question"].strip(),
                                      list(dict.fromkeys(answers)), frozenset({doc_id})))
    check_bad({k: v for k, v in skipped.items() if k != "question_without_answers"}, total, path)
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
                skip_bad(skipped, "bad_columns", f"{path}:{line_no}", f"expected 2 tab-separated columns, got {len(parts)}")
                continue
            try:
                answers = ast.literal_eval(parts[1])
            except (ValueError, SyntaxError):
                skip_bad(skipped, "bad_answers", f"{path}:{line_no}", "answers are not a list literal")
                continue
            answers = [a for a in answers if isinstance(a, str) and answer_keys([a])] if isinstance(answers, list) else []
            if not answers:
                count_skipped(skipped, "question_without_answers")
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
                skip_bad(skipped, "question_without_text", where, "no 'question' text")
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
                count_skipped(skipped, "question_without_answers")
                continue
            questions.append(Question(str(rec.get("id") or rec.get("qid") or i), rec["question"].strip(), answers,
                                      frozenset(gold)))
    check_bad({k: v for k, v in skipped.items() if k != "question_without_answers"}, total, path)
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
                skip_bad(skipped, "doc_without_text", f"corpus.jsonl:{line_no}", "no 'text'")
                continue
            doc_ids.add(str(obj["_id"]))
            yield str(obj["_id"]), str(obj.get("title") or ""), text

    corpus = join_url(work_dir, "corpus.jsonl")
    if not _write_corpus(docs(), corpus):
        raise InputError(f"{path}/corpus.jsonl: empty corpus")
    queries = {}
    for line_no, obj in _read_jsonl(os.path.join(path, "queries.jsonl")):
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            skip_bad(skipped, "query_without_text", f"queries.jsonl:{line_no}", "no 'text'")
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
                skip_bad(skipped, "qrels_unknown_query", f"{qrels_path}:{line_no}", f"query id {qid!r} not in queries.jsonl")
                continue
            if did not in doc_ids:
                skip_bad(skipped, "qrels_unknown_doc", f"{qrels_path}:{line_no}", f"corpus id {did!r} not in corpus.jsonl")
                continue
            judged.setdefault(qid, {})[did] = rel
    check_bad({k: v for k, v in skipped.items() if k.startswith("qrels_")}, lines, qrels_path)
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
