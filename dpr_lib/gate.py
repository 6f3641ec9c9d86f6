"""The quality gate: a new version moves ``LATEST`` only if its validation figures hold against
those of the version ``LATEST`` names.

With ``index.validation_questions`` (QA pairs with answers: in practice a judged sample of the
query log) the merge job searches the complete, not yet published version exactly as a service
would (question encoder, shards, docstore) and records top-k accuracy (a hit holds an answer,
DPR's string match) in the manifest's ``validation``. Before ``LATEST`` moves:

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

import json
import logging
import time

import numpy as np

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import ConfigError, DprError

log = logging.getLogger("dpr_lib.gate")

REJECTED = "rejected.json"


class QualityGateError(DprError):
    """A new version's validation figures regressed: it was built but not published."""

    exit_code = 11


def read_validation_questions(cfg: Config) -> list[tuple[str, list[str]]]:
    """(question, answers) pairs of ``index.validation_questions``: JSON Lines ``{"question",
    "answers": [...]}`` or DPR's ``question<TAB>['answer', ...]`` (.csv/.tsv). Errors name the key."""
    import ast

    url = cfg.index.validation_questions
    try:
        raw = storage.read_bytes(url, attempts=2).decode("utf-8")
    except (OSError, DprError, UnicodeDecodeError) as exc:
        raise ConfigError(f"index.validation_questions: cannot read {url}: {exc}") from None
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
    return pairs


def validate_version(cfg: Config, manifest_url: str, pairs: list[tuple[str, list[str]]]) -> dict:
    """Top-k accuracy of the version at ``manifest_url`` on ``pairs``, searched as a service would."""
    from dpr_lib.datasets import has_answer
    from dpr_lib.search import Searcher

    t = time.time()
    k = cfg.index.validation_k
    # Loaded as one search node loads it (shards memory-mapped from the local cache): the version
    # must fit one node's disk; a fleet-sharded index would validate per node group instead.
    searcher = Searcher(manifest_url, cfg.encoder, cfg.path("cache_dir"), mmap=True,
                        storage_options=cfg.storage_options(), max_k=max(k, cfg.search.max_k))
    hit_at = []
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        for (_, answers), hits in zip(chunk, searcher.ask([q for q, _ in chunk], k)):
            ranks = [i for i, h in enumerate(hits) if has_answer(f"{h.title} {h.text}", answers)]
            hit_at.append(ranks[0] if ranks else k)
    hit_at = np.asarray(hit_at)
    figures = {"metric": f"top{k}_accuracy", "value": round(float((hit_at < k).mean()), 4), "k": k,
               "top1_accuracy": round(float((hit_at < 1).mean()), 4), "questions": len(pairs),
               "source": cfg.index.validation_questions, "seconds": round(time.time() - t, 2)}
    log.info("validation: %s %.4f on %d questions (%.1fs)", figures["metric"], figures["value"], len(pairs),
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
