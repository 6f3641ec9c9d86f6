"""Every input record is accounted for, and checked before anything is published.

The ledger of one run::

    vectors         = embeddings            every Embeddings row is in exactly one shard
    input_records   = docs + rejects        every record read became a document or a reject
    corpus_passages = passages              the corpus stage wrote the Passages being indexed
    passages        = embedded + reused     every passage has a vector, made now or kept from before
    embeddings      = passages              the Embeddings table has one row per passage
    vectors         = passages              every passage is in exactly one shard
    docstore_rows   = passages              and its text is in the docstore

Each side is counted independently (records read vs documents found in the written Passages
table and rows in the written rejects; rows in the Passages files vs rows the encode tasks wrote
and rows they kept; vectors the shard tasks added vs rows in the docstore), so a lost or
duplicated record shows up as a mismatch. A mismatch raises :class:`AccountingError` before the
stage publishes (the corpus stage before it swaps the Passages table in, the merge job before it
writes the manifest and LATEST). The counts are written into the manifest (``accounting``).
"""

from __future__ import annotations

import json
import logging

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import AccountingError

log = logging.getLogger("dpr_lib.accounting")

EQUATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vectors", ("embeddings",)),
    ("input_records", ("docs", "rejects")),
    ("corpus_passages", ("passages",)),
    ("passages", ("embedded", "reused")),
    ("embeddings", ("passages",)),
    ("vectors", ("passages",)),
    ("docstore_rows", ("passages",)),
)


def check(counts: dict, where: str) -> dict:
    """Check every equation whose terms are all known; raise AccountingError naming each one that
    fails. Returns ``{"counts": ..., "checked": [...], "unchecked": [...]}`` for the manifest."""
    checked, unchecked, failures = [], [], []
    for lhs, rhs in EQUATIONS:
        terms = (lhs, *rhs)
        if any(counts.get(t) is None for t in terms):
            unchecked.append(_text(lhs, rhs))
            continue
        left, right = int(counts[lhs]), sum(int(counts[t]) for t in rhs)
        checked.append(_text(lhs, rhs))
        if left != right:
            values = " + ".join(f"{t} {int(counts[t])}" for t in rhs)
            failures.append(f"{lhs} {left} != {values} (= {right})")
    if failures:
        raise AccountingError(f"{where}: records are not accounted for: {'; '.join(failures)}. "
                              "Nothing was published.")
    return {"counts": {k: (None if v is None else int(v)) for k, v in counts.items()},
            "checked": checked, "unchecked": unchecked}


def _text(lhs: str, rhs: tuple[str, ...]) -> str:
    return f"{lhs} = {' + '.join(rhs)}"


def from_stats(cfg: Config) -> dict:
    """The corpus and encode counts that the stages of this work dir recorded in their stats, when
    they describe the configured Passages and Embeddings (empty when a stage's stats are missing,
    e.g. for Embeddings made elsewhere: those equations are then reported as unchecked)."""
    counts: dict = {}
    corpus = _read_stats(cfg, "shard_corpus")
    if corpus and corpus.get("passages_url") == cfg.path("passages"):
        counts.update({k: corpus.get(k) for k in ("input_records", "docs", "rejects")})
        counts["corpus_passages"] = corpus.get("passages")
    encode = _read_stats(cfg, "encode_passages")
    if encode and encode.get("embeddings_url") == cfg.path("embeddings") and "passages_reused" in encode:
        counts["embedded"] = encode.get("passages_encoded")
        counts["reused"] = encode.get("passages_reused")
    return counts


def _read_stats(cfg: Config, stage: str) -> dict | None:
    url = join_url(cfg.path("stats"), f"{stage}.json")
    try:
        if not storage.exists(url):
            return None
        return json.loads(storage.read_bytes(url))
    except (ValueError, OSError) as exc:
        log.warning("cannot read %s (%s): its counts are not checked", url, exc)
        return None
