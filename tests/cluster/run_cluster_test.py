"""`make cluster-test`: the whole pipeline through spark-submit on a real multi-executor cluster.

``local-cluster[2,1,2048]`` starts a standalone master and two workers, each running an executor
JVM with its own Python workers. Executors run the Python of the packed environment
(``--archives dist/dpr_env.tar.gz#env`` + ``spark.pyspark.python=./env/bin/python``), not this
virtualenv, and the encode stage records every executor's ``sys.executable``. Spark tables live
on the local filesystem (plain paths = file://; s3a:// would need hadoop-aws and the AWS SDK jars
on the classpath, which cannot be fetched offline), and the index is published through fsspec to
``s3://`` on a real S3 HTTP server (moto) on 127.0.0.1. The result is checked with the assertions
of tests/integration/test_pipeline.py, then the same pipeline runs in ``local[2]`` for comparison.

    python tests/cluster/run_cluster_test.py --archive dist/dpr_env.tar.gz [--docs 100] [--skip-local]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = ["What does the with statement do?", "How do I parse command-line arguments?"]


def _executor_dirs() -> set[str]:
    """Standalone workers' app directories (each executor unpacks the archive there, ~2 GB)."""
    import glob

    import pyspark

    return set(glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "work", "app-*")))


def _write_conf(path: str, work: str, index_root: str, endpoint: str, docs: int) -> None:
    import yaml

    conf = {
        "spark": {"app_name": "dpr-cluster-test",
                  "conf": {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"}},
        "paths": {"work_dir": work, "cache_dir": os.path.join(work, "cache"), "index_root": index_root},
        "corpus": {"default_corpus_limit": docs, "num_files": 4},
        "index": {"num_shards": 2},
        "publish": {"endpoint_url": endpoint},
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(conf, fh, sort_keys=False)


def cluster_command(archive: str, conf: str) -> list[str]:
    """The spark-submit command line (docs/operations/cluster.md shows it)."""
    return [os.path.join(os.path.dirname(sys.executable), "spark-submit"),
            "--master", "local-cluster[2,1,2048]",
            "--archives", f"{archive}#env",
            "--conf", "spark.pyspark.python=./env/bin/python",
            "--conf", f"spark.pyspark.driver.python={sys.executable}",
            "--conf", "spark.executor.memory=1536m",
            os.path.join(REPO, "jobs", "pipeline.py"), "--conf", conf,
            *[a for q in QUESTIONS for a in ("--question", q)]]


def _run(cmd: list[str], log_path: str, env: dict) -> float:
    print("$ " + " ".join(cmd if len(" ".join(cmd)) < 400 else cmd[:8] + ["..."]), flush=True)
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-4000:]
        sys.exit(f"FAILED (exit {proc.returncode}) after {seconds:.0f}s; log {log_path}:\n{tail}")
    return seconds


def _stats(work: str, stage: str) -> dict:
    with open(os.path.join(work, "stats", f"{stage}.json"), encoding="utf-8") as fh:
        return json.load(fh)


def check(name: str, work: str, index_root: str, endpoint: str) -> dict:
    """The assertions of the local pipeline test, on the published index read back from S3."""
    from dpr_lib.config import load_config
    from dpr_lib.search import Searcher

    corpus, encode = _stats(work, "shard_corpus"), _stats(work, "encode_passages")
    cfg = load_config(None, [f"publish.endpoint_url={endpoint}", f"paths.cache_dir={work}/search-cache"])
    searcher = Searcher(index_root, cfg.encoder, cfg.path("cache_dir"), storage_options=cfg.storage_options())
    manifest = searcher.index.manifest
    hits = {q: [h.title for h in hs] for q, hs in zip(QUESTIONS, searcher.ask(QUESTIONS, 3))}
    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    expect(corpus["passages"] == encode["passages_encoded"] == manifest.totals["vectors"] > 100,
           f"passages {corpus['passages']} = encoded {encode['passages_encoded']} = indexed "
           f"{manifest.totals['vectors']} > 100")
    expect(corpus["rejects"] == 0, f"rejects {corpus['rejects']} == 0")
    expect("Python language reference: with" in hits[QUESTIONS[0]], f"with-statement hit in {hits[QUESTIONS[0]]}")
    expect(any(t.startswith("argparse") for t in hits[QUESTIONS[1]]), f"argparse hit in {hits[QUESTIONS[1]]}")
    expect(manifest.recall["at_nprobe"] >= 0.95, f"recall {manifest.recall['at_nprobe']} >= 0.95")
    if failures:
        sys.exit(f"{name}: FAILED: " + "; ".join(failures))
    timings = {"corpus": corpus["seconds"], "encode": encode["seconds"],
               **{f"index.{k}": v for k, v in (manifest.timings or {}).items()}}
    return {"executor_python": encode["executor_python"], "tasks": len(encode["tasks"]),
            "passages": corpus["passages"], "version": manifest.version, "hits": hits, "stages": timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", default="dist/dpr_env.tar.gz", help="venv-pack archive (make package)")
    parser.add_argument("--docs", type=int, default=100, help="documents of the embedded corpus (default 100)")
    parser.add_argument("--out", default="work-cluster", help="work directory (replaced)")
    parser.add_argument("--skip-local", action="store_true", help="do not run the local[2] comparison")
    args = parser.parse_args()
    archive = os.path.abspath(args.archive)
    if not os.path.exists(archive):
        sys.exit(f"{archive} not found: run `make package` first")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from s3server import start_s3_server

    before = _executor_dirs()

    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.pop("PYSPARK_PYTHON", None)          # executors must not fall back to this virtualenv
    env.pop("SPARK_ENV_LOADED", None)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    server, endpoint = start_s3_server("dpr-cluster")
    report: dict = {"archive": archive, "archive_bytes": os.path.getsize(archive), "docs": args.docs}
    try:
        work = os.path.join(out, "cluster")
        conf = os.path.join(out, "cluster.yaml")
        _write_conf(conf, work, "s3://dpr-cluster/cluster/index", endpoint, args.docs)
        seconds = _run(cluster_command(archive, conf), os.path.join(out, "cluster.log"), env)
        result = check("cluster", work, "s3://dpr-cluster/cluster/index", endpoint)
        pythons = result["executor_python"]
        driver_venv = os.path.dirname(os.path.dirname(sys.executable))
        if not pythons or any(not p.endswith("/env/bin/python") or p.startswith(driver_venv + "/bin") for p in pythons):
            sys.exit(f"executors did not run the shipped environment: {pythons}")
        if len(pythons) < 2:
            sys.exit(f"expected two executors (each its own unpacked archive), saw {pythons}")
        report["cluster"] = {"seconds": round(seconds, 1), **result}
        if not args.skip_local:
            work = os.path.join(out, "local")
            conf = os.path.join(out, "local.yaml")
            _write_conf(conf, work, "s3://dpr-cluster/local/index", endpoint, args.docs)
            cmd = [sys.executable, os.path.join(REPO, "jobs", "pipeline.py"), "--conf", conf,
                   "--set", "spark.master=local[2]", *[a for q in QUESTIONS for a in ("--question", q)]]
            seconds = _run(cmd, os.path.join(out, "local.log"), {**env, "PYSPARK_PYTHON": sys.executable})
            report["local"] = {"seconds": round(seconds, 1), **check("local[2]", work, "s3://dpr-cluster/local/index",
                                                                       endpoint)}
    finally:
        server.stop()
    for app in _executor_dirs() - before:          # only after a pass: a failure keeps the executor logs
        shutil.rmtree(app, ignore_errors=True)
    with open(os.path.join(out, "cluster-test.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    c = report["cluster"]
    print("\ncluster-test passed: local-cluster[2,1,2048], environment "
          f"{os.path.relpath(archive, REPO)} ({report['archive_bytes'] / 2**20:.0f} MiB), index on {endpoint}")
    print("executors' Python (encode stage):")
    for p in c["executor_python"]:
        print(f"  {p}")
    print(f"{'stage':<22}{'local-cluster':>14}" + (f"{'local[2]':>10}" if "local" in report else ""))
    for stage, v in c["stages"].items():
        other = report.get("local", {}).get("stages", {}).get(stage)
        print(f"{stage:<22}{v:>13.1f}s" + (f"{other:>9.1f}s" if other is not None else ""))
    line = f"{'spark-submit wall':<22}{c['seconds']:>13.1f}s"
    if "local" in report:
        line += f"{report['local']['seconds']:>9.1f}s   ({c['seconds'] / report['local']['seconds']:.2f}x)"
    print(line)
    print(f"report: {os.path.join(os.path.relpath(out, REPO), 'cluster-test.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
