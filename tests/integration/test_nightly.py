"""Nightly incremental runs on real Spark: unchanged, added / edited / deleted documents, encoder
change, crash and resume, the lock, and the shrink guard."""

import json
import os
import time

import faiss
import numpy as np
import pytest
from conftest import make_config, synthetic_docs, write_jsonl

from dpr_lib.errors import ConfigError, InputError
from dpr_lib.manifest import read_latest
from dpr_lib.nightly import LockError, run_nightly
from dpr_lib.search import ShardedIndex


def cfg_for(tmp, tiny_bert_dir, snapshot, *extra):
    return make_config(tmp, f"corpus.input={snapshot}", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                       "encoder.normalize=true", "index.num_shards=2", *extra)


def shard_ids(root, cache) -> set[int]:
    """The live pids of the version LATEST names: every segment's stored ids minus its tombstoned ones."""
    loaded = ShardedIndex(root, cache_dir=cache)
    ids = set()
    for idx, seq in zip(loaded.shards, loaded.shard_seqs):
        ivf = faiss.extract_index_ivf(idx)
        stored = set()
        for lst in range(ivf.nlist):
            n = ivf.invlists.list_size(lst)
            if n:
                stored.update(faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).tolist())
        ids |= stored - set(loaded.dead_in(seq).tolist())
    return ids


@pytest.fixture(scope="module")
def history(spark, tmp_path_factory, tiny_bert_dir):
    """Three runs: first, unchanged, then with an edited, an added and a deleted document."""
    tmp = tmp_path_factory.mktemp("nightly")
    docs = synthetic_docs(40, words_per_doc=150, seed=11)
    snapshot = tmp / "snapshot.jsonl"
    write_jsonl(snapshot, docs)
    cfg = cfg_for(tmp, tiny_bert_dir, snapshot)
    first = run_nightly(spark, cfg)
    second = run_nightly(spark, cfg)
    edited = [dict(d) for d in docs if d["id"] != "doc-5"]
    edited[0]["text"] = "completely new words " * 50  # 150 words: both passages change
    edited.append({"id": "doc-new", "title": "New", "text": "a fresh document about zulu " * 10})
    write_jsonl(snapshot, edited)
    third = run_nightly(spark, cfg)
    return cfg, tmp, first, second, third


def test_first_run_encodes_everything_and_trains(history):
    cfg, _, first, _, _ = history
    assert first["passages"] == 80 and first["encoded"] == 80 and first["reused"] == 0
    assert first["diff"] == {"new": 80, "changed": 0, "unchanged": 0, "deleted": 0}
    assert first["quantizer"]["reused"] is False
    assert read_latest(cfg.path("index_root")) != first["version"]  # later runs published after it
    assert "published" in first["summary"] and "80 passages" in first["summary"]


def test_unchanged_corpus_encodes_nothing_and_still_publishes(history):
    cfg, _, first, second, _ = history
    assert second["encoded"] == 0 and second["reused"] == 80
    assert second["diff"] == {"new": 0, "changed": 0, "unchanged": 80, "deleted": 0}
    assert second["quantizer"]["reused"] is True and second["version"] != first["version"]
    assert second["kind"] == "delta", "nothing changed: an empty delta segment, no shard rebuilt"


def test_edits_additions_and_deletions(history, tiny_bert_dir):
    cfg, tmp, _, _, third = history
    assert third["diff"] == {"new": 1, "changed": 2, "unchanged": 76, "deleted": 2}
    assert third["encoded"] == 3 and third["reused"] == 76 and third["passages"] == 79
    assert third["kind"] == "delta"
    assert read_latest(cfg.path("index_root")) == third["version"]
    from dpr_lib.corpus import make_pid

    ids = shard_ids(cfg.path("index_root"), str(tmp / "cache-a"))
    assert len(ids) == 79
    assert make_pid("doc-5", 0) not in ids and make_pid("doc-5", 1) not in ids, "deleted pids are gone"
    assert make_pid("doc-new", 0) in ids
    # The edited passage carries its new vector.
    from dpr_lib.encoder import Encoder, resolve_spec

    enc = Encoder(resolve_spec(cfg.encoder, cfg.path("cache_dir")))
    text = " ".join(("completely new words " * 50).split()[:100])
    v = enc.encode(["Title 0"], [text])
    loaded = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp / "cache-b"), nprobe=1024)
    scores, pids = loaded.search(v, 1)
    assert pids[0, 0] == make_pid("doc-0", 0) and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_encoder_change_forces_full_reencode_and_retrain(spark, history, tiny_bert_dir):
    cfg, tmp, *_ = history
    cls = cfg_for(tmp, tiny_bert_dir, cfg.corpus.input, "encoder.pooling=cls")
    report = run_nightly(spark, cls)
    assert report["encoded"] == report["passages"] == 79
    assert report["quantizer"] == {"reused": False, "reason": "encoder fingerprint changed"}


