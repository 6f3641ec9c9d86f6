"""The shared bad-input corpus: every class of bad record the product must survive, with the
outcome each one must have (a counted reject with its reason, a cleaned document, or a clear
error). Used by tests/unit/test_corpus_unit.py and tests/integration/test_bad_input.py; the failure
table of docs/reliability.md lists the same classes."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

GOOD = 20
BIG_DOC_BYTES = 10 * 1024 * 1024
TINY_DOCS = 100_000

# (class, JSON Lines line, expected reject reason or None when the record is kept)
JSONL_CASES: list[tuple[str, bytes, str | None]] = [
    ("malformed JSON", b'{"id": "m1", "text": "unterminated', "malformed_json"),
    ("JSON that is not an object", b'["m2", "a list"]', "malformed_json"),
    ("wrong type: id is a list", b'{"id": ["w1"], "text": "some text"}', "wrong_type"),
    ("wrong type: id is a boolean", b'{"id": true, "text": "some text"}', "wrong_type"),
    ("wrong type: text is a number", b'{"id": "w3", "text": 42}', "wrong_type"),
    ("wrong type: title is an object", b'{"id": "w4", "title": {"a": 1}, "text": "some text"}', "wrong_type"),
    ("null id", b'{"id": null, "text": "some text"}', "missing_id"),
    ("missing id", b'{"text": "some text"}', "missing_id"),
    ("null text", b'{"id": "n1", "text": null}', "missing_text"),
    ("missing text", b'{"id": "n2", "title": "only a title"}', "missing_text"),
    ("empty text", b'{"id": "e1", "text": ""}', "empty_text"),
    ("whitespace-only text", b'{"id": "e2", "text": " \\t\\n\\u00a0 "}', "empty_text"),
    ("control characters only", b'{"id": "e3", "text": "\\u0000\\u0001\\u0007"}', "empty_text"),
    ("invalid UTF-8", b'{"id": "u1", "text": "caf\xe9 au lait"}', "invalid_utf8"),
    ("control characters inside text (kept, cleaned)",
     b'{"id": "c1", "title": "bell\\u0007title", "text": "nul\\u0000 and bell\\u0007 and esc\\u001b inside"}', None),
    ("duplicate id (the second is rejected)", b'{"id": "good-0", "text": "a second document with id good-0"}',
     "duplicate_doc_id"),
]

TSV_CASES: list[tuple[str, str, str | None]] = [
    ("TSV row with 2 columns", "t1\tonly text\n", "bad_columns"),
    ("TSV row with 4 columns", "t2\ttext\ttitle\textra\n", "bad_columns"),
    ("TSV row with 3 columns", "t3\tgood text here\tGood title\n", None),
]


def expected_rejects() -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, reason in JSONL_CASES:
        if reason:
            out[reason] = out.get(reason, 0) + 1
    return out


def write_jsonl_corpus(directory) -> dict:
    """bad.jsonl (every JSONL case among GOOD good documents), big.jsonl (one 10 MB document),
    tiny.jsonl (100k one-word documents). Returns the expected counts."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "bad.jsonl"), "wb") as fh:
        for i in range(GOOD):
            fh.write(json.dumps({"id": f"good-{i}", "title": f"Good {i}", "text": f"good document number {i}"})
                     .encode() + b"\n")
            if i < len(JSONL_CASES):
                fh.write(JSONL_CASES[i][1] + b"\n")
        fh.write(b"\n   \n")  # blank lines are not records
    word = "lorem "
    words = BIG_DOC_BYTES // len(word)
    with open(os.path.join(directory, "big.jsonl"), "w") as fh:
        fh.write(json.dumps({"id": "big", "title": "Ten megabytes", "text": word * words}) + "\n")
    with open(os.path.join(directory, "tiny.jsonl"), "w") as fh:
        for i in range(TINY_DOCS):
            fh.write(f'{{"id": "t{i}", "text": "w{i}"}}\n')
    rejects = expected_rejects()
    records = GOOD + len(JSONL_CASES) + 1 + TINY_DOCS
    kept = records - sum(rejects.values())
    return {"input_records": records, "docs": kept, "rejects": rejects, "big_doc_words": words}


def write_tsv_corpus(path) -> dict:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("id\ttext\ttitle\n")
        for i in range(GOOD):
            fh.write(f"g{i}\tgood text {i}\tTitle {i}\n")
        for _, line, _ in TSV_CASES:
            fh.write(line)
    return {"rejects": {"bad_columns": sum(1 for *_, r in TSV_CASES if r)},
            "docs": GOOD + sum(1 for *_, r in TSV_CASES if r is None)}


def write_wrong_schema_parquet(path) -> None:
    """Parquet without the id/text columns."""
    pq.write_table(pa.table({"doc": ["a", "b"], "body": ["x", "y"]}), path)


def write_wrong_type_parquet(path) -> None:
    """Parquet with the right names, but text is a number: every row is a wrong_type reject."""
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [1, 2, 3]}), path)
