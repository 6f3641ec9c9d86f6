"""Training data: DPR biencoder records (JSON Lines or DPR's JSON list) -> a :class:`TrainSet`
(questions and a de-duplicated passage pool), the seeded train/validation split, and the passages
of each batch (positive + hard negatives drawn from each question's top BM25 candidates)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from dpr_lib import storage
from dpr_lib.errors import InputError


@dataclasses.dataclass
class TrainSet:
    """Questions and a de-duplicated passage pool; positives / hard negatives index the pool."""

    questions: list[str]
    positives: list[list[int]]
    hard: list[list[int]]
    titles: list[str]
    texts: list[str]
    skipped: dict

    def __len__(self) -> int:
        return len(self.questions)


def _records(url: str, storage_options: dict | None):
    files = [f for f in storage.list_files(url, "", storage_options) if f.endswith((".jsonl", ".json"))]
    if not files:
        raise InputError(f"no training data (.jsonl or .json) under {url}")
    for f in files:
        fs, path = storage.get_fs(f, storage_options)
        with fs.open(path, "rt", encoding="utf-8") as fh:
            head = fh.read(1)
            while head and head.isspace():
                head = fh.read(1)
            fh.seek(0)
            if head == "[":                          # DPR's own biencoder files: one JSON list
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{f}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
                for i, rec in enumerate(data):
                    yield f"{f}[{i}]", rec
            else:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield f"{f}:{n}", json.loads(line)
                        except json.JSONDecodeError as exc:
                            yield f"{f}:{n}", exc


def load_training_data(url: str, storage_options: dict | None = None) -> TrainSet:
    """Read DPR biencoder records (JSON Lines, or DPR's JSON list); records without a question or a
    positive passage are skipped and counted; too many bad records fail naming the file."""
    from dpr_lib.datasets import check_bad, skip_bad

    pool: dict[tuple[str, str], int] = {}
    ts = TrainSet([], [], [], [], [], {})

    def ctx_ids(ctxs) -> list[int]:
        out = []
        for c in ctxs or []:
            if isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"].strip():
                key = (str(c.get("title") or ""), c["text"])
                if key not in pool:
                    pool[key] = len(ts.titles)
                    ts.titles.append(key[0])
                    ts.texts.append(key[1])
                out.append(pool[key])
        return out

    total = 0
    for where, rec in _records(url, storage_options):
        total += 1
        if isinstance(rec, Exception):
            skip_bad(ts.skipped, "invalid_json", where, str(rec))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
            skip_bad(ts.skipped, "no_question", where, "no 'question' text")
            continue
        pos = ctx_ids(rec.get("positive_ctxs"))
        if not pos:
            skip_bad(ts.skipped, "no_positive", where, "no positive_ctxs with text")
            continue
        hard = [h for h in ctx_ids(rec.get("hard_negative_ctxs")) if h not in pos]
        ts.questions.append(rec["question"].strip())
        ts.positives.append(pos)
        ts.hard.append(hard)
    check_bad(ts.skipped, total, url)
    if len(ts) < 2:
        raise InputError(f"{url}: {len(ts)} usable training questions; in-batch training needs at least 2")
    return ts


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) question indices: a seeded, disjoint split."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n - 2)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def batch_passages(ts: TrainSet, questions: np.ndarray, epoch: int, n_hard: int, hard_pool: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each question: [positive, n_hard hard negatives] as pool indices, shape [B, 1 + n_hard],
    and the positives [B]. Hard negatives are drawn from each question's top ``hard_pool``; a
    question with too few is topped up with random passages that are not its positives. Seeded by
    (seed, epoch, question), so every process and every rerun draws the same."""
    rows = np.empty((len(questions), 1 + n_hard), np.int64)
    for r, qi in enumerate(questions):
        rng = np.random.default_rng([seed, epoch, int(qi)])
        pos = ts.positives[qi]
        cand = ts.hard[qi][:hard_pool]
        chosen = list(rng.choice(cand, size=min(n_hard, len(cand)), replace=False)) if cand and n_hard else []
        while len(chosen) < n_hard:
            x = int(rng.integers(len(ts.texts)))
            if x not in pos and x not in chosen:
                chosen.append(x)
        rows[r] = [pos[0], *chosen]
    return rows, rows[:, 0].copy()
