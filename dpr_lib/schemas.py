"""The data contracts between stages (README, "The stages" and "Index version layout"), defined once
and imported everywhere."""

from __future__ import annotations

import pyarrow as pa

PASSAGES = pa.schema([
    pa.field("pid", pa.int64(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("chunk", pa.int32(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
])

REJECTS = pa.schema([
    pa.field("source", pa.string()),   # file and byte offset (or file alone)
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("raw", pa.string()),      # the raw record, truncated, invalid bytes escaped
])

def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("pid", pa.int64(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.field("element", value, nullable=False), dim), nullable=False),
    ])


DOCSTORE = pa.schema([
    pa.field("pid", pa.int64(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])

# Parquet key-value metadata keys of the Embeddings table.
META_FINGERPRINT = b"dpr.fingerprint"
META_SOURCE_SHA256 = b"dpr.source_sha256"
META_DIM = b"dpr.dim"

# 2: adds k_factor, memory and per-shard re-rank stores; a reader of 1 would search compact
# shards without re-ranking, so it must refuse them (and a service keeps its current version).
