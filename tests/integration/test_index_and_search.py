"""The merge job and the loader: publish to a local root and to a real S3 server, verify the
manifest, sharded search == single index, interrupted publishes, corrupt files, bad requests."""

import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, encoder_sets, make_config, synthetic_docs, write_jsonl

from dpr_lib import schemas, storage
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.errors import EncoderError, IncompatibleIndexError, IndexIntegrityError, InputError, StorageError
from dpr_lib.index import build_index
from dpr_lib.index_ops import deserialize
from dpr_lib.manifest import list_versions, read_latest
from dpr_lib.search import Searcher, ShardedIndex


@pytest.fixture(scope="module")
def encoded(spark, tmp_path_factory, tiny_bert_dir):
    """A corpus of 120 documents (240 passages), encoded with the tiny BERT."""
    tmp = tmp_path_factory.mktemp("index")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(120, seed=9))}",
                      f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "encoder.normalize=true",
                      "corpus.num_files=3", "index.num_shards=3",
                      "index.recall_queries=64")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    return cfg


def all_vectors(cfg):
    table = pa.concat_tables(pq.read_table(f) for f in storage.list_files(cfg.path("embeddings"), ".parquet"))
    return np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32), \
        table.column("pid").to_numpy()


def test_publish_local_manifest_and_sharded_equals_single(spark, encoded, tmp_path):
    cfg = make_config(tmp_path, *[f"{k}={v}" for k, v in {
        "encoder.model": encoded.encoder.model, "encoder.pooling": "mean", "encoder.normalize": "true",
        "paths.passages": encoded.path("passages"),
        "paths.embeddings": encoded.path("embeddings"), "index.num_shards": 3,
        "index.recall_target": 0.6}.items()])  # a target several nprobes reach: the choice among them is tested
    manifest = build_index(spark, cfg)
    root = cfg.path("index_root")
    assert read_latest(root) == manifest.version
    vdir = os.path.join(root, "versions", manifest.version)
    on_disk = json.load(open(os.path.join(vdir, "manifest.json")))
    assert on_disk["format_version"] == 2  # a full build: readable by format-2 loaders
    assert on_disk["metric"] == "inner_product" and on_disk["factory"].startswith("IVF")
    assert len(on_disk["shards"]) == 3
    assert on_disk["totals"]["vectors"] == 240 == sum(s["vectors"] for s in on_disk["shards"])
    assert on_disk["totals"]["docstore_rows"] == 240
    for entry in on_disk["shards"] + on_disk["docstore"] + [on_disk["trained"]]:
        path = os.path.join(vdir, entry["path"])
        assert storage.sha256_file(path) == entry["sha256"] and os.path.getsize(path) == entry["bytes"]
    assert set(on_disk["recall"]["by_nprobe"]) >= {"1", "2"}
    # The recommended nprobe is the smallest that reaches the target (the largest when none does).
    by = {int(p): r for p, r in on_disk["recall"]["by_nprobe"].items()}
    reaching = [p for p, r in by.items() if r >= cfg.index.recall_target]
    assert len(reaching) >= 2, by
    assert on_disk["nprobe"] == min(reaching), (on_disk["nprobe"], by)
    assert on_disk["recall"]["at_nprobe"] == by[on_disk["nprobe"]]

    vectors, pids = all_vectors(cfg)
    single = deserialize(open(os.path.join(vdir, "trained.faiss"), "rb").read())
    single.add_with_ids(vectors, pids)
    faiss.extract_index_ivf(single).nprobe = manifest.nprobe
    loaded = ShardedIndex(root, cache_dir=str(tmp_path / "cache"))
    assert loaded.ntotal == 240 and len(loaded.shards) == 3
    want_s, want_i = single.search(vectors[:50], 10)
    got_s, got_i = loaded.search(vectors[:50], 10)
    assert got_i.tolist() == want_i.tolist()
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
    mapped = ShardedIndex(root, cache_dir=str(tmp_path / "cache"), mmap=True)
    assert mapped.search(vectors[:50], 10)[1].tolist() == want_i.tolist()
    # Shards split across two "nodes", merged by a broker, give the same answer.
    from dpr_lib.index_ops import merge_topk

    a = ShardedIndex(root, cache_dir=str(tmp_path / "cache"), shards=[0])
    b = ShardedIndex(root, cache_dir=str(tmp_path / "cache"), shards=[1, 2])
    (sa, ia), (sb, ib) = a.search(vectors[:50], 10), b.search(vectors[:50], 10)
    assert merge_topk([sa, sb], [ia, ib], 10)[1].tolist() == want_i.tolist()
    # Exhaustive nprobe equals exact search.
    exact = ShardedIndex(root, cache_dir=str(tmp_path / "cache"), nprobe=manifest.nlist)
    brute = pids[np.argsort(-(vectors[:20] @ vectors.T), axis=1)[:, :5]]
    assert exact.search(vectors[:20], 5)[1].tolist() == brute.tolist()


