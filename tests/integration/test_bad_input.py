"""The shared bad-input corpus (tests/badinput.py) through the real corpus stage and the real
job: every class ends as a counted reject, a cleaned document or a clear one-line error."""

import os
import subprocess
import sys

import pytest
from badinput import (
    BIG_DOC_BYTES,
    GOOD,
    write_jsonl_corpus,
    write_tsv_corpus,
    write_wrong_schema_parquet,
    write_wrong_type_parquet,
)
from conftest import REPO, make_config, read_table

from dpr_lib.corpus import shard_corpus
from dpr_lib.errors import InputError


def test_every_bad_record_class_is_a_counted_reject_among_a_huge_and_100k_tiny_documents(spark, tmp_path):
    expected = write_jsonl_corpus(tmp_path / "in")
    cfg = make_config(tmp_path, f"corpus.input={tmp_path / 'in'}", "corpus.format=jsonl", "corpus.num_files=4")
    stats = shard_corpus(spark, cfg)  # the default reject ratio (5%) holds: 15 rejects in 100,037 records
    assert stats["rejects_by_reason"] == expected["rejects"]
    assert stats["input_records"] == expected["input_records"]
    assert stats["docs"] == expected["docs"] and stats["docs"] + stats["rejects"] == stats["input_records"]
    big_passages = -(-expected["big_doc_words"] // cfg.corpus.words)
    assert stats["passages"] == (expected["docs"] - 1) + big_passages, "every small doc is one passage"

    rejects = read_table(cfg.path("rejects")).to_pylist()
    assert all(r["source"].rsplit(":", 1)[1].isdigit() and r["raw"] and r["detail"] for r in rejects)
    utf8 = [r for r in rejects if r["reason"] == "invalid_utf8"][0]
    assert "\\xe9" in utf8["raw"], "the raw record is kept, undecodable bytes escaped"

    passages = read_table(cfg.path("passages"), columns=["doc_id", "title", "text"],
                             filters=[("doc_id", "in", ["c1", "big", "good-0"])]).to_pylist()
    by_doc = {}
    for p in passages:
        by_doc.setdefault(p["doc_id"], []).append(p)
    assert by_doc["c1"][0]["text"] == "nul and bell and esc inside" and by_doc["c1"][0]["title"] == "bell title"
    assert by_doc["good-0"][0]["text"] == "good document number 0", "the first of two equal ids is kept"
    assert len(by_doc["big"]) == big_passages and all(len(p["text"].split()) <= 100 for p in by_doc["big"])


def test_oversized_document_is_rejected_when_capped(spark, tmp_path):
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "big.jsonl", "w") as fh:
        fh.write('{"id": "big", "text": "' + "lorem " * (BIG_DOC_BYTES // 6) + '"}\n')
        for i in range(GOOD):
            fh.write(f'{{"id": "g{i}", "text": "fine {i}"}}\n')
    cfg = make_config(tmp_path, f"corpus.input={tmp_path / 'in'}", "corpus.max_doc_bytes=1000000")
    stats = shard_corpus(spark, cfg)
    assert stats["rejects_by_reason"] == {"too_large": 1} and stats["docs"] == GOOD


def test_tsv_with_broken_column_counts(spark, tmp_path):
    expected = write_tsv_corpus(tmp_path / "c.tsv")
    stats = shard_corpus(spark, make_config(tmp_path, f"corpus.input={tmp_path / 'c.tsv'}", "corpus.max_reject_ratio=0.5"))
    assert stats["rejects_by_reason"] == expected["rejects"] and stats["docs"] == expected["docs"]


def test_parquet_with_wrong_types_is_all_rejects_and_stops_the_run(spark, tmp_path):
    write_wrong_type_parquet(tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"3 of 3 input records rejected .* by reason: \{'wrong_type': 3\}"):
        shard_corpus(spark, make_config(tmp_path, f"corpus.input={tmp_path / 't.parquet'}"))


def test_parquet_with_a_wrong_schema_is_a_one_line_error_from_the_job(tmp_path):
    """Through the real job entry point: exit code 3 and one readable line, no traceback."""
    write_wrong_schema_parquet(tmp_path / "w.parquet")
    run = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "shard_corpus.py"),
                          "--set", f"corpus.input={tmp_path / 'w.parquet'}", "--set", f"paths.work_dir={tmp_path}/work",
                          "--set", "spark.master=local[1]"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "error: input" in run.stderr and "lacks required column(s) ['id', 'text']" in run.stderr
    assert "['doc', 'body']" in run.stderr