def test_crash_between_stages_then_resume(spark, tmp_path, tiny_bert_dir):
    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(30, seed=2))
    run_nightly(spark, cfg_for(tmp_path, tiny_bert_dir, snapshot))
    good = read_latest(cfg_for(tmp_path, tiny_bert_dir, snapshot).path("index_root"))
    write_jsonl(tmp_path / "s.jsonl", synthetic_docs(32, seed=2))
    # The publish stage fails (an index that cannot be trained on this corpus); earlier stages finished.
    broken = cfg_for(tmp_path, tiny_bert_dir, snapshot, "encoder.pooling=cls", "index.factory=IVF4096,Flat")
    with pytest.raises(InputError, match="needs at least nlist=4096"):
        run_nightly(spark, broken)
    assert read_latest(broken.path("index_root")) == good, "the last good version stays published"
    runs = sorted(os.listdir(os.path.join(broken.path("work_dir"), "runs")))
    state = json.load(open(os.path.join(broken.path("work_dir"), "runs", runs[-1], "state.json")))
    assert state["done"] == ["shard", "diff", "encode"] and not state["published"]
    passages_mtime = os.path.getmtime(os.path.join(broken.path("work_dir"), "runs", runs[-1], "passages"))
    fixed = cfg_for(tmp_path, tiny_bert_dir, snapshot, "encoder.pooling=cls")
    report = run_nightly(spark, fixed)
    assert report["run"] == runs[-1], "the next run resumed the failed one"
    assert os.path.getmtime(os.path.join(broken.path("work_dir"), "runs", runs[-1], "passages")) == passages_mtime
    assert read_latest(fixed.path("index_root")) == report["version"] != good
    assert report["passages"] == 64


def test_lock_refuses_a_concurrent_run_and_takes_over_a_stale_one(spark, tmp_path, tiny_bert_dir):
    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(20, seed=4))
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    lock = os.path.join(cfg.path("index_root"), "_lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as fh:
        json.dump({"owner": "other-host:1", "since": time.time()}, fh)
    with pytest.raises(LockError, match="another run \\(other-host:1\\) holds"):
        run_nightly(spark, cfg)
    assert read_latest(cfg.path("index_root")) is None
    with open(lock, "w") as fh:
        json.dump({"owner": "dead-host:1", "since": time.time() - 10 * 3600}, fh)
    report = run_nightly(spark, cfg)
    assert read_latest(cfg.path("index_root")) == report["version"]
    assert not os.path.exists(lock), "released after the run"


def test_shrink_guard(spark, tmp_path, tiny_bert_dir):
    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(30, seed=6))
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    first = run_nightly(spark, cfg)
    write_jsonl(tmp_path / "s.jsonl", synthetic_docs(10, seed=6))
    with pytest.raises(InputError, match="shrank from 60 to 20 passages"):
        run_nightly(spark, cfg)
    assert read_latest(cfg.path("index_root")) == first["version"]
    forced = run_nightly(spark, cfg, force=True)
    assert forced["passages"] == 20 and read_latest(cfg.path("index_root")) == forced["version"]
    assert np.isfinite(forced["recall_at_nprobe"])


