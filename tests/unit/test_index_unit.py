from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpr_lib.errors import ConfigError, InputError
from dpr_lib.index_ops import (
    check_task_memory,
    choose_factory,
    deserialize,
    merge_topk,
    recall_at_k,
    rule_table,
    serialize,
    shard_count,
    train_quantizer,
)


def test_auto_rule():
    p = choose_factory(1_000_000, 768)
    assert p.factory == "IVF4096,Flat" and 4 * 1000 <= p.nlist <= 16 * 1000
    assert p.train_size == 4096 * 64 and p.train_bytes == 4096 * 64 * 768 * 4  # 64 a list, in the 2 GiB budget
    assert choose_factory(1_000_000, 768, max_train_sample=200_000).train_size == 200_000
    # the budget holds the code and the 8-byte id
    assert choose_factory(1_000_000, 768, bytes_per_vector=776).factory == "IVF4096,SQ8"
    assert choose_factory(1_000_000, 768, bytes_per_vector=775).factory == "IVF4096,PQ384"
    assert choose_factory(1_000_000, 768, bytes_per_vector=72).factory == "IVF4096,PQ64"
    assert choose_factory(1_000_000, 384, bytes_per_vector=96).factory == "IVF4096,PQ64"
    assert choose_factory(1_000_000, 384, bytes_per_vector=50).factory == "IVF4096,PQ32"
    # too few vectors for 256-centroid PQ codebooks: scalar codes, said in the reason
    tiny = choose_factory(5000, 384, bytes_per_vector=96)
    assert tiny.factory.endswith(",SQ8") and "too few to train" in tiny.reason
    with pytest.raises(InputError, match="leaves no room for a code"):
        choose_factory(1_000_000, 384, bytes_per_vector=8)
    small = choose_factory(1000, 384)
    assert small.nlist == 1000 // 39 and small.train_size == 1000
    # below index.exact_below (exact codes only): one list, an exact index
    exact = choose_factory(9_999, 384, exact_below=10_000)
    assert exact.factory == "IVF1,Flat" and exact.nlist == 1 and "exact search" in exact.reason
    assert choose_factory(10_000, 384, exact_below=10_000).nlist > 1
    assert choose_factory(5000, 384, bytes_per_vector=96, exact_below=10_000).factory.endswith(",SQ8")


def test_exact_index_finds_the_brute_force_top_k():
    x = np.random.default_rng(3).standard_normal((3000, 32)).astype(np.float32)
    index = deserialize(serialize(train_quantizer(x[:64], "IVF1,Flat")))
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    q = x[:50] + 0.1
    _, found = index.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert recall_at_k(found, exact) == 1.0


GiB = 2**30


