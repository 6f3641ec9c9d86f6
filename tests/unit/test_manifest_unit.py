"""The manifest contract: one typed definition, JSON round trips, refusals that name the problem."""

import json

import numpy as np
import pytest

from dpr_lib.errors import IncompatibleIndexError, IndexIntegrityError
from dpr_lib.manifest import (
    FORMAT_VERSION,
    SEGMENTED_FORMAT,
    DocstoreEntry,
    FileEntry,
    Manifest,
    ShardEntry,
    relative_to,
    version_url,
)


def _manifest() -> Manifest:
    return Manifest(
        version="20261201T000000Z-abcdef", encoder={"id": "e1", "dim": 4}, dim=4, factory="IVF2,PQ2", nlist=2,
        nprobe=2, trained=FileEntry("trained.faiss", 10, "a" * 64),
        shards=[ShardEntry(0, "shard-00000.faiss", 3, 100, "b" * 64,
                           rerank={"pids": FileEntry("shard-00000.pids.npy", 24, "c" * 64),
                                   "vectors": FileEntry("shard-00000.vectors.npy", 24, "d" * 64)}),
                ShardEntry(1, "shard-00001.faiss", 2, 90, "e" * 64)],
        docstore=[DocstoreEntry("docstore/part-00000.parquet", 1, 9, 5, 300, "f" * 64)],
        recall={"k": 10, "at_nprobe": 0.97}, extra={"nightly": {"run": "r1"}})


def test_json_round_trip_keeps_every_field_and_the_caller_keys():
    m = _manifest()
    doc = json.loads(m.to_json())
    assert doc["format_version"] == 2 and doc["nightly"] == {"run": "r1"}  # no segments: format-2 readers load it
    assert doc["shards"][0]["rerank"]["vectors"]["path"] == "shard-00000.vectors.npy"
    assert "rerank" not in doc["shards"][1] and "extra" not in doc
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.shards[0].rerank["pids"].sha256 == "c" * 64 and back.docstore[0].max_pid == 9


def test_a_shared_quantizer_file_names_its_holder_and_keeps_it_referenced():
    m = _manifest()
    assert "trained_version" not in json.loads(m.to_json()), "a version's own file: nothing new in the JSON"
    assert m.trained_holder() == m.version and m.referenced_versions() == {m.version}
    m.trained_version = "20261130T000000Z-000000"
    back = Manifest.from_json(m.to_json())
    assert back.trained_version == "20261130T000000Z-000000" and back == m
    assert back.trained_holder() == "20261130T000000Z-000000"
    assert back.referenced_versions() == {m.version, "20261130T000000Z-000000"}, "pruning keeps the holder"


def test_blobs_name_every_file_a_node_fetches():
    assert _manifest().blobs() == frozenset(c * 64 for c in "bcdef")


def test_newer_format_bad_json_and_missing_keys_are_refused_by_name():
    doc = _manifest().to_dict()
    with pytest.raises(IncompatibleIndexError, match=rf"m.json has format_version 99; this dpr_lib reads up to "
                                                     rf"{FORMAT_VERSION}"):
        Manifest.from_dict({**doc, "format_version": 99}, "m.json")
    with pytest.raises(IncompatibleIndexError, match="format_version None"):
        Manifest.from_dict({k: v for k, v in doc.items() if k != "format_version"})
    with pytest.raises(IndexIntegrityError, match="not valid JSON"):
        Manifest.from_json(b"{nope")
    with pytest.raises(IndexIntegrityError, match=r"not a valid manifest: KeyError 'shards'"):
        Manifest.from_dict({k: v for k, v in doc.items() if k != "shards"})


def test_version_paths():
    assert version_url("s3://b/idx", "v1") == "s3://b/idx/versions/v1"
    assert relative_to("s3://b/idx/versions/v1/shard-00000.faiss", "s3://b/idx/versions/v1") == "shard-00000.faiss"
    for bad in ("", "..", "a/b"):
        with pytest.raises(IncompatibleIndexError, match="invalid version id"):
            version_url("s3://b/idx", bad)


def test_a_version_with_segments_is_format_3_and_a_format_2_reader_refuses_it(monkeypatch):
    from dpr_lib import manifest as mf

    base = _manifest()
    delta = _manifest()
    delta.version, delta.segment_seq = "v2", 1
    delta.segments = [base.own_segment()]
    delta.shards = [ShardEntry(0, "shard-00000.faiss", 1, 50, "9" * 64)]
    delta.docstore = []
    delta.tombstones = {"path": "tombstones.npy", "bytes": 144, "sha256": "8" * 64, "count": 2}
    doc = json.loads(delta.to_json())
    assert doc["format_version"] == SEGMENTED_FORMAT == 3
    back = Manifest.from_json(delta.to_json())
    assert back == delta and [s.seq for s in back.all_segments()] == [0, 1]
    assert back.referenced_versions() == {base.version, "v2"}
    # Every file of every segment, plus the tombstones, is something a search node fetches.
    assert back.blobs() == base.blobs() | {"9" * 64, "8" * 64}
    assert {(v, f.path) for v, f in back.files_by_version()} >= {(base.version, "shard-00001.faiss"), ("v2", "tombstones.npy")}
    monkeypatch.setattr(mf, "FORMAT_VERSION", 2)  # the reader of the previous release
    with pytest.raises(IncompatibleIndexError, match="format_version 3; this dpr_lib reads up to 2: upgrade"):
        Manifest.from_json(delta.to_json(), "m.json")
    assert Manifest.from_json(base.to_json()) == base, "a full build still loads there"


def test_tombstones_keep_the_latest_seq_per_pid():
    from dpr_lib.segments import add_tombstones

    t = add_tombstones(np.zeros((0, 2), np.int64), np.array([5, 3]), 1)
    assert t.tolist() == [[3, 1], [5, 1]]
    t = add_tombstones(t, np.array([5, 9]), 2)
    assert t.tolist() == [[3, 1], [5, 2], [9, 2]]
