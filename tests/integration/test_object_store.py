"""Object storage reached only through the config: one source of storage options for every fsspec
call (work dir, index, model URL, recall questions), and Spark's own s3a client pointed at the
same endpoint."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import uuid

import fsspec
from conftest import make_config, synthetic_docs, write_jsonl

from dpr_lib import storage
from dpr_lib.manifest import read_latest
from dpr_lib.pipeline import run_pipeline
from dpr_lib.search import Searcher
from dpr_lib.spark import hadoop_s3a_conf


def test_pipeline_with_work_dir_and_index_on_s3_through_endpoint_url_only(spark, tmp_path, tiny_bert_dir,
                                                                          s3_endpoint):
    """The work dir (stats, index), the corpus (gzipped: read by fsspec inside the tasks), the model
    and the recall questions live on the S3 server, which is reachable only through
    publish.endpoint_url: a call that missed the options would go to AWS (unreachable here) and
    fail. The Spark tables stay local: Spark reaches S3 through hadoop-aws, which this machine
    does not have."""
    assert not os.environ.get("AWS_ENDPOINT_URL") and not os.environ.get("AWS_ENDPOINT_URL_S3")
    root = f"s3://dpr-test/wd-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(tiny_bert_dir.rstrip("/") + "/", f"{root}/models/tiny/".removeprefix("s3://"), recursive=True)
    fs.pipe(f"{root}/questions.txt".removeprefix("s3://"),
            "\n".join(f"where is fact{i} mentioned" for i in range(40)).encode())
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(60, seed=3))
    fs.pipe(f"{root}/in/c.jsonl.gz".removeprefix("s3://"), gzip.compress(open(corpus, "rb").read()))
    tables = tmp_path / "tables"
    cfg = make_config(tmp_path, f"paths.work_dir={root}", f"paths.passages={tables}/passages",
                      f"paths.rejects={tables}/rejects", f"paths.embeddings={tables}/embeddings",
                      f"corpus.input={root}/in/c.jsonl.gz",
                      f"encoder.model={root}/models/tiny", "encoder.pooling=mean", "encoder.normalize=true",
                      f"index.recall_questions={root}/questions.txt", f"publish.endpoint_url={s3_endpoint}")
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_pipeline(spark, cfg, ["where is fact7 mentioned"], k=3)

    opts = cfg.storage_options()
    assert read_latest(f"{root}/index", opts) == result["version"]
    for stage in ("shard_corpus", "encode_passages", "build_index"):
        assert storage.exists(f"{root}/stats/{stage}.json", opts), f"{stage} stats on the S3 work dir"
    assert not os.path.exists(root), "nothing of the work dir went to a local path named like the URL"
    manifest = Searcher(f"{root}/index", cfg.encoder, cfg.path("cache_dir"), storage_options=opts).index.manifest
    assert manifest.recall["questions_file"] == f"{root}/questions.txt"
    assert result["passages"] == result["encoded"] == 120, "60 documents of 120 words, 100-word passages"


def test_spark_s3a_client_gets_the_same_endpoint():
    cfg = make_config("/tmp", "publish.endpoint_url=http://minio.internal:9000")
    assert hadoop_s3a_conf(cfg) == {"spark.hadoop.fs.s3a.endpoint": "http://minio.internal:9000",
                                    "spark.hadoop.fs.s3a.path.style.access": "true"}
    assert hadoop_s3a_conf(make_config("/tmp")) == {}
