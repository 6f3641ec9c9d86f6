"""Concurrency as object stores and busy services really behave: the nightly lock raced by
processes started together (on the real S3 server, each request slowed 0-300 ms, and on a local
path), a shard cache filled by several processes at once, and concurrent /search requests."""

from __future__ import annotations

import json
import os
import time

import pytest
from faultproxy import FaultProxy
from lockrace import race

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.nightly import LockError, RunLock

TRIALS = 20


@pytest.fixture
def slow_s3(s3_endpoint):
    """The S3 server behind a proxy that delays every request by 0-300 ms."""
    with FaultProxy(s3_endpoint) as proxy:
        for method in ("PUT", "GET", "HEAD", "DELETE"):
            proxy.add_rule(method, ".", "slow")
        yield proxy


def _roots(tmp_path, slow_s3, name):
    return [(str(tmp_path / name), None),
            (f"s3://dpr-test/{name}-{time.time_ns()}", {"client_kwargs": {"endpoint_url": slow_s3.url}})]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_the_processes_racing_for_the_lock_wins(tmp_path, slow_s3, where):
    root, opts = dict(zip(["local", "s3"], _roots(tmp_path, slow_s3, "race")))[where]
    winners = race(root, opts, processes=3, trials=TRIALS)
    assert winners == [1] * TRIALS, f"winners per trial: {winners}"
    assert storage.read_tagged(join_url(root, "_lock"), opts) is None, "the last winner released it"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_takes_over_a_stale_lock(tmp_path, slow_s3, where):
    root, opts = dict(zip(["local", "s3"], _roots(tmp_path, slow_s3, "stale")))[where]
    url = join_url(root, "_lock")

    def plant():
        storage.write_bytes_atomic(url, json.dumps({"owner": "dead-host:1", "since": 0}).encode(), opts)

    winners = race(root, opts, processes=3, trials=TRIALS, stale_s=60, before_trial=plant)
    assert winners == [1] * TRIALS, f"winners per trial: {winners}"


def test_lock_release_never_removes_a_lock_taken_over_since(tmp_path):
    root = str(tmp_path / "idx")
    slow = RunLock(root, stale_s=0.05)
    slow.acquire()
    time.sleep(0.1)
    fast = RunLock(root, stale_s=0.05)
    fast.acquire()  # the first run looked dead and was taken over
    slow.release()  # ... then it finished after all: the lock is not its own any more
    held = json.loads(storage.read_bytes(join_url(root, "_lock")))
    assert held["owner"] == fast.owner
    with pytest.raises(LockError, match="holds"):
        RunLock(root, stale_s=3600).acquire()
    fast.release()
    assert not os.path.exists(join_url(root, "_lock"))


def test_a_store_without_conditional_writes_is_refused_clearly():
    with pytest.raises(LockError, match="nightly.lock=false"):
        RunLock("memory://idx", stale_s=60).acquire()
