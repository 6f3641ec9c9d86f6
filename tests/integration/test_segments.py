"""Versions made of segments on real Spark: a nightly change published as a delta segment plus
tombstones, searched exactly like the full rebuild with the same quantizer; compaction, pruning,
a crash before LATEST, format-2 versions, and a serving node's swap that downloads only the delta."""

import json
import os

import numpy as np
import pytest
from conftest import make_config, synthetic_docs, write_jsonl

from dpr_lib.corpus import make_pid
from dpr_lib.manifest import MANIFEST, list_versions, read_latest, read_manifest, version_url
from dpr_lib.nightly import run_nightly
from dpr_lib.search import Searcher, ShardedIndex

QUESTIONS = [f"which document mentions fact{i}?" for i in range(60)] + ["zulu fresh document", "completely new words"]
NEW_TEXT = "completely new words about a quiet harbour " * 15  # 120 words: both passages of doc-7 change


def cfg_for(tmp, tiny_bert_dir, snapshot, *extra):
    return make_config(tmp, f"corpus.input={snapshot}", f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean",
                       "encoder.normalize=true", "index.num_shards=2", "index.factory=IVF4,Flat",
                       "publish.keep_versions=2", "serve.warmup_queries=0", *extra)


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory, tiny_bert_dir):
    """v1: a full build; v2: a delta (doc-5 deleted, doc-7 rewritten, doc-new added); v3: the same
    snapshot with --compact, i.e. a full rebuild with v1's quantizer. A serving node follows."""
    from dpr_lib.serve import IndexHolder

    tmp = tmp_path_factory.mktemp("segments")
    docs = synthetic_docs(100, words_per_doc=150, seed=21)
    snapshot = write_jsonl(tmp / "snapshot.jsonl", docs)
    cfg = cfg_for(tmp, tiny_bert_dir, snapshot)
    v1 = run_nightly(spark, cfg)
    holder = IndexHolder(cfg, cfg.path("index_root"))
    assert holder.poll_once()
    first_load = holder.current
    edited = [dict(d) for d in docs if d["id"] != "doc-5"]
    edited[7]["text"] = NEW_TEXT  # doc-8 after the deletion shifted the list
    edited_id = edited[7]["id"]
    edited.append({"id": "doc-new", "title": "New", "text": "a fresh document about zulu " * 10})
    write_jsonl(snapshot, edited)
    v2 = run_nightly(spark, cfg)
    assert holder.poll_once()
    swap = holder.current
    v3 = run_nightly(spark, cfg, compact=True)
    return {"cfg": cfg, "tmp": tmp, "v1": v1, "v2": v2, "v3": v3, "first_load": first_load, "swap": swap,
            "edited_id": edited_id, "holder": holder}


def _searcher(chain, version, mode="auto"):
    cfg = chain["cfg"]
    url = os.path.join(version_url(cfg.path("index_root"), version), MANIFEST)
    return Searcher(url, cfg.encoder, str(chain["tmp"] / "cache-search"), mode=mode, nprobe=2)


def test_the_change_is_a_delta_segment_with_tombstones(chain):
    v1, v2, v3 = chain["v1"], chain["v2"], chain["v3"]
    assert v1["kind"] == "full" and v2["kind"] == "delta" and v3["kind"] == "full"
    assert v2["diff"] == {"new": 1, "changed": 2, "unchanged": 196, "deleted": 2}
    root = chain["cfg"].path("index_root")
    m2 = read_manifest(os.path.join(version_url(root, v2["version"]), MANIFEST))
    assert [s.version for s in m2.segments] == [v1["version"]], "v1's segment is referenced, not copied"
    assert m2.segment_seq == 1 and m2.tombstones["count"] == 4, "2 changed + 2 deleted pids"
    assert sum(s.vectors for s in m2.shards) == 3, "the delta holds only the new and changed passages"
    assert m2.totals["vectors"] == 199 == v2["passages"]
    assert m2.compaction["kind"] == "delta" and m2.quantizer["from_version"] == v1["version"]
    v2dir = version_url(root, v2["version"])
    assert not os.path.exists(os.path.join(v2dir, "trained.faiss")), "the delta shares v1's quantizer file"
    assert m2.trained_version == v1["version"] and m2.trained == read_manifest(
        os.path.join(version_url(root, v1["version"]), MANIFEST)).trained
    m3 = read_manifest(os.path.join(version_url(root, v3["version"]), MANIFEST))
    assert m3.compaction == {"kind": "full", "reason": "--compact"} and not m3.segments and not m3.tombstones
    assert m3.quantizer["reused"] is True, "compaction kept the quantizer: the same codes"
    assert m3.trained_version == "" and os.path.exists(os.path.join(version_url(root, v3["version"]), "trained.faiss")), \
        "a full build holds its own copy, so its base can be pruned"
    assert json.load(open(os.path.join(version_url(root, v3["version"]), MANIFEST)))["format_version"] == 2
    assert json.load(open(os.path.join(version_url(root, v2["version"]), MANIFEST)))["format_version"] == 3


