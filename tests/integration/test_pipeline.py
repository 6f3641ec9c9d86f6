"""The whole pipeline with the real bundled model (all-MiniLM-L6-v2) on a slice of the embedded
corpus, then the commands of the README's quick start and the loader example of
docs/serving/loader.md, executed as written (only the index root is this test's)."""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, make_config, wait_until_serving

from dpr_lib.pipeline import run_pipeline


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = make_config(tmp, "corpus.default_corpus_limit=100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_pipeline(spark, cfg, ["What does the with statement do?", "How do I parse command-line arguments?"])
    return cfg, result, out.getvalue()


def test_pipeline_answers_questions_about_the_corpus(published):
    cfg, result, printed = published
    assert result["passages"] == result["encoded"] > 100 and result["rejects"] == 0
    assert "Python language reference: with" in result["top_hits"]["What does the with statement do?"]
    hits = result["top_hits"]["How do I parse command-line arguments?"]
    assert any(t.startswith("argparse") for t in hits), hits
    assert f"published index version {result['version']} to {cfg.path('index_root')}" in printed
    assert result["recall_at_nprobe"] >= 0.95


def test_loader_example_of_the_docs_runs(published, tmp_path):
    cfg, result, _ = published
    page = open(os.path.join(REPO, "docs", "serving", "loader.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert '"work/index"' in code
    code = code.replace('"work/index"', repr(cfg.path("index_root")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/serving/loader.md", "exec"), {"__name__": "docs_example"})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3 and re.match(r"^0\.\d{3} \S", lines[0]), lines


def quick_start_commands() -> list[list[str]]:
    """The query commands of the README's quick start (after ``make run``), as argument lists."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(".venv/bin/")]


def test_quick_start_commands_run(published, tmp_path):
    """Every ``dpr-search`` line of the quick start answers from the published index, and the
    ``dpr-serve`` line starts a service that answers /health and /search."""
    import httpx
    from s3server import free_port

    cfg, result, _ = published
    commands = quick_start_commands()
    assert {c[0] for c in commands} == {".venv/bin/dpr-search", ".venv/bin/dpr-serve"}, commands
    root, bindir = cfg.path("index_root"), os.path.dirname(sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in commands:
        assert "work/index" in argv, argv
        argv = [os.path.join(bindir, os.path.basename(argv[0]))] + [root if a == "work/index" else a for a in argv[1:]]
        argv += ["--set", f"paths.cache_dir={tmp_path}/cache"]
        if argv[0].endswith("dpr-search"):
            run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
            assert run.returncode == 0, run.stderr[-2000:]
            assert result["version"] in run.stdout and "pid" in run.stdout, run.stdout[:2000]  # hits from this version
            continue
        port, log_path = free_port(), tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv + ["--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                wait_until_serving(client, proc, log_path)
                hits = client.post("/search", json={"questions": ["What is a generator?"], "k": 3}).json()
                assert hits["version"] == result["version"] and len(hits["results"][0]["hits"]) == 3, hits
        finally:
            proc.terminate()
            proc.wait(timeout=30)