def test_passage_lookup_and_question_search(spark, encoded, tmp_path):
    build_index(spark, encoded)
    searcher = Searcher(encoded.path("index_root"), encoded.encoder, cache_dir=str(tmp_path / "c"), mode="dense")
    passages = pa.concat_tables(pq.read_table(f) for f in storage.list_files(encoded.path("passages"), ".parquet"))
    some = passages.slice(0, 5).to_pylist()
    found = searcher.index.lookup([r["pid"] for r in some] + [-1])
    assert {p: (d["title"], d["text"]) for p, d in found.items()} == {r["pid"]: (r["title"], r["text"]) for r in some}
    by_pid = {r["pid"]: r for r in passages.to_pylist()}
    hits = searcher.ask([some[0]["text"]], k=5)[0]
    scores, pids = searcher.index.search(searcher.encoder.encode(None, [some[0]["text"]]), 5)
    assert [h.pid for h in hits] == pids[0].tolist()
    np.testing.assert_allclose([h.score for h in hits], scores[0], rtol=1e-6)
    assert all(h.text == by_pid[h.pid]["text"] and h.title == by_pid[h.pid]["title"] for h in hits)
    many = searcher.ask(["alpha"], k=1000)[0]
    assert 0 < len(many) <= 240 and len({h.pid for h in many}) == len(many), "k above the index size: fewer hits"
    everything = Searcher(encoded.path("index_root"), encoded.encoder, cache_dir=str(tmp_path / "c"),
                          nprobe=searcher.index.manifest.nlist, mode="dense")
    assert len(everything.ask(["alpha"], k=1000)[0]) == 240, "probing every list returns every passage"
    with pytest.raises(InputError, match="empty question"):
        searcher.ask(["  "])
    with pytest.raises(InputError, match="k must be a positive integer"):
        searcher.ask(["alpha"], k=0)
    with pytest.raises(InputError, match="k must be <= 1000"):
        searcher.ask(["alpha"], k=1001)


def test_publish_to_s3_and_load_back(spark, encoded, s3_endpoint, tmp_path):
    cfg = make_config(tmp_path, *encoder_sets(encoded),
                      f"paths.passages={encoded.path('passages')}", f"paths.embeddings={encoded.path('embeddings')}",
                      "paths.index_root=s3://dpr-test/idx", f"publish.endpoint_url={s3_endpoint}",
                      "publish.keep_versions=2")
    versions = [build_index(spark, cfg).version for _ in range(3)]
    opts = cfg.storage_options()
    assert read_latest("s3://dpr-test/idx", opts) == versions[-1]
    assert list_versions("s3://dpr-test/idx", opts) == versions[1:], "older versions pruned to keep_versions"
    searcher = Searcher("s3://dpr-test/idx", cfg.encoder, cache_dir=str(tmp_path / "cache"), storage_options=opts)
    assert searcher.index.version == versions[-1] and searcher.index.ntotal == 240
    passages = {r["pid"]: r["text"] for f in storage.list_files(cfg.path("passages"), ".parquet")
                for r in pq.read_table(f, columns=["pid", "text"]).to_pylist()}
    hits = searcher.ask(["alpha bravo"], 3)[0]
    assert len(hits) == 3 and all(h.text == passages[h.pid] for h in hits), "docstore read back through S3"


def test_unwritable_bucket_is_a_clear_error(spark, encoded, s3_endpoint, tmp_path):
    cfg = make_config(tmp_path, *encoder_sets(encoded),
                      f"paths.passages={encoded.path('passages')}", f"paths.embeddings={encoded.path('embeddings')}",
                      "paths.index_root=s3://no-such-bucket/idx", f"publish.endpoint_url={s3_endpoint}",
                      "publish.retries=2")
    with pytest.raises((StorageError, FileNotFoundError), match="s3://no-such-bucket/idx/versions/.*/trained.faiss"):
        build_index(spark, cfg)


