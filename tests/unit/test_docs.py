"""The documentation is true to the code: generated pages are current, every configuration key is
in the reference, the README stays short and every link and reference to a page or section leads
somewhere. The site itself is built strictly when MkDocs is installed (``make docs`` in CI)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from dpr_lib import docgen
from dpr_lib.config import load_config

DOCS = os.path.join(REPO, "docs")


def read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
        return fh.read()


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(path: str) -> set[str]:
    out, fence = set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_generated_pages_are_current():
    assert docgen.stale() == [], "regenerate with `python -m dpr_lib.docgen`"


def test_every_config_key_is_in_the_reference_with_type_default_and_description():
    page = read(docgen.CONFIG_PAGE)
    cfg = load_config(None)
    keys = [f"{section}.{key}" for section, values in vars(cfg).items() for key in vars(values)]
    assert len(keys) > 100
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert missing == []
    undocumented = [k.path for k in docgen.config_keys() if not k.description]
    assert undocumented == [], "add a docstring under each field in dpr_lib/config.py"
    row = next(line for line in page.splitlines() if line.startswith("| `corpus.words` |"))
    assert row.split(" | ")[1:5] == ["int", "`100`", "", "&gt; 0"], row
    assert "| `encoder.backend` | str | `torch` |  | `torch` \\| `auto` \\| `onnx` \\| `openvino` |" in page


def test_a_key_missing_from_the_reference_is_caught(tmp_path):
    """The staleness check sees a row taken out of the committed page."""
    root = tmp_path / "repo"
    for rel in (docgen.CONFIG_PAGE, docgen.RESULTS_PAGE, docgen.RESULTS_JSON):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, rel), root / rel)
    assert docgen.stale(str(root)) == []
    page = (root / docgen.CONFIG_PAGE).read_text()
    (root / docgen.CONFIG_PAGE).write_text("\n".join(x for x in page.splitlines() if "`search.mode`" not in x))
    assert docgen.stale(str(root)) == [docgen.CONFIG_PAGE]


def test_the_results_page_follows_latest_json(tmp_path):
    results = json.loads(read(docgen.RESULTS_JSON))
    results["sparse.p50_ms_1m"] = 1.234567
    page = docgen.results_page(results)
    assert "| `sparse.p50_ms_1m` | 1.234567 |" in page
    assert page != read(docgen.RESULTS_PAGE)
    for key, value in results.items():
        if "." in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            assert f"| `{key}` |" in page, key


def test_the_results_page_says_which_part_ran_where():
    results = {"date": "d", "machine": {"cpu": "Xeon"}, "encode.x": 1.0,
               "details": {"full_run_date": "d0", "last_part": "encode",
                           "partial_runs": {"encode": "d2", "sparse": "d1"},
                           "partial_run_cpus": {"encode": "Xeon, amx"}}}
    page = docgen.results_page(results)
    assert "Machine of the last run (`--only encode`;" in page
    assert "since the full run of d0: `encode` d2 (Xeon, amx); `sparse` d1." in page
    del results["details"]
    assert "Parts rerun alone" not in docgen.results_page(results)


def test_readme_is_short_and_its_links_lead_somewhere():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert os.path.exists(os.path.join(REPO, path)), target
        if anchor:
            assert anchor in anchors(os.path.join(REPO, path)), target


def test_every_page_is_in_the_nav():
    nav = read("mkdocs.yml")
    pages = [os.path.relpath(os.path.join(d, f), DOCS) for d, _, fs in os.walk(DOCS) for f in fs if f.endswith(".md")]
    assert pages and [p for p in pages if f" {p}" not in nav] == []


SOURCES = ("dpr_lib", "jobs", "bench", "conf", "tests", "Makefile", "pyproject.toml", ".ci")
DOC_REF = re.compile(r"(docs/[\w./-]+\.md)(?:#([\w-]+))?")
README_SECTION = re.compile(r"README(?:'s)?,?\s+\(?\"([^\"]+)\"")
VAGUE_README = re.compile(r"README(?:'s |, )([a-z][^\n]{0,40})")
"""A reference such as "(README, encoder backends)" or "the README's encoder table": no test can
check where it leads, so it is not allowed; name a docs page (and anchor) instead."""


def source_files():
    for top in SOURCES:
        full = os.path.join(REPO, top)
        if os.path.isfile(full):
            yield full
            continue
        for d, _, files in os.walk(full):
            if "__pycache__" in d:
                continue
            for f in files:
                if f.endswith((".py", ".yaml", ".yml", ".toml", ".html")) or f in ("run", "Makefile"):
                    yield os.path.join(d, f)


def test_no_docstring_or_message_points_to_a_page_or_section_that_does_not_exist():
    readme_anchors = anchors(os.path.join(REPO, "README.md"))
    readme_headings = [line.lstrip("#").strip().lower() for line in read("README.md").splitlines()
                       if line.startswith("## ")]
    bad = []
    for path in source_files():
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, REPO)
        if rel == "tests/unit/test_docs.py":
            continue
        for page, anchor in DOC_REF.findall(text):
            if not os.path.exists(os.path.join(REPO, page)):
                bad.append(f"{rel}: {page}")
            elif anchor and anchor not in anchors(os.path.join(REPO, page)):
                bad.append(f"{rel}: {page}#{anchor}")
        for section in README_SECTION.findall(text):
            if slug(section) not in readme_anchors:
                bad.append(f'{rel}: README "{section}"')
        bad += [f"{rel}: {m.group(0)}…" for m in VAGUE_README.finditer(text)
                if not any(m.group(1).lower().startswith(h) for h in readme_headings)]
    assert bad == []


def test_the_reference_checker_catches_a_dangling_reference():
    """The patterns above match the forms the code uses, so the test above can fail."""
    assert DOC_REF.findall("see docs/reference/index-format.md#checksums") == [("docs/reference/index-format.md",
                                                                                 "checksums")]
    assert README_SECTION.findall('the automatic index rule (README, "Index rule")') == ["Index rule"]
    assert slug("Index rule") not in anchors(os.path.join(REPO, "README.md"))
    assert VAGUE_README.search("(README, encoder backends)") and VAGUE_README.search("see the README's encoder table")
    assert not VAGUE_README.search('readme = "README.md"')


@pytest.mark.skipif(shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None,
                    reason="mkdocs not installed (pip install 'dpr_lib[docs]'); `make docs` builds the site in CI")
def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index-format" / "index.html").exists()
