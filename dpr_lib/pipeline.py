"""The whole pipeline in one call: corpus -> encode -> index + publish -> a few sample questions.

This is what ``make run`` runs on the embedded default corpus. Stages are idempotent: the encode
stage skips Embeddings files that are complete for unchanged Passages files.
"""

from __future__ import annotations

import logging
import time

from dpr_lib.config import Config

log = logging.getLogger("dpr_lib.pipeline")

SAMPLE_QUESTIONS = [
    "How do I read rows from a CSV file?",
    "How can I run a shell command and capture its output?",
    "What does the with statement do?",
    "How do I create a temporary directory that is removed automatically?",
]


def run_pipeline(spark, cfg: Config, questions: list[str] | None = None, k: int = 3) -> dict:
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages
    from dpr_lib.index import build_index
    from dpr_lib.search import Searcher, format_hits
    from dpr_lib.spark import bind_storage

    bind_storage(spark, cfg)
    t0 = time.time()
    corpus = shard_corpus(spark, cfg)
    encode = encode_passages(spark, cfg)
    manifest = build_index(spark, cfg)
    searcher = Searcher(cfg.path("index_root"), cfg.encoder, cfg.path("cache_dir"),
                        storage_options=cfg.storage_options())
    questions = SAMPLE_QUESTIONS if questions is None else questions
    answers = searcher.ask(questions, k) if questions else []
    for q, hits in zip(questions, answers):
        print(format_hits(q, hits), flush=True)
    seconds = round(time.time() - t0, 1)
    print(f"\npublished index version {manifest.version} to {cfg.path('index_root')} "
          f"({manifest.totals['vectors']} passages, {manifest.factory}, nprobe {manifest.nprobe}) "
          f"in {seconds}s", flush=True)
    return {"version": manifest.version, "index_root": cfg.path("index_root"), "seconds": seconds,
            "passages": corpus["passages"], "rejects": corpus["rejects"],
            "encoded": encode["passages_encoded"], "encode_passages_per_s": encode["passages_per_s"],
            "recall_at_nprobe": manifest.recall["at_nprobe"],
            "top_hits": {q: [h.title for h in hits] for q, hits in zip(questions, answers)}}