def test_interrupted_publish_keeps_the_previous_version(spark, encoded, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(encoded.path("passages"), work / "passages")
    cfg = make_config(tmp_path, *encoder_sets(encoded), f"paths.passages={work}/passages",
                      f"paths.embeddings={encoded.path('embeddings')}")
    first = build_index(spark, cfg).version
    # The docstore step (after the shards were uploaded) fails: its input vanished.
    first_file = storage.list_files(str(work / "passages"), ".parquet")[0]
    with open(first_file, "wb") as fh:
        fh.write(b"not parquet")
    with pytest.raises(InputError, match=r"cannot read the Passages file .*part-00000.*parquet for the docstore"):
        build_index(spark, cfg)
    assert read_latest(cfg.path("index_root")) == first
    assert list_versions(cfg.path("index_root")) == [first], "the failed version left nothing behind"
    assert ShardedIndex(cfg.path("index_root"), cache_dir=str(tmp_path / "c")).version == first


def test_bad_embeddings_are_refused(spark, encoded, tmp_path):
    table = pq.read_table(storage.list_files(encoded.path("embeddings"), ".parquet")[0])
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)

    def write(name, pids, vecs):
        os.makedirs(tmp_path / name, exist_ok=True)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
        out = pa.Table.from_arrays([pa.array(pids, pa.int64()), pa.array(["h"] * len(pids)), flat],
                                   schema=schemas.embeddings_schema(vecs.shape[1]).with_metadata(table.schema.metadata))
        pq.write_table(out, tmp_path / name / "part-00000.parquet")
        return make_config(tmp_path / name, *encoder_sets(encoded),
                           f"paths.embeddings={tmp_path / name}", f"paths.passages={encoded.path('passages')}")

    pids = table.column("pid").to_numpy()
    nan = vectors.copy()
    nan[3, 0] = np.nan
    with pytest.raises(EncoderError, match=f"NaN/inf vectors for pid\\(s\\) \\[{pids[3]}\\]"):
        build_index(spark, write("nan", pids, nan))
    with pytest.raises(InputError, match="duplicate pids"):
        build_index(spark, write("dup", np.concatenate([pids, pids[:2]]), np.vstack([vectors, vectors[:2]])))
    few = write("few", pids, vectors)
    few.index.factory = "IVF4096,Flat"
    with pytest.raises(InputError, match=f"needs at least nlist=4096 vectors to train, the Embeddings table has {len(pids)}"):
        build_index(spark, few)
    wrong_dim = write("dim", pids, np.hstack([vectors, vectors]))
    with pytest.raises(IncompatibleIndexError, match="vectors are not of dimension 32"):
        build_index(spark, wrong_dim)


