"""Stage 1, corpus: raw documents -> the Passages table (+ rejects).

Reads JSON Lines (``id``, ``title``, ``text``), DPR's TSV (``id<TAB>text<TAB>title`` with a
header), Parquet with those columns, a directory of plain-text files (file name = doc id), a
Spark DataFrame, or a catalog table. Splits every document into passages of ``corpus.words``
words (optionally overlapping), keeps the title with each passage, and writes Parquet files
``part-NNNNN-*.parquet`` that are range-partitioned and sorted by ``pid``, into a new version of
the table that readers see once its pointer is written (``dpr_lib.outputs.commit_table``).

Invariants:
- ``pid`` depends only on (doc_id, chunk): stable across runs and input partitionings.
  A pid shared by two different keys is an error, never a merge.
- Every input record ends as a document or a reject: input_records = docs + rejects, counted
  independently (records read; distinct doc ids in the written Passages; rows of the written
  rejects) and checked before the Passages table is swapped in (``dpr_lib.accounting``).
- Rejects (with the raw record and its location) are written before the reject-ratio check,
  and a failing check leaves the previous Passages table untouched.

The pure functions (``split_words``, ``make_pid``, ``parse_*``) import no pyspark.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dpr_lib import accounting, schemas, storage
from dpr_lib.config import Config
from dpr_lib.errors import AccountingError, InputError
from dpr_lib.outputs import commit_table, discard_table_version, new_table_version, write_stats

log = logging.getLogger("dpr_lib.corpus")

RAW_LIMIT = 2000  # characters of a raw record kept in rejects
_CONTROL = {c: " " for c in range(32) if chr(c) not in "\t\n\r"}
_CONTROL[127] = " "
_FORMAT_BY_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text"}
# Compressed line files are read directly (one task per file: a compressed stream has no byte
# ranges to split at); record offsets are then offsets in the decompressed text.
_COMPRESSION_BY_EXT = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstd"}


def _compression(path: str) -> str | None:
    return _COMPRESSION_BY_EXT.get(os.path.splitext(path)[1].lower())


def _format_ext(path: str) -> str:
    """The extension that names the format: ``a.jsonl.gz`` -> ``.jsonl``."""
    if _compression(path):
        path = os.path.splitext(path)[0]
    return os.path.splitext(path)[1].lower()
_PID_MASK = (1 << 63) - 1


# ---------------------------------------------------------------- pure functions

def split_words(words: list[str], size: int, overlap: int = 0) -> list[list[str]]:
    """Consecutive windows of ``size`` words, each sharing ``overlap`` words with the previous one.

    Dropping the first ``overlap`` words of every window but the first gives back ``words``
    exactly (nothing lost, nothing duplicated). The last window may be shorter.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    if not words:
        return []
    stride = size - overlap
    out, start = [], 0
    while True:
        out.append(words[start:start + size])
        if start + size >= len(words):
            return out
        start += stride


