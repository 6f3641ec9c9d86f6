"""Stage 2, encode: the Passages table -> the Embeddings table, through the passage encoder.

The encoder itself (model, fingerprint, batching) is :mod:`dpr_lib.encoder`, Spark-free; the
configured passage encoder (``encoder.backend``, auto included) is
:func:`dpr_lib.encoder_choice.passage_spec`. The encode job runs one Spark task per Passages
file and writes one Embeddings file per Passages file, atomically, with the encoder fingerprint
in the Parquet metadata, so a rerun skips every finished file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpr_lib import schemas, storage
from dpr_lib.config import Config, join_url
from dpr_lib.encoder import Encoder, EncoderSpec, get_encoder
from dpr_lib.encoder_choice import passage_spec
from dpr_lib.errors import EncoderError, IncompatibleIndexError, InputError

log = logging.getLogger("dpr_lib.encode")

def check_vectors(vectors: np.ndarray, pids: np.ndarray, dim: int) -> None:
    """Fail with the pid named on NaN/inf vectors or a wrong dimension."""
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EncoderError(f"encoder returned vectors of shape {vectors.shape}, expected [n, {dim}] "
                           f"(first pid {int(pids[0]) if len(pids) else None})")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise EncoderError(f"encoder returned NaN/inf vectors for pid(s) {pids[bad][:5].tolist()}")


def passage_pairs(batch: pa.RecordBatch) -> tuple[list, list]:
    """(titles, texts) of a Passages batch; a passage without text is an error naming its pid (the
    corpus stage rejects those, so one here is a table not written by it)."""
    texts = batch.column("text").to_pylist()
    empty = [int(p) for p, t in zip(batch.column("pid").to_pylist(), texts) if not t or not t.strip()]
    if empty:
        raise InputError(f"passages with empty text reached the encoder (pids {empty[:5]}); "
                         "the corpus stage should have rejected them")
    return batch.column("title").to_pylist(), texts


def embeddings_of(batch: pa.RecordBatch, vectors: np.ndarray, dim: int) -> pa.RecordBatch:
    """The Embeddings batch (pid, content_hash, vector) of a Passages batch and its vectors (checked)."""
    check_vectors(vectors, batch.column("pid").to_numpy(), dim)
    return embeddings_batch(batch.column("pid"), batch.column("content_hash"), vectors, schemas.embeddings_schema(dim))


def encode_batch(encoder: Encoder, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Passages batch (pid, title, text, content_hash) -> Embeddings batch (pid, content_hash, vector)."""
    return embeddings_of(batch, encoder.encode(*passage_pairs(batch)), encoder.spec.dim)


def embeddings_batch(pids, content_hashes, vectors: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    """Rows of the Embeddings table (``schema``: :func:`dpr_lib.schemas.embeddings_schema`, with or
    without file metadata): vectors float32 [n, dim] as its fixed-size lists."""
    dim = schema.field("vector").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.RecordBatch.from_arrays([pids, content_hashes, pa.FixedSizeListArray.from_arrays(flat, dim)],
                                      schema=schema)


# ---------------------------------------------------------------- one file (a Spark task, or a test)

def embeddings_metadata(fingerprint: dict, source_sha: str) -> dict[bytes, bytes]:
    """An Embeddings file's metadata: the encoder fingerprint (with its dim) and what it was made from."""
    return {schemas.META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True).encode(),
            schemas.META_SOURCE_SHA256: source_sha.encode(),
            schemas.META_DIM: str(fingerprint["dim"]).encode()}


def _complete_rows(out_url: str, fingerprint_id: str, source_sha: str) -> int | None:
    """Rows of ``out_url`` when it is a complete Embeddings file of this source and encoder, else None."""
    fs, path = storage.get_fs(out_url)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            meta, rows = pf.schema_arrow.metadata or {}, pf.metadata.num_rows
    except Exception:  # noqa: BLE001
        return None
    fp = json.loads(meta.get(schemas.META_FINGERPRINT, b"{}"))
    ok = fp.get("id") == fingerprint_id and meta.get(schemas.META_SOURCE_SHA256, b"").decode() == source_sha
    return rows if ok else None


