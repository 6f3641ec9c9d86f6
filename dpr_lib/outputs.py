"""Outputs every stage writes the same way: its stats JSON (``<paths.stats>/<stage>.json``) and
the publication of a Spark job's part files under their final name. Imported by the stages
(corpus, encode, index, training data), so none of them imports another for it.
"""

from __future__ import annotations

import json

from dpr_lib import storage
from dpr_lib.config import Config, join_url


def write_stats(cfg: Config, stage: str, stats: dict) -> str:
    """Write a stage's stats JSON to <paths.stats>/<stage>.json and return its URL."""
    url = join_url(cfg.path("stats"), f"{stage}.json")
    storage.write_bytes_atomic(url, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
    return url


def publish_spark_output(tmp_url: str, final_url: str, suffix: str = ".parquet") -> list[str]:
    """Move Spark's part files from ``tmp_url`` to ``final_url`` as part-NNNNN<suffix>, replacing
    what was there. Files keep Spark's partition order, so range-partitioned output stays ordered."""
    fs, tmp_path = storage.get_fs(tmp_url)
    _, final_path = storage.get_fs(final_url)
    parts = sorted(p for p in fs.ls(tmp_path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    if fs.exists(final_path):
        fs.rm(final_path, recursive=True)
    fs.makedirs(final_path, exist_ok=True)
    out = []
    for i, p in enumerate(parts):
        dest = f"{final_path}/part-{i:05d}{suffix}"
        fs.mv(p, dest)
        out.append(dest)
    fs.rm(tmp_path, recursive=True)
    return out