# ---------------------------------------------------------------- a delta knows its own recall


def _fresh_recall(cfg, version: str, lists, nprobe: int, exact_version: str, k: int) -> float:
    """Recall@k of ``version`` at ``nprobe`` on the recall lists' queries, measured from scratch:
    its shards searched by the loader against exact search (every list probed) of ``exact_version``,
    which holds the same live vectors."""
    from dpr_lib.index_ops import drop_ids, recall_at_k

    root = cfg.path("index_root")
    need = k + (0 if lists.pids is None else 1)

    def search(v, p):
        ix = ShardedIndex(os.path.join(version_url(root, v), MANIFEST), cache_dir=str(cfg.path("cache_dir")), nprobe=p)
        return ix.search(lists.queries, need)[1]

    exact = search(exact_version, 4)  # IVF4: four lists probed = exact search
    return recall_at_k(drop_ids(search(version, nprobe), lists.pids, k), drop_ids(exact, lists.pids, k))


def _lists(cfg, version: str):
    from dpr_lib.index.recall import RecallLists

    m = read_manifest(os.path.join(version_url(cfg.path("index_root"), version), MANIFEST))
    with open(os.path.join(version_url(cfg.path("index_root"), version), m.recall["lists"]["path"]), "rb") as fh:
        return m, RecallLists.from_bytes(fh.read())


def test_a_delta_measures_its_own_recall_as_a_fresh_measurement_would(chain):
    """The delta's recall, merged from v1's recall lists and its own segment's, equals recall
    measured from scratch on the delta version (v3 holds the same live vectors), at every nprobe
    and at both depths; the full builds record both depths too."""
    cfg = chain["cfg"]
    m2, lists = _lists(cfg, chain["v2"]["version"])
    assert m2.recall["measured"].startswith("delta") and "carried_from" not in m2.recall
    assert m2.recall["uncertain_queries"] == 0 and m2.recall["rule"] is None
    for k, by in ((10, m2.recall["by_nprobe"]), (100, m2.recall["by_nprobe_at_depth"]["100"])):
        for p, claimed in by.items():
            fresh = _fresh_recall(cfg, chain["v2"]["version"], lists, int(p), chain["v3"]["version"], k)
            # Above the nprobe where a shard's sweep stopped, the lists repeat its last hits: lower bounds.
            assert claimed <= fresh + 1e-4, (k, p, claimed, fresh)
            if int(p) <= m2.nprobe:
                assert abs(claimed - fresh) < 1e-4, (k, p, claimed, fresh)
    m3 = read_manifest(os.path.join(version_url(cfg.path("index_root"), chain["v3"]["version"]), MANIFEST))
    assert set(m3.recall["at_depth"]) == {"10", "100"} and m3.recall["at_depth"]["10"] == m3.recall["at_nprobe"]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_a_deleted_pid_is_never_returned_and_a_changed_passage_only_with_its_new_text(chain, mode):
    s = _searcher(chain, chain["v2"]["version"], mode)
    deleted = {make_pid("doc-5", 0), make_pid("doc-5", 1)}
    hits = s.ask(["which document mentions fact5?", "completely new words about a quiet harbour"], k=199, mode=mode)
    for row in hits:
        pids = [h.pid for h in row]
        assert not deleted & set(pids), "a deleted pid came back"
        assert len(pids) == len(set(pids)), "a pid came back twice (old and new segment)"
    changed = make_pid(chain["edited_id"], 0)
    (top,) = [h for h in hits[1] if h.pid == changed]
    assert top.text.startswith("completely new words about a quiet harbour")
    if mode == "bm25":  # the tiny random encoder ranks by chance; BM25 must find the new words first
        assert hits[1][0].pid in {changed, make_pid(chain["edited_id"], 1)}


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_segments_with_tombstones_equal_the_full_rebuild_with_the_same_quantizer(chain, mode):
    delta = _searcher(chain, chain["v2"]["version"], mode)
    full = _searcher(chain, chain["v3"]["version"], mode)
    ds, dp = delta.retrieve(QUESTIONS, 20, mode)
    fs, fp = full.retrieve(QUESTIONS, 20, mode)
    np.testing.assert_array_equal(dp, fp)
    np.testing.assert_allclose(ds, fs, rtol=1e-5, atol=1e-6)
    assert delta.index.ntotal == full.index.ntotal == 199
    if mode != "dense":  # corpus statistics updated by the delta = those of the rebuild
        d, f = delta.index.manifest.sparse, full.index.manifest.sparse
        assert d["docs"] == f["docs"] and d["avg_doc_len"] == pytest.approx(f["avg_doc_len"])
        assert d["vocab"]["terms"] == f["vocab"]["terms"]


