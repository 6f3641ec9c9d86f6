"""dpr-serve for real: the CLI started as a process on 127.0.0.1, the index on the moto S3 server,
queried over HTTP by httpx; a swap while concurrent clients run; a corrupt version refused."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import make_config, synthetic_docs, wait_until_serving, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3server import free_port

from dpr_lib import storage
from dpr_lib.corpus import shard_corpus
from dpr_lib.encode import encode_passages
from dpr_lib.index import build_index
from dpr_lib.manifest import set_latest

ROOT = "s3://dpr-test/serve"


@pytest.fixture(scope="module")
def service(spark, tmp_path_factory, tiny_bert_dir, s3_endpoint):
    tmp = tmp_path_factory.mktemp("serve")
    overrides = [f"encoder.model={tiny_bert_dir}", f"publish.endpoint_url={s3_endpoint}", f"paths.index_root={ROOT}",
                 "index.num_shards=2", "index.factory=IVF4,PQ8x4"]
    cfg = make_config(tmp, f"corpus.input={write_jsonl(tmp / 'c.jsonl', synthetic_docs(80, seed=4))}", *overrides)
    shard_corpus(spark, cfg)
    encode_passages(spark, cfg)
    first = build_index(spark, cfg)
    port = free_port()
    log_path = tmp / "serve.log"
    cmd = [os.path.join(os.path.dirname(sys.executable), "dpr-serve"), "--index", ROOT, "--port", str(port),
           "--set", f"paths.cache_dir={tmp}/serve-cache", "--set", "serve.poll_s=0.3", "--set", "serve.max_batch=8",
           "--set", "serve.max_k=20", "--set", "serve.max_question_chars=200",
           # tight bounds, so the hostile-client tests below run in seconds
           "--set", "serve.header_timeout_s=2", "--set", "serve.body_timeout_s=2",
           "--set", "serve.max_body_bytes=65536", "--set", "serve.max_connections=64"] + \
          [a for o in overrides[:2] for a in ("--set", o)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30)
    wait_until_serving(client, proc, log_path)
    yield {"cfg": cfg, "client": client, "url": url, "first": first, "log": log_path, "spark": spark, "proc": proc,
           "port": port}
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


def _search_ok(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith('dpr_requests_total{code="200",endpoint="search"}'))
    return float(line.rsplit(" ", 1)[1])


def test_search_over_http(service):
    client = service["client"]
    health = client.get("/health").json()
    assert health["status"] == "ready" and health["version"] == service["first"].version
    assert health["vectors"] == service["first"].totals["vectors"]
    r = client.post("/search", json={"questions": ["fact3 alpha", "bravo fact7"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == service["first"].version
    assert [x["question"] for x in body["results"]] == ["fact3 alpha", "bravo fact7"]
    # The hits are those of the library's Searcher on the same version (same question encoder, nprobe
    # and re-rank factor), with their passages' text from the docstore.
    from dpr_lib.search import Searcher

    cfg = service["cfg"]
    want = Searcher(ROOT, cfg.encoder, cfg.path("cache_dir") + "-direct",
                    storage_options=cfg.storage_options()).ask(["fact3 alpha", "bravo fact7"], 5)
    for res, hits in zip(body["results"], want):
        assert len(res["hits"]) == 5
        assert [h["pid"] for h in res["hits"]] == [h.pid for h in hits]
        assert [h["score"] for h in res["hits"]] == pytest.approx([h.score for h in hits], rel=1e-5, abs=1e-6)
        assert [(h["doc_id"], h["title"], h["text"]) for h in res["hits"]] == [(h.doc_id, h.title, h.text) for h in hits]
        assert all(set(h) == {"pid", "score", "doc_id", "title", "text"} and h["text"] for h in res["hits"])
    metrics = client.get("/metrics").text
    assert f'dpr_index_info{{version="{service["first"].version}"}} 1.0' in metrics
    # this request was counted (one more 200 on /search than before it)
    before = _search_ok(metrics)
    assert client.post("/search", json={"questions": ["alpha"], "k": 1}).status_code == 200
    assert _search_ok(client.get("/metrics").text) == before + 1
    assert "dpr_request_seconds_bucket" in metrics and 'dpr_process_memory_bytes{kind="anonymous"}' in metrics


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not valid JSON"),
    (b'["q"]', "must be a JSON object"),
    (json.dumps({"questions": []}).encode(), "non-empty list"),
    (json.dumps({"questions": ["  "]}).encode(), "question 0 is empty"),
    (json.dumps({"questions": ["x" * 201]}).encode(), "the limit is 200"),
    (json.dumps({"questions": ["q"] * 9}).encode(), "at most 8 questions"),
    (json.dumps({"questions": ["q"], "k": 0}).encode(), "'k' must be an integer from 1 to 20"),
    (json.dumps({"questions": ["q"], "k": 21}).encode(), "'k' must be an integer from 1 to 20"),
    (json.dumps({"questions": ["q"], "k": "5"}).encode(), "'k' must be an integer"),
    (json.dumps({"questions": ["q"], "top": 5}).encode(), "unknown field"),
    (json.dumps({"questions": ["q"], "mode": "sparse"}).encode(), "'mode' must be one of dense, bm25, hybrid"),
])
def test_bad_requests_get_400_and_the_service_stays_up(service, payload, message):
    client = service["client"]
    r = client.post("/search", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.post("/search", json={"questions": ["alpha"], "k": 1}).status_code == 200


def test_swap_under_load_fails_no_request(service):
    """Four clients send requests while a new version is published; every response succeeds and
    names the version that answered; a client never goes back to the old version."""
    client, cfg, spark = service["client"], service["cfg"], service["spark"]
    old = client.get("/health").json()["version"]
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []
    stop = threading.Event()

    def load(i):
        with httpx.Client(base_url=service["url"], timeout=30) as c:
            for n in range(3000):  # a bound; the loop stops 1 s after the swap
                if stop.is_set():
                    break
                try:
                    r = c.post("/search", json={"questions": [f"fact{n % 80} query"], "k": 3})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        seen[i].append(r.json()["version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    new = build_index(spark, cfg).version
    deadline = time.time() + 90
    while client.get("/health").json()["version"] != new and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # keep the load on the new version for a moment
    stop.set()
    for t in threads:
        t.join()
    assert client.get("/health").json()["version"] == new, service["log"].read_text()[-2000:]
    assert failures == []
    for versions in seen:
        assert versions and set(versions) <= {old, new}
        first_new = versions.index(new) if new in versions else len(versions)
        assert all(v == new for v in versions[first_new:]), "a client went back to the old version"
    assert any(new in v for v in seen)
    assert client.get("/health").json()["swaps"] >= 1


def _publish_broken(cfg, serving: str, bad_version: str, missing: bool) -> None:
    """A copy of the serving version whose shard bytes do not match the manifest (corrupt in
    transit) or whose shards were never uploaded (half-published)."""
    opts = cfg.storage_options()
    vurl = f"{ROOT}/versions/{serving}"
    manifest = json.loads(storage.read_bytes(f"{vurl}/manifest.json", opts))
    for entry in manifest["shards"]:
        entry["sha256"] = f"{len(bad_version):02x}" * 32  # content no cache holds
        if not missing:
            data = bytearray(storage.read_bytes(f"{vurl}/{entry['path']}", opts))
            data[len(data) // 2] ^= 0xFF
            storage.write_bytes_atomic(f"{ROOT}/versions/{bad_version}/{entry['path']}", bytes(data), opts)
    manifest["version"] = bad_version
    storage.write_bytes_atomic(f"{ROOT}/versions/{bad_version}/manifest.json", json.dumps(manifest).encode(), opts)
    set_latest(ROOT, bad_version, opts)


@pytest.mark.parametrize("missing, reason", [(False, "is corrupt: sha256"), (True, "listed in the manifest but missing")])
def test_broken_new_version_is_refused_and_the_old_one_kept(service, missing, reason):
    client, cfg = service["client"], service["cfg"]
    serving = client.get("/health").json()["version"]
    bad_version = "29991231T000000Z-missing" if missing else "29991231T000000Z-corrupt"
    _publish_broken(cfg, serving, bad_version, missing)
    try:
        deadline = time.time() + 30
        health = client.get("/health").json()
        while (health["failed_version"] or {}).get("version") != bad_version and time.time() < deadline:
            time.sleep(0.2)
            health = client.get("/health").json()
        assert health["status"] == "ready" and health["version"] == serving
        assert health["failed_version"]["version"] == bad_version
        assert reason in health["failed_version"]["error"]
        assert_no_paths_or_urls(json.dumps(health))  # the cache path and the s3:// URL stay in the log
        assert "s3://" in service["log"].read_text()
        assert "dpr_index_failed_version_pending 1.0" in client.get("/metrics").text
        r = client.post("/search", json={"questions": ["alpha"], "k": 2})
        assert r.status_code == 200 and r.json()["version"] == serving
    finally:
        set_latest(ROOT, serving, cfg.storage_options())


def test_holder_reports_an_index_root_with_nothing_published(tmp_path):
    from dpr_lib.serve import IndexHolder

    holder = IndexHolder(make_config(tmp_path), str(tmp_path / "empty-root"))
    assert holder.poll_once() is False and holder.current is None
    assert "LATEST is missing" in holder.failed["error"] and str(tmp_path) in holder.failed["error"]
    assert "LATEST is missing" in holder.public_failure()["error"]
    assert_no_paths_or_urls(json.dumps(holder.public_failure()))


def assert_no_paths_or_urls(text: str) -> None:
    import re

    assert "://" not in text, text
    assert not re.search(r"(^|[\s'\"(])/[A-Za-z0-9_.-]+/", text), text


def test_released_versions_leave_the_cache(service, tmp_path):
    """A swap keeps the version it replaced on disk (requests may still use it); the swap after
    removes the files of the version released before, except those a live version shares."""
    import copy

    from dpr_lib.config import load_config
    from dpr_lib.serve import IndexHolder

    spark, base = service["spark"], service["cfg"]
    root = str(tmp_path / "root")

    def publish(shards: int):
        cfg = copy.deepcopy(base)
        cfg.paths.index_root, cfg.publish.endpoint_url = root, ""
        cfg.index.num_shards, cfg.index.factory, cfg.publish.keep_versions = shards, "IVF4,Flat", 5
        return build_index(spark, cfg)

    holder = IndexHolder(load_config(None, [f"encoder.model={base.encoder.model}", "serve.warmup_queries=2",
                                            f"paths.cache_dir={tmp_path}/cache"]), root)
    cached = lambda: {n.split(".")[0] for n in os.listdir(tmp_path / "cache" / "blobs")}  # noqa: E731
    m1 = publish(2)
    assert holder.poll_once() and cached() >= m1.blobs()
    m2 = publish(3)
    assert holder.poll_once() and cached() >= m1.blobs() | m2.blobs(), "the replaced version stays"
    m3 = publish(1)
    assert holder.poll_once() and holder.current.version == m3.version
    stale = m1.blobs() - m2.blobs() - m3.blobs()
    assert stale, "the three versions have shards of their own (the docstore is shared)"
    assert not stale & cached(), "the version released before the last is gone from the cache"
    assert cached() >= m2.blobs() | m3.blobs()
    assert m1.blobs() & m3.blobs() <= cached(), "files a live version shares are kept"


def _metric(metrics: str, name: str) -> float:
    return float(next(x for x in metrics.splitlines() if x.startswith(name + " ")).rsplit(" ", 1)[1])


def test_concurrent_requests_are_answered_together_and_each_gets_its_own_hits(service):
    """24 requests at once (questions and k differ): each gets the hits it gets alone, and the
    service answered them in fewer forward passes than requests (micro-batching)."""
    import asyncio

    client = service["client"]
    requests = [{"questions": [f"fact{i} alpha", f"bravo fact{i + 1}"][: 1 + i % 2], "k": (3, 5)[i % 2]}
                for i in range(24)]
    alone = [client.post("/search", json=r).json()["results"] for r in requests]
    before = client.get("/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=service["url"], timeout=30) as c:
            return await asyncio.gather(*(c.post("/search", json=r) for r in requests))

    together = asyncio.run(burst())
    after = client.get("/metrics").text
    for req, solo, resp in zip(requests, alone, together):
        assert resp.status_code == 200, resp.text
        got = resp.json()["results"]
        assert [r["question"] for r in got] == req["questions"]
        for g, s in zip(got, solo):
            assert len(g["hits"]) == req["k"]
            assert [h["pid"] for h in g["hits"]] == [h["pid"] for h in s["hits"]]
            assert [h["score"] for h in g["hits"]] == pytest.approx([h["score"] for h in s["hits"]], abs=2e-3)
    batches = _metric(after, "dpr_search_batches") - _metric(before, "dpr_search_batches")
    questions = _metric(after, "dpr_search_batched_questions") - _metric(before, "dpr_search_batched_questions")
    assert questions == sum(len(r["questions"]) for r in requests)
    assert batches < len(requests), f"{len(requests)} concurrent requests took {batches} forward passes"


def test_each_mode_over_http_answers_as_the_library(service):
    """dense, bm25 and hybrid over HTTP: the hits of the library's Searcher in that mode; the
    default (no mode) is what the version recommends (hybrid: no validation data)."""
    from dpr_lib.search import Searcher

    client, cfg = service["client"], service["cfg"]
    questions = ["fact3 alpha", "bravo fact7"]
    direct = Searcher(ROOT, cfg.encoder, cfg.path("cache_dir") + "-modes", storage_options=cfg.storage_options())
    assert client.get("/health").json()["modes"] == ["dense", "bm25", "hybrid"]
    for mode in ("dense", "bm25", "hybrid", None):
        r = client.post("/search", json={"questions": questions, "k": 4, **({"mode": mode} if mode else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == (mode or "hybrid") and body["took_ms"] > 0
        want = direct.ask(questions, 4, mode)
        assert [[h["pid"] for h in res["hits"]] for res in body["results"]] == [[h.pid for h in w] for w in want]
    bm25 = client.post("/search", json={"questions": ["fact3"], "k": 1, "mode": "bm25"}).json()
    assert bm25["results"][0]["hits"][0]["doc_id"] == "doc-3"  # the marker term finds its document


def _browser():
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_results_page_in_a_headless_browser(service):
    """GET / in a real Chromium: type a question, search all modes, read the hits side by side;
    they are the API's hits of each mode, with the version that answered and the latency."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    client = service["client"]
    browser = _browser()
    try:
        browser.get(service["url"] + "/")
        assert browser.title == "dpr-serve"
        version = client.get("/health").json()["version"]
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "version").text == version)
        box = browser.find_element(By.ID, "q")
        box.send_keys("fact3 alpha")
        Select(browser.find_element(By.ID, "mode")).select_by_value("all")
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "columns").get_attribute("data-state") == "done")
        cols = browser.find_elements(By.CSS_SELECTOR, "#columns .col")
        assert [c.get_attribute("data-mode") for c in cols] == ["dense", "bm25", "hybrid"]
        for col in cols:
            mode = col.get_attribute("data-mode")
            api = client.post("/search", json={"questions": ["fact3 alpha"], "k": 5, "mode": mode}).json()
            hits = col.find_elements(By.CSS_SELECTOR, "li.hit")
            assert [int(h.get_attribute("data-pid")) for h in hits] == [h["pid"] for h in api["results"][0]["hits"]]
            first = hits[0]
            assert first.find_element(By.CSS_SELECTOR, ".title").text == api["results"][0]["hits"][0]["title"]
            assert first.find_element(By.CSS_SELECTOR, ".snippet").text
            assert first.find_element(By.CSS_SELECTOR, ".pid").text == f"pid {api['results'][0]['hits'][0]['pid']}"
            assert col.find_element(By.CSS_SELECTOR, ".answered-by").text == version
            assert col.find_element(By.CSS_SELECTOR, ".latency").text.endswith(" ms")
        bm25_top = cols[1].find_element(By.CSS_SELECTOR, "li.hit .title").text
        assert bm25_top == "Title 3"  # the marker term's document, found by BM25
    finally:
        browser.quit()


