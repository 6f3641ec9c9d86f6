"""Reference search service (``dpr-serve``): the published shards behind HTTP, swapping to each
new version without downtime.

- ``POST /search`` ``{"questions": [...], "k": 10, "mode": "hybrid"}`` -> ``{"version", "mode",
  "took_ms", "results": [{"question", "hits": [{pid, score, doc_id, title, text}]}]}``; ``mode`` is
  dense, bm25 or hybrid (default: ``search.mode``, auto = what the version's manifest recommends).
  The body must be ``application/json`` (415 otherwise).
- Every error, wherever it is raised (the request checks, routing, an unexpected exception, the
  HTTP protocol's own bounds), is ``{"error": message, "code": reason}`` with a 4xx where the
  request was at fault, and every response is counted in ``/metrics`` by status, errors also by
  reason. The checks and bounds live in ``dpr_lib.serve_http``.
- ``GET /``: a small page to look at results: a question box, dense, bm25 and hybrid hits side by
  side, the version that answered and the latency (static HTML shipped with the package, no CDN).
- ``GET /health``: 200 once a version is loaded and warmed up (503 before), with the version, the
  vectors served and the last version that failed to load, if any (its reason without paths or
  URLs; the log has the full message).
- ``GET /openapi.json``: the API, ``/search``'s request and response included; ``/docs`` only with
  ``serve.docs`` (its assets come from a CDN).
- ``GET /metrics``: Prometheus text (requests and latency per endpoint, the loaded version,
  vectors, swaps, failed versions, resident and anonymous memory, questions per forward pass).

**Concurrency.** Request handlers never encode or search themselves: they queue their questions
and wait. One worker thread takes everything queued (up to ``serve.batch_questions`` questions,
waiting at most ``serve.batch_wait_ms`` for more) and answers it with one forward pass of the
question encoder and one FAISS search, then hands each request its own hits. So 16 concurrent
clients cost about one batched forward pass instead of 16 serialised ones (when a batch fails, each
of its requests is answered alone, so a question that cannot be searched fails only its own request), and the compute threads
are bounded for the whole service (``serve.threads`` for torch and FAISS) instead of per request.

**Swaps.** A background thread reads ``LATEST`` every ``serve.poll_s``. A new version is
downloaded (sha256-verified), loaded and warmed up beside the current one, then published to
request handlers by replacing one reference: a request takes that reference when it starts and
finishes on the version it started with; the old version is freed when its last request ends.
Versions load one at a time, so memory peaks at the old plus the new version, never more. A
version that fails to download, verify or load is reported (``/health``, ``/metrics``, the log)
and the service keeps serving the current one; it is retried after ``max(60 s, 10 x poll_s)``.
"""


import logging
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.encoder import describe
from dpr_lib.errors import DprError, InputError
from dpr_lib.serve_http import (
    Refusal,
    WireLimits,
    error_body,
    guarded_protocol,
    parse_search,
    public_reason,
    search_models,
)

__all__ = ["IndexHolder", "Loaded", "MicroBatcher", "create_app", "main", "parse_search"]

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
        except Exception as exc:  # noqa: BLE001 - the error belongs to the request(s) that caused it
            if len(batch) == 1:
                batch[0][3].set_exception(exc)
                return
            # One request's question can fail a whole forward pass: answer each alone, so only the
            # request at fault fails and the others get exactly their solo answers.
            log.warning("a batch of %d requests failed (%s); answering each alone", len(batch), type(exc).__name__)
            for item in batch:
                self._answer([item])
            return
        self.batches += 1
        self.questions += len(questions)
        at = 0
        for _, qs, _, fut in batch:
            fut.set_result(results[at:at + len(qs)])
            at += len(qs)


