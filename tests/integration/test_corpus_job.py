"""The corpus stage on real Spark: every input format, passage boundaries, pid stability, rejects."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config, read_table, synthetic_docs, write_jsonl

from dpr_lib import schemas, storage
from dpr_lib.corpus import make_pid, shard_corpus
from dpr_lib.errors import InputError


def read_passages(cfg) -> pa.Table:
    return read_table(cfg.path("passages"))


def test_jsonl_passages_titles_boundaries_and_contract(spark, tmp_path):
    docs = [{"id": "a", "title": "Alpha", "text": " ".join(f"a{i}" for i in range(250))},
            {"id": "b", "title": "Bravo", "text": "just a few words"}]
    cfg = make_config(tmp_path, f"corpus.input={write_jsonl(tmp_path / 'in' / 'c.jsonl', docs)}")
    stats = shard_corpus(spark, cfg)
    assert (stats["input_records"], stats["docs"], stats["passages"], stats["rejects"]) == (2, 2, 4, 0)
    table = read_passages(cfg)
    assert table.schema.names == schemas.PASSAGES.names
    assert [f.type for f in table.schema] == [f.type for f in schemas.PASSAGES]
    rows = {(r["doc_id"], r["chunk"]): r for r in table.to_pylist()}
    assert rows[("a", 0)]["text"].split() == [f"a{i}" for i in range(100)]
    assert rows[("a", 2)]["text"].split() == [f"a{i}" for i in range(200, 250)]
    assert rows[("b", 0)]["text"] == "just a few words"
    assert {r["title"] for r in rows.values() if r["doc_id"] == "a"} == {"Alpha"}
    assert all(r["pid"] == make_pid(d, c) for (d, c), r in rows.items())
    pids = table.column("pid").to_pylist()
    assert pids == sorted(pids), "files are range-partitioned and sorted by pid"
    assert json.load(open(stats["stats_url"]))["passages"] == 4


def test_every_format_gives_the_same_passages(spark, tmp_path):
    docs = synthetic_docs(6, words_per_doc=130)
    inputs = tmp_path / "inputs"
    jsonl = write_jsonl(inputs / "jsonl" / "c.jsonl", docs)
    os.makedirs(inputs / "tsv")
    with open(inputs / "tsv" / "c.tsv", "w") as fh:
        fh.write("id\ttext\ttitle\n")
        for d in docs:
            fh.write(f"{d['id']}\t{d['text']}\t{d['title']}\n")
    os.makedirs(inputs / "parquet")
    pq.write_table(pa.Table.from_pylist(docs), inputs / "parquet" / "c.parquet")
    os.makedirs(inputs / "text")
    for d in docs:
        (inputs / "text" / f"{d['id']}.txt").write_text(d["text"])

    def key_set(url, fmt, name=""):
        cfg = make_config(tmp_path / (name or fmt), f"corpus.input={url}", f"corpus.format={fmt}")
        shard_corpus(spark, cfg)
        return {(r["doc_id"], r["chunk"], r["text"]) for r in read_passages(cfg).to_pylist()}, read_passages(cfg)

    want, _ = key_set(jsonl, "jsonl")
    assert len(want) == 12
    assert key_set(str(inputs / "tsv"), "tsv")[0] == want
    assert key_set(str(inputs / "parquet"), "parquet")[0] == want
    text_set, text_table = key_set(str(inputs / "text"), "text")
    assert {(d.replace(".txt", ""), c, t) for d, c, t in text_set} == want
    assert set(text_table.column("title").to_pylist()) == {d["id"] for d in docs}  # title = file name
    # compressed JSON Lines and TSV are read directly, format from the name before .gz / .bz2
    import bz2
    import gzip

    os.makedirs(inputs / "gz")
    with open(jsonl, "rb") as src, gzip.open(inputs / "gz" / "c.jsonl.gz", "wb") as dst:
        dst.write(src.read())
    assert key_set(str(inputs / "gz"), "auto", "gz")[0] == want
    os.makedirs(inputs / "bz2")
    with open(inputs / "tsv" / "c.tsv", "rb") as src, bz2.open(inputs / "bz2" / "c.tsv.bz2", "wb") as dst:
        dst.write(src.read())
    assert key_set(str(inputs / "bz2"), "auto", "bz2")[0] == want


def test_truncated_gzip_keeps_what_it_read_and_rejects_the_rest(spark, tmp_path):
    import gzip

    docs = synthetic_docs(200, words_per_doc=50, seed=4)
    data = gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    cfg = make_config(tmp_path, f"corpus.input={tmp_path / 'in'}", "corpus.max_reject_ratio=1")
    stats = shard_corpus(spark, cfg)
    assert 0 < stats["docs"] < 200 and stats["rejects"] == 1
    rejects = read_table(cfg.path("rejects")).to_pylist()
    assert [r["reason"] for r in rejects] == ["unreadable_file"] and "c.jsonl.gz" in rejects[0]["source"]


def test_pids_stable_across_runs_and_partitionings(spark, tmp_path):
    docs = synthetic_docs(40, words_per_doc=230, seed=3)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    a = make_config(tmp_path / "a", f"corpus.input={path}", "corpus.num_files=2")
    b = make_config(tmp_path / "b", f"corpus.input={path}", "corpus.num_files=5", "corpus.split_bytes=4000")
    shard_corpus(spark, a)
    first = read_passages(a)
    shard_corpus(spark, a)
    stats_b = shard_corpus(spark, b)
    assert stats_b["splits"] > 5, "the input really was read in several byte ranges"
    cols = ["pid", "doc_id", "chunk", "content_hash"]
    assert read_passages(a).select(cols).equals(first.select(cols))
    assert read_passages(b).select(cols).sort_by("pid").equals(first.select(cols).sort_by("pid"))


def test_dataframe_input(spark, tmp_path):
    df = spark.createDataFrame(synthetic_docs(3))
    cfg = make_config(tmp_path)
    stats = shard_corpus(spark, cfg, df=df)
    assert stats["passages"] == 6 and stats["format"] == "dataframe"  # 120 words -> 100 + 20
    with pytest.raises(InputError, match=r"lacks required column\(s\) \['text'\]"):
        shard_corpus(spark, cfg, df=spark.createDataFrame([{"id": "x", "body": "y"}]))


def test_temp_view_and_catalog_table_input(spark, tmp_path):
    """Documents already in Spark: ``corpus.input=table:<name>`` reads a temporary view or a
    catalog table (here saved with saveAsTable into a database located in a local warehouse dir)."""
    docs = synthetic_docs(4)
    spark.createDataFrame(docs).createOrReplaceTempView("dpr_docs_view")
    view = shard_corpus(spark, make_config(tmp_path / "v", "corpus.input=table:dpr_docs_view"))
    warehouse = tmp_path / "warehouse"
    spark.sql(f"CREATE DATABASE IF NOT EXISTS dpr_test LOCATION '{warehouse.as_uri()}'")
    try:
        spark.createDataFrame(docs).write.mode("overwrite").saveAsTable("dpr_test.docs")
        assert any(p.name == "docs" for p in warehouse.iterdir())         # really written to the warehouse
        table = shard_corpus(spark, make_config(tmp_path / "t", "corpus.input=table:spark_catalog.dpr_test.docs"))
    finally:
        spark.sql("DROP DATABASE IF EXISTS dpr_test CASCADE")
    assert view["passages"] == table["passages"] == 8 and view["rejects"] == table["rejects"] == 0
    cols = ["pid", "doc_id", "chunk", "content_hash"]
    a = read_passages(make_config(tmp_path / "v")).select(cols).sort_by("pid")
    b = read_passages(make_config(tmp_path / "t")).select(cols).sort_by("pid")
    assert a.equals(b)
    with pytest.raises(InputError, match="names table 'dpr_test.nope', which is not in the session's catalog"):
        shard_corpus(spark, make_config(tmp_path / "x", "corpus.input=table:dpr_test.nope"))


BAD_LINES = [
    (b'{"id": "ok1", "title": "t", "text": "good text one"}', None),
    (b'{"id": "ok2", "title": "t", "text": "good text two"}', None),
    (b'{"id": "m", "text": ', "malformed_json"),
    (b'{"title": "no id", "text": "x"}', "missing_id"),
    (b'{"id": "e", "text": "   "}', "empty_text"),
    (b'{"id": "n", "text": null}', "missing_text"),
    (b'{"id": "w", "text": 12}', "wrong_type"),
    (b'{"id": "u", "text": "bad \xff bytes"}', "invalid_utf8"),
    (b'{"id": "ok1", "title": "dup", "text": "duplicate id"}', "duplicate_doc_id"),
]


def test_rejects_are_written_counted_and_keep_the_raw_record(spark, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    cfg = make_config(tmp_path, f"corpus.input={path}", "corpus.max_reject_ratio=0.9")
    stats = shard_corpus(spark, cfg)
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert stats["rejects_by_reason"] == expected
    assert stats["input_records"] == len(BAD_LINES) == stats["docs"] + stats["rejects"]
    rejects_table = read_table(cfg.path("rejects"))
    assert rejects_table.schema.names == schemas.REJECTS.names
    rejects = rejects_table.to_pylist()
    dup = [r for r in rejects if r["reason"] == "duplicate_doc_id"][0]
    assert "duplicate id" in dup["raw"] and dup["source"].startswith(str(path))
    offsets = [len(b"\n".join(line for line, _ in BAD_LINES[:i])) + (1 if i else 0) for i in range(len(BAD_LINES))]
    malformed = [r for r in rejects if r["reason"] == "malformed_json"][0]
    assert malformed["source"] == f"{path}:{offsets[2]}"
    kept = read_passages(cfg).to_pylist()
    assert {(r["doc_id"], r["text"]) for r in kept} == {("ok1", "good text one"), ("ok2", "good text two")}


def test_reject_ratio_fails_and_leaves_previous_passages(spark, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_docs(4))
    cfg = make_config(tmp_path, f"corpus.input={good}")
    shard_corpus(spark, cfg)
    before = read_passages(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    cfg2 = make_config(tmp_path, f"corpus.input={bad}", "corpus.max_reject_ratio=0.1")
    with pytest.raises(InputError, match=r"7 of 9 input records rejected .* corpus.max_reject_ratio"):
        shard_corpus(spark, cfg2)
    assert read_passages(cfg).equals(before)
    assert len(read_table(cfg.path("rejects"))) == 7, "rejects of the failed run are kept for inspection"


def test_tsv_broken_columns_and_unreadable_input(spark, tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("id\ttext\ttitle\n1\tfine text\tT\n2\tmissing title column\n3\ta\tb\textra\n")
    cfg = make_config(tmp_path, f"corpus.input={path}", "corpus.max_reject_ratio=1")
    stats = shard_corpus(spark, cfg)
    assert stats["rejects_by_reason"] == {"bad_columns": 2} and stats["docs"] == 1
    with pytest.raises(InputError, match="does not exist"):
        shard_corpus(spark, make_config(tmp_path, f"corpus.input={tmp_path}/nothing.jsonl"))


def test_pid_collision_is_an_error(spark, tmp_path, monkeypatch):
    import dpr_lib.corpus as corpus

    # Force a collision the way a hash can: two different keys, one pid. The real mapper runs on
    # the executors with the pid function the driver hands it, so replacing that function here
    # reaches every worker.
    monkeypatch.setattr(corpus, "make_pid", lambda doc_id, chunk: 42)
    cfg = make_config(tmp_path, f"corpus.input={write_jsonl(tmp_path / 'c.jsonl', synthetic_docs(2))}")
    with pytest.raises(InputError, match="pid collision between different"):
        shard_corpus(spark, cfg)
    assert storage.table_pointer(cfg.path("passages")) is None, "no Passages table was published"
    assert os.listdir(cfg.path("passages")) == [], "the refused version was removed"