# ------------------------------------------------------------------ hostile and broken clients

FUZZ_REQUESTS = int(os.environ.get("DPR_FUZZ_REQUESTS", "5000"))
ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates and control characters included
BAD_CHARS = st.sampled_from(["\ud800", "\udfff", "\x00", "\ud83d"])


def _status_counts(metrics: str, endpoint: str) -> dict[str, float]:
    import re

    pat = re.compile(r'^dpr_requests_total\{code="(\d+)",endpoint="' + endpoint + r'"\} (\S+)$')
    return {m.group(1): float(m.group(2)) for m in map(pat.match, metrics.splitlines()) if m}


def _request_schema(client) -> dict:
    api = client.get("/openapi.json").json()
    return api["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]


def _encode(payload, ascii_only: bool) -> bytes:
    # ensure_ascii=False with a lone surrogate gives its raw (CESU-8) bytes, as a broken client sends them
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _hostile_bodies(schema: dict) -> st.SearchStrategy:
    """(kind, body bytes, content type): bodies valid per the published schema, and bodies broken
    every way a client can break them: invalid Unicode (escaped and raw), NULs and control
    characters in questions, any JSON value, raw bytes, deep nesting, huge numbers, wrong types."""
    from schema_strategies import from_schema

    valid = from_schema(schema)
    json_any = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(ANY_CHAR),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=8), c,
                                                                                  max_size=4), max_leaves=12)

    @st.composite
    def bad_question(draw):
        payload = draw(valid)
        i = draw(st.integers(0, len(payload["questions"]) - 1))
        text = draw(st.text(ANY_CHAR, max_size=30))
        at = draw(st.integers(0, len(text)))
        payload["questions"][i] = text[:at] + draw(BAD_CHARS) + text[at:]
        return "bad_question", _encode(payload, draw(st.booleans())), "application/json"

    @st.composite
    def bad_field(draw):
        payload = draw(valid)
        key = draw(st.sampled_from(["k", "mode", "questions", "extra"]))
        payload[key] = draw(json_any | st.integers().filter(lambda n: not 1 <= n <= 20)
                            | st.integers(10 ** 40, 10 ** 400))
        return "maybe", _encode(payload, draw(st.booleans())), "application/json"

    return st.one_of(
        valid.flatmap(lambda p: st.tuples(st.just("valid"), st.booleans().map(lambda a: _encode(p, a)),
                                          st.sampled_from(["application/json", "application/json; charset=utf-8"]))),
        bad_question(), bad_field(),
        st.tuples(st.just("maybe"), json_any.flatmap(lambda v: st.booleans().map(lambda a: _encode(v, a))),
                  st.just("application/json")),
        st.tuples(st.just("maybe"), st.binary(max_size=300), st.just("application/json")),
        st.tuples(st.just("maybe"), st.integers(9, 20000).map(lambda d: b"[" * d + b"]" * d), st.just("application/json")),
        st.tuples(st.just("wrong_type"), valid.map(lambda p: _encode(p, True)),
                  st.sampled_from(["", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])),
    )