def test_a_serving_node_keeps_its_base_segment_and_downloads_only_the_delta(chain):
    cfg, swap, first = chain["cfg"], chain["swap"], chain["first_load"]
    root = cfg.path("index_root")
    m1 = read_manifest(os.path.join(version_url(root, chain["v1"]["version"]), MANIFEST))
    m2 = read_manifest(os.path.join(version_url(root, chain["v2"]["version"]), MANIFEST))
    assert swap.version == m2.version
    assert swap.reused_shards == len(m1.shards), "the base shards were shared, not loaded again"
    assert first.downloaded_bytes == sum(f.bytes for _, f in m1.files_by_version())
    own = sum(f.bytes for v, f in m2.files_by_version() if v == m2.version)
    assert swap.downloaded_bytes == own, "exactly the delta's files (shards, docstore, sparse, tombstones, vocabulary)"
    full = sum(f.bytes for _, f in m2.files_by_version())
    assert swap.downloaded_bytes < 0.5 * full
    holder = chain["holder"]
    hits = holder.current.searcher.ask(["which document mentions fact5?"], 199, "bm25")[0]
    assert make_pid("doc-5", 0) not in {h.pid for h in hits}


def test_a_format_2_version_still_loads(chain):
    root = chain["cfg"].path("index_root")
    v3 = chain["v3"]["version"]
    on_disk = json.load(open(os.path.join(version_url(root, v3), MANIFEST)))
    assert on_disk["format_version"] == 2 and "segments" in on_disk and on_disk["segments"] == []
    # Written exactly as the previous release wrote it (no segment keys): still loads, one segment.
    for key in ("segments", "segment_seq", "tombstones", "compaction"):
        on_disk.pop(key)
    legacy = chain["tmp"] / "legacy" / "manifest.json"
    os.makedirs(legacy.parent, exist_ok=True)
    legacy.write_text(json.dumps(on_disk))
    for name in os.listdir(version_url(root, v3)):  # its files, beside the manifest
        if name != MANIFEST:
            os.symlink(os.path.join(version_url(root, v3), name), legacy.parent / name)
    loaded = ShardedIndex(str(legacy), cache_dir=str(chain["tmp"] / "cache-legacy"))
    assert loaded.ntotal == 199 and len(loaded.manifest.all_segments()) == 1


