"""Reliability: faults injected into real runs. Real Spark (local mode, and the real jobs as
subprocesses killed with SIGKILL), the real S3 server behind a fault-injecting proxy on
127.0.0.1 (tests/faultproxy.py), a real full disk (a tmpfs in a private mount namespace).

The promise under test: a failure never corrupts or half-publishes a version (readers keep
loading the previous one), the next run completes, and every record is accounted for.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO, encoder_sets, make_config, read_table, synthetic_docs, write_jsonl
from faultproxy import FaultProxy

from dpr_lib import accounting, storage
from dpr_lib.config import join_url
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.errors import AccountingError, IncompatibleIndexError, IndexIntegrityError, StorageError
from dpr_lib.index import build_index
from dpr_lib.manifest import MANIFEST, list_versions, read_latest, version_url
from dpr_lib.search import ShardedIndex

CONF = os.path.join(REPO, "conf", "local.yaml")
SECRET = "wJalrXUtnFEMI-reliability-secret-K7MDENG"  # must never appear in anything written


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory, tiny_bert_dir):
    """100 documents -> 200 passages in 2 files, encoded with the tiny BERT; stats in the work dir."""
    tmp = tmp_path_factory.mktemp("reliability")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(100, seed=4))}",
                      f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.normalize=true",
                      "index.num_shards=2", "index.recall_queries=32")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    return cfg


def s3_cfg(base, tmp_path, endpoint: str, prefix: str, *extra: str):
    """``base``'s work dir (Passages, Embeddings, stats), publishing to s3://dpr-test/<prefix>."""
    return make_config(tmp_path, f"paths.work_dir={base.paths.work_dir}", f"paths.cache_dir={tmp_path}/cache",
                       *encoder_sets(base), f"paths.index_root=s3://dpr-test/{prefix}",
                       f"publish.endpoint_url={endpoint}", "index.num_shards=2", *extra)


