"""Concurrency as object stores and busy services really behave: the nightly lock raced by
processes started together (on the real S3 server, each request slowed 0-300 ms, and on a local
path), a shard cache filled by several processes at once, and concurrent /search requests."""

from __future__ import annotations

import json
import os
import time

import pytest
from faultproxy import FaultProxy
from racers import load_together, race_lock

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
    winners = race_lock(root, opts, processes=3, trials=TRIALS)
    assert winners == [1] * TRIALS, f"winners per trial: {winners}"
    assert storage.read_tagged(join_url(root, "_lock"), opts) is None, "the last winner released it"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_takes_over_a_stale_lock(tmp_path, slow_s3, where):
    root, opts = dict(zip(["local", "s3"], _roots(tmp_path, slow_s3, "stale")))[where]
    url = join_url(root, "_lock")

    def plant():
        storage.write_bytes_atomic(url, json.dumps({"owner": "dead-host:1", "since": 0}).encode(), opts)

    winners = race_lock(root, opts, processes=3, trials=TRIALS, stale_s=60, before_trial=plant)
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


# ---------------------------------------------------------------- one shard cache, several processes

@pytest.fixture(scope="module")
def published_on_s3(spark, tmp_path_factory, tiny_bert_dir, s3_endpoint):
    from conftest import make_config, synthetic_docs, write_jsonl

    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages
    from dpr_lib.index import build_index

    tmp = tmp_path_factory.mktemp("cache-race")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(120, seed=9))}",
                      f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.normalize=true",
                      f"paths.index_root=s3://dpr-test/cache-race-{time.time_ns()}",
                      f"publish.endpoint_url={s3_endpoint}", "index.num_shards=4")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    return cfg, build_index(spark, cfg)


def _blob_names(cache_dir):
    return sorted(os.listdir(os.path.join(cache_dir, "blobs")))


def test_four_processes_load_one_version_into_one_cache_at_once(published_on_s3, tmp_path):
    import numpy as np

    cfg, manifest = published_on_s3
    queries = np.random.default_rng(0).standard_normal((8, manifest.dim)).astype("float32").tolist()
    for attempt in range(3):  # each time into an empty cache: every file is fetched by all four at once
        cache = str(tmp_path / f"shared-{attempt}")
        got = load_together(cfg.path("index_root"), cache, cfg.storage_options(), queries, processes=4)
        assert [g[0] for g in got] == ["ok"] * 4, [g[1] for g in got if g[0] != "ok"]
        assert all(g[1] == got[0][1] for g in got) and {g[2] for g in got} == {manifest.version}
        names = _blob_names(cache)
        assert not [n for n in names if n.endswith(".part")], "no temp file left behind"
        assert {e.sha256 for e in manifest.shards} <= {n.split(".")[0] for n in names}
        for n in names:  # every entry complete: its content hashes to its name
            assert storage.sha256_file(os.path.join(cache, "blobs", n)) == n.split(".")[0]


def test_a_cache_entry_is_trusted_by_name_and_reverified_on_request(published_on_s3, tmp_path):
    from dpr_lib.search import ShardedIndex

    cfg, manifest = published_on_s3
    root, opts, cache = cfg.path("index_root"), cfg.storage_options(), str(tmp_path / "c")
    ShardedIndex(root, cache_dir=cache, storage_options=opts)
    entry = os.path.join(cache, "blobs", manifest.shards[0].sha256 + ".faiss")
    good = open(entry, "rb").read()
    with open(entry, "r+b") as fh:  # a disk error flips one byte of a cached shard
        fh.seek(len(good) - 1)
        fh.write(bytes([good[-1] ^ 0xFF]))
    before = os.stat(entry).st_mtime_ns
    ShardedIndex(root, cache_dir=cache, storage_options=opts)  # trusted: not re-read, not replaced
    assert os.stat(entry).st_mtime_ns == before
    ShardedIndex(root, cache_dir=cache, storage_options=opts, verify_cache=True)
    assert open(entry, "rb").read() == good, "search.verify_cache re-hashed it and fetched it again"