def make_pid(doc_id: str, chunk: int) -> int:
    """Stable non-negative int64 id of passage ``chunk`` of ``doc_id`` (usable as a FAISS id)."""
    digest = hashlib.blake2b(f"{doc_id}\x1f{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _PID_MASK


def content_hash(title: str, text: str) -> str:
    """Hash of exactly what the encoder sees (title and text); decides embedding reuse."""
    return hashlib.blake2b(f"{title}\x1f{text}".encode(), digest_size=16).hexdigest()


def clean_text(text: str) -> str:
    """Control characters become spaces (they carry no words and confuse tokenizers)."""
    return text.translate(_CONTROL)


def passages_of(doc_id: str, title: str, text: str, words: int, overlap: int, pid_of=make_pid) -> list[tuple]:
    """Rows (pid, doc_id, chunk, title, text, content_hash) of one document."""
    rows = []
    for chunk, window in enumerate(split_words(text.split(), words, overlap)):
        body = " ".join(window)
        rows.append((pid_of(doc_id, chunk), doc_id, chunk, title, body, content_hash(title, body)))
    return rows


def _raw(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="backslashreplace")
    return data[:RAW_LIMIT]


def _reject(file: str, offset: int, reason: str, detail: str, raw: bytes | str) -> dict:
    return {"doc_id": None, "title": None, "text": None, "file": file, "offset": offset,
            "reason": reason, "detail": detail[:500], "raw": _raw(raw)}


def validate_record(file: str, offset: int, doc_id, title, text, raw, max_doc_bytes: int) -> dict:
    """One parsed record -> a document dict or a reject dict (reason set)."""
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        return _reject(file, offset, "missing_id", "record has no id", raw)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return _reject(file, offset, "wrong_type", f"id must be a string or integer, got {type(doc_id).__name__}", raw)
    if text is None:
        return _reject(file, offset, "missing_text", "record has no text", raw)
    if not isinstance(text, str):
        return _reject(file, offset, "wrong_type", f"text must be a string, got {type(text).__name__}", raw)
    if title is None:
        title = ""
    if not isinstance(title, str):
        return _reject(file, offset, "wrong_type", f"title must be a string, got {type(title).__name__}", raw)
    if len(text) > max_doc_bytes:
        return _reject(file, offset, "too_large", f"text has {len(text)} characters > corpus.max_doc_bytes", raw)
    text = clean_text(text)
    if not text.strip():
        return _reject(file, offset, "empty_text", "text is empty or whitespace only", raw)
    return {"doc_id": str(doc_id), "title": " ".join(clean_text(title).split()), "text": text,
            "file": file, "offset": offset, "reason": None, "detail": None, "raw": None}


def parse_jsonl_line(file: str, offset: int, line: bytes, max_doc_bytes: int) -> dict:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject(file, offset, "invalid_utf8", str(exc), line)
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return _reject(file, offset, "malformed_json", str(exc), decoded)
    if not isinstance(obj, dict):
        return _reject(file, offset, "malformed_json", f"expected a JSON object, got {type(obj).__name__}", decoded)
    return validate_record(file, offset, obj.get("id"), obj.get("title"), obj.get("text"), decoded, max_doc_bytes)


def parse_tsv_line(file: str, offset: int, line: bytes, max_doc_bytes: int) -> dict | None:
    """DPR TSV: id, text, title (text may be quoted as DPR's psgs_w100.tsv is). None for the header."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject(file, offset, "invalid_utf8", str(exc), line)
    stripped = decoded.rstrip("\r\n")
    if offset == 0 and stripped.lower().split("\t") == ["id", "text", "title"]:
        return None
    fields = next(csv.reader([stripped], delimiter="\t"), [])
    if len(fields) != 3:
        return _reject(file, offset, "bad_columns", f"expected 3 tab-separated columns, got {len(fields)}", decoded)
    doc_id, text, title = fields
    return validate_record(file, offset, doc_id, title, text, decoded, max_doc_bytes)


def iter_lines(fh, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every line that *starts* in [start, end) of a seekable binary file.

    Like Hadoop's LineRecordReader: a split skips the partial line at its start (the previous
    split owns it) and reads past ``end`` to finish its last line.
    """
    if start > 0:
        fh.seek(start - 1)
        fh.readline()
    pos = fh.tell()
    while pos < end:
        line = fh.readline()
        if not line:
            return
        yield pos, line
        pos += len(line)


# ---------------------------------------------------------------- input planning (driver)

@dataclass(frozen=True)
class Split:
    fmt: str
    path: str      # file URL
    start: int
    end: int
    root: str      # input root, for text doc ids


def detect_format(files: list[str], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    exts = {_format_ext(f) for f in files}
    fmts = {_FORMAT_BY_EXT.get(e, "text") for e in exts}
    if len(fmts) != 1:
        raise InputError(f"cannot detect corpus.format from extensions {sorted(exts)}; set corpus.format")
    return fmts.pop()


def plan_splits(input_url: str, fmt: str, split_bytes: int) -> tuple[str, list[Split], int]:
    """List the input files and cut line-oriented ones into byte ranges. Returns (fmt, splits, bytes)."""
    try:
        fs, path = storage.get_fs(input_url)
        if not fs.exists(path):
            raise InputError(f"corpus.input does not exist: {input_url}")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot open corpus.input {input_url}: {exc}") from exc
    files = storage.list_files(input_url)
    if not files:
        raise InputError(f"corpus.input {input_url} contains no files")
    fmt = detect_format(files, fmt)
    root = input_url if not fs.isfile(path) else os.path.dirname(input_url)
    splits, total = [], 0
    for f in files:
        size = fs.size(storage.get_fs(f)[1])
        total += size
        if fmt in ("jsonl", "tsv") and _compression(f):
            splits.append(Split(fmt, f, 0, 1 << 62, root))
        elif fmt in ("jsonl", "tsv"):
            for start in range(0, max(size, 1), split_bytes):
                splits.append(Split(fmt, f, start, min(start + split_bytes, size), root))
        else:
            splits.append(Split(fmt, f, 0, size, root))
    return fmt, splits, total


def parse_split(split: Split, max_doc_bytes: int) -> Iterator[dict]:
    """Every record of one split as a document or a reject dict (schema PARSED)."""
    fs, path = storage.get_fs(split.path)
    if split.fmt == "text":
        rel = split.path[len(split.root):].lstrip("/") if split.path.startswith(split.root) else split.path
        doc_id = rel or os.path.basename(split.path)
        title = os.path.splitext(os.path.basename(split.path))[0].replace("_", " ")
        try:
            data = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001
            yield _reject(split.path, 0, "unreadable_file", str(exc), "")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _reject(split.path, 0, "invalid_utf8", str(exc), data[:RAW_LIMIT])
            return
        yield validate_record(split.path, 0, doc_id, title, text, text, max_doc_bytes)
        return
    parse = parse_jsonl_line if split.fmt == "jsonl" else parse_tsv_line
    try:
        fh = fs.open(path, "rb", compression=_compression(path))
    except Exception as exc:  # noqa: BLE001
        yield _reject(split.path, split.start, "unreadable_file", str(exc), "")
        return
    with fh:
        try:
            for offset, line in iter_lines(fh, split.start, split.end):
                if not line.strip():
                    continue  # blank lines are not records
                rec = parse(split.path, offset, line, max_doc_bytes)
                if rec is not None:
                    yield rec
        except (OSError, EOFError) as exc:  # a truncated or corrupt compressed stream
            if not _compression(path):
                raise
            yield _reject(split.path, split.start, "unreadable_file", f"{type(exc).__name__}: {exc}", "")


_PARSED_FIELDS = ["doc_id", "title", "text", "file", "offset", "reason", "detail", "raw"]
PARSED = pa.schema([
    ("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("file", pa.string()),
    ("offset", pa.int64()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string()),
])


def _records_to_batches(records: Iterable[dict], batch_rows: int = 2048) -> Iterator[pa.RecordBatch]:
    buf: list[dict] = []
    for rec in records:
        buf.append(rec)
        if len(buf) >= batch_rows:
            yield pa.RecordBatch.from_pylist(buf, schema=PARSED)
            buf = []
    if buf:
        yield pa.RecordBatch.from_pylist(buf, schema=PARSED)


# ---------------------------------------------------------------- Spark runner

def read_raw(spark, cfg: Config, input_url: str | None = None, df=None):
    """Parsed records (schema PARSED) as a DataFrame, plus input stats. Nothing is collected."""
    from dpr_lib.spark import spark_schema

    ccfg = cfg.corpus
    max_doc = ccfg.max_doc_bytes
    if df is None and input_url and input_url.startswith("table:"):
        table = input_url[len("table:"):]
        if not spark.catalog.tableExists(table):
            raise InputError(f"corpus.input names table {table!r}, which is not in the session's catalog")
        df = spark.table(table)
    if df is None:
        fmt, splits, total_bytes = plan_splits(input_url, ccfg.format, ccfg.split_bytes)
        if fmt == "parquet":
            df = spark.read.parquet(*[s.path for s in splits])
            return _parse_dataframe(df, max_doc, source=input_url), {"input_bytes": total_bytes, "format": fmt}
        from dpr_lib.spark import tasks_dataframe

        rows = [s.__dict__ for s in splits]
        split_df = tasks_dataframe(spark, rows, "fmt string, path string, start long, end long, root string")

        def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                for row in batch.to_pylist():
                    yield from _records_to_batches(parse_split(Split(**row), max_doc))

        parsed = split_df.mapInArrow(parse, spark_schema(PARSED))
        return parsed, {"input_bytes": total_bytes, "format": fmt, "splits": len(rows)}
    return _parse_dataframe(df, max_doc, source="dataframe"), {"input_bytes": None, "format": "dataframe"}


def _parse_dataframe(df, max_doc: int, source: str):
    """A DataFrame with columns id, text[, title] -> PARSED rows (rows validated in Python)."""
    from pyspark.sql import functions as F

    from dpr_lib.spark import spark_schema

    missing = [c for c in ("id", "text") if c not in df.columns]
    if missing:
        raise InputError(
            f"input {source} lacks required column(s) {missing}; expected id, text and optional title, "
            f"got {df.columns}"
        )
    cols = [F.col("id").cast("string").alias("id"), F.col("text"),
            (F.col("title") if "title" in df.columns else F.lit(None).cast("string")).alias("title"),
            F.input_file_name().alias("_file")]
    text_type = dict(df.dtypes)["text"]
    title_type = dict(df.dtypes).get("title", "string")
    df = df.select(*cols).withColumn("_row", F.monotonically_increasing_id())

    def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        def records():
            for batch in batches:
                for row in batch.to_pylist():
                    text, title = row["text"], row["title"]
                    raw = json.dumps({k: row[k] for k in ("id", "title", "text")}, default=str)
                    if text_type != "string" and text is not None:
                        text = 0  # any non-string marks wrong_type
                    if title_type != "string" and title is not None:
                        title = 0
                    yield validate_record(row["_file"] or source, row["_row"], row["id"], title, text,
                                          raw, max_doc)
        yield from _records_to_batches(records())

    return df.mapInArrow(parse, spark_schema(PARSED))


def _passages_mapper(words: int, overlap: int, pid_of):
    """The corpus stage's mapper: documents -> Passages rows. ``pid_of`` is the pid function the
    driver names (shipped with the closure), so every executor uses the same one."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            rows = []
            for d in batch.select(["doc_id", "title", "text"]).to_pylist():
                rows.extend(passages_of(d["doc_id"], d["title"], d["text"], words, overlap, pid_of))
            if rows:
                yield pa.RecordBatch.from_arrays(
                    [pa.array(col, type=f.type) for col, f in zip(zip(*rows), schemas.PASSAGES)],
                    schema=schemas.PASSAGES)
    return run


def shard_corpus(spark, cfg: Config, df=None) -> dict:
    """Run the corpus stage: read ``corpus.input`` (or ``df``), write Passages and rejects.

    Returns the stats dict (also written to <stats>/shard_corpus.json).
    """
    from dpr_lib.spark import bind_storage, task_errors

    bind_storage(spark, cfg)
    with task_errors():
        return _shard_corpus(spark, cfg, df)


def _shard_corpus(spark, cfg: Config, df=None) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from dpr_lib.spark import spark_schema

    t0 = time.time()
    ccfg = cfg.corpus
    input_url = ccfg.input
    if df is None and not input_url:
        from dpr_lib.default_corpus import write_default_corpus

        input_url = storage.local_path(cfg.path("work_dir")) + "/default_corpus/python_docs.jsonl"
        n = write_default_corpus(input_url, limit=ccfg.default_corpus_limit)
        log.info("embedded corpus: %d documents of Python's own documentation -> %s", n, input_url)

    parsed, input_stats = read_raw(spark, cfg, input_url, df)
    parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        docs = parsed.filter(F.col("reason").isNull())
        ranked = docs.withColumn(
            "_rn", F.row_number().over(Window.partitionBy("doc_id").orderBy("file", "offset")))
        dup_rejects = ranked.filter(F.col("_rn") > 1).select(
            "file", "offset", F.lit("duplicate_doc_id").alias("reason"),
            F.concat(F.lit("doc id "), F.col("doc_id"), F.lit(" seen earlier in the input")).alias("detail"),
            F.substring(F.to_json(F.struct("doc_id", "title", "text")), 1, RAW_LIMIT).alias("raw"))
        rejects = parsed.filter(F.col("reason").isNotNull()).select("file", "offset", "reason", "detail", "raw")
        rejects = rejects.unionByName(dup_rejects).select(
            F.concat(F.col("file"), F.lit(":"), F.col("offset").cast("string")).alias("source"),
            "reason", "detail", "raw").select(*schemas.REJECTS.names)  # the contract's columns, in order

        rejects_url = cfg.path("rejects")
        rejects_version = new_table_version(rejects_url)
        rejects.coalesce(1).write.mode("overwrite").parquet(rejects_version)
        commit_table(rejects_url, rejects_version)  # rejects are written even when the job then fails
        by_reason = {r["reason"]: r["count"] for r in
                     spark.read.parquet(rejects_version).groupBy("reason").count().collect()}
        n_rejects = sum(by_reason.values())
        n_input = parsed.count()  # every record read, counted apart from docs and rejects
        if n_input == 0:
            raise InputError(f"corpus {input_url or 'dataframe'} has no records")
        ratio = n_rejects / n_input
        if ratio > ccfg.max_reject_ratio:
            raise InputError(
                f"{n_rejects} of {n_input} input records rejected ({ratio:.1%} > corpus.max_reject_ratio "
                f"{ccfg.max_reject_ratio:.1%}); by reason: {by_reason}; see {rejects_url}. "
                "The Passages table was left as it was.")

        passages = ranked.filter(F.col("_rn") == 1).select("doc_id", "title", "text").mapInArrow(
            _passages_mapper(ccfg.words, ccfg.overlap, make_pid), spark_schema(schemas.PASSAGES))
        passages_url = cfg.path("passages")
        tmp = new_table_version(passages_url)  # readers see it only once commit_table points at it
        (passages.repartitionByRange(ccfg.num_files, "pid").sortWithinPartitions("pid")
         .write.mode("overwrite").parquet(tmp))
        collisions = (spark.read.parquet(tmp).groupBy("pid")
                      .agg(F.count("*").alias("n"), F.collect_set(F.struct("doc_id", "chunk")).alias("keys"))
                      .filter("n > 1").limit(5).collect())
        if collisions:
            discard_table_version(tmp)
            detail = "; ".join(f"pid {r['pid']}: {[tuple(k) for k in r['keys']]}" for r in collisions)
            raise InputError(f"pid collision between different (doc_id, chunk) keys: {detail}")
        docs_written = spark.read.parquet(tmp).select("doc_id").distinct().count()
        try:
            accounting.check({"input_records": n_input, "docs": docs_written, "rejects": n_rejects},
                             "corpus stage")
        except AccountingError:
            discard_table_version(tmp)
            raise
        n_docs = docs_written
        files = commit_table(passages_url, tmp)
        n_passages = sum(pq.ParquetFile(storage.get_fs(passages_url)[0].open(f, "rb")).metadata.num_rows
                         for f in files)
    finally:
        parsed.unpersist()

    stats = {
        "stage": "shard_corpus", "input": input_url or "dataframe", **input_stats,
        "input_records": n_input, "docs": n_docs, "passages": n_passages, "files": len(files),
        "rejects": n_rejects, "rejects_by_reason": by_reason, "reject_ratio": round(ratio, 6),
        "passages_url": passages_url, "rejects_url": rejects_url,
        "words": ccfg.words, "overlap": ccfg.overlap, "seconds": round(time.time() - t0, 3),
    }
    stats["stats_url"] = write_stats(cfg, "shard_corpus", stats)
    log.info("shard_corpus: %d records -> %d docs, %d passages in %d files, %d rejects %s (%.1fs)",
             n_input, n_docs, n_passages, len(files), n_rejects, by_reason or "", stats["seconds"])
    return stats