def test_fuzzed_requests_from_the_schema_never_get_a_5xx_and_are_all_counted(service):
    """DPR_FUZZ_REQUESTS (5,000) requests generated from /openapi.json's /search schema and broken
    every way a client can break them: no response is a 5xx, every error is the JSON shape with a
    code, every body the schema allows is answered, and /metrics counted every response by status."""
    from collections import Counter

    client = service["client"]
    before = _status_counts(client.get("/metrics").text, "search")
    seen: Counter = Counter()
    server_errors: list[str] = []

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=_hostile_bodies(_request_schema(client)))
    def one(case):
        kind, body, ctype = case
        r = client.post("/search", content=body, headers={"content-type": ctype} if ctype else {})
        seen[str(r.status_code)] += 1
        if r.status_code >= 500:
            server_errors.append(f"{r.status_code} {body[:200]!r}: {r.text[:200]}")
            return
        if kind == "valid":
            assert r.status_code == 200, (body, r.text)
            assert len(r.json()["results"]) == len(json.loads(body)["questions"])
        elif r.status_code != 200:
            err = r.json()
            assert set(err) == {"error", "code"} and err["error"] and r.headers["content-type"] == "application/json"
        if kind == "bad_question":
            assert r.status_code == 400, (body, r.text)
        if kind == "wrong_type":
            assert r.status_code == 415, r.text

    one()
    assert server_errors == []
    assert sum(seen.values()) == FUZZ_REQUESTS and seen["200"] > FUZZ_REQUESTS // 10 and len(seen) >= 3, seen
    after = _status_counts(client.get("/metrics").text, "search")
    assert {c: after.get(c, 0) - before.get(c, 0) for c in after if after.get(c, 0) != before.get(c, 0)} == seen


