"""`bench/run.py`'s options: help and a bad part answer at once, before any benchmark starts."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, "bench", "run.py")


def run(*args, **env):
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=REPO)


def test_help_lists_every_part_and_runs_nothing(tmp_path):
    out = run("--help", BENCH_OUT=str(tmp_path))
    assert out.returncode == 0, out.stderr
    for part in ("encode", "index", "serve", "nightly_scale", "sparse", "soak", "cluster"):
        assert f"\n  {part} " in out.stdout
    assert list(tmp_path.iterdir()) == []  # no report written


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unknown_part_is_refused_naming_it(tmp_path, how):
    out = run("--only", "sparces", BENCH_OUT=str(tmp_path)) if how == "flag" else \
        run(BENCH_ONLY="sparces", BENCH_OUT=str(tmp_path))
    assert out.returncode == 2
    assert "unknown part 'sparces'" in out.stderr and "sparse" in out.stderr
    assert list(tmp_path.iterdir()) == []
