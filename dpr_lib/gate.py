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


def validate_version(cfg: Config, manifest_url: str, data: Validation) -> tuple[dict, dict]:
    """The version at ``manifest_url`` searched on ``data`` as a service would (question encoder,
    shards, sparse side, docstore): top-k accuracy (QA pairs) or nDCG@10 over the hits' doc ids
    (judged queries) of dense, and, when the version has a sparse side, of bm25 and of every fusion
    candidate (:func:`dpr_lib.fusion.fusion_candidates`). Returns (figures, fusion): ``figures``
    for the manifest's ``validation`` (``value`` is dense's, ``by_mode`` each mode's), ``fusion``
    the best candidate, what ``mode: auto``/``hybrid`` will serve ({} without a sparse side)."""
    from dpr_lib.fusion import DEFAULT_FUSION, choose_fusion, choose_with_evidence, fusion_candidates
    from dpr_lib.search import Searcher

    t = time.time()
    qa = data.answers is not None
    k = cfg.index.validation_k if qa else max(cfg.index.validation_k, 10)
    # Loaded as one search node loads it (shards memory-mapped from the local cache): the version
    # must fit one node's disk; a fleet-sharded index would validate per node group instead.
    searcher = Searcher(manifest_url, cfg.encoder, cfg.path("cache_dir"), mmap=True,
                        storage_options=cfg.storage_options(), max_k=max(k, cfg.search.max_k), mode="auto")
    index = searcher.index
    fetch = k * DEFAULT_FUSION["fetch_k_factor"] if index.sparse is not None else k
    dense_s, dense_p, sparse_s, sparse_p = [], [], [], []
    for start in range(0, len(data), 256):
        block = [q.strip() for q in data.questions[start:start + 256]]
        s, p = index.search(searcher.encoder.encode(None, block), fetch)
        dense_s.append(s)
        dense_p.append(p)
        if index.sparse is not None:
            s, p = index.search_sparse(block, fetch)
            sparse_s.append(s)
            sparse_p.append(p)
    dense = (np.concatenate(dense_s), np.concatenate(dense_p))
    if index.sparse is not None:
        candidates = fusion_candidates((np.concatenate(sparse_s), np.concatenate(sparse_p)), dense, k)
    else:
        candidates = {"dense": ({"mode": "dense"}, dense)}
    wanted = np.unique(np.concatenate([run[1][:, :k].ravel() for _, run in candidates.values()]))
    docs = index.lookup(wanted[wanted >= 0])
    scorer = _qa_scorer(data, docs, k) if qa else _qrels_scorer(data, docs, k)
    per_q = {name: scorer(run[1][:, :k]) for name, (_, run) in candidates.items()}
    values = {name: {m: round(float(v.mean()), 4) for m, v in figs.items()} for name, figs in per_q.items()}
    main = f"top{k}" if qa else "ndcg@10"
    metric = f"top{k}_accuracy" if qa else "ndcg@10"
    figures = {"metric": metric, "value": values["dense"][main], "k": k}
    if qa:
        figures["top1_accuracy"] = values["dense"]["top1"]
    fusion: dict = {}
    if index.sparse is not None:
        # In-sample, on every validation question: a fusion replaces the better single retriever
        # only when a paired bootstrap over the questions says it is better (dpr_lib.fusion).
        evidence = choose_with_evidence(per_q, cfg.index.seed)
        best = evidence["name"]
        if evidence["warning"]:
            log.warning("fusion tuning: %s", evidence["warning"])
        hybrids = {n: v for n, v in values.items() if candidates[n][0]["mode"] == "hybrid"}
        best_hybrid = choose_fusion({**hybrids, "bm25": values["bm25"], "dense": values["dense"]}) \
            if best in ("bm25", "dense") else best
        if best_hybrid in ("bm25", "dense"):  # what mode "hybrid" serves when neither fusion beats a single side
            best_hybrid = max(hybrids, key=lambda n: (values[n][main], n == "rrf_k60"))
        settings = {key: v for key, v in candidates[best_hybrid][0].items() if key != "mode"}
        fusion = {"mode": candidates[best][0]["mode"], "method": settings.pop("fusion"), **settings,
                  "fetch_k_factor": DEFAULT_FUSION["fetch_k_factor"], "source": "tuned", "metric": metric,
                  "chosen_by": list(values["dense"]), "questions": len(data), "figures": values,
                  "plain_choice": evidence["plain"], "safe_choice": evidence["safe"],
                  "intervals": evidence["intervals"], "singles_interval": evidence["singles_interval"],
                  "warning": evidence["warning"]}
        figures["by_mode"] = {"dense": values["dense"][main], "bm25": values["bm25"][main],
                              "hybrid": values[best_hybrid][main]}
    figures.update({"questions": len(data), "source": cfg.index.validation_questions,
                    "seconds": round(time.time() - t, 2)})
    log.info("validation: %s %.4f (dense) on %d questions%s (%.1fs)", metric, figures["value"], len(data),
             f"; bm25 {figures['by_mode']['bm25']:.4f}, hybrid {figures['by_mode']['hybrid']:.4f}; serving "
             f"{fusion['mode']}" if fusion else "", figures["seconds"])
    return figures, fusion


