"""Recall of a version's IVF search against exact search: the questions it is measured on
(``index.recall_questions`` encoded by the question encoder, else stored vectors), the exact top-k
over Embeddings files, and the choice of nprobe and k_factor from the shard tasks' hits."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpr_lib import storage
from dpr_lib.config import Config
from dpr_lib.errors import ConfigError, StorageError
from dpr_lib.index.shards import file_batches, from_npy, to_npy
from dpr_lib.index_ops import check_finite, drop_ids, merge_topk, recall_at_k, topk_block, vectors_of
from dpr_lib.manifest import RecallSection

log = logging.getLogger("dpr_lib.index")


EXACT_RESULT = pa.schema([("scores", pa.binary()), ("ids", pa.binary())])


def exact_topk(spark, files: list[str], queries: np.ndarray, k: int, dim: int,
               batch_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of ``queries`` over Embeddings files, one Spark task per file.

    Each task returns its file's top-k ([q, k], never the vectors); the driver merges them, so it
    holds files x q x k results and no embeddings.
    """
    from dpr_lib.spark import spark_schema, tasks_dataframe

    bc = spark.sparkContext.broadcast(np.ascontiguousarray(queries, dtype=np.float32))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        q = bc.value
        for b in batches:
            for url in b.column("path").to_pylist():
                best = (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
                for batch in file_batches(url, batch_rows):
                    pids = batch.column("pid").to_numpy().astype(np.int64)
                    vecs = vectors_of(batch, dim)
                    check_finite(vecs, pids)
                    block = topk_block(q @ vecs.T, pids, k)
                    best = merge_topk([best[0], block[0]], [best[1], block[1]], k)
                yield pa.RecordBatch.from_pylist([{"scores": to_npy(best[0]), "ids": to_npy(best[1])}],
                                                 schema=EXACT_RESULT)

    tasks = tasks_dataframe(spark, [{"path": f} for f in files], "path string")
    partial = tasks.mapInArrow(run, spark_schema(EXACT_RESULT)).toLocalIterator()
    best = (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
    for row in partial:  # one file's top-k at a time
        best = merge_topk([best[0], from_npy(row["scores"])], [best[1], from_npy(row["ids"])], k)
    bc.unpersist()
    return best


# ---------------------------------------------------------------- the merge job (driver)


def read_recall_questions(cfg: Config) -> list[str]:
    """The questions of ``index.recall_questions`` (at most max(recall_queries, 1024), a seeded
    sample of a longer file). Errors name the key: a run should fail before it encodes anything."""
    url, icfg = cfg.index.recall_questions, cfg.index
    try:
        raw = storage.read_bytes(url, cfg.storage_options(), attempts=2)
    except (OSError, StorageError) as exc:
        raise ConfigError(f"index.recall_questions: cannot read {url}: {exc}") from None
    try:
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"index.recall_questions: {url} is not UTF-8 text ({exc})") from None
    questions = []
    for no, line in enumerate(lines, 1):
        if not line:
            continue
        if url.endswith((".jsonl", ".json")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"index.recall_questions: {url} line {no} is not JSON ({exc.msg})") from None
            line = row.get("question") if isinstance(row, dict) else row
            if not isinstance(line, str):
                raise ConfigError(f'index.recall_questions: {url} line {no} has no "question" string')
            line = line.strip()
        if line:
            questions.append(line)
    if not questions:
        raise ConfigError(f"index.recall_questions: {url} holds no questions")
    limit = max(icfg.recall_queries, 1024)
    if len(questions) > limit:
        pick = np.sort(np.random.default_rng(icfg.seed).choice(len(questions), limit, replace=False))
        questions = [questions[i] for i in pick]
    return questions


def encode_recall_questions(cfg: Config) -> np.ndarray:
    """``index.recall_questions`` encoded on the driver by the question encoder: float32 [n, d].
    Kept in the local cache_dir by (questions, encoder fingerprint): nightly runs with the same
    file and encoder do not encode them again."""
    import hashlib

    from dpr_lib.encoder import Encoder, resolve_spec

    questions = read_recall_questions(cfg)
    t = time.time()
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options())
    key = hashlib.sha256(json.dumps([spec.fingerprint_id(), questions]).encode()).hexdigest()[:24]
    cached = os.path.join(cfg.path("cache_dir"), "recall_questions", f"{key}.npy")
    if os.path.exists(cached):
        vectors = np.load(cached, allow_pickle=False)
        if vectors.shape == (len(questions), spec.dim) and vectors.dtype == np.float32:
            log.info("recall questions: %d from %s (cached encodings)", len(questions), cfg.index.recall_questions)
            return vectors
    vectors = Encoder(spec).encode(None, questions)
    log.info("recall questions: %d from %s encoded (%.1fs)", len(questions), cfg.index.recall_questions,
             time.time() - t)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs the next run a re-encode
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{uuid.uuid4().hex}.npy"
        np.save(tmp, vectors, allow_pickle=False)
        os.replace(tmp, cached)
    return vectors