MALFORMED = [
    b'{"questions": ["\\ud800"]}', b'{"questions": ["ok", "bad \\udfff"]}', '{"questions": ["\ud800 raw"]}'.encode(
        "utf-8", "surrogatepass"), b'{"questions": ["nul\\u0000"]}', b"[" * 5000 + b"]" * 5000,
    b'{"questions": ["q"], "k": ' + b"7" * 4000 + b"}", b'{"questions": ["q"], "k": NaN}', b"\xff\xfe",
]


def test_malformed_requests_fail_no_other_client(service):
    """8 clients x 50 normal requests (dense and hybrid) while two others send malformed ones:
    every normal request is answered, with exactly its solo answer; every malformed one is a 400."""
    client = service["client"]
    normal = [{"questions": [f"fact{i} alpha bravo"], "k": 5, "mode": ("dense", "hybrid")[i % 2]} for i in range(10)]
    solo = [[h["pid"] for h in client.post("/search", json=r).json()["results"][0]["hits"]] for r in normal]
    failures: list[str] = []
    bad_status: list[int] = []
    done = threading.Event()

    def clean(c):
        with httpx.Client(base_url=service["url"], timeout=30) as http:
            for n in range(50):
                i = (c * 7 + n) % len(normal)
                r = http.post("/search", json=normal[i])
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                elif [h["pid"] for h in r.json()["results"][0]["hits"]] != solo[i]:
                    failures.append(f"request {i}: other hits than alone")

    def hostile():
        with httpx.Client(base_url=service["url"], timeout=30) as http:
            n = 0
            while not done.is_set() or n < len(MALFORMED):
                bad_status.append(http.post("/search", content=MALFORMED[n % len(MALFORMED)],
                                            headers={"content-type": "application/json"}).status_code)
                n += 1

    threads = [threading.Thread(target=clean, args=(c,)) for c in range(8)]
    attackers = [threading.Thread(target=hostile) for _ in range(2)]
    for t in threads + attackers:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in attackers:
        t.join()
    assert failures == []
    assert len(bad_status) >= 2 * len(MALFORMED) and set(bad_status) == {400}, sorted(set(bad_status))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=st.lists(st.one_of(st.sampled_from([f"fact{i} alpha" for i in range(6)]).map(lambda q: ("ok", q)),
                               st.text(ANY_CHAR, max_size=12).flatmap(
                                   lambda t: BAD_CHARS.filter(lambda b: b != "\x00").map(lambda b: ("bad", t + b)))),
                     min_size=2, max_size=10).filter(lambda xs: {k for k, _ in xs} == {"ok", "bad"}))