def _qa_scorer(data: Validation, docs: dict, k: int):
    """pids [q, k] -> per question, 1 when a top-c passage holds an answer (DPR's string match), c = 1, 5, k."""
    from dpr_lib.datasets import has_answer
    from dpr_lib.metrics import first_hit_ranks

    memo: dict = {}

    def hit(q: int, pid: int) -> bool:
        key = (q, pid)
        if key not in memo:
            d = docs.get(pid)
            memo[key] = d is not None and has_answer(f"{d['title']} {d['text']}", data.answers[q])
        return memo[key]

    def score(pids: np.ndarray) -> dict:
        ranks = first_hit_ranks(pids, hit)  # 1-based, 0 = none
        return {f"top{c}": ((ranks > 0) & (ranks <= c)).astype(np.float64) for c in sorted({1, min(5, k), k})}

    return score


def _qrels_scorer(data: Validation, docs: dict, k: int):
    """pids [q, k] -> per question {nDCG@10, recall@k} over the hits' doc ids (a document at its best passage's rank)."""
    import pytrec_eval

    from dpr_lib.metrics import doc_run

    evaluator = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", f"recall.{k}"})

    def score(pids: np.ndarray) -> dict:
        per_query = evaluator.evaluate(doc_run(lambda p: (docs.get(p) or {}).get("doc_id"), data.qids, pids))

        def each(measure: str) -> np.ndarray:
            return np.array([per_query.get(q, {}).get(measure, 0.0) for q in data.qids], np.float64)

        return {"ndcg@10": each("ndcg_cut_10"), f"recall@{k}": each(f"recall_{k}")}

    return score


def judge(new: dict, previous: dict | None, previous_version: str | None, cfg: Config) -> str:
    """'' when the version may be published, else the reason (metric and both values)."""
    if not new:
        return ""
    metric, value = new["metric"], new["value"]
    if previous and previous.get("metric") == metric and previous.get("source") == new.get("source"):
        # dense (``value``), then each mode both versions measured: no mode a client may ask for regresses
        pairs = [("dense", previous["value"], value)] + [
            (mode, previous["by_mode"][mode], v) for mode, v in (new.get("by_mode") or {}).items()
            if mode != "dense" and mode in (previous.get("by_mode") or {})]
        for mode, before, now in pairs:
            drop = before - now
            if drop > cfg.publish.max_regression:
                return (f"{metric} ({mode}) fell from {before:.4f} (version {previous_version}, which LATEST names) "
                        f"to {now:.4f} on {new['questions']} validation questions: a drop of {drop:.4f} > "
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
