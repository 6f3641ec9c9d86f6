"""`make bench`, cluster part: `make cluster-test` timings."""

from __future__ import annotations

import json
import os
import subprocess
import time

from common import REPO, log


def bench_cluster(results: dict, details: dict) -> None:
    """`make cluster-test`: the pipeline by spark-submit on local-cluster[2,1,2048] from the packed
    environment, against the same pipeline in local[2] (both timed by the script, same run)."""
    log("cluster: make cluster-test (package + local-cluster + local[2])")
    t = time.time()
    proc = subprocess.run(["make", "cluster-test"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"make cluster-test failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rep = json.load(open(os.path.join(REPO, "work-cluster", "cluster-test.json")))
    results["cluster.make_cluster_test_s"] = round(time.time() - t, 1)
    results["cluster.local_cluster_pipeline_s"] = rep["cluster"]["seconds"]
    results["cluster.local2_pipeline_s"] = rep["local"]["seconds"]
    results["cluster.pipeline_ratio_vs_local2"] = round(rep["cluster"]["seconds"] / rep["local"]["seconds"], 2)
    results["cluster.executors"] = len(rep["cluster"]["executor_python"])
    results["cluster.archive_mib"] = round(rep["archive_bytes"] / 2**20)
    details["cluster"] = {"executor_python": rep["cluster"]["executor_python"],
                          "stages": {"local-cluster": rep["cluster"]["stages"], "local[2]": rep["local"]["stages"]}}