def test_loader_refuses_broken_versions(spark, encoded, tmp_path):
    root = tmp_path / "root"
    cfg = make_config(tmp_path, *encoder_sets(encoded), f"paths.index_root={root}",
                      f"paths.passages={encoded.path('passages')}", f"paths.embeddings={encoded.path('embeddings')}")
    with pytest.raises(IndexIntegrityError, match="LATEST is missing"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c0"))
    manifest = build_index(spark, cfg)
    vdir = root / "versions" / manifest.version
    # Corrupt shard bytes: detected by sha256, naming the file.
    shard = vdir / manifest.shards[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="shard-00001.faiss is corrupt: sha256"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c1"))
    assert not [f for f in os.listdir(tmp_path / "c1" / "blobs") if f.endswith(".part")], "no partial cache entry"
    # A manifest listing a shard that is not there.
    os.remove(shard)
    with pytest.raises(IndexIntegrityError, match="listed in the manifest but missing"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c2"))
    # A manifest from the future.
    m = json.loads((vdir / "manifest.json").read_text())
    m["format_version"] = 99
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleIndexError, match="format_version 99"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c3"))
    # A manifest naming a file outside its version directory.
    m["format_version"] = 1
    m["shards"][0]["path"] = "../../LATEST"
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="outside its version directory"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c4"))


def test_a_shard_from_a_faiss_this_reader_cannot_read_names_both_versions(spark, encoded, tmp_path):
    """The manifest records the software that wrote the version; a shard in an index format this
    FAISS does not know is refused naming the writer's FAISS and this one, not a crash inside FAISS."""
    import hashlib

    import faiss
    import numpy

    import dpr_lib

    root = tmp_path / "root"
    cfg = make_config(tmp_path, *encoder_sets(encoded), f"paths.index_root={root}",
                      f"paths.passages={encoded.path('passages')}", f"paths.embeddings={encoded.path('embeddings')}")
    manifest = build_index(spark, cfg)
    assert manifest.software["faiss"] == faiss.__version__ and manifest.software["numpy"] == numpy.__version__
    assert manifest.training["budget_bytes"] == 2**30, "half the running session's 2g, not the config's default"
    assert manifest.software["dpr_lib"] == dpr_lib.__version__ and manifest.software["index_format"]
    vdir = root / "versions" / manifest.version
    future = b"IxQ9" + bytes(64)  # an index type FAISS will add some day: unknown to this one
    (vdir / manifest.shards[0].path).write_bytes(future)
    m = json.loads((vdir / "manifest.json").read_text())
    m["shards"][0]["sha256"], m["shards"][0]["bytes"] = hashlib.sha256(future).hexdigest(), len(future)
    m["software"]["faiss"] = "9.9.0"
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleIndexError, match=rf"written by FAISS 9\.9\.0; this FAISS {faiss.__version__} "
                                                     r"cannot read it .*faiss-cpu==9\.9\.0"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c"))
    m["software"]["faiss"] = faiss.__version__  # same FAISS: then the file itself is broken
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="cannot be read by FAISS"):
        ShardedIndex(str(root), cache_dir=str(tmp_path / "c"))


def test_question_encoder_must_match_the_manifest(spark, encoded, tiny_dpr_dir, tmp_path):
    build_index(spark, encoded)
    from dpr_lib.config import EncoderConfig

    with pytest.raises(IncompatibleIndexError, match="is not the one this index was built for"):
        Searcher(encoded.path("index_root"), EncoderConfig(model=tiny_dpr_dir), cache_dir=str(tmp_path))


def test_cli_json_and_text(spark, encoded, tmp_path):
    build_index(spark, encoded)
    cmd = [sys.executable, "-m", "dpr_lib.search", "--index", encoded.path("index_root"), "alpha bravo", "-k", "2",
           "--set", f"paths.cache_dir={tmp_path}"] + [a for kv in encoder_sets(encoded) for a in ("--set", kv)]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["results"][0]["hits"]) == 2 and doc["results"][0]["hits"][0]["text"]
    text = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert text.returncode == 0 and "Q: alpha bravo" in text.stdout and " 2. [" in text.stdout, text.stderr
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "nothing"), "q"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode == IndexIntegrityError.exit_code
    assert bad.stderr.startswith("error: no index published") and "Traceback" not in bad.stderr


