"""spark-submit on ``local-cluster`` (separate executor JVMs with their own Python workers):
GPU addresses assigned by Spark's resource scheduling (a discovery script announcing two fake
GPUs), the CPU fallback, and an environment archive missing a dependency."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, synthetic_docs, write_jsonl

SPARK_SUBMIT = shutil.which("spark-submit", path=os.path.dirname(sys.executable))


def _spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def _submit(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    env.pop("SPARK_ENV_LOADED", None)
    return subprocess.run([SPARK_SUBMIT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


ENCODE_DRIVER = textwrap.dedent("""
    import json, sys
    from dpr_lib.cli import setup_logging
    from dpr_lib.config import load_config
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages
    from dpr_lib.spark import get_session

    setup_logging()
    cfg = load_config(None, sys.argv[1:])
    spark = get_session(cfg)
    shard_corpus(spark, cfg)
    stats = encode_passages(spark, cfg)
    print("RESULT " + json.dumps({"app": spark.sparkContext.applicationId, "tasks": stats["tasks"],
                                  "devices": stats["devices"], "executor_python": stats["executor_python"]}))
""")


@pytest.mark.skipif(SPARK_SUBMIT is None, reason="spark-submit not installed beside this Python")
def test_each_encode_task_gets_its_own_spark_gpu_address_and_falls_back_to_cpu(tmp_path, tiny_bert_dir):
    script = tmp_path / "gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(ENCODE_DRIVER)
    docs = write_jsonl(tmp_path / "docs.jsonl", synthetic_docs(40, words_per_doc=400))
    gpu_conf = {"spark.worker.resource.gpu.amount": "2", "spark.worker.resource.gpu.discoveryScript": str(script),
                "spark.executor.resource.gpu.amount": "2", "spark.executor.resource.gpu.discoveryScript": str(script),
                "spark.task.resource.gpu.amount": "1", "spark.ui.enabled": "false",
                "spark.pyspark.python": sys.executable}
    args = ["--master", "local-cluster[1,2,1024]"]
    for k, v in gpu_conf.items():
        args += ["--conf", f"{k}={v}"]
    proc = _submit([*args, str(driver), f"paths.work_dir={tmp_path}/work", f"paths.cache_dir={tmp_path}/cache",
                    f"encoder.model={tiny_bert_dir}", f"corpus.input={docs}", "corpus.num_files=4"])
    import torch

    if torch.cuda.device_count() == 1:  # the fake discovery script hands out address 1 too: refused by name
        assert proc.returncode != 0 and "Spark assigned GPU address '1', but this node has 1 CUDA device" in \
            proc.stdout + proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    tasks = result["tasks"]
    assert len(tasks) == 4
    # Two task slots, two GPUs: the concurrent tasks hold distinct addresses; none runs without one.
    assert {t["gpu"] for t in tasks} == {"0", "1"}
    work = os.path.join(_spark_home(), "work", result["app"])
    try:
        logs = "".join(open(f, encoding="utf-8", errors="replace").read() for f in glob.glob(f"{work}/*/stderr"))
        if torch.cuda.device_count() >= 2:  # a GPU host: each task encodes on the GPU it was given
            assert {t["device"] for t in tasks} == {"cuda:0", "cuda:1"}
            assert result["devices"] == ["cuda:0 (spark gpu 0)", "cuda:1 (spark gpu 1)"]
        else:  # no CUDA (or too few GPUs for the fake addresses): the fallback was taken ...
            assert {t["device"] for t in tasks} == {"cpu"}
            assert result["devices"] == ["cpu (spark gpu 0)", "cpu (spark gpu 1)"]
            # ... and said so in the executor's log (a worker process of its own, not this test's).
            assert "Spark assigned GPU" in logs and "encoding on CPU" in logs
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(SPARK_SUBMIT is None, reason="spark-submit not installed beside this Python")
def test_an_archive_missing_a_dependency_fails_naming_the_module_and_the_archive(tmp_path):
    """An environment archive without the product (a bare venv, packed with venv-pack): the job
    stops before its first stage with the module, the executor's Python and the archive named."""
    apps = set(glob.glob(os.path.join(_spark_home(), "work", "app-*")))
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    archive = tmp_path / "bare_env.tar.gz"
    subprocess.run([sys.executable, "-m", "venv_pack", "-p", str(bare), "-o", str(archive), "-q"], check=True)
    proc = _submit(["--master", "local-cluster[1,1,1024]", "--archives", f"{archive}#env",
                    "--conf", "spark.pyspark.python=./env/bin/python", "--conf", "spark.ui.enabled=false",
                    "--conf", f"spark.pyspark.driver.python={sys.executable}",
                    os.path.join(REPO, "jobs", "shard_corpus.py"), "--conf", os.path.join(REPO, "conf", "local.yaml"),
                    "--set", f"paths.work_dir={tmp_path}/work"])
    assert proc.returncode == 10, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr        # spark-submit merges the driver's stderr into stdout
    err = next(line for line in output.splitlines() if line.startswith("error: "))
    assert err.startswith("error: executor Python ") and "/env/bin/python" in err
    assert "cannot import dpr_lib (ModuleNotFoundError" in err
    assert f"environment shipped as {archive.as_uri()}#env" in err and "Rebuild it with `make package`" in err
    assert "Traceback" not in output
    assert not os.path.exists(tmp_path / "work" / "passages")
    for app in set(glob.glob(os.path.join(_spark_home(), "work", "app-*"))) - apps:
        shutil.rmtree(app, ignore_errors=True)