def test_a_question_that_cannot_be_encoded_fails_only_its_own_request_in_a_batch(holder_and_batcher, case):
    """Past the edge checks (a library user can submit anything): requests batched with questions
    the tokenizer cannot encode (lone surrogates) get exactly their solo answers; only the
    requests holding such a question fail."""
    loaded, batcher, solo = holder_and_batcher
    futures = [batcher.submit(loaded, [q], 4) for _, q in case]
    for (kind, q), fut in zip(case, futures):
        if kind == "bad":
            assert fut.exception(timeout=60) is not None
        else:
            hits = fut.result(timeout=60)[0]
            want = solo.setdefault(q, loaded.searcher.ask([q], 4)[0])
            assert [h.pid for h in hits] == [h.pid for h in want]
            assert [h.score for h in hits] == pytest.approx([h.score for h in want], abs=2e-3)


@pytest.fixture(scope="module")
def holder_and_batcher(service, tmp_path_factory):
    import copy

    from dpr_lib.serve import IndexHolder, MicroBatcher

    cfg = copy.deepcopy(service["cfg"])
    cfg.paths.cache_dir = str(tmp_path_factory.mktemp("batcher-cache"))
    cfg.serve.warmup_queries = 0
    holder = IndexHolder(cfg, ROOT)
    assert holder.poll_once(), holder.failed
    batcher = MicroBatcher(64, 0.05)  # waits for the whole list, so each case is one batch
    yield holder.current, batcher, {}
    batcher.close()