def test_compact_shards_rerank_from_disk_equals_exact_on_candidates(spark, encoded, tmp_path, s3_endpoint):
    """IVF-PQ codes in RAM + a float16 re-rank store per shard on the S3 server: the manifest lists
    the store with sha256, the loader maps it and re-ranks each shard's candidates exactly."""
    cfg = make_config(tmp_path, *encoder_sets(encoded), f"paths.passages={encoded.path('passages')}",
                      f"paths.embeddings={encoded.path('embeddings')}", "index.num_shards=2",
                      "index.factory=IVF4,PQ8x4", "paths.index_root=s3://dpr-test/compact",
                      f"publish.endpoint_url={s3_endpoint}")
    manifest = build_index(spark, cfg)
    opts = cfg.storage_options()
    # (nprobe, k_factor): the smallest nprobe, then the smallest re-rank factor, reaching the target
    by = {tuple(map(int, key.split("/"))): r for key, r in manifest.rerank["recall_by_nprobe_k_factor"].items()}
    reaching = sorted(c for c, r in by.items() if r >= cfg.index.recall_target)
    assert (manifest.nprobe, manifest.k_factor) == (reaching[0] if reaching else max(by)), (manifest.nprobe, by)
    assert manifest.rerank["store"] == "float16" and manifest.rerank["k_factor"] == manifest.k_factor
    assert manifest.memory["resident_bytes_per_passage"] == 4 + 8  # PQ8x4: 4-byte codes + the id
    assert manifest.memory["disk_bytes_per_passage"] == 2 * 32 + 8
    assert set(manifest.rerank["recall_by_nprobe_k_factor"]) >= {"1/1", "4/32"}
    vurl = f"s3://dpr-test/compact/versions/{manifest.version}"
    for shard in manifest.shards:
        for part in ("pids", "vectors"):
            meta = shard.rerank[part]
            assert meta.path == shard.path.replace(".faiss", f".{part}.npy")
            assert storage.sha256_file(f"{vurl}/{meta.path}", storage_options=opts) == meta.sha256

    loaded = ShardedIndex("s3://dpr-test/compact", cache_dir=str(tmp_path / "cache"), storage_options=opts,
                          k_factor=4)
    assert loaded.k_factor == 4 and len(loaded.stores) == 2
    assert all(isinstance(v, np.memmap) and v.dtype == np.float16 for _, v in loaded.stores)
    vectors, pids = all_vectors(cfg)
    queries = vectors[:20] + np.random.default_rng(1).standard_normal(vectors[:20].shape).astype(np.float32) * 0.1
    got_s, got_i = loaded.search(queries, 5)
    # expected: the union of every shard's top 5x4 PQ candidates, re-scored exactly (float16 vectors)
    by_pid = dict(zip(pids.tolist(), vectors.astype(np.float16).astype(np.float32)))
    for row, q in enumerate(queries):
        cands = {int(p) for s in loaded.shards for p in s.search(q[None], 20)[1][0] if p >= 0}
        exact = sorted(cands, key=lambda p: (-float(q @ by_pid[p]), p))[:5]
        assert got_i[row].tolist() == exact
        np.testing.assert_allclose(got_s[row], [q @ by_pid[p] for p in exact], rtol=1e-4, atol=1e-5)
    # with every list probed and every vector a candidate, re-ranking is exact search
    full = ShardedIndex("s3://dpr-test/compact", cache_dir=str(tmp_path / "cache"), storage_options=opts,
                        nprobe=4, k_factor=64)
    _, all_i = full.search(queries, 5)
    brute = pids[np.argsort(-(queries @ vectors.astype(np.float16).astype(np.float32).T), axis=1, kind="stable")[:, :5]]
    assert all_i.tolist() == brute.tolist()

    # a corrupted store is refused by sha256 (cache and source)
    key = manifest.shards[0].rerank["vectors"].path
    import s3fs
    fs = s3fs.S3FileSystem(**opts)
    data = bytearray(fs.cat(f"dpr-test/compact/versions/{manifest.version}/{key}"))
    data[-1] ^= 0xFF
    fs.pipe(f"dpr-test/compact/versions/{manifest.version}/{key}", bytes(data))
    with pytest.raises(IndexIntegrityError, match="sha256"):
        ShardedIndex("s3://dpr-test/compact", cache_dir=str(tmp_path / "cache2"), storage_options=opts)


def test_dataframe_input_gives_each_task_one_shard(spark, encoded, tmp_path):
    """The nightly path feeds the merge job a DataFrame: shard s is built by task s alone (a hash
    of the shard number into num_shards partitions would put two shards in one task), and the
    shards together hold every vector once."""
    from dpr_lib import index as ix
    from dpr_lib import index_ops as ops

    vectors, pids = all_vectors(encoded)
    df = spark.read.parquet(encoded.path("embeddings")).select("pid", "vector")
    trained = ops.serialize(ops.train_quantizer(vectors, "IVF4,Flat"))
    num_shards = 5
    rows = ix.build_shards(spark, df, trained, num_shards, vectors.shape[1],
                           lambda s: str(tmp_path / f"shard-{s}.faiss"), vectors[:8], 5, [1, 4], 64, {}, 1)
    assert [r.shard for r in rows] == list(range(num_shards))
    assert all(r.task_shards == 1 for r in rows), [r.task_shards for r in rows]
    held = np.concatenate([_ids_of(faiss.read_index(r.path)) for r in rows])
    assert sorted(held.tolist()) == sorted(pids.tolist())
    assert sum(r.vectors for r in rows) == len(pids)
    for r in rows:
        assert storage.sha256_file(r.path) == r.sha256 and os.path.getsize(r.path) == r.bytes
        assert r.peak_rss > 0


def _ids_of(index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                           for i in range(ivf.nlist)] or [np.zeros(0, np.int64)])
