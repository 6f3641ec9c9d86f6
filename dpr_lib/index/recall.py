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
    """The served nprobe and k_factor and the recall@k measured at each (k_factor 0 = no re-rank),
    and at the other depths recall is reported at."""

    nprobe: int
    k_factor: int
    by: dict            # (nprobe, k_factor) -> recall@k
    by_nprobe: dict     # nprobe -> recall@k at the chosen k_factor
    by_depth: dict = dataclasses.field(default_factory=dict)   # depth -> {nprobe: recall} at the chosen k_factor

    def section(self, k: int, target: float, queries: RecallQueries) -> RecallSection:
        """The manifest's ``recall`` section."""
        return {"k": k, "target": target, "queries": len(queries.vectors),
                "query_source": "questions" if queries.pids is None else "stored vectors, self excluded",
                **({"questions_file": queries.source} if queries.source else {}),
                "by_nprobe": {str(p): r for p, r in self.by_nprobe.items()},
                "at_nprobe": self.by_nprobe.get(self.nprobe),
                "reached_target": self.by_nprobe.get(self.nprobe, 0) >= target,
                "at_depth": {str(d): by.get(self.nprobe) for d, by in sorted(self.by_depth.items())},
                "by_nprobe_at_depth": {str(d): {str(p): r for p, r in by.items()}
                                       for d, by in sorted(self.by_depth.items()) if d != k}}


DEEP_K_FACTOR_MAX = 4
"""Re-rank versions measure recall at the deeper reported depth only for k_factors up to this (a
depth of 100 at k_factor 32 would re-rank 3,200 candidates per query in the sweep)."""
LIST_MARGIN = 10
"""Hits kept per recall query beyond the deepest depth, so a delta that tombstones a few of a
query's hits still knows its top k exactly (:func:`merge_lists`)."""


def sweep_plan(k: int, report_k: int, queries: RecallQueries, k_factors: list[int] | None):
    """(search depth of the shard tasks, their k_factors) for recall at ``k`` and ``report_k``: with
    a re-rank store each (k_factor, depth) is searched as a service would search for that depth;
    without, one search at the deepest depth plus :data:`LIST_MARGIN` serves every depth."""
    depths = sorted({queries.k_search(d) for d in (k, report_k) if d})
    if not k_factors:
        return depths[-1] + LIST_MARGIN, None
    combos = [(kf, depths[0]) for kf in k_factors]
    combos += [(kf, d) for d in depths[1:] for kf in k_factors if kf <= DEEP_K_FACTOR_MAX]
    return depths[-1], combos


def _combo(k_factors, kf: int, depth: int) -> int | None:
    """Index of (kf, depth) among the shard tasks' k_factors (0 without re-rank), None if not swept."""
    if not k_factors:
        return 0
    return next((f for f, c in enumerate(k_factors) if tuple(c) == (kf, depth)), None)


