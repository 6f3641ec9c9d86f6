"""The quality gate: a new version moves ``LATEST`` only if its validation figures hold against
those of the version ``LATEST`` names.

With ``index.validation_questions`` (QA pairs with answers, or BEIR-style judged queries: in
practice a judged sample of the query log) the merge job searches the complete, not yet published
version exactly as a service would (question encoder, shards, docstore) and records top-k accuracy
(a hit holds an answer, DPR's string match) or nDCG@10 (over the hits' doc ids) in the manifest's
``validation``. Before ``LATEST`` moves:

- a drop of more than ``publish.max_regression`` (absolute) against the figure in the current
  ``LATEST``'s manifest stops the publish;
- with no earlier figure, ``publish.min_validation`` (an absolute floor; 0 = none) applies.

A stopped version stays in ``versions/`` with ``rejected.json`` (the reason), ``LATEST`` is not
touched, and the job exits with :class:`QualityGateError`'s code (11); ``--force`` publishes it
anyway (recorded in the manifest's ``gate``). The nightly job goes through the same gate.

Recall against exact search is not gated by regression: the merge job picks the smallest nprobe
reaching ``index.recall_target``, so that figure moves with the nprobe step, not with quality.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import ConfigError, DprError
from dpr_lib.manifest import REJECTED

log = logging.getLogger("dpr_lib.gate")



class QualityGateError(DprError):
    """A new version's validation figures regressed: it was built but not published."""

    exit_code = 11


@dataclass
class Validation:
    """Validation data: QA pairs (``answers`` per question: top-k accuracy) or BEIR-style judged
    queries (``qrels`` {query id: {doc id: grade}}: nDCG@10 over the hits' doc ids)."""

    questions: list[str]
    answers: list[list[str]] | None = None
    qids: list[str] | None = None
    qrels: dict | None = None

    def __len__(self) -> int:
        return len(self.questions)


def read_validation_questions(cfg: Config) -> Validation:
    """``index.validation_questions``: JSON Lines ``{"question", "answers": [...]}``, DPR's
    ``question<TAB>['answer', ...]`` (.csv/.tsv), or a BEIR-format directory (``queries.jsonl`` and
    ``qrels/test.tsv``, or ``qrels/dev.tsv``) judged by doc id. Errors name the key."""
    if not cfg.publish.docstore:
        raise ConfigError("index.validation_questions needs publish.docstore=true: hits are judged by the "
                          "texts and doc ids the docstore holds")
    url = cfg.index.validation_questions
    if not url.endswith((".jsonl", ".json", ".csv", ".tsv")):
        return _read_beir(url)
    raw = _read_text(url, url)
    pairs = []
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            if url.endswith((".jsonl", ".json")):
                row = json.loads(line)
                question, answers = row["question"], row["answers"]
            else:
                question, answers = line.split("\t", 1)
                answers = ast.literal_eval(answers.strip())
            ok = isinstance(question, str) and question.strip() and isinstance(answers, list) and answers \
                and all(isinstance(a, str) for a in answers)
        except (ValueError, KeyError, TypeError, SyntaxError):
            ok = False
        if not ok:
            raise ConfigError(f"index.validation_questions: {url} line {no} is not a question with a non-empty "
                              'list of answers ({"question": ..., "answers": [...]} or question<TAB>[...])')
        pairs.append((question.strip(), answers))
    if not pairs:
        raise ConfigError(f"index.validation_questions: {url} holds no questions")
    return Validation([q for q, _ in pairs], answers=[a for _, a in pairs])


def _read_text(url: str, what: str) -> str:
    try:
        return storage.read_bytes(url, attempts=2).decode("utf-8")
    except (OSError, DprError, UnicodeDecodeError) as exc:
        raise ConfigError(f"index.validation_questions: cannot read {what}: {exc}") from None