def test_a_crash_between_the_delta_and_latest_leaves_the_previous_version_served(spark, tmp_path, tiny_bert_dir,
                                                                                monkeypatch):
    from dpr_lib import publish

    docs = synthetic_docs(100, words_per_doc=150, seed=4)
    snapshot = write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    good = run_nightly(spark, cfg)["version"]
    write_jsonl(snapshot, docs[:-1])  # one document deleted

    def crash(*args, **kwargs):
        raise RuntimeError("killed before LATEST")

    monkeypatch.setattr(publish, "set_latest", crash)
    with pytest.raises(RuntimeError, match="killed before LATEST"):
        run_nightly(spark, cfg)
    root = cfg.path("index_root")
    assert read_latest(root) == good
    loaded = ShardedIndex(root, cache_dir=str(tmp_path / "c1"))
    assert loaded.version == good and loaded.ntotal == 200
    monkeypatch.undo()
    report = run_nightly(spark, cfg)
    assert report["kind"] == "delta" and read_latest(root) == report["version"]
    assert ShardedIndex(root, cache_dir=str(tmp_path / "c2")).ntotal == 198
    runs = sorted(os.listdir(os.path.join(cfg.path("work_dir"), "runs")))
    state = json.load(open(os.path.join(cfg.path("work_dir"), "runs", runs[-1], "state.json")))
    assert state["run"] == report["run"] and state["seconds"].keys() >= {"shard", "diff", "encode", "publish"}


def test_pruning_keeps_every_referenced_segment(spark, chain):
    """keep_versions=2: after v3 (compacted) the kept versions are v2 and v3, and v2 references v1,
    so v1 stays. One more compaction: v2 goes, and with it the last reference to v1."""
    cfg = chain["cfg"]
    root = cfg.path("index_root")
    v1, v2, v3 = (chain[k]["version"] for k in ("v1", "v2", "v3"))
    assert list_versions(root) == [v1, v2, v3]
    assert ShardedIndex(os.path.join(version_url(root, v2), MANIFEST), cache_dir=str(chain["tmp"] / "c-p")).ntotal == 199
    v4 = run_nightly(spark, cfg, compact=True)["version"]
    assert list_versions(root) == [v3, v4]


def test_a_change_set_as_input_gives_the_state_a_snapshot_would(spark, tmp_path, tiny_bert_dir):
    """Two change sets (upserts and deletes, the second touching a passage the first added) applied
    as deltas; then the equivalent full snapshot diffs as unchanged against that state, and its
    compacted rebuild searches exactly like the segments."""
    docs = synthetic_docs(100, words_per_doc=150, seed=31)
    snapshot = write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    run_nightly(spark, cfg)
    first = write_jsonl(tmp_path / "changes-1.jsonl", [
        {"op": "upsert", "id": "doc-3", "title": "Title 3", "text": NEW_TEXT},
        {"op": "upsert", "id": "doc-new1", "title": "New 1", "text": "a fresh document about zulu " * 10},
        {"op": "delete", "id": "doc-9"}])
    r1 = run_nightly(spark, cfg, changes=first)
    assert r1["input"] == f"change set {first}" and r1["kind"] == "delta"
    assert r1["diff"] == {"new": 1, "changed": 2, "unchanged": 0, "deleted": 2}, "only the named documents were diffed"
    assert r1["passages"] == 199 and r1["encoded"] == 3
    second = write_jsonl(tmp_path / "changes-2.jsonl", [
        {"op": "upsert", "id": "doc-3", "title": "Title 3", "text": "yet another rewrite of it " * 24},
        {"op": "delete", "id": "doc-new1"},
        {"op": "UPSERT", "id": "doc-new2", "title": "New 2", "text": "brand new text about yankee " * 10}])
    r2 = run_nightly(spark, cfg, changes=second)
    assert r2["diff"] == {"new": 1, "changed": 2, "unchanged": 0, "deleted": 1} and r2["passages"] == 199
    state = json.load(open(os.path.join(cfg.path("work_dir"), "state", "last_success.json")))
    assert [e["seq"] for e in state["passages"]] == [0, 1, 2], "a full table and the two deltas' passages"

    final = [d for d in docs if d["id"] != "doc-9"]
    final[3] = {**final[3], "text": "yet another rewrite of it " * 24}
    final.append({"id": "doc-new2", "title": "New 2", "text": "brand new text about yankee " * 10})
    write_jsonl(snapshot, final)
    full = run_nightly(spark, cfg, compact=True)
    assert full["diff"] == {"new": 0, "changed": 0, "unchanged": 199, "deleted": 0}, \
        "the chain's live Passages are exactly the snapshot's"
    assert full["kind"] == "full"
    root = cfg.path("index_root")
    for mode in ("dense", "bm25", "hybrid"):
        got = {}
        for name, v in (("segments", r2["version"]), ("rebuild", full["version"])):
            s = Searcher(os.path.join(version_url(root, v), MANIFEST), cfg.encoder, str(tmp_path / "cs"), mode=mode,
                         nprobe=2)
            got[name] = s.retrieve(QUESTIONS, 10, mode)
        np.testing.assert_array_equal(got["segments"][1], got["rebuild"][1])
        np.testing.assert_allclose(got["segments"][0], got["rebuild"][0], rtol=1e-5, atol=1e-6)