def test_quantizer_that_needs_more_probes_is_retrained(spark, tmp_path, tiny_bert_dir):
    """The reuse check of a real run: with the default nightly.max_nprobe_growth the second run
    reuses the quantizer; with a limit no nprobe can meet, the reused version is discarded and
    the run retrains, saying why (in the report and the published manifest)."""
    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(30, seed=8))
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    run_nightly(spark, cfg)
    reused = run_nightly(spark, cfg)
    assert reused["quantizer"]["reused"] is True
    strict = cfg_for(tmp_path, tiny_bert_dir, snapshot, "nightly.max_nprobe_growth=0.001")
    report = run_nightly(spark, strict, compact=True)  # the drift check runs when every vector is re-sharded
    q = report["quantizer"]
    assert q["reused"] is False
    assert f"the reused quantizer of version {reused['version']} needs nprobe" in q["reason"]
    assert "nightly.max_nprobe_growth" in q["reason"]
    manifest = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path / "cache")).manifest
    assert manifest.version == report["version"] and manifest.quantizer == q
    versions = os.listdir(os.path.join(cfg.path("index_root"), "versions"))
    assert len(versions) == 3, "the discarded reused-quantizer version left nothing behind"


def test_recall_measured_on_configured_questions(spark, tmp_path, tiny_bert_dir):
    """index.recall_questions: the recommended nprobe comes from real questions (encoded by the
    question encoder), recorded in the manifest; a missing file stops the run before any stage."""
    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(30, seed=9))
    missing = cfg_for(tmp_path, tiny_bert_dir, snapshot, f"index.recall_questions={tmp_path}/nope.txt")
    with pytest.raises(ConfigError, match="index.recall_questions: cannot read"):
        run_nightly(spark, missing)
    assert not os.path.exists(os.path.join(missing.path("work_dir"), "runs")), "failed before any stage"
    questions = tmp_path / "questions.txt"
    questions.write_text("".join(f"which document mentions fact{i}?\n" for i in range(40)))
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot, f"index.recall_questions={questions}")
    report = run_nightly(spark, cfg)
    recall = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path / "cache")).manifest.recall
    assert recall["query_source"] == "questions" and recall["queries"] == 40
    assert recall["questions_file"] == str(questions)
    assert report["recall_at_nprobe"] == recall["at_nprobe"] >= cfg.index.recall_target
    # Their encodings are kept by (questions, encoder): the next run does not encode them again.
    cache = os.path.join(cfg.path("cache_dir"), "recall_questions")
    (kept,) = os.listdir(cache)
    assert np.load(os.path.join(cache, kept)).shape == (40, 32)
    mtime = os.path.getmtime(os.path.join(cache, kept))
    again = run_nightly(spark, cfg)
    assert os.listdir(cache) == [kept] and os.path.getmtime(os.path.join(cache, kept)) == mtime
    assert again["recall_at_nprobe"] == report["recall_at_nprobe"]
    # A reused quantizer discarded for a retrain: the retrained version measured the same questions.
    strict = cfg_for(tmp_path, tiny_bert_dir, snapshot, f"index.recall_questions={questions}",
                     "nightly.max_nprobe_growth=0.001")
    retrained = run_nightly(spark, strict, compact=True)
    manifest = ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path / "cache")).manifest
    assert retrained["quantizer"]["reused"] is False and manifest.version == retrained["version"]
    assert manifest.recall["questions_file"] == str(questions) and manifest.recall["queries"] == 40


def test_the_runs_embeddings_table_keeps_the_design_contract(history):
    """The merged Embeddings table a run leaves as the next run's baseline is what the encode job
    writes: the fingerprint in every file's metadata, fixed-size float32 vectors, pid-sorted files
    of disjoint pid ranges, one row per passage of the run."""
    import pyarrow.parquet as pq

    from dpr_lib import storage
    from dpr_lib.encode import check_embeddings

    cfg, _, _, _, third = history
    state = json.load(open(os.path.join(cfg.path("work_dir"), "state", "last_success.json")))
    tables = state["embeddings"]
    assert isinstance(tables, list) and tables
    for table in tables:  # a full build leaves one table; a delta chain adds the run's new vectors as another
        files = storage.list_files(table, ".parquet")
        fingerprint, rows = check_embeddings(files, state["fingerprint"])
        assert fingerprint["id"] == state["fingerprint"]["id"]
        if len(tables) == 1:
            assert rows == third["passages"] or rows == state["passages_count"]
        ranges = []
        for f in files:
            t = pq.read_table(f)
            assert str(t.schema.field("vector").type) == f"fixed_size_list<element: float not null>[{fingerprint['dim']}]"
            pids = t.column("pid").to_numpy()
            assert (np.diff(pids) > 0).all(), "pid-sorted, no duplicates"
            ranges.append((pids[0], pids[-1]))
        ranges.sort()
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), "disjoint pid ranges"