def test_rule_table_never_trains_fewer_than_39_points_per_list():
    """The rule at d=768 (DPR) from 10k to 1B vectors, with the driver budgets of conf/local.yaml
    (4g -> 2 GiB) and conf/cluster.example.yaml (16g -> 8 GiB): hand-checked rows below."""
    for budget in (2 * GiB, 8 * GiB):
        for row in rule_table(768, budget):
            if row["nlist"] > 1:
                assert row["points_per_list"] >= 39, row
                assert row["train_size"] >= 39 * row["nlist"], row
            assert row["driver_bytes"] <= budget and row["driver_bytes"] == row["train_size"] * 768 * 4
    rows = {r["n"]: r for r in rule_table(768, 8 * GiB)}
    assert (rows[10_000]["factory"], rows[10_000]["train_size"]) == ("IVF256,Flat", 10_000)  # n // 39 lists
    assert (rows[1_000_000]["nlist"], rows[1_000_000]["train_size"]) == (4096, 4096 * 64)
    assert (rows[21_000_000]["nlist"], rows[21_000_000]["points_per_list"]) == (32768, 64)
    # 100M: 4*sqrt(n) -> 65536 lists; 8 GiB holds 2.79M vectors = 42 a list: kept, >= 39
    assert (rows[100_000_000]["nlist"], rows[100_000_000]["train_size"]) == (65536, 8 * GiB // 3072)
    # 1B: 131072 lists would need 5.1M training vectors; lowered to the power of two 2.79M/39 allows
    assert rows[1_000_000_000]["nlist"] == 65536
    assert rows[21_000_000]["train_method"] == "two_level" and rows[1_000_000]["train_method"] == "two_level"
    assert rows[100_000]["train_method"] == "flat"
    # two-level k-means scores each point against 2*sqrt(nlist) centroids for 10 iterations, then
    # refines with 3 full iterations; flat k-means scores it against all nlist for 10
    flat = choose_factory(21_000_000, 768, max_train_bytes=8 * GiB, train_method="flat")
    assert flat.train_flops / rows[21_000_000]["train_flops"] == pytest.approx(
        32768 * 10 / (2 * 32768 ** 0.5 * 10 + 32768 * 3))
    assert flat.train_flops == pytest.approx(32768 * 64 * 32768 * 768 * 2 * 10)


def test_budget_lowers_nlist_and_says_so():
    p = choose_factory(21_000_000, 768, max_train_bytes=2 * GiB)
    # 2 GiB = 699,050 vectors of d=768 < 39 x 32768: nlist 16384 (the power of two <= 699050/39)
    assert p.nlist == 16384 and p.train_size == 2 * GiB // 3072 and p.train_size // p.nlist >= 39
    assert "nlist lowered from 32768 to 16384" in p.reason and "index.max_train_bytes" in p.reason
    assert "lowered" not in choose_factory(1_000_000, 768, max_train_bytes=2 * GiB).reason


def test_factory_untrainable_with_the_budget_fails_naming_nlist_sample_and_key():
    with pytest.raises(ConfigError, match=r"nlist=65536 needs 2555904 training vectors .* can have 699050 "
                                          r"\(index.max_train_bytes = 2147483648 bytes holds 699050"):
        choose_factory(21_000_000, 768, max_train_bytes=2 * GiB, factory="IVF65536,Flat")
    with pytest.raises(ConfigError, match="the Embeddings table has 2000 vectors"):
        choose_factory(2000, 16, factory="IVF64,Flat")


def test_shard_count_grows_with_n_and_task_memory_is_checked():
    assert shard_count(10_000, 2, 1_000_000) == 2
    assert shard_count(21_000_000, 2, 1_000_000) == 21
    assert shard_count(21_000_001, 0, 1_000_000) == 22
    check_task_memory(1_000_000, 1, 768, 3072, 8 * GiB)
    with pytest.raises(ConfigError, match=r"shard 0 .*1000000 vectors each of 1\) needs ~4.*max_vectors_per_shard"):
        check_task_memory(1_000_000, 1, 768, 3072, 2 * GiB)
    check_task_memory(10**9, 1, 768, 3072, 0)  # unknown task memory: no check


def test_two_level_training_matches_flat_k_means():
    """Two-level k-means on clustered data: recall@10 at equal nprobe within 0.01 of flat k-means
    (the scale bench measures it on calibrated 768-d vectors)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((64, 32)).astype(np.float32)
    x = centers[rng.integers(0, 64, 20_000)] + 0.6 * rng.standard_normal((20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:300] + 0.2 * rng.standard_normal((300, 32)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recalls = {}
    for method in ("flat", "two_level"):
        index = train_quantizer(x[:256 * 64], "IVF256,Flat", 1, method)
        assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 256
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 8
        recalls[method] = recall_at_k(index.search(q, 10)[1], exact)
    assert recalls["flat"] > 0.5
    assert abs(recalls["two_level"] - recalls["flat"]) <= 0.01, recalls


def test_explicit_factory_needs_enough_vectors():
    with pytest.raises(InputError, match="needs at least nlist=1024 vectors to train, the Embeddings table has 50"):
        choose_factory(50, 16, factory="IVF1024,Flat")
    assert choose_factory(5000, 16, factory="IVF64,Flat").nlist == 64


def test_untrainable_factory_is_a_clear_error():
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    with pytest.raises(InputError, match=r"cannot train index.factory 'IVF2,PQ4' on 100 vectors: .*256"):
        train_quantizer(x, "IVF2,PQ4")


def test_merge_topk_hand_case():
    s, i = merge_topk([np.array([[0.9, 0.5]]), np.array([[0.7, 0.6]])], [np.array([[1, 2]]), np.array([[3, 4]])], 3)
    assert i.tolist() == [[1, 3, 4]]
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.6]])
    s, i = merge_topk([np.array([[0.9, -1e30]])], [np.array([[1, -1]])], 3)
    assert i.tolist() == [[1, -1, -1]]


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_merge_of_shard_topk_equals_global_topk(n_shards, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((3, 60)).astype(np.float32)
    ids = np.arange(60)
    shard = rng.integers(0, n_shards, 60)
    parts_s, parts_i = [], []
    for s in range(n_shards):
        sel = shard == s
        order = np.argsort(-scores[:, sel], axis=1)[:, :k]
        parts_s.append(np.take_along_axis(scores[:, sel], order, 1))
        parts_i.append(ids[sel][order])
    got_s, got_i = merge_topk(parts_s, parts_i, k)
    want = np.argsort(-scores, axis=1)[:, :k]
    assert got_i.tolist() == want.tolist()


def test_recall_hand_case():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 2, 9], [4, 5, 6]])) == pytest.approx(5 / 6)


def test_shards_with_shared_quantizer_equal_one_index():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    trained = serialize(train_quantizer(x[:2000], "IVF32,Flat"))
    single = deserialize(trained)
    single.add_with_ids(x, ids)
    shards = [deserialize(trained) for _ in range(3)]
    for s in range(3):
        shards[s].add_with_ids(x[s::3], ids[s::3])
    q = rng.standard_normal((20, 16)).astype(np.float32)
    for idx in [single, *shards]:
        faiss.extract_index_ivf(idx).nprobe = 4
    want_s, want_i = single.search(q, 10)
    parts = [s.search(q, 10) for s in shards]
    got_s, got_i = merge_topk([p[0] for p in parts], [p[1] for p in parts], 10)
    assert got_i.tolist() == want_i.tolist()
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6)


def test_pack_batch_keeps_every_vector_with_its_pid_in_its_shard():
    import pyarrow as pa

    from dpr_lib.index import pack_batch, shard_of

    rng = np.random.default_rng(3)
    pids = rng.integers(0, 2**62, 500)
    vecs = rng.standard_normal((500, 8)).astype(np.float32)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(pids, pa.int64()), pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 8)],
        names=["pid", "vector"])
    got = {}
    for row in [r for b in pack_batch(batch, 8, 4) for r in b.to_pylist()]:
        p = np.frombuffer(row["pids"], np.int64)
        v = np.frombuffer(row["vectors"], np.float32).reshape(-1, 8)
        assert (shard_of(p, 4) == row["shard"]).all()
        got.update({int(a): b for a, b in zip(p, v)})
    assert sorted(got) == sorted(pids.tolist())
    np.testing.assert_array_equal(np.stack([got[int(p)] for p in pids]), vecs)
    assert set(np.unique(shard_of(pids, 4)).tolist()) == {0, 1, 2, 3}, "the hash spreads pids over all shards"


def test_rerank_in_blocks_equals_one_block(monkeypatch):
    from dpr_lib import index_ops as ix

    rng = np.random.default_rng(0)
    pids = np.sort(rng.choice(10**6, 500, replace=False)).astype(np.int64)
    vecs = rng.standard_normal((500, 16)).astype(np.float16)
    q = rng.standard_normal((37, 16)).astype(np.float32)
    cand = pids[rng.integers(0, 500, (37, 20))]
    cand[0, 3] = -1          # no candidate
    cand[1, 0] = 7_777_777   # not in the store
    whole = ix.rerank(q, cand, pids, vecs, 5)
    monkeypatch.setattr(ix, "RERANK_BLOCK_FLOATS", 16 * 20 * 3)  # 3 queries per block
    blocks = ix.rerank(q, cand, pids, vecs, 5)
    assert (whole[1] == blocks[1]).all() and np.allclose(whole[0], blocks[0])
    exact = (q[1] @ vecs.astype(np.float32).T)
    row = [p for p in cand[1].tolist() if p in set(pids.tolist())]
    want = sorted(set(row), key=lambda p: (-exact[np.searchsorted(pids, p)], p))[:5]
    assert whole[1][1].tolist() == want


def test_shard_pieces_cover_every_row_once_and_balance(tmp_path):
    """Shards of Embeddings files are contiguous row runs, cut inside row groups when needed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpr_lib.index.shards import file_layout, plan_pieces, read_pieces
    from dpr_lib.schemas import embeddings_schema

    files, pid = [], 0
    for i, groups in enumerate([[7, 3], [1], [12, 5, 2]]):
        path = str(tmp_path / f"part-{i}.parquet")
        with pq.ParquetWriter(path, embeddings_schema(4)) as w:
            for rows in groups:
                pids = np.arange(pid, pid + rows, dtype=np.int64)
                flat = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(pids, 4).astype(np.float32)), 4)
                w.write_table(pa.Table.from_arrays([pa.array(pids), pa.array(["h"] * rows), flat],
                                                   schema=embeddings_schema(4)))
                pid += rows
        files.append(path)
    layout = file_layout(files)
    assert [f["row_groups"] for f in layout] == [[7, 3], [1], [12, 5, 2]]
    for n in (1, 2, 3, 4, 7, 40):
        got = [np.concatenate([p for p, _ in read_pieces(pieces, 4, 2)] or [np.zeros(0, np.int64)])
               for pieces in plan_pieces(layout, n)]
        assert np.array_equal(np.concatenate(got), np.arange(pid)), "every row once, in order"
        sizes = [len(g) for g in got]
        assert max(sizes) - min(sizes) <= 1, sizes
        for pieces in plan_pieces(layout, n):  # vectors travel with their pids
            for p, v in read_pieces(pieces, 4, 3):
                assert (v[:, 0] == p).all()


