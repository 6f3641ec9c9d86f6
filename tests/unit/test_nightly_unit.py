"""The nightly job's resume helper (:class:`dpr_lib.nightly.Stages`): a completed stage is skipped
on resume, a failed one reruns, and the state file is replaced atomically."""

import json
import os

import pytest

from dpr_lib import storage
from dpr_lib.nightly import Stages, read_json


def test_a_completed_stage_is_skipped_on_resume(tmp_path):
    url = str(tmp_path / "run" / "state.json")
    calls = []
    first = Stages(url, {"run": "r1"})
    assert first.run("shard", lambda: calls.append("shard") or {"passages": 3}) == {"passages": 3}
    resumed = Stages(url, read_json(url))
    assert resumed.run("shard", lambda: calls.append("shard again") or {"passages": 99}) == {"passages": 3}
    assert resumed.run("diff", lambda: calls.append("diff") or {"new": 1}) == {"new": 1}
    assert calls == ["shard", "diff"]
    state = read_json(url)
    assert state["done"] == ["shard", "diff"] and set(state["seconds"]) == {"shard", "diff"}


def test_a_failed_stage_is_not_recorded_and_reruns(tmp_path):
    url = str(tmp_path / "state.json")
    stages = Stages(url, {"run": "r2"})
    stages.run("shard", lambda: 1)

    def broken():
        raise RuntimeError("encode died")

    with pytest.raises(RuntimeError, match="encode died"):
        stages.run("encode", broken)
    state = read_json(url)
    assert state["done"] == ["shard"] and "encode" not in state
    again = Stages(url, state)
    assert again.run("encode", lambda: {"encoded": 5}) == {"encoded": 5}
    assert read_json(url)["done"] == ["shard", "encode"]


def test_the_state_write_is_atomic(tmp_path, monkeypatch):
    """The state is written beside and renamed into place: a run killed before the rename leaves
    the previous state whole (never a truncated file) and no staging file behind."""
    url = str(tmp_path / "state.json")
    stages = Stages(url, {"run": "r3"})
    stages.run("shard", lambda: {"passages": 1})
    before = open(url).read()
    staged = []
    real_replace = os.replace

    def killed_before_rename(src, dst):
        staged.append(open(src).read())  # the new state was complete in its staging file
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        stages.run("diff", lambda: {"new": 2})
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert json.loads(staged[0])["done"] == ["shard", "diff"]
    assert open(url).read() == before and json.loads(before)["done"] == ["shard"]
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