def question_fingerprint(cfg: Config, passage_fingerprint: dict) -> dict:
    """The question encoder's fingerprint; where passages went through an exported backend, it
    says why questions did not (encoder.backend applies to passages only)."""
    from dpr_lib.backends import QUESTION_NOTE
    from dpr_lib.encoder import resolve_spec

    fp = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="question", storage_options=cfg.storage_options()
                      ).fingerprint()
    if passage_fingerprint.get("backend", "torch") != "torch":
        fp["note"] = QUESTION_NOTE
    return fp



@dataclasses.dataclass
class RecallQueries:
    """The queries recall is measured on: encoded questions (``pids`` None), or stored vectors of
    the table (``pids``: their own, excluded from both their exact and approximate top-k)."""

    vectors: np.ndarray
    pids: np.ndarray | None
    source: str = ""  # the questions file, "" for stored vectors

    def k_search(self, k: int) -> int:
        return k if self.pids is None else k + 1  # room to drop the query's own pid


@dataclasses.dataclass
class RecallChoice:
    """The served nprobe and k_factor and the recall@k measured at each (k_factor 0 = no re-rank)."""

    nprobe: int
    k_factor: int
    by: dict            # (nprobe, k_factor) -> recall@k
    by_nprobe: dict     # nprobe -> recall@k at the chosen k_factor

    def section(self, k: int, target: float, queries: RecallQueries) -> RecallSection:
        """The manifest's ``recall`` section."""
        return {"k": k, "target": target, "queries": len(queries.vectors),
                "query_source": "questions" if queries.pids is None else "stored vectors, self excluded",
                **({"questions_file": queries.source} if queries.source else {}),
                "by_nprobe": {str(p): r for p, r in self.by_nprobe.items()},
                "at_nprobe": self.by_nprobe.get(self.nprobe),
                "reached_target": self.by_nprobe.get(self.nprobe, 0) >= target}


def choose_nprobe(shards, nprobes: list[int], k_factors: list[int] | None, k: int, queries: RecallQueries,
                  icfg) -> RecallChoice:
    """Merge the shards' hits per (nprobe, k_factor), measure recall@k against the merged exact
    top-k, and pick the smallest nprobe, then the smallest k_factor, reaching ``index.recall_target``
    (``index.nprobe`` forces nprobe); none reaching it: the largest swept."""
    k_search = queries.k_search(k)
    _, exact_i = merge_topk([s.exact_scores for s in shards], [s.exact_ids for s in shards], k_search)
    exact_i = drop_ids(exact_i, queries.pids, k)
    by = {}
    for j, p in enumerate(nprobes):
        for f, kf in enumerate(k_factors or [0]):
            hits = [s.hits(j, f) for s in shards]
            _, found = merge_topk([h[0] for h in hits], [h[1] for h in hits], k_search)
            by[(p, kf)] = round(recall_at_k(drop_ids(found, queries.pids, k), exact_i), 4)
    candidates = [(p, kf) for (p, kf) in by if not icfg.nprobe or p == icfg.nprobe]
    reaching = sorted(c for c in candidates if by[c] >= icfg.recall_target)
    nprobe, k_factor = reaching[0] if reaching else (
        max(candidates) if candidates else (icfg.nprobe, max(k_factors) if k_factors else 0))
    if icfg.nprobe:
        nprobe = icfg.nprobe
    return RecallChoice(nprobe, k_factor, by, {p: by[(p, kf)] for (p, kf) in by if kf == k_factor})


def stale_quantizer(prev, max_nprobe: float, max_nprobe_key: str, choice: RecallChoice, k: int, icfg) -> str | None:
    """Why a quantizer reused from version ``prev`` no longer serves, or None. It must reach
    ``index.recall_target`` at all, and (unless nprobe is forced) at no more than ``max_nprobe``
    probes: one that needs many more lists than the previous version did has drifted away from the
    corpus, and every query would pay for it."""
    recall = choice.by_nprobe.get(choice.nprobe, 0)
    if recall < icfg.recall_target:
        return (f"recall@{k} {recall:.3f} with the reused quantizer of version {prev.version} is below "
                f"index.recall_target {icfg.recall_target}")
    if max_nprobe and not icfg.nprobe and choice.nprobe > max_nprobe:
        return (f"the reused quantizer of version {prev.version} needs nprobe {choice.nprobe} to reach "
                f"index.recall_target {icfg.recall_target}, over the limit of {max_nprobe:g} "
                f"({max_nprobe_key} x the nprobe {prev.nprobe} that version served with)")
    return None


def probe_queries(layout: list[dict], dim: int, n: int) -> np.ndarray:
    """The first ``n`` vectors of the files (read from the driver: a few hundred rows)."""
    out = []
    for f in layout:
        for batch in file_batches(f["path"], n, columns=("vector",)):
            out.append(vectors_of(batch, dim))
            break
        if sum(len(o) for o in out) >= n:
            break
    q = np.concatenate(out)[:n] if out else np.zeros((1, dim), np.float32)
    return np.ascontiguousarray(q, np.float32)