def encode_file(spec: EncoderSpec, in_url: str, out_url: str, log_every_s: float = 10.0) -> dict:
    """Encode one Passages file into one Embeddings file, unless a complete one already exists.

    The output appears atomically (temporary local file, then rename or a single upload).
    """
    t0 = time.time()
    source_sha = storage.sha256_file(in_url)
    stats = {"file": in_url, "output": out_url, "rows": 0, "truncated": 0, "skipped": False,
             "python": sys.executable, "gpu": os.environ.get("DPR_GPU_ADDRESS", ""), "device": "",
             "seconds": 0.0}
    kept = _complete_rows(out_url, spec.fingerprint_id(), source_sha)
    if kept is not None:
        stats["skipped"], stats["rows"] = True, kept  # rows kept from an earlier run, not encoded now
        return stats
    encoder = get_encoder(spec)
    stats["device"] = str(encoder.device)
    truncated0 = encoder.truncated
    fs, path = storage.get_fs(in_url)
    schema = schemas.embeddings_schema(spec.dim).with_metadata(embeddings_metadata(spec.fingerprint(), source_sha))
    with storage.StagedFile(out_url, prefix="dpr-emb-") as staged, fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        total = pf.metadata.num_rows
        last_log = time.time()
        batches = pf.iter_batches(batch_size=spec.buffer_rows, columns=["pid", "title", "text", "content_hash"])
        # The stream is closed on the way out, error or not: on a GPU it holds the encoder's lock.
        with pq.ParquetWriter(staged.path, schema) as writer, \
                contextlib.closing(encoder.encode_stream(batches, passage_pairs)) as stream:
            for batch, vectors in stream:
                out = embeddings_of(batch, vectors, spec.dim)
                writer.write_batch(out.replace_schema_metadata(schema.metadata))
                stats["rows"] += batch.num_rows
                if time.time() - last_log > log_every_s:
                    rate = stats["rows"] / (time.time() - t0)
                    log.info("encode %s: %d/%d rows, %.1f passages/s, ETA %.0fs", in_url, stats["rows"],
                             total, rate, (total - stats["rows"]) / max(rate, 1e-9))
                    last_log = time.time()
    stats["truncated"] = encoder.truncated - truncated0
    stats["seconds"] = round(time.time() - t0, 3)
    return stats


# ---------------------------------------------------------------- Spark runner

def output_name(in_url: str) -> str:
    """The Embeddings file of a Passages file: stable across corpus runs (Spark's part-NNNNN-<id>
    names keep their partition number only), so an unchanged file is found complete and skipped."""
    from dpr_lib.outputs import spark_part

    name = os.path.basename(in_url)
    return (spark_part(name) or name.replace(".parquet", "")) + ".parquet"