def release_memory() -> None:
    """Collect the released version's objects and hand the allocator's free pages back to the
    system (glibc's malloc_trim): without it a swap to a version that shares nothing (a compaction)
    left the service's RSS at two versions' worth (the soak bench: +12% for the rest of the run)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


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
        self._trim_due = False  # a version was released: return its freed memory at the next poll
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
                            mode=scfg.mode, reuse=self.current.searcher.index if self.current else None,
                            sparse_exact=scfg.sparse_exact)
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

        if self._trim_due:  # a poll interval after a swap: requests on the old version have ended
            self._trim_due = False
            release_memory()

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

    def public_failure(self) -> dict | None:
        """The last failed version as any client may see it: its id and reason, with no path or
        URL of the index root or the cache (the log has the full message)."""
        failed = self.failed
        if failed is None:
            return None
        return {"version": failed["version"], "error": public_reason(failed["error"]), "at": failed["at"]}

    def _fail(self, version: str, error: str) -> None:
        self.failures += 1
        self.failed = {"version": version, "error": error, "at": time.time()}
        log.error("version %s not loaded, still serving %s: %s", version,
                  self.current.version if self.current else "nothing", error)

    def _release(self, old: Loaded, new: Loaded) -> None:
        """Forget the old version (requests still on it keep it alive until they end) and remove
        cache files of the version released before it that neither live version uses."""
        self._released.append(old.blobs)
        self._trim_due = True
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


ENDPOINTS = {"/search": "search", "/": "page", "/health": "health", "/metrics": "metrics",
             "/openapi.json": "openapi", "/docs": "docs"}


def endpoint_of(path: str) -> str:
    """The metrics label of a path: the service's endpoints by name, anything else "other" (a
    client cannot grow the label set)."""
    return ENDPOINTS.get(path, "other")


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    """The one error shape as a response; ``x-error-code`` lets the counting middleware count the
    reason without reading the body."""
    from starlette.responses import Response

    return Response(error_body(code, message), status_code=status, media_type="application/json",
                    headers={**(headers or {}), "x-error-code": code})


def internal_error(what: str):
    """A 500 for an unexpected failure: the traceback goes to the log under an id the client is
    given, nothing of it to the client. Call from an ``except`` block."""
    ref = uuid.uuid4().hex[:12]
    log.exception("%s (error %s)", what, ref)
    return error_response(500, "internal", f"{what}; the server log has the details (error {ref})")


class CountedASGI:
    """Counts every response by endpoint and status (errors also by reason, from ``x-error-code``)
    and times it; an exception that escapes the application before its response began becomes a
    JSON 500 here, counted, with the details in the log under an id the client is given."""

    def __init__(self, app, on_response):
        self.app = app
        self.on_response = on_response  # (endpoint, status, reason or None, seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = endpoint_of(scope.get("path", ""))
        status: int | None = None
        reason: str | None = None
        gone = False  # the client left (or the protocol refused and answered the request itself)

        async def receive_watched():
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def send_watched(message):
            nonlocal status, reason
            if message["type"] == "http.response.start":
                status = message["status"]
                reason = dict(message.get("headers", [])).get(b"x-error-code", b"").decode("latin-1") or None
            await send(message)

        try:
            await self.app(scope, receive_watched, send_watched)
        except Exception:  # noqa: BLE001 - no failure reaches the client as anything but the JSON shape
            if status is not None:
                raise  # the response began: uvicorn closes the connection
            await internal_error(f"internal error on {endpoint}")(scope, receive_watched, send_watched)
        finally:
            if status is not None and not gone:
                self.on_response(endpoint, status, reason, time.perf_counter() - t0)


class ServiceMetrics:
    """The service's Prometheus registry: responses and errors as they happen (:meth:`counted`),
    the index and process gauges read when /metrics is scraped (:meth:`render`)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("dpr_requests", "HTTP responses by endpoint and status (every one, errors "
                                "answered by the HTTP protocol included)", ["endpoint", "code"], registry=r)
        self.errors = Counter("dpr_errors", "Error responses by endpoint and reason", ["endpoint", "reason"],
                              registry=r)
        self.latency = Histogram("dpr_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.info = Gauge("dpr_index_info", "The index version being served (value 1)", ["version"], registry=r)
        self.vectors = Gauge("dpr_index_vectors", "Vectors served", registry=r)
        self.ready = Gauge("dpr_index_ready", "1 once a version is loaded", registry=r)
        self.swaps = Gauge("dpr_index_swaps", "Version swaps since start", registry=r)
        self.failures = Gauge("dpr_index_failed_loads", "Versions that failed to load since start", registry=r)
        self.failing = Gauge("dpr_index_failed_version_pending", "1 while the newest version failed to load",
                             registry=r)
        self.mem = Gauge("dpr_process_memory_bytes", "Process memory", ["kind"], registry=r)
        self.batches = Gauge("dpr_search_batches", "Forward passes + searches answered since start", registry=r)
        self.batched = Gauge("dpr_search_batched_questions", "Questions answered through them", registry=r)

    def counted(self, endpoint: str, status: int, reason: str | None, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, reason or str(status)).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def render(self, holder: IndexHolder, batcher: "MicroBatcher | None") -> bytes:
        from prometheus_client import generate_latest

        loaded = holder.current
        self.info.clear()
        if loaded:
            self.info.labels(loaded.version).set(1)
        self.vectors.set(loaded.searcher.index.ntotal if loaded else 0)
        self.ready.set(1 if loaded else 0)
        self.swaps.set(holder.swaps)
        self.failures.set(holder.failures)
        self.failing.set(1 if holder.failed else 0)
        if batcher is not None:
            self.batches.set(batcher.batches)
            self.batched.set(batcher.questions)
        for key, value in process_memory().items():
            self.mem.labels({"VmRSS": "resident", "RssAnon": "anonymous", "RssFile": "file"}[key]).set(value)
        return generate_latest(self.registry)


def health_body(holder: IndexHolder) -> dict:
    """What GET /health answers (status 200 once a version is loaded, else 503)."""
    loaded = holder.current
    return {"status": "ready" if loaded else "loading", "version": loaded.version if loaded else None,
            "vectors": loaded.searcher.index.ntotal if loaded else 0, "swaps": holder.swaps,
            "mode": loaded.searcher.mode if loaded else None,
            "modes": (["dense", "bm25", "hybrid"] if loaded.searcher.index.sparse is not None else ["dense"])
            if loaded else [],
            "segments": len(loaded.searcher.index.manifest.all_segments()) if loaded else 0,
            "encoder": describe(loaded.searcher.index.manifest.encoder or {},
                                loaded.searcher.index.manifest.question_encoder, public=True) if loaded else None,
            "loaded": {"downloaded_bytes": loaded.downloaded_bytes, "reused_shards": loaded.reused_shards,
                       "seconds": loaded.load_seconds} if loaded else None,
            "downloaded_bytes_total": holder.downloaded_bytes,
            "failed_version": holder.public_failure()}


def _error_handlers(app) -> None:
    """404, 405 and FastAPI's validation errors in the service's one error shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        message = {404: "no such endpoint (the service answers POST /search, GET /health, GET /metrics, GET /, "
                        "GET /openapi.json)",
                   405: "method not allowed on this endpoint"}.get(exc.status_code, "request refused")
        return error_response(exc.status_code, code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "bad_request", "the request does not match the API (see /openapi.json)")


def _search_route(app, holder: IndexHolder, batcher_of) -> None:
    """POST /search: the body checked by :func:`~dpr_lib.serve_http.parse_search` (its bounds hold
    before any JSON object is built), the questions answered through the micro-batcher on the
    version loaded when the request arrived. Request, response and errors are described in
    /openapi.json by the typed models of :func:`~dpr_lib.serve_http.search_models`."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect

    cfg = holder.cfg
    SearchRequest, SearchResponse, ErrorModel = search_models(cfg)
    errors_doc = {status: {"model": ErrorModel, "description": what} for status, what in (
        (400, "bad request: the body, a question, k or mode (code names which)"),
        (408, "the headers or body did not arrive in time"), (413, "body too large"),
        (415, "body not application/json"), (431, "headers too large"),
        (500, "unexpected error (an id to find it in the log)"), (503, "no version loaded yet, or too many connections"))}

    @app.post("/search", response_model=None, responses={200: {"model": SearchResponse}, **errors_doc},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": SearchRequest.model_json_schema()}}}})
    async def search(request: Request):
        t0 = time.perf_counter()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return error_response(415, "unsupported_media_type", "send the body as JSON with the header "
                                  "Content-Type: application/json")
        try:
            body = await request.body()
        except ClientDisconnect:  # the client left, or the protocol refused the body and answered
            return Response(status_code=400)
        try:
            questions, k, mode = parse_search(body, cfg)
        except Refusal as exc:
            return error_response(exc.status, exc.code, str(exc))
        loaded = holder.current  # this request finishes on this version, whatever swaps meanwhile
        if loaded is None:
            return error_response(503, "not_ready", "no index version loaded yet", {"retry-after": "5"})
        try:
            results = await asyncio.wrap_future(batcher_of().submit(loaded, questions, k, mode))
        except Refusal as exc:
            return error_response(exc.status, exc.code, str(exc))
        except (InputError, UnicodeError) as exc:  # this request's questions, not the service
            return error_response(400, "bad_question", f"a question could not be searched: {type(exc).__name__}: "
                                  f"{public_reason(ascii(str(exc))[1:-1], 200)}")
        except Exception:  # noqa: BLE001 - only this request fails; the details go to the log
            return internal_error("search failed")
        body = {"version": loaded.version, "mode": mode or loaded.searcher.mode,
                "took_ms": round((time.perf_counter() - t0) * 1000, 2), "results": [
            {"question": q, "hits": [{"pid": h.pid, "score": h.score, "doc_id": h.doc_id, "title": h.title,
                                      "text": h.text} for h in hits]} for q, hits in zip(questions, results)]}
        return JSONResponse(body)


def create_app(holder: IndexHolder, start_poller: bool = True):
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST

    cfg = holder.cfg
    metrics = ServiceMetrics()
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

    docs = cfg.serve.docs
    app = FastAPI(title="dpr-serve", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(CountedASGI, on_response=metrics.counted)
    # The protocol's own refusals (408, 413, 431, 503, malformed HTTP) are counted here too.
    app.state.wire_refused = lambda path, status, code: metrics.counted(endpoint_of(path), status, code)
    _error_handlers(app)
    _search_route(app, holder, lambda: batcher)
    page = _page()

    @app.get("/")
    async def index_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        body = health_body(holder)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(holder, batcher), media_type=CONTENT_TYPE_LATEST)

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
    app = create_app(holder)
    protocol = guarded_protocol(WireLimits.from_config(cfg), app.state.wire_refused)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, http=protocol,
                server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