def merged_hits(shards, nprobe_at: int, combo: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The shards' hits at one swept (nprobe, k_factor) merged into the version's top ``depth``."""
    hits = [s.hits(nprobe_at, combo) for s in shards]
    return merge_topk([h[0][:, :depth] for h in hits], [h[1][:, :depth] for h in hits], depth)


def choose_nprobe(shards, nprobes: list[int], k_factors: list | None, k: int, queries: RecallQueries,
                  icfg, report_k: int = 0) -> RecallChoice:
    """Merge the shards' hits per (nprobe, k_factor), measure recall@k against the merged exact
    top-k, and pick the smallest nprobe, then the smallest k_factor, reaching ``index.recall_target``
    (``index.nprobe`` forces nprobe); none reaching it: the largest swept. Recall at ``report_k``
    is measured too (``by_depth``). ``k_factors``: as :func:`sweep_plan` gives them."""
    kfs = sorted({c[0] for c in k_factors}) if k_factors else [0]
    depths = [d for d in dict.fromkeys((k, report_k)) if d]
    by_depth: dict[int, dict] = {}
    for d in depths:
        d_search = queries.k_search(d)
        _, exact_i = merge_topk([s.exact_scores[:, :d_search] for s in shards],
                                [s.exact_ids[:, :d_search] for s in shards], d_search)
        exact_i = drop_ids(exact_i, queries.pids, d)
        for j, p in enumerate(nprobes):
            for kf in kfs:
                f = _combo(k_factors, kf, d_search)
                if f is not None:
                    found = merged_hits(shards, j, f, d_search)[1]
                    by_depth.setdefault(d, {})[(p, kf)] = round(recall_at_k(drop_ids(found, queries.pids, d), exact_i), 4)
    by = by_depth[k]
    candidates = [(p, kf) for (p, kf) in by if not icfg.nprobe or p == icfg.nprobe]
    reaching = sorted(c for c in candidates if by[c] >= icfg.recall_target)
    nprobe, k_factor = reaching[0] if reaching else (
        max(candidates) if candidates else (icfg.nprobe, max(kfs)))
    if icfg.nprobe:
        nprobe = icfg.nprobe
    return RecallChoice(nprobe, k_factor, by, {p: by[(p, kf)] for (p, kf) in by if kf == k_factor},
                        {d: {p: r for (p, kf), r in bd.items() if kf == k_factor} for d, bd in by_depth.items()})


def base_nprobe(manifest) -> int:
    """The nprobe of the last full build behind a version (a delta may serve a raised one): what
    ``nightly.max_nprobe_growth`` scales."""
    return int((getattr(manifest, "recall", None) or {}).get("base_nprobe") or manifest.nprobe)


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
                f"({max_nprobe_key} x the nprobe {base_nprobe(prev)} of the last full build)")
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


# ---------------------------------------------------------------- recall lists: a delta's own recall

RECALL_LISTS = "recall-lists.npz"


@dataclasses.dataclass
class RecallLists:
    """What a version keeps so that a delta on it can measure its own recall in proportion to the
    change: the recall queries, and their exact and approximate (per swept nprobe) top ``depth``
    over the version's live vectors (versions without a re-rank store). A delta searches only its
    own segment with the same queries and merges (:func:`merge_lists`)."""

    queries: np.ndarray        # float32 [q, d]
    pids: np.ndarray | None    # stored-vector queries' own pids (excluded from both lists), None for questions
    source: str
    nprobes: list[int]
    exact: tuple[np.ndarray, np.ndarray]          # scores float32, ids int64 [q, depth]
    hits: list[tuple[np.ndarray, np.ndarray]]     # per nprobe, the same shapes

    @property
    def depth(self) -> int:
        return int(self.exact[1].shape[1])

    def recall_queries(self) -> RecallQueries:
        return RecallQueries(self.queries, self.pids, self.source)

    @classmethod
    def of_shards(cls, shards, nprobes: list[int], queries: RecallQueries, depth: int) -> RecallLists:
        exact = merge_topk([s.exact_scores for s in shards], [s.exact_ids for s in shards], depth)
        return cls(queries.vectors, queries.pids, queries.source, list(nprobes), exact,
                   [merged_hits(shards, j, 0, depth) for j in range(len(nprobes))])

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, queries=self.queries, pids=np.zeros(0, np.int64) if self.pids is None else self.pids,
                 self_excluded=np.array(self.pids is not None), source=np.array(self.source),
                 nprobes=np.array(self.nprobes, np.int64), exact_scores=self.exact[0], exact_ids=self.exact[1],
                 hit_scores=np.stack([h[0] for h in self.hits]), hit_ids=np.stack([h[1] for h in self.hits]))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RecallLists:
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["queries"], z["pids"] if bool(z["self_excluded"]) else None, str(z["source"]),
                       [int(p) for p in z["nprobes"]], (z["exact_scores"], z["exact_ids"]),
                       list(zip(z["hit_scores"], z["hit_ids"])))


def merge_lists(old: tuple[np.ndarray, np.ndarray], dead: np.ndarray, new: tuple[np.ndarray, np.ndarray],
                depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A version's top-``depth`` lists after a delta: ``old`` (the previous version's lists) without
    the ``dead`` pids (sorted), merged with ``new`` (the delta segment's own lists, same queries).

    Returns (scores, ids, certain): ``certain`` [q] is how many of the first hits are known to be
    the new version's true top hits: a hit ranked below an old or new list's last entry could be
    missing from the truncated lists, so only the hits scoring above both lists' last scores (of
    those that were full) are certain."""
    o_s, o_i = old
    o_i = np.where(np.isin(o_i, dead), -1, o_i)
    o_s = np.where(o_i < 0, -np.inf, o_s).astype(np.float32)
    scores, ids = merge_topk([o_s, new[0]], [o_i, new[1]], depth)

    def floor(s, i):  # the last score of a full list; -inf where the list holds every candidate
        return np.where(i[:, -1] >= 0, s[:, -1], -np.inf)

    bound = np.maximum(floor(*old), floor(*new))
    certain = ((scores > bound[:, None]) & (ids >= 0)).sum(axis=1)
    certain = np.where(np.isneginf(bound), depth, certain)
    return scores, ids, certain


def recall_of_lists(exact: tuple, hits: tuple, pids: np.ndarray | None, k: int,
                    certain: np.ndarray | None = None) -> tuple[float | None, int]:
    """(recall@k of ``hits`` against ``exact`` over the queries whose top k are certain, how many
    were not). ``certain``: per query, the certain prefix of both lists (the smaller); None = all."""
    need = k + (0 if pids is None else 1)
    keep = np.ones(len(exact[1]), bool) if certain is None else certain >= need
    if not keep.any():
        return None, int(len(keep))
    qp = None if pids is None else pids[keep]
    r = recall_at_k(drop_ids(hits[1][keep][:, :need], qp, k), drop_ids(exact[1][keep][:, :need], qp, k))
    return round(r, 4), int((~keep).sum())