def test_stale_quantizer_rule():

    from dpr_lib.index.recall import RecallChoice, stale_quantizer

    icfg = SimpleNamespace(recall_target=0.95, nprobe=0)
    prev, key = SimpleNamespace(version="v1", nprobe=16), "nightly.max_nprobe_growth"
    curve = {8: 0.9, 16: 0.94, 32: 0.96, 64: 0.99}

    def at(nprobe, by=curve):
        return RecallChoice(nprobe, 0, {(p, 0): r for p, r in by.items()}, by)

    assert stale_quantizer(prev, 32.0, key, at(32), 10, icfg) is None  # 2x the previous nprobe: still serves
    why = stale_quantizer(prev, 16.0, key, at(32), 10, icfg)
    assert why and "needs nprobe 32" in why and "over the limit of 16 (nightly.max_nprobe_growth x the nprobe 16" in why
    assert "below index.recall_target" in stale_quantizer(prev, 32.0, key, at(64, {64: 0.9}), 10, icfg)
    # A forced nprobe is what is served, whatever the previous version did; only the target counts.
    forced = SimpleNamespace(recall_target=0.95, nprobe=64)
    assert stale_quantizer(prev, 16.0, key, at(64), 10, forced) is None
    assert stale_quantizer(SimpleNamespace(version="v1", nprobe=1), 0, key, at(64), 10, icfg) is None  # no limit


