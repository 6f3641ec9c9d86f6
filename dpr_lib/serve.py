"""Reference search service (``dpr-serve``): the published shards behind HTTP, swapping to each
new version without downtime.

- ``POST /search`` ``{"questions": [...], "k": 10, "mode": "hybrid"}`` -> ``{"version", "mode",
  "took_ms", "results": [{"question", "hits": [{pid, score, doc_id, title, text}]}]}``; ``mode`` is
  dense, bm25 or hybrid (default: ``search.mode``, auto = what the version's manifest recommends);
  bad requests get a 400 with a readable message.
- ``GET /``: a small page to look at results: a question box, dense, bm25 and hybrid hits side by
  side, the version that answered and the latency (static HTML shipped with the package, no CDN).
- ``GET /health``: 200 once a version is loaded and warmed up (503 before), with the version, the
  vectors served and the last version that failed to load, if any.
- ``GET /metrics``: Prometheus text (requests and latency per endpoint, the loaded version,
  vectors, swaps, failed versions, resident and anonymous memory, questions per forward pass).

**Concurrency.** Request handlers never encode or search themselves: they queue their questions
and wait. One worker thread takes everything queued (up to ``serve.batch_questions`` questions,
waiting at most ``serve.batch_wait_ms`` for more) and answers it with one forward pass of the
question encoder and one FAISS search, then hands each request its own hits. So 16 concurrent
clients cost about one batched forward pass instead of 16 serialised ones, and the compute threads
are bounded for the whole service (``serve.threads`` for torch and FAISS) instead of per request.

**Swaps.** A background thread reads ``LATEST`` every ``serve.poll_s``. A new version is
downloaded (sha256-verified), loaded and warmed up beside the current one, then published to
request handlers by replacing one reference: a request takes that reference when it starts and
finishes on the version it started with; the old version is freed when its last request ends.
Versions load one at a time, so memory peaks at the old plus the new version, never more. A
version that fails to download, verify or load is reported (``/health``, ``/metrics``, the log)
and the service keeps serving the current one; it is retried after ``max(60 s, 10 x poll_s)``.
"""


import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import DprError, InputError

log = logging.getLogger("dpr_lib.serve")

WARMUP_QUESTIONS = ["what is this about?", "who wrote it and when?", "how does it work?",
                    "where is it located?"]


@dataclass
class Loaded:
    version: str
    searcher: object  # dpr_lib.search.Searcher
    loaded_at: float
    load_seconds: float
    blobs: frozenset  # sha256 of the cache files it uses
    downloaded_bytes: int = 0  # fetched from storage to load it (files already cached cost nothing)
    reused_shards: int = 0  # shards shared with the version it replaced (segments it already held)