def job(script: str, sets: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
    """Start a real job (its own driver, JVM and Python workers) in its own process group."""
    args = [sys.executable, os.path.join(REPO, "jobs", script), "--conf", CONF]
    # The library's default encoder, as make_config's clean runs use (conf/local.yaml's
    # encoder.backend=auto is tested in test_backends.py); a test's own sets come after and win.
    for s in ["spark.master=local[2]", "encoder.backend=torch", *sets]:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever of its process group is left (in local mode the JVM and
    the Python workers are the driver's children: the machine running it went away)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log_path=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- accounting

def test_manifest_carries_the_checked_ledger_and_a_lost_embedding_row_is_refused(spark, corpus, tmp_path):
    stats = json.load(open(os.path.join(corpus.path("stats"), "shard_corpus.json")))
    manifest = build_index(spark, corpus)
    ledger = manifest.accounting
    assert ledger["unchecked"] == [], "the pipeline's stages provide every count"
    assert len(ledger["checked"]) == len(accounting.EQUATIONS) == 7
    c = ledger["counts"]
    assert c["input_records"] == stats["input_records"] == 100 and c["rejects"] == 0 and c["docs"] == 100
    assert c["passages"] == c["embeddings"] == c["vectors"] == c["docstore_rows"] == stats["passages"]
    assert c["embedded"] + c["reused"] == c["passages"]

    # One Embeddings file loses three rows (a partial write nobody noticed): refused before publishing.
    emb = tmp_path / "embeddings"
    shutil.copytree(corpus.path("embeddings"), emb)
    first = sorted(emb.iterdir())[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(0, table.num_rows - 3), first)
    cfg = make_config(tmp_path, f"paths.work_dir={corpus.paths.work_dir}", f"paths.embeddings={emb}",
                      f"paths.index_root={corpus.path('index_root')}", *encoder_sets(corpus), "index.num_shards=2")
    with pytest.raises(AccountingError, match=f"embeddings {c['passages'] - 3} != passages {c['passages']}"):
        build_index(spark, cfg)
    assert read_latest(corpus.path("index_root")) == manifest.version
    assert list_versions(corpus.path("index_root"))[-1] == manifest.version, "nothing of the refused version"


# ---------------------------------------------------------------- executor killed mid-encode

def _pyspark_workers(root_pid: int):
    import psutil

    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "pyspark.daemon" in " ".join(p.cmdline()) and "pyspark.daemon" in " ".join(p.parent().cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_executor_killed_mid_encode_is_retried_and_output_is_identical(spark, tmp_path):
    """The bundled MiniLM on 200 passages (a few seconds per task): a Python worker is killed while
    it writes its Embeddings file; Spark retries the task; the result equals a clean run's."""
    import psutil

    docs = write_jsonl(tmp_path / "docs.jsonl", synthetic_docs(100, words_per_doc=180, seed=12))
    clean = make_config(tmp_path / "clean", f"corpus.input={docs}")
    shard_corpus(spark, clean)
    encode_passages(spark, clean)

    watch = tmp_path / "tmp"
    watch.mkdir()
    work = tmp_path / "killed"
    shutil.copytree(clean.path("passages"), work / "passages")
    proc = job("encode_passages.py", ["spark.master=local[2,3]", f"paths.work_dir={work}",
                                      f"paths.cache_dir={tmp_path}/cache"],
               tmp_path / "encode.log", env={"TMPDIR": str(watch)})
    try:
        def writer():  # the worker that has a temporary Embeddings file open: mid-encode
            for w in _pyspark_workers(proc.pid):
                try:
                    if any(os.path.basename(f.path).startswith("dpr-emb-") for f in w.open_files()):
                        return w
                except psutil.Error:
                    pass
            return None

        victim = wait_for(writer, 240, "a worker writing Embeddings", proc, tmp_path / "encode.log")
        victim.kill()
        assert proc.wait(timeout=300) == 0, open(tmp_path / "encode.log").read()[-3000:]
    finally:
        if proc.poll() is None:
            kill_driver(proc)
    stats = json.load(open(work / "stats" / "encode_passages.json"))
    assert stats["retried_tasks"] >= 1, "the killed task was retried"
    assert stats["passages_encoded"] == sum(pq.ParquetFile(f).metadata.num_rows
                                            for f in storage.list_files(clean.path("passages"), ".parquet"))

    def vectors(url):
        files = storage.list_files(url, ".parquet")
        return [(pq.read_table(f).column("pid").to_pylist(), pq.read_table(f).column("vector").to_pylist())
                for f in files]

    assert vectors(str(work / "embeddings")) == vectors(clean.path("embeddings")), "identical to a clean run"


# ---------------------------------------------------------------- tables published by pointer

def test_driver_killed_after_the_table_write_keeps_the_previous_passages(spark, tmp_path):
    """The corpus job is killed once Spark has written the new Passages version (its _SUCCESS is
    there) and before the pointer moves: readers still get the previous table, whole; the next run
    publishes and removes the orphan."""
    table = tmp_path / "work" / "passages"
    first = make_config(tmp_path, f"corpus.input={write_jsonl(tmp_path / 'a.jsonl', synthetic_docs(40, seed=1))}")
    shard_corpus(spark, first)
    before = read_table(str(table))
    old_pointer = storage.table_pointer(str(table))

    second = write_jsonl(tmp_path / "b.jsonl", synthetic_docs(60, seed=2))
    log_path = tmp_path / "corpus.log"
    proc = job("shard_corpus.py", [f"paths.work_dir={tmp_path}/work", f"corpus.input={second}",
                                   "corpus.num_files=2"], log_path)

    def written():  # a new version directory complete on disk, not yet published
        return [d for d in os.listdir(table) if d.startswith("v-") and d != old_pointer["version"]
                and os.path.exists(table / d / "_SUCCESS")]

    try:
        (orphan,) = wait_for(written, 240, "the new Passages version to be written", proc, log_path)
        kill_driver(proc)
    finally:
        if proc.poll() is None:
            kill_driver(proc)
    assert storage.table_pointer(str(table)) == old_pointer, "killed before the pointer was written"
    assert read_table(str(table)).equals(before), "readers see the previous table, whole"
    assert spark.read.parquet(storage.resolve_table(str(table))).count() == before.num_rows

    stats = shard_corpus(spark, make_config(tmp_path, f"corpus.input={second}"))
    after = storage.table_pointer(str(table))
    assert after["version"] not in (old_pointer["version"], orphan)
    assert read_table(str(table)).num_rows == stats["passages"] > before.num_rows
    left = sorted(d for d in os.listdir(table) if d.startswith("v-"))
    assert orphan not in left, "the unpublished version is pruned"
    assert left == sorted([old_pointer["version"], after["version"]]), "the previous version stays for readers"


# ---------------------------------------------------------------- driver killed while publishing

@pytest.mark.parametrize("moment,pattern", [("shard upload", r"/versions/[^/]+/shard-\d+\.faiss$"),
                                            ("LATEST write", r"/LATEST$")])
def test_driver_killed_while_publishing_keeps_the_previous_version(spark, corpus, proxy, tmp_path, moment,
                                                                   pattern):
    prefix = "killed-" + moment.split()[0].lower()
    cfg = s3_cfg(corpus, tmp_path, proxy.url, prefix)
    opts, root = cfg.storage_options(), cfg.path("index_root")
    first = build_index(spark, cfg).version

    proxy.add_rule("PUT", f"/dpr-test/{prefix}.*{pattern}", "hold")
    sets = [f"paths.work_dir={corpus.paths.work_dir}", f"paths.cache_dir={tmp_path}/cache", *encoder_sets(corpus),
            f"paths.index_root={root}", f"publish.endpoint_url={proxy.url}", "index.num_shards=2",
            "index.recall_queries=32",  # the secret also sits in the config the job reads (s3a style)
            f"spark.conf={{spark.ui.enabled: 'false', spark.hadoop.fs.s3a.secret.key: {SECRET}}}"]
    log_path = tmp_path / "build.log"
    proc = job("build_index.py", sets, log_path, env={"AWS_SECRET_ACCESS_KEY": SECRET})
    try:
        wait_for(proxy.held.is_set, 240, f"the {moment}", proc, log_path)
        kill_driver(proc)
    finally:
        proxy.reset()
        if proc.poll() is None:
            kill_driver(proc)

    assert read_latest(root, opts) == first, f"killed during the {moment}: LATEST still names the old version"
    versions = list_versions(root, opts)
    assert len(versions) == 2, "the killed run left its unpublished version directory"
    orphan = [v for v in versions if v != first][0]
    has_manifest = storage.exists(join_url(version_url(root, orphan), MANIFEST), opts)
    assert has_manifest == (moment == "LATEST write"), "the manifest is written only after every shard"
    assert ShardedIndex(root, cache_dir=str(tmp_path / "reader"), storage_options=opts).version == first

    # The next run completes and publishes; an incomplete leftover is removed by its pruning.
    nxt = build_index(spark, cfg).version
    assert read_latest(root, opts) == nxt
    assert ShardedIndex(root, cache_dir=str(tmp_path / "reader"), storage_options=opts).version == nxt
    if not has_manifest:
        assert orphan not in list_versions(root, opts)
    # The credentials of the killed job went nowhere: not in its log, not in anything it wrote.
    assert SECRET not in open(log_path).read()
    assert not _objects_containing(root, opts, SECRET)


def _objects_containing(root: str, opts: dict, needle: str) -> list[str]:
    fs, path = storage.get_fs(root, opts)
    fs.invalidate_cache()
    return [p for p in fs.find(path) if needle.encode() in fs.cat_file(p)]


# ---------------------------------------------------------------- S3 errors

def test_s3_errors_for_a_while_are_retried(spark, corpus, proxy, tmp_path):
    cfg = s3_cfg(corpus, tmp_path, proxy.url, "flaky")
    # Every write answers 503 SlowDown, or drops the connection, a few times each, then recovers.
    proxy.add_rule("PUT", "/dpr-test/flaky/.*", "error", times=4)
    proxy.add_rule("PUT", "/dpr-test/flaky/.*", "reset", times=3)
    before = dict(proxy.counts)
    try:
        manifest = build_index(spark, cfg)
    finally:
        proxy.reset()
    assert proxy.counts["error"] - before["error"] == 4 and proxy.counts["reset"] - before["reset"] == 3
    index = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path / "r"), storage_options=cfg.storage_options())
    assert index.version == manifest.version and index.ntotal == manifest.accounting["counts"]["passages"]


def test_s3_down_fails_clearly_and_publishes_nothing(spark, corpus, proxy, tmp_path):
    cfg = s3_cfg(corpus, tmp_path, proxy.url, "down", "publish.retries=1")
    opts, root = cfg.storage_options(), cfg.path("index_root")
    first = build_index(spark, cfg).version
    proxy.add_rule("PUT", "/dpr-test/down/.*", "error")  # the store refuses every write from now on
    try:
        with pytest.raises(StorageError, match="s3://dpr-test/down/versions/.*"):
            build_index(spark, cfg)
    finally:
        proxy.reset()
    assert read_latest(root, opts) == first
    assert ShardedIndex(root, cache_dir=str(tmp_path / "r"), storage_options=opts).version == first


# ---------------------------------------------------------------- disk full in the loader's cache

_FULL_DISK_SCRIPT = r"""
import errno, hashlib, json, os, resource, signal, sys
from dpr_lib.errors import DprError
from dpr_lib.search import ShardedIndex

root, cache, mode = sys.argv[1], sys.argv[2], sys.argv[3]
filler = os.path.join(cache, "filler")
if mode == "tmpfs":  # fill the disk to the last block, then free 8 KiB
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.truncate(filler, os.path.getsize(filler) - 8192)
else:  # no mount namespace here: a file-size limit makes the cache write fail the same way
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
out = {"mode": mode}
try:
    ShardedIndex(root, cache_dir=cache)
    out["first"] = "loaded"
except DprError as exc:
    out["first"] = f"{type(exc).__name__}: {exc}"
blobs = os.path.join(cache, "blobs")
out["cache"] = {n: hashlib.sha256(open(os.path.join(blobs, n), "rb").read()).hexdigest() for n in os.listdir(blobs)}
if mode == "tmpfs":
    os.remove(filler)
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
index = ShardedIndex(root, cache_dir=cache)
out["second"] = {"vectors": index.ntotal, "hits": len(index.lookup([0]))}
print("RESULT " + json.dumps(out))
"""


def test_disk_full_in_the_loader_cache_is_a_clear_error_and_leaves_no_corrupt_entry(spark, corpus, tmp_path):
    manifest = build_index(spark, corpus)
    cache = tmp_path / "cache"
    cache.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK_SCRIPT)
    argv = [sys.executable, str(script), corpus.path("index_root"), str(cache)]
    # A real full disk: a 4 MiB tmpfs mounted over the cache dir in a private mount namespace.
    mount = f"mount -t tmpfs -o size=4m tmpfs {cache} && exec {' '.join(argv)} tmpfs"
    can_mount = shutil.which("unshare") and subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"], capture_output=True).returncode == 0
    cmd = ["unshare", "-rm", "sh", "-c", mount] if can_mount else argv + ["rlimit"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    reason = "No space left on device" if out["mode"] == "tmpfs" else "File too large"
    assert out["first"].startswith("StorageError: cannot store") and "in the cache" in out["first"], out
    assert reason in out["first"] and "local disk full" in out["first"], out
    # Nothing partial: every cache entry is complete (its name is its sha256), no temporary file.
    assert all(name.split(".")[0] == digest for name, digest in out["cache"].items()), out["cache"]
    assert out["second"]["vectors"] == manifest.totals["vectors"]


# ---------------------------------------------------------------- what the loader refuses to read

def test_loader_refuses_pickles_and_paths_outside_the_index(spark, corpus, tmp_path):
    """A shard replaced by a pickle whose unpickling would run code, with a manifest that vouches
    for it (an attacker with write access to the bucket): the loader never unpickles."""
    import pickle

    root = tmp_path / "root"
    cfg = make_config(tmp_path, f"paths.work_dir={corpus.paths.work_dir}", f"paths.index_root={root}",
                      *encoder_sets(corpus), "index.num_shards=2")
    manifest = build_index(spark, cfg)
    vdir = root / "versions" / manifest.version
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    blob = pickle.dumps(Payload())
    (vdir / manifest.shards[0].path).write_bytes(blob)
    m = json.loads((vdir / MANIFEST).read_text())
    m["shards"][0]["sha256"] = storage.sha256_bytes(blob)
    (vdir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="cannot be read by FAISS"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c"))
    assert not marker.exists(), "the pickle was never executed"

    # LATEST naming a version outside versions/ is refused, not followed.
    (root / "LATEST").write_text("../../../etc\n")
    with pytest.raises(IncompatibleIndexError, match="invalid version id"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(IncompatibleIndexError, match="invalid version id"):
        version_url(str(root), "..")


def test_stats_reports_and_manifests_hold_no_credentials(spark, corpus, tmp_path):
    """Credentials come from the environment (the AWS chain) and are written nowhere: the job's
    log, its stats and the published objects are searched for the secret. The secret is also in
    the job's config, where Spark users put s3a credentials (spark.hadoop.fs.s3a.secret.key): the
    product reads that config, passes it to Spark, and must not log or report it."""
    root = "s3://dpr-test/secrets"
    sets = [f"paths.work_dir={tmp_path}/work", f"paths.passages={corpus.path('passages')}",
            f"paths.embeddings={corpus.path('embeddings')}", f"paths.cache_dir={tmp_path}/cache",
            *encoder_sets(corpus), f"paths.index_root={root}", "index.num_shards=2", "index.recall_queries=32",
            f"publish.endpoint_url={os.environ['DPR_TEST_S3']}",
            f"spark.conf={{spark.ui.enabled: 'false', spark.hadoop.fs.s3a.secret.key: {SECRET}}}"]
    proc = job("build_index.py", sets, tmp_path / "job.log",
               env={"AWS_ACCESS_KEY_ID": "AKIA-reliability-id", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert proc.wait(timeout=300) == 0, open(tmp_path / "job.log").read()[-3000:]
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "work") for f in fs]
    assert written, "the job wrote its stats"
    for path in [str(tmp_path / "job.log"), *written]:
        data = open(path, "rb").read()
        assert SECRET.encode() not in data and b"AKIA-reliability-id" not in data, path
    cfg = make_config(tmp_path, f"paths.index_root={root}", f"publish.endpoint_url={os.environ['DPR_TEST_S3']}")
    assert read_latest(root, cfg.storage_options())
    assert not _objects_containing(root, cfg.storage_options(), SECRET)
    assert not _objects_containing(root, cfg.storage_options(), "AKIA-reliability-id")


@pytest.fixture(autouse=True)
def _s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("DPR_TEST_S3", s3_endpoint)

