"""The data contracts between stages (docs/stages.md and docs/reference/index-format.md), defined once
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

def embeddings_schema(dim: int) -> pa.Schema:
    """The Embeddings table: float32 vectors of a fixed dimension (a float16 table would halve the
    bytes but loses precision the exact top-k then misses; not offered until something needs it)."""
    return pa.schema([
        pa.field("pid", pa.int64(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.field("element", pa.float32(), nullable=False), dim), nullable=False),
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