def test_merged_recall_lists_equal_the_lists_of_the_new_state_where_certain():
    """merge_lists: the previous top-L without the dead pids, merged with a delta's own top-L,
    equals the top-L of the new live set on every hit it calls certain (property over seeds)."""
    from dpr_lib.index.recall import merge_lists
    from dpr_lib.index_ops import merge_topk, topk_block

    seen = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        old_v, new_v = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
        old_p = rng.choice(10**6, 300, replace=False).astype(np.int64)
        dead = np.sort(rng.choice(old_p, int(rng.integers(0, 120)), replace=False))
        new_p = np.concatenate([dead[:20], np.arange(10**7, 10**7 + 40 - len(dead[:20]))])  # changed ones keep their pid
        q, depth = rng.normal(size=(16, 8)).astype(np.float32), 25
        old = topk_block(q @ old_v.T, old_p, depth)
        new = topk_block(q @ new_v.T, new_p, depth)
        live = ~np.isin(old_p, dead)
        truth = merge_topk([topk_block(q @ old_v[live].T, old_p[live], depth)[0], new[0]],
                           [topk_block(q @ old_v[live].T, old_p[live], depth)[1], new[1]], depth)
        s, i, certain = merge_lists(old, dead, new, depth)
        assert ((certain >= 0) & (certain <= depth)).all()
        for r in range(len(q)):
            c = int(certain[r])
            assert i[r, :c].tolist() == truth[1][r, :c].tolist(), (seed, r, c)
        seen += certain.tolist()
    assert min(seen) < 25 <= max(seen), "both certain and truncated lists occur, so the check above can fail"
