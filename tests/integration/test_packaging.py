"""A search node installs ``dpr_lib[serve]``: no pyspark, no matplotlib. This test builds a fresh
virtualenv holding exactly the distributions that install resolves to (dpr_lib's base and ``serve``
requirements from pyproject.toml, and theirs, taken from this environment: no network), then
answers a question from a published version with ``dpr-search`` and ``dpr-serve`` there. Any
import of a distribution outside that set (pyspark above all) fails the test."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from importlib import metadata

import httpx
import pytest
import tomllib
from conftest import make_config, synthetic_docs, wait_until_serving, write_jsonl
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from s3server import free_port

from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.index import build_index

REPO = pathlib.Path(__file__).resolve().parents[2]


def closure(extras: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``pip install dpr_lib[extras]`` resolves to (dpr_lib itself aside)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        found[name] = dist
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r)
    return found


def _serve_venv(root: pathlib.Path) -> pathlib.Path:
    """python -m venv, then the closure's files linked into its site-packages and dpr_lib on a .pth."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    for dist in closure(("serve",)).values():
        base = pathlib.Path(dist.locate_file(""))
        tops = {pathlib.Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
    (site / "dpr_lib.pth").write_text(str(REPO) + "\n")
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("pkg")
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(40, seed=7))}",
                      f"encoder.model={tiny_bert_dir}", "index.sparse=true", "publish.docstore=true")
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    manifest = build_index(spark, cfg)
    return cfg, manifest


def test_the_serve_install_holds_no_spark_and_no_plots():
    names = set(closure(("serve",)))
    assert {"fastapi", "uvicorn", "faiss-cpu", "torch", "transformers"} <= names
    assert not names & {"pyspark", "matplotlib", "pytrec-eval-terrier", "py4j", "pandas"}, names


def test_a_serve_virtualenv_without_pyspark_searches_and_serves(published, tmp_path, tiny_bert_dir):
    cfg, manifest = published
    py = _serve_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "SPARK_HOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('pyspark'), "
                            "u.find_spec('matplotlib'))"], capture_output=True, text=True, env=env, check=True)
    assert probe.stdout.split() == ["None", "None"], probe.stdout
    root = cfg.path("index_root")
    sets = ["--set", f"encoder.model={tiny_bert_dir}", "--set", f"paths.cache_dir={tmp_path}/cache"]
    out = subprocess.run([str(py), "-c", "import sys; from dpr_lib.search import main; sys.exit(main())",
                          "what is passage seven about", "--index", root, "-k", "3", "--json", *sets],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert found["version"] == manifest.version
    hits = found["results"][0]["hits"]
    assert len(hits) == 3 and all(h["pid"] >= 0 and h["text"] for h in hits)

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(py), "-c", "import sys; from dpr_lib.serve import main; sys.exit(main())",
                                 "--index", root, "--port", str(port), *sets], stdout=fh, stderr=subprocess.STDOUT,
                                env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_until_serving(client, proc, log)
            r = client.post("/search", json={"questions": ["what is passage seven about"], "k": 3, "mode": "hybrid"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["version"] == manifest.version and len(body["results"][0]["hits"]) == 3
            schema = client.get("/openapi.json").json()
            request = schema["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert "questions" in request["properties"] and "k" in request["properties"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