class MicroBatcher:
    """Questions of concurrent requests answered together: one worker thread, one forward pass and
    one search per batch. Each round takes what queued while the last one ran (up to
    ``max_questions``, waiting at most ``max_wait_s`` for more) and searches once per (version, k)
    in it: a request finishes on the version it started on, and gets the hits it would get alone
    (a re-ranked search depends on k)."""

    def __init__(self, max_questions: int, max_wait_s: float):
        self.max_questions = max(1, max_questions)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.questions = 0
        self._thread = threading.Thread(target=self._run, name="dpr-search-batcher", daemon=True)
        self._thread.start()

    def submit(self, loaded: Loaded, questions: list[str], k: int, mode: str | None = None) -> Future:
        fut: Future = Future()
        self._queue.put((loaded, questions, (k, mode), fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            taken, n = [first], len(first[1])
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_questions:  # what queued meanwhile (and, if configured, a bounded wait)
                try:
                    wait = deadline - time.monotonic()
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                taken.append(item)
                n += len(item[1])
            groups: dict = {}  # one search per (version, k, mode), in arrival order
            for item in taken:
                groups.setdefault((id(item[0]), item[2]), []).append(item)
            for batch in groups.values():
                self._answer(batch)

    def _answer(self, batch: list) -> None:
        loaded = batch[0][0]
        questions = [q for _, qs, _, _ in batch for q in qs]
        try:
            k, mode = batch[0][2]
            results = loaded.searcher.ask(questions, k, mode)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for *_, fut in batch:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.questions += len(questions)
        at = 0
        for _, qs, _, fut in batch:
            fut.set_result(results[at:at + len(qs)])
            at += len(qs)


class IndexHolder:
    """The version being served, and the loader thread that replaces it."""

    def __init__(self, cfg: Config, index_root: str, shards: list[int] | None = None):
        self.cfg = cfg
        self.root = index_root
        self.shards = shards
        self.opts = cfg.storage_options()
        self.cache_dir = cfg.path("cache_dir")
        self.current: Loaded | None = None
        self.failed: dict | None = None  # {"version", "error", "at"}
        self.swaps = 0
        self.failures = 0
        self.downloaded_bytes = 0  # over every load since start
        self._released: list[frozenset] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- loading
    def load(self, version: str) -> Loaded:
        from dpr_lib.manifest import MANIFEST, version_url
        from dpr_lib.search import Searcher

        t0 = time.time()
        scfg = self.cfg.search
        searcher = Searcher(join_url(version_url(self.root, version), MANIFEST), self.cfg.encoder, self.cache_dir,
                            self.shards, scfg.mmap, scfg.nprobe or None, self.opts,
                            max_k=max(self.cfg.serve.max_k, scfg.max_k), k_factor=scfg.k_factor or None,
                            verify_cache=scfg.verify_cache, docstore_cache_mb=scfg.docstore_cache_mb,
                            mode=scfg.mode, reuse=self.current.searcher.index if self.current else None)
        searcher.index.prefetch_docstore()  # local before the swap: no request waits for a download
        n = self.cfg.serve.warmup_queries
        if n:
            questions = (WARMUP_QUESTIONS * (n // len(WARMUP_QUESTIONS) + 1))[:n]
            # hybrid touches the encoder, the shards and re-rank stores, the sparse side and the docstore
            searcher.ask(questions, min(10, self.cfg.serve.max_k),
                         "hybrid" if searcher.index.sparse is not None else "dense")
        cache = searcher.index.cache
        self.downloaded_bytes += cache.downloaded_bytes
        return Loaded(version, searcher, time.time(), round(time.time() - t0, 3), searcher.index.manifest.blobs(),
                      cache.downloaded_bytes, searcher.index.reused_files)

    def poll_once(self) -> bool:
        """Load and swap to LATEST if it is new; True when a swap happened."""
        from dpr_lib.manifest import read_latest

        try:
            latest = read_latest(self.root, self.opts)
        except Exception as exc:  # noqa: BLE001 - storage down: keep serving, report
            self._fail("LATEST", f"cannot read LATEST: {exc}")
            return False
        if latest is None:
            if self.current is None and not self.failed:
                self._fail("LATEST", f"no index published under {self.root} yet (LATEST is missing)")
            return False
        if self.current and latest == self.current.version:
            return False
        retry_after = max(60.0, 10 * self.cfg.serve.poll_s)
        if self.failed and self.failed["version"] == latest and time.time() - self.failed["at"] < retry_after:
            return False
        log.info("loading version %s (serving %s)", latest, self.current.version if self.current else "nothing")
        try:
            new = self.load(latest)
        except Exception as exc:  # noqa: BLE001 - any failure to load keeps the old version
            self._fail(latest, str(exc) if isinstance(exc, DprError) else f"{type(exc).__name__}: {exc}")
            return False
        old, self.current = self.current, new  # the swap: one reference, read once per request
        self.failed = None  # what failed was older than what now serves
        if old is not None:
            self.swaps += 1
            self._release(old, new)
        log.info("serving version %s (%d vectors, loaded in %.1fs)", new.version, new.searcher.index.ntotal,
                 new.load_seconds)
        return True

    def _fail(self, version: str, error: str) -> None:
        self.failures += 1
        self.failed = {"version": version, "error": error, "at": time.time()}
        log.error("version %s not loaded, still serving %s: %s", version,
                  self.current.version if self.current else "nothing", error)

    def _release(self, old: Loaded, new: Loaded) -> None:
        """Forget the old version (requests still on it keep it alive until they end) and remove
        cache files of the version released before it that neither live version uses."""
        self._released.append(old.blobs)
        if len(self._released) < 2:
            return
        stale = self._released.pop(0) - old.blobs - new.blobs
        blob_dir = os.path.join(self.cache_dir, "blobs")
        for name in os.listdir(blob_dir) if os.path.isdir(blob_dir) else []:
            if name.split(".")[0] in stale:
                try:
                    os.remove(os.path.join(blob_dir, name))
                except OSError:
                    pass

    # -------------------------------------------------------------- thread
    def start(self) -> None:
        def loop():
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001 - the poller must survive anything
                    log.exception("poll failed")
                self._stop.wait(self.cfg.serve.poll_s)

        self._thread = threading.Thread(target=loop, name="dpr-index-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)


# ------------------------------------------------------------------ request checks

def parse_search(body: bytes, cfg: Config) -> tuple[list[str], int, str | None]:
    """(questions, k, mode or None) from a /search body; InputError with a readable message otherwise."""
    try:
        payload = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InputError('request body must be a JSON object like {"questions": ["..."], "k": 10}')
    unknown = sorted(set(payload) - {"questions", "k", "mode"})
    if unknown:
        raise InputError(f"unknown field(s) {unknown}; expected 'questions' and optionally 'k' and 'mode'")
    questions = payload.get("questions")
    if not isinstance(questions, list) or not questions:
        raise InputError("'questions' must be a non-empty list of strings")
    if len(questions) > cfg.serve.max_batch:
        raise InputError(f"at most {cfg.serve.max_batch} questions per request (serve.max_batch), got {len(questions)}")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"question {i} is empty or not a string")
        if len(q) > cfg.serve.max_question_chars:
            raise InputError(f"question {i} has {len(q)} characters; the limit is {cfg.serve.max_question_chars} "
                             "(serve.max_question_chars)")
    k = payload.get("k", cfg.search.k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.serve.max_k:
        raise InputError(f"'k' must be an integer from 1 to {cfg.serve.max_k} (serve.max_k), got {k!r}")
    mode = payload.get("mode")
    if mode is not None and mode not in ("dense", "bm25", "hybrid", "auto"):
        raise InputError(f"'mode' must be one of dense, bm25, hybrid, auto; got {mode!r}")
    return [q.strip() for q in questions], k, (None if mode == "auto" else mode)


def process_memory() -> dict[str, int]:
    """Resident and anonymous (private, not file-backed) memory of this process, bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


# ------------------------------------------------------------------ the app

def bound_compute_threads(threads: int) -> int:
    """torch's and FAISS's threads for the whole service (only the batcher thread computes, so this
    bounds every request's search); 0 = the machine's cores less one, left to the HTTP event loop
    (on 2 cores: one client 34 questions/s with 1 thread, 24 with 2, which starved the loop)."""
    import faiss
    import torch

    n = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def _page() -> str:
    """The results page shipped with the package (dpr_lib/static/search.html)."""
    from importlib import resources

    return resources.files("dpr_lib").joinpath("static/search.html").read_text(encoding="utf-8")


def create_app(holder: IndexHolder, start_poller: bool = True):
    import asyncio
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    cfg = holder.cfg
    registry = CollectorRegistry()
    requests = Counter("dpr_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
    latency = Histogram("dpr_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    g_info = Gauge("dpr_index_info", "The index version being served (value 1)", ["version"], registry=registry)
    g_vectors = Gauge("dpr_index_vectors", "Vectors served", registry=registry)
    g_ready = Gauge("dpr_index_ready", "1 once a version is loaded", registry=registry)
    g_swaps = Gauge("dpr_index_swaps", "Version swaps since start", registry=registry)
    g_failures = Gauge("dpr_index_failed_loads", "Versions that failed to load since start", registry=registry)
    g_failing = Gauge("dpr_index_failed_version_pending", "1 while the newest version failed to load",
                      registry=registry)
    g_mem = Gauge("dpr_process_memory_bytes", "Process memory", ["kind"], registry=registry)

    g_batches = Gauge("dpr_search_batches", "Forward passes + searches answered since start", registry=registry)
    g_batched = Gauge("dpr_search_batched_questions", "Questions answered through them", registry=registry)
    batcher: MicroBatcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        bound_compute_threads(cfg.serve.threads)
        batcher = MicroBatcher(cfg.serve.batch_questions, cfg.serve.batch_wait_ms / 1000)
        if start_poller:
            holder.start()
        yield
        holder.stop()
        batcher.close()

    app = FastAPI(title="dpr-serve", lifespan=lifespan)

    def error(code: int, message: str, endpoint: str, t0: float) -> JSONResponse:
        requests.labels(endpoint, str(code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        return JSONResponse({"error": message}, status_code=code)

    @app.post("/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        try:
            questions, k, mode = parse_search(await request.body(), cfg)
        except InputError as exc:
            return error(400, str(exc), "search", t0)
        loaded = holder.current  # this request finishes on this version, whatever swaps meanwhile
        if loaded is None:
            return error(503, "no index version loaded yet", "search", t0)
        try:
            results = await asyncio.wrap_future(batcher.submit(loaded, questions, k, mode))
        except InputError as exc:
            return error(400, str(exc), "search", t0)
        except Exception as exc:  # noqa: BLE001 - a readable 500, the service stays up
            log.exception("search failed")
            return error(500, f"search failed: {type(exc).__name__}: {exc}", "search", t0)
        body = {"version": loaded.version, "mode": mode or loaded.searcher.mode,
                "took_ms": round((time.perf_counter() - t0) * 1000, 2), "results": [
            {"question": q, "hits": [{"pid": h.pid, "score": h.score, "doc_id": h.doc_id, "title": h.title,
                                      "text": h.text} for h in hits]} for q, hits in zip(questions, results)]}
        requests.labels("search", "200").inc()
        latency.labels("search").observe(time.perf_counter() - t0)
        return JSONResponse(body)

    page = _page()

    @app.get("/")
    async def index_page():
        requests.labels("page", "200").inc()
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        loaded = holder.current
        body = {"status": "ready" if loaded else "loading", "version": loaded.version if loaded else None,
                "vectors": loaded.searcher.index.ntotal if loaded else 0, "swaps": holder.swaps,
                "mode": loaded.searcher.mode if loaded else None,
                "modes": (["dense", "bm25", "hybrid"] if loaded.searcher.index.sparse is not None else ["dense"])
                if loaded else [],
                "segments": len(loaded.searcher.index.manifest.all_segments()) if loaded else 0,
                "loaded": {"downloaded_bytes": loaded.downloaded_bytes, "reused_shards": loaded.reused_shards,
                           "seconds": loaded.load_seconds} if loaded else None,
                "downloaded_bytes_total": holder.downloaded_bytes,
                "failed_version": holder.failed}
        return JSONResponse(body, status_code=200 if loaded else 503)

    @app.get("/metrics")
    async def metrics():
        loaded = holder.current
        g_info.clear()
        if loaded:
            g_info.labels(loaded.version).set(1)
        g_vectors.set(loaded.searcher.index.ntotal if loaded else 0)
        g_ready.set(1 if loaded else 0)
        g_swaps.set(holder.swaps)
        g_failures.set(holder.failures)
        g_failing.set(1 if holder.failed else 0)
        if batcher is not None:
            g_batches.set(batcher.batches)
            g_batched.set(batcher.questions)
        for key, value in process_memory().items():
            g_mem.labels({"VmRSS": "resident", "RssAnon": "anonymous", "RssFile": "file"}[key]).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from dpr_lib.cli import base_parser, parse_shards, setup_logging
    from dpr_lib.config import load_config

    parser = base_parser("Serve a published DPR index over HTTP.", prog="dpr-serve", default_conf=None)
    parser.add_argument("--index", required=True, help="index root (follows LATEST), local or s3://...")
    parser.add_argument("--host", default=None, help="bind address (default serve.host)")
    parser.add_argument("--port", type=int, default=0, help="port (default serve.port)")
    parser.add_argument("--shards", default="", help="comma-separated shard numbers to serve (default: all)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(args.conf, args.overrides)
        storage.use_options(cfg.storage_options())
        shards = parse_shards(args.shards)
    except DprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    holder = IndexHolder(cfg, args.index, shards)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    log.info("dpr-serve on http://%s:%d, index %s (polling every %.0fs)", host, port, args.index, cfg.serve.poll_s)
    uvicorn.run(create_app(holder), host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