def test_a_bad_change_set_fails_naming_the_rows_and_publishes_nothing(spark, tmp_path, tiny_bert_dir):
    from dpr_lib.errors import InputError

    snapshot = write_jsonl(tmp_path / "s.jsonl", synthetic_docs(100, words_per_doc=150, seed=5))
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    with pytest.raises(InputError, match="applies to a previous run"):
        run_nightly(spark, cfg, changes=str(tmp_path / "none.jsonl"))
    good = run_nightly(spark, cfg)["version"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"op": "update", "id": "doc-1", "title": "t", "text": "x y z"}])
    with pytest.raises(InputError, match="1 row\\(s\\) with an op other than upsert / delete"):
        run_nightly(spark, cfg, changes=bad)
    both = write_jsonl(tmp_path / "both.jsonl", [{"op": "upsert", "id": "doc-1", "title": "t", "text": "x y z"},
                                                 {"op": "delete", "id": "doc-1"}])
    with pytest.raises(InputError, match="both upserted and deleted"):
        run_nightly(spark, cfg, changes=both)
    other = cfg_for(tmp_path, tiny_bert_dir, snapshot, "encoder.pooling=cls")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"op": "delete", "id": "doc-1"}])
    with pytest.raises(InputError, match="the encoder changed since the previous run"):
        run_nightly(spark, other, changes=ok)
    assert read_latest(cfg.path("index_root")) == good


def test_a_swap_to_a_delta_under_load_fails_no_request(spark, tmp_path, tiny_bert_dir):
    """Three clients query the node (as dpr-serve's handlers do: the version read once per request)
    while a delta version is published and swapped in, its base shards shared with the old one."""
    import threading

    from dpr_lib.serve import IndexHolder, MicroBatcher

    docs = synthetic_docs(100, words_per_doc=150, seed=12)
    snapshot = write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot)
    v1 = run_nightly(spark, cfg)["version"]
    holder = IndexHolder(cfg, cfg.path("index_root"))
    assert holder.poll_once()
    failures, seen, stop = [], [[] for _ in range(3)], threading.Event()
    batcher = MicroBatcher(8, 0.002)  # dpr-serve's request path: one forward pass per batch
    gone = {make_pid("doc-2", 0), make_pid("doc-2", 1)}

    def client(i):
        n = 0
        while not stop.is_set():
            loaded = holder.current
            try:
                hits = batcher.submit(loaded, [f"which document mentions fact{n % 100}?"], 10,
                                      ("dense", "bm25", "hybrid")[i]).result(timeout=60)
                seen[i].append((loaded.version, {h.pid for h in hits[0]}))
            except Exception as exc:  # noqa: BLE001 - what the test counts
                failures.append(repr(exc))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        write_jsonl(snapshot, [d for d in docs if d["id"] != "doc-2"])
        v2 = run_nightly(spark, cfg)
        assert v2["kind"] == "delta" and holder.poll_once()
        import time

        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        batcher.close()
    assert failures == []
    assert holder.current.reused_shards == 2
    for runs in seen:
        versions = [v for v, _ in runs]
        assert set(versions) <= {v1, v2["version"]} and versions[-1] == v2["version"]
        assert all(not (pids & gone) for v, pids in runs if v == v2["version"]), "a deleted pid after the swap"


def _strict_run(spark, tmp, tiny_bert_dir, growth: float) -> dict:
    """v1 built at recall target 0.5 (a small nprobe), then one document rewritten and published
    with target 1.0 and ``nightly.max_nprobe_growth=growth``."""
    docs = synthetic_docs(100, words_per_doc=150, seed=22)
    snapshot = write_jsonl(tmp / "snapshot.jsonl", docs)
    v1 = run_nightly(spark, cfg_for(tmp, tiny_bert_dir, snapshot, "index.recall_target=0.5"))
    docs[3]["text"] = NEW_TEXT
    write_jsonl(snapshot, docs)
    cfg = cfg_for(tmp, tiny_bert_dir, snapshot, "index.recall_target=1.0", f"nightly.max_nprobe_growth={growth}")
    return {"cfg": cfg, "v1": v1, "v2": run_nightly(spark, cfg)}


