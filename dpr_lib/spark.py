"""The one place a SparkSession is built. Jobs call ``get_session(cfg)``; library functions take
``spark`` as a parameter and never create their own."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from dpr_lib.config import Config

log = logging.getLogger("dpr_lib.spark")

# Settings the product relies on; config's spark.conf may override them.
_DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.showConsoleProgress": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.python.worker.reuse": "true",
}


def get_session(cfg: Config):
    """Build (or join, under spark-submit) the SparkSession described by ``cfg.spark``."""
    from pyspark.sql import SparkSession

    # Executors in local mode must run the driver's interpreter (with torch, faiss, dpr_lib).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if "SPARK_SUBMIT_OPTS" not in os.environ and not os.environ.get("SPARK_ENV_LOADED"):
        builder = builder.master(cfg.spark.master)
    for key, value in {**_DEFAULTS, **hadoop_s3a_conf(cfg), **cfg.spark.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DPR_SPARK_LOG_LEVEL", "WARN"))
    bind_storage(spark, cfg)
    log.info("Spark %s, master %s", spark.version, spark.sparkContext.master)
    if not is_local_master(spark.sparkContext.master):
        check_executors(spark)
    return spark


def bind_storage(spark, cfg: Config) -> dict:
    """Bind ``cfg``'s storage options (publish.endpoint_url, publish.storage_options) to every storage
    call of this job: on the driver, and in every task the calling thread submits (a Spark local
    property the tasks read). Stages call it first, so no fsspec call is left on the default endpoint."""
    import json

    from dpr_lib import storage

    opts = cfg.storage_options()
    storage.use_options(opts)
    if spark is not None:
        spark.sparkContext.setLocalProperty(storage.OPTIONS_PROPERTY, json.dumps(opts, sort_keys=True))
    return opts


def hadoop_s3a_conf(cfg: Config) -> dict:
    """Spark's own S3 client (s3a://, for the tables) pointed at the same endpoint as everything else,
    unless spark.conf sets it."""
    if not cfg.publish.endpoint_url:
        return {}
    return {"spark.hadoop.fs.s3a.endpoint": cfg.publish.endpoint_url,
            "spark.hadoop.fs.s3a.path.style.access": "true"}


def is_local_master(master: str) -> bool:
    """``local``/``local[N]``: executors are this process's own interpreter (``local-cluster`` is not)."""
    return master == "local" or master.startswith("local[")


EXECUTOR_MODULES = ("dpr_lib", "torch", "transformers", "faiss", "pyarrow", "numpy", "fsspec", "s3fs")

# Run on executors before any stage. It must not need dpr_lib to be unpickled (an archive missing
# dpr_lib is one of the failures it reports), so it is compiled here and shipped by value.
_PROBE_SOURCE = """
def probe(_):
    import importlib, os, socket, sys
    missing = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    yield {"python": sys.executable, "host": socket.gethostname(), "cwd": os.getcwd(), "missing": missing}
"""


def _probe_function():
    import builtins

    namespace = {"__builtins__": builtins, "__name__": "dpr_executor_probe", "MODULES": EXECUTOR_MODULES}
    exec(compile(_PROBE_SOURCE, "<dpr executor probe>", "exec"), namespace)  # noqa: S102 - our own constant
    return namespace["probe"]


def check_executors(spark, tasks: int = 0) -> list[dict]:
    """Import the product's modules on the executors (``tasks`` small tasks, default one per core)
    and fail with the missing module, the executor's Python and the shipped archive named, before
    a stage fails deep inside a task with a bare ImportError. Returns what each task saw."""
    from dpr_lib.errors import ExecutorEnvironmentError

    sc = spark.sparkContext
    n = tasks or max(2, sc.defaultParallelism)
    try:
        seen = sc.parallelize(range(n), n).mapPartitions(_probe_function()).collect()
    except Exception as exc:  # noqa: BLE001 - the Python worker itself did not start
        raise ExecutorEnvironmentError(
            f"executors could not run Python ({_archive_hint(sc)}): {str(exc).splitlines()[0][:500]}") from exc
    for s in seen:
        if s["missing"]:
            name, why = next(iter(s["missing"].items()))
            raise ExecutorEnvironmentError(
                f"executor Python {s['python']} on {s['host']} cannot import {name} ({why}); "
                f"{_archive_hint(sc)}. Rebuild it with `make package` (all missing: {sorted(s['missing'])})")
    pythons = sorted({s["python"] for s in seen})
    log.info("executors run %s (%s)", ", ".join(pythons), _archive_hint(sc))
    return seen


def _archive_hint(sc) -> str:
    conf = sc.getConf()
    archives = conf.get("spark.archives", "") or conf.get("spark.yarn.dist.archives", "")
    python = conf.get("spark.pyspark.python", "") or os.environ.get("PYSPARK_PYTHON", "")
    if archives:
        return f"environment shipped as {archives}, spark.pyspark.python={python or 'unset'}"
    return f"no archive shipped (spark.archives unset), executor python {python or 'default'}"


def spark_schema(arrow_schema):
    """The Spark StructType of an Arrow schema (for mapInArrow outputs)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def tasks_dataframe(spark, rows: list[dict], schema: str):
    """A DataFrame with exactly one of ``rows`` per partition, so each becomes one Spark task.

    (``DataFrame.repartition(n)`` distributes round-robin from a random start and may put two
    rows in one partition; ``parallelize`` with one slice per row does not.)
    """
    from pyspark.sql import Row

    rdd = spark.sparkContext.parallelize([Row(**r) for r in rows], max(1, len(rows)))
    return spark.createDataFrame(rdd, schema)


@contextlib.contextmanager
def task_errors():
    """Turn a product error raised inside a Spark task back into that error on the driver.

    Spark reports a failed Python task as a PythonException whose text holds the worker's
    traceback; users should see our one-line message (and exit code), not a JVM stack trace.
    """
    from dpr_lib import errors

    try:
        yield
    except Exception as exc:  # noqa: BLE001 - py4j and pyspark raise several types
        text = str(exc)
        found = re.findall(r"dpr_lib\.errors\.(\w+): (.+)", text)
        if not found:
            raise
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.DprError)):
            raise
        raise cls(f"{message.strip()} (in a Spark task)") from exc