def _read_beir(root: str) -> Validation:
    queries = {}
    for no, line in enumerate(_read_text(join_url(root, "queries.jsonl"), f"{root}/queries.jsonl").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            queries[str(row["_id"])] = row["text"].strip()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"index.validation_questions: {root}/queries.jsonl line {no} is not "
                              '{"_id": ..., "text": ...}') from None
    name = next((n for n in ("test.tsv", "dev.tsv") if storage.exists(join_url(root, "qrels", n))), "test.tsv")
    qrels: dict[str, dict[str, int]] = {}
    for no, line in enumerate(_read_text(join_url(root, "qrels", name), f"{root}/qrels/{name}").splitlines(), 1):
        parts = line.rstrip("\n").split("\t")
        if not line.strip() or (no == 1 and parts[:2] == ["query-id", "corpus-id"]):
            continue
        try:
            qid, did, grade = parts
            grade = int(grade)
        except ValueError:
            raise ConfigError(f"index.validation_questions: {root}/qrels/{name} line {no} is not "
                              "query-id<TAB>corpus-id<TAB>integer score") from None
        if qid in queries:
            qrels.setdefault(qid, {})[did] = grade
    qids = [q for q, judged in qrels.items() if any(g > 0 for g in judged.values())]
    if not qids:
        raise ConfigError(f"index.validation_questions: {root} has no query with a relevant judged document")
    return Validation([queries[q] for q in qids], qids=qids, qrels={q: qrels[q] for q in qids})


def validate_version(cfg: Config, manifest_url: str, data: Validation) -> dict:
    """The version at ``manifest_url`` searched on ``data`` as a service would: top-k accuracy
    (QA pairs) or nDCG@10 over the hits' doc ids (judged queries)."""
    from dpr_lib.datasets import has_answer
    from dpr_lib.search import Searcher

    t = time.time()
    k = cfg.index.validation_k if data.answers is not None else max(cfg.index.validation_k, 10)
    # Loaded as one search node loads it (shards memory-mapped from the local cache): the version
    # must fit one node's disk; a fleet-sharded index would validate per node group instead.
    searcher = Searcher(manifest_url, cfg.encoder, cfg.path("cache_dir"), mmap=True,
                        storage_options=cfg.storage_options(), max_k=max(k, cfg.search.max_k))
    results = []
    for start in range(0, len(data), 256):
        results += searcher.ask(data.questions[start:start + 256], k)
    if data.answers is not None:
        hit_at = np.asarray([next((i for i, h in enumerate(hits) if has_answer(f"{h.title} {h.text}", answers)), k)
                             for hits, answers in zip(results, data.answers)])
        figures = {"metric": f"top{k}_accuracy", "value": round(float((hit_at < k).mean()), 4), "k": k,
                   "top1_accuracy": round(float((hit_at < 1).mean()), 4)}
    else:
        import pytrec_eval

        run = {}
        for qid, hits in zip(data.qids, results):
            docs: dict[str, float] = {}
            for h in hits:  # a document scores as its best passage
                docs[h.doc_id] = max(docs.get(h.doc_id, -1e9), h.score)
            run[qid] = docs
        per_query = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10"}).evaluate(run)
        ndcg = float(np.mean([per_query.get(q, {}).get("ndcg_cut_10", 0.0) for q in data.qids]))
        figures = {"metric": "ndcg@10", "value": round(ndcg, 4), "k": k}
    figures.update({"questions": len(data), "source": cfg.index.validation_questions,
                    "seconds": round(time.time() - t, 2)})
    log.info("validation: %s %.4f on %d questions (%.1fs)", figures["metric"], figures["value"], len(data),
             figures["seconds"])
    return figures


def judge(new: dict, previous: dict | None, previous_version: str | None, cfg: Config) -> str:
    """'' when the version may be published, else the reason (metric and both values)."""
    if not new:
        return ""
    metric, value = new["metric"], new["value"]
    if previous and previous.get("metric") == metric and previous.get("source") == new.get("source"):
        drop = previous["value"] - value
        if drop > cfg.publish.max_regression:
            return (f"{metric} fell from {previous['value']:.4f} (version {previous_version}, which LATEST names) to "
                    f"{value:.4f} on {new['questions']} validation questions: a drop of {drop:.4f} > "
                    f"publish.max_regression={cfg.publish.max_regression}")
        return ""
    if value < cfg.publish.min_validation:
        return (f"{metric} {value:.4f} on {new['questions']} validation questions is below "
                f"publish.min_validation={cfg.publish.min_validation} (no earlier figure to compare with)")
    return ""


def reject(vurl: str, reason: str, opts: dict | None, retries: int) -> None:
    """Mark a complete version as not published, with the reason (LATEST is not touched)."""
    storage.write_bytes_atomic(join_url(vurl, REJECTED), json.dumps(
        {"reason": reason, "at": time.time()}, indent=2).encode(), opts, retries)