def _raw(port: int, data: bytes, wait: float = 15.0) -> tuple[float, bytes]:
    """Send ``data`` and read until the server closes: (seconds until closed, what it answered)."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.monotonic()
        if data:
            sock.sendall(data)
        sock.settimeout(wait)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return time.monotonic() - t0, out


@pytest.mark.parametrize("data, what", [
    (b"", "headers"),  # connects, sends nothing
    (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Le", "headers"),  # stalls mid-headers
    (b'POST /search HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nContent-Length: 90\r\n\r\n{"quest',
     "body"),  # stalls mid-body
])
def test_a_stalled_request_is_closed_within_the_read_timeout(service, data, what):
    elapsed, answer = _raw(service["port"], data)
    assert 1.5 <= elapsed <= 4.0, elapsed  # serve.header_timeout_s / body_timeout_s = 2 in this service
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == "request_timeout" and f"{what} did not arrive within 2 s" in body["error"]


def test_stalled_connections_cannot_pile_up(service):
    """300 connections that never send a byte: beyond serve.max_connections (64) they are refused
    at once with a JSON 503; the rest are closed by the header timeout; then the service answers."""
    import socket

    socks = [socket.create_connection(("127.0.0.1", service["port"])) for _ in range(300)]
    t0 = time.monotonic()
    answers = []
    for s in socks:
        s.settimeout(10)
        try:
            answers.append(s.recv(4096))
        except (ConnectionResetError, TimeoutError) as exc:
            answers.append(repr(exc).encode())
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
    assert len(refused) >= 300 - 64 and len(refused) + len(timed_out) == 300, answers[:3]
    assert b'"code": "too_many_connections"' in refused[0] and b"retry-after: 1" in refused[0]
    assert elapsed < 6, elapsed
    assert service["client"].post("/search", json={"questions": ["alpha"], "k": 1}).status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(service):
    """A declared 1 GB body gets a 413 right after its headers and the connection closes: the
    client cannot push more than socket buffers' worth, and the service's memory does not grow.
    A chunked body (no length declared) is cut off once it passes serve.max_body_bytes."""
    import socket

    import psutil

    proc = psutil.Process(service["proc"].pid)
    rss0 = proc.memory_info().rss
    chunk = b"x" * (1 << 20)
    for head in (b"Content-Length: 1073741824\r\n", b"Transfer-Encoding: chunked\r\n"):
        sock = socket.create_connection(("127.0.0.1", service["port"]))
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n" + head + b"\r\n")
        sent = 0
        try:
            while sent < (1 << 30):
                sock.sendall(b"100000\r\n" + chunk + b"\r\n" if b"chunked" in head else chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.close()
        assert sent <= 64 << 20, f"the service kept reading: {sent >> 20} MB sent"
    assert proc.memory_info().rss - rss0 <= 50 << 20
    before = _status_counts(service["client"].get("/metrics").text, "search")
    _, answer = _raw(service["port"], b"POST /search HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                      b"Content-Length: 1073741824\r\n\r\n" + b"[" * 1000)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"code": "body_too_large"' in answer, answer
    assert b"the limit is 65536 (serve.max_body_bytes)" in answer
    after = _status_counts(service["client"].get("/metrics").text, "search")
    assert after["413"] == before.get("413", 0) + 1


@pytest.mark.parametrize("method, path, body, headers, status, code", [
    ("GET", "/nowhere", None, {}, 404, "not_found"),
    ("DELETE", "/health", None, {}, 405, "method_not_allowed"),
    ("GET", "/docs", None, {}, 404, "not_found"),  # off by default: its assets come from a CDN
    ("POST", "/search", b'{"questions": ["q"]}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/search", b'{"questions": ["q"]}', {}, 415, "unsupported_media_type"),
])
def test_every_error_has_one_shape(service, method, path, body, headers, status, code):
    r = service["client"].request(method, path, content=body, headers=headers)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert r.json()["code"] == code and r.json()["error"]
    assert_no_paths_or_urls(r.text)
    _, answer = _raw(service["port"], b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"code": "bad_http"' in answer


def test_openapi_describes_search(service):
    schema = _request_schema(service["client"])
    assert schema["additionalProperties"] is False and schema["required"] == ["questions"]
    assert schema["properties"]["questions"]["maxItems"] == 8  # this service's serve.max_batch
    assert schema["properties"]["k"]["maximum"] == 20
    api = service["client"].get("/openapi.json").json()
    responses = api["paths"]["/search"]["post"]["responses"]
    assert {"200", "400", "408", "413", "415"} <= set(responses)
    assert "results" in json.dumps(api["components"]["schemas"]["SearchResponse"])
