"""The whole pipeline with the real bundled model (all-MiniLM-L6-v2) on a slice of the embedded
corpus, then the README's search-service example, executed as written."""

import contextlib
import io
import os
import re

import pytest
from conftest import REPO, make_config

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


def test_readme_search_service_example_runs(published, tmp_path):
    cfg, result, _ = published
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Loading the index in a search service", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"work/index"' in code
    code = code.replace('"work/index"', repr(cfg.path("index_root")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3 and re.match(r"^0\.\d{3} \S", lines[0]), lines