def encode_passages(spark, cfg: Config) -> dict:
    """Run the encode stage over every Passages file; returns stats (also in <stats>/encode_passages.json)."""
    from pyspark import TaskContext

    from dpr_lib.outputs import write_stats
    from dpr_lib.spark import bind_storage, task_errors, tasks_dataframe

    bind_storage(spark, cfg)
    t0 = time.time()
    in_files = storage.list_files(cfg.path("passages"), ".parquet")
    if not in_files:
        raise InputError(f"no Passages files under {cfg.path('passages')}; run the corpus stage first")
    spec = passage_spec(cfg, build=True)
    out_dir = cfg.path("embeddings")
    outs = [join_url(out_dir, output_name(f)) for f in in_files]
    # Files of an older corpus layout would be mixed into the index: remove them.
    fs, out_path = storage.get_fs(out_dir)
    keep = {o.rsplit("/", 1)[-1] for o in outs}
    if fs.exists(out_path):
        for stale in storage.list_files(out_dir, ".parquet"):
            if stale.rsplit("/", 1)[-1] not in keep:
                fs.rm(storage.get_fs(stale)[1])
    log.info("encode: %d files with %s (%s pooling, normalize=%s, %s %s%s, max_length %d), fingerprint %s",
             len(in_files), spec.model_id, spec.pooling, spec.normalize, spec.backend, spec.dtype,
             " int8" if spec.quantize == "int8" else "", spec.max_length, spec.fingerprint_id())

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task_spec = spec
        ctx = TaskContext.get()
        if ctx is not None:
            cpus = int(ctx.cpus()) if hasattr(ctx, "cpus") else 1
            gpus = ctx.resources().get("gpu") if hasattr(ctx, "resources") else None
            if gpus is not None and gpus.addresses:
                os.environ["DPR_GPU_ADDRESS"] = gpus.addresses[0]
            else:
                os.environ.pop("DPR_GPU_ADDRESS", None)
            if spec.threads == 0:
                task_spec = dataclasses.replace(spec, threads=max(1, cpus))
        for batch in batches:
            for row in batch.to_pylist():
                st = encode_file(task_spec, row["input"], row["output"])
                st["attempt"] = ctx.attemptNumber() if ctx is not None else 0  # > 0: Spark retried the task
                yield pa.RecordBatch.from_pylist([st], schema=_TASK_STATS)

    tasks = tasks_dataframe(spark, [{"input": i, "output": o} for i, o in zip(in_files, outs)],
                            "input string, output string")
    from dpr_lib.spark import spark_schema

    with task_errors():
        results = [r.asDict() for r in tasks.mapInArrow(run, spark_schema(_TASK_STATS)).collect()]
    encoded = sum(r["rows"] for r in results if not r["skipped"])
    seconds = time.time() - t0
    stats = {
        "stage": "encode_passages", "files": len(results),
        "files_skipped": sum(r["skipped"] for r in results),
        "retried_tasks": sum(1 for r in results if r["attempt"]),
        "passages_encoded": encoded, "passages_reused": sum(r["rows"] for r in results if r["skipped"]),
        "truncated": sum(r["truncated"] for r in results),
        "passages_per_s": round(encoded / seconds, 2) if encoded else 0.0,
        "embeddings_url": out_dir, "fingerprint": spec.fingerprint(),
        "executor_python": sorted({r["python"] for r in results}),
        "devices": sorted({f"{r['device']} (spark gpu {r['gpu']})" if r["gpu"] else r["device"]
                           for r in results if r["device"]}),
        "tasks": results, "seconds": round(seconds, 3),
    }
    stats["stats_url"] = write_stats(cfg, "encode_passages", stats)
    log.info("encode: %d passages encoded, %d files skipped as complete, %d truncated, %.1f passages/s (%.1fs)",
             encoded, stats["files_skipped"], stats["truncated"], stats["passages_per_s"], seconds)
    return stats


_TASK_STATS = pa.schema([("file", pa.string()), ("output", pa.string()), ("rows", pa.int64()),
                         ("truncated", pa.int64()), ("skipped", pa.bool_()), ("python", pa.string()),
                         ("gpu", pa.string()), ("device", pa.string()), ("seconds", pa.float64()),
                         ("attempt", pa.int64())])


def check_embeddings(files: list[str], expected_fingerprint: dict | None = None) -> tuple[dict, int]:
    """All Embeddings files must carry one fingerprint (and ``expected_fingerprint`` if given).

    Returns (fingerprint, total rows). Reads Parquet footers only.
    """
    fingerprint, total = None, 0
    for f in files:
        fs, path = storage.get_fs(f)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            meta = pf.schema_arrow.metadata or {}
            total += pf.metadata.num_rows
        fp = json.loads(meta.get(schemas.META_FINGERPRINT, b"null"))
        if fp is None:
            raise IncompatibleIndexError(f"{f} has no encoder fingerprint: not written by the encode job")
        if fingerprint is None:
            fingerprint = fp
        elif fp.get("id") != fingerprint.get("id"):
            raise IncompatibleIndexError(
                f"Embeddings mix encoder fingerprints: {files[0]} has {fingerprint.get('id')} "
                f"({fingerprint.get('model_id')}), {f} has {fp.get('id')} ({fp.get('model_id')})")
    if expected_fingerprint and fingerprint and fingerprint.get("id") != expected_fingerprint.get("id"):
        raise IncompatibleIndexError(
            f"Embeddings were made by encoder {fingerprint.get('id')} ({fingerprint.get('model_id')}), "
            f"expected {expected_fingerprint.get('id')} ({expected_fingerprint.get('model_id')})")
    return fingerprint or {}, total