def test_a_delta_below_the_recall_target_raises_nprobe_within_the_limit(spark, tmp_path, tiny_bert_dir):
    run = _strict_run(spark, tmp_path, tiny_bert_dir, 8)
    v1, v2 = run["v1"], run["v2"]
    assert v1["nprobe"] < 4, "the base needs fewer than every list for recall 0.5"
    assert v2["kind"] == "delta" and v2["nprobe"] > v1["nprobe"]
    m, lists = _lists(run["cfg"], v2["version"])
    assert m.recall["rule"].startswith(f"recall@10 {m.recall['by_nprobe'][str(v1['nprobe'])]} at nprobe {v1['nprobe']}")
    assert m.recall["at_nprobe"] == 1.0 and m.recall["base_nprobe"] == v1["nprobe"]
    assert m.nprobe == v2["nprobe"] and abs(_fresh_recall(run["cfg"], v2["version"], lists, v2["nprobe"],
                                                          v2["version"], 10) - 1.0) < 1e-9


def test_a_delta_below_the_recall_target_compacts_past_the_limit(spark, tmp_path, tiny_bert_dir):
    run = _strict_run(spark, tmp_path, tiny_bert_dir, 1)
    v2 = run["v2"]
    assert v2["kind"] == "full", "nprobe may not grow past 1 x the base: the job compacted instead"
    assert v2["compaction_reason"].startswith("the delta missed the recall target: recall@10"), v2["compaction_reason"]
    assert v2["recall_at_nprobe"] >= 1.0


def test_deltas_share_the_base_quantizer_file_and_a_corrupted_one_is_retrained(spark, tmp_path, tiny_bert_dir):
    """Two deltas in a row both name v1's ``trained.faiss`` (no copy, no chain through v2); once
    that file fails its checksum the next run does not reuse it: a full build with a new quantizer."""
    docs = synthetic_docs(100, words_per_doc=150, seed=23)
    snapshot = write_jsonl(tmp_path / "snapshot.jsonl", docs)
    cfg = cfg_for(tmp_path, tiny_bert_dir, snapshot, "publish.keep_versions=5")
    root = cfg.path("index_root")
    runs = [run_nightly(spark, cfg)]
    for i in (3, 4):
        docs[i]["text"] = NEW_TEXT + f" marker{i}word"
        write_jsonl(snapshot, docs)
        runs.append(run_nightly(spark, cfg))
    v1, v2, v3 = (r["version"] for r in runs)
    assert [r["kind"] for r in runs] == ["full", "delta", "delta"]
    m1, m3 = (read_manifest(os.path.join(version_url(root, v), MANIFEST)) for v in (v1, v3))
    assert m3.trained_version == v1 and m3.trained == m1.trained and m3.quantizer["from_version"] == v2
    assert sorted(f for v in (v1, v2, v3) for f in os.listdir(version_url(root, v)) if f == "trained.faiss") \
        == ["trained.faiss"], "one quantizer file for the three versions"

    path = os.path.join(version_url(root, v1), "trained.faiss")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    docs[5]["text"] = NEW_TEXT + " marker5word"
    write_jsonl(snapshot, docs)
    v4 = run_nightly(spark, cfg)
    m4 = read_manifest(os.path.join(version_url(root, v4["version"]), MANIFEST))
    assert v4["kind"] == "full" and m4.quantizer["reused"] is False
    assert m4.quantizer["reason"] == f"the quantizer {path} failed its sha256 check", m4.quantizer
    assert m4.trained_version == "" and m4.trained.sha256 != m1.trained.sha256
    searcher = Searcher(os.path.join(version_url(root, v4["version"]), MANIFEST), cfg.encoder,
                        str(tmp_path / "cache-search"), nprobe=4)
    (top,) = searcher.ask(["marker5word"], k=1, mode="bm25")[0]
    assert top.doc_id == docs[5]["id"] and "marker5word" in top.text, "the rebuilt version serves the new text"
