"""The edge of ``dpr-serve``: what a request may be before any of it reaches the index.

A search service sits behind a company's search box, so every client is a stranger: one client's
request must never fail another's, and no request may hold the service's memory or connections
for long. This module holds the checks that run before a question is queued (``parse_search``),
the one error shape (``Refusal``, ``error_body``: ``{"error": message, "code": reason}``), what
``/health`` may show of a failure (``public_reason``: no paths, no URLs), and the HTTP protocol
(``guarded_protocol``) that bounds a request on the wire, before the application sees it:

- line + headers at most ``serve.max_header_bytes`` (431), received within
  ``serve.header_timeout_s`` of the request's first byte or of the connection (408, closed);
- a body at most ``serve.max_body_bytes``, refused (413, closed) as soon as its Content-Length or,
  when chunked, the bytes received pass the limit: it is never read whole;
- a body received within ``serve.body_timeout_s`` of the headers (408, closed);
- at most ``serve.max_connections`` open connections (one more: 503 with Retry-After, closed);
- a request the HTTP parser cannot read: 400 in the same JSON shape.

Each refusal on the wire is reported to a callback, so ``/metrics`` counts it like any response.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpr_lib.config import Config
from dpr_lib.errors import InputError

MODES = ("dense", "bm25", "hybrid", "auto")


class Refusal(InputError):
    """A request the service answers with a 4xx: the HTTP status, a machine-readable reason
    (``code``) and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


def error_body(code: str, message: str) -> bytes:
    """The one error shape. ASCII JSON, so a message quoting a client's invalid Unicode (a lone
    surrogate) still encodes."""
    return json.dumps({"error": message, "code": code}, ensure_ascii=True).encode("ascii")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"),;]*")
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s/'\"),;:]+)+/?|[A-Za-z]:\\[^\s'\"),;]*")


def public_reason(message: str, limit: int = 300) -> str:
    """A failure's message as a client may see it: every URL and absolute path replaced by
    ``<url>`` / ``<path>`` (the full message goes to the server log)."""
    return _ABS_PATH.sub("<path>", _URL.sub("<url>", message))[:limit]


# ------------------------------------------------------------------ the body of /search

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, in linear time and without recursion
    (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", body))
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, dtype=np.uint8)
    opens = (steps == ord("[")) | (steps == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def load_json(body: bytes, max_depth: int, max_number_chars: int):
    """A request body as JSON, refusing (400) what is not strict UTF-8 (encoded surrogates
    included), nests deeper than ``max_depth``, has a number literal longer than
    ``max_number_chars`` or uses NaN/Infinity."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, "bad_encoding", f"request body is not valid UTF-8 (byte {exc.start}: "
                      f"{exc.reason})") from None
    # Fewer brackets than the limit cannot nest past it: the common small body skips the scan.
    depth = json_depth(body) if body.count(b"[") + body.count(b"{") > max_depth else 0
    if depth > max_depth:
        raise Refusal(400, "too_deep", f"request body nests {depth} levels deep; the limit is {max_depth} "
                      "(serve.max_json_depth)")

    def number(kind):
        def parse(literal: str):
            if len(literal) > max_number_chars:
                raise Refusal(400, "number_too_long", f"a number in the request body has {len(literal)} "
                              f"characters; the limit is {max_number_chars} (serve.max_number_chars)")
            return kind(literal)
        return parse

    def constant(name: str):
        raise Refusal(400, "bad_json", f"request body is not valid JSON: {name} is not a JSON number")

    try:
        return json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise Refusal(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # cannot happen below max_depth; kept so no body ends in a 500
        raise Refusal(400, "too_deep", "request body nests too deep (serve.max_json_depth)") from None


def check_question(i: int, q, max_chars: int) -> str:
    """One question, stripped; a ``Refusal`` naming its position otherwise: empty or not a
    string, longer than ``max_chars``, holding a NUL or a lone UTF-16 surrogate (not a Unicode
    scalar value: the tokenizer cannot encode it)."""
    if not isinstance(q, str) or not q.strip():
        raise Refusal(400, "bad_question", f"question {i} is empty or not a string")
    if len(q) > max_chars:
        raise Refusal(400, "question_too_long", f"question {i} has {len(q)} characters; the limit is "
                      f"{max_chars} (serve.max_question_chars)")
    if "\x00" in q:
        raise Refusal(400, "bad_question", f"question {i} holds a NUL character at {q.index(chr(0))}")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Refusal(400, "bad_question", f"question {i} holds a lone UTF-16 surrogate at character "
                      f"{exc.start}; questions must be valid Unicode") from None
    return q.strip()


def parse_search(body: bytes, cfg: Config) -> tuple[list[str], int, str | None]:
    """(questions, k, mode or None) from a /search body; a ``Refusal`` (400) with a readable
    message and a reason code otherwise."""
    s = cfg.serve
    payload = load_json(body or b"", s.max_json_depth, s.max_number_chars)
    if not isinstance(payload, dict):
        raise Refusal(400, "bad_shape", 'request body must be a JSON object like {"questions": ["..."], "k": 10}')
    unknown = sorted(set(payload) - {"questions", "k", "mode"})
    if unknown:
        raise Refusal(400, "unknown_field", f"unknown field(s) {ascii(unknown)}; expected 'questions' and "
                      "optionally 'k' and 'mode'")
    questions = payload.get("questions")
    if not isinstance(questions, list) or not questions:
        raise Refusal(400, "bad_questions", "'questions' must be a non-empty list of strings")
    if len(questions) > s.max_batch:
        raise Refusal(400, "too_many_questions", f"at most {s.max_batch} questions per request "
                      f"(serve.max_batch), got {len(questions)}")
    questions = [check_question(i, q, s.max_question_chars) for i, q in enumerate(questions)]
    k = payload.get("k", cfg.search.k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= s.max_k:
        raise Refusal(400, "bad_k", f"'k' must be an integer from 1 to {s.max_k} (serve.max_k), got "
                      f"{ascii(k)[:40]}")
    mode = payload.get("mode")
    if mode is not None and mode not in MODES:
        raise Refusal(400, "bad_mode", f"'mode' must be one of dense, bm25, hybrid, auto; got {ascii(mode)[:40]}")
    return questions, k, (None if mode == "auto" else mode)


def search_models(cfg: Config):
    """(request, response, error) pydantic models of /search, with this service's limits: what
    ``/openapi.json`` describes, so a client can be generated from it. ``parse_search`` enforces
    the same rules with messages naming the setting; a test holds the two together."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    s = cfg.serve
    Question = Annotated[str, StringConstraints(min_length=1, max_length=s.max_question_chars,
                                                pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]

    class SearchRequest(BaseModel):
        """Questions to answer with the top-k passages of the version being served."""

        model_config = ConfigDict(extra="forbid")
        questions: list[Question] = Field(min_length=1, max_length=s.max_batch,
                                          description="questions (not blank, no NUL, valid Unicode)")
        k: int = Field(cfg.search.k, ge=1, le=s.max_k, description="passages per question")
        mode: Literal["dense", "bm25", "hybrid", "auto"] | None = Field(
            None, description="retriever; default (and auto): what the version's manifest recommends")

    class Hit(BaseModel):
        pid: int
        score: float
        doc_id: str
        title: str
        text: str

    class Answer(BaseModel):
        question: str
        hits: list[Hit]

    class SearchResponse(BaseModel):
        version: str = Field(description="the index version that answered")
        mode: str
        took_ms: float
        results: list[Answer]

    class Error(BaseModel):
        error: str = Field(description="what was wrong, naming the limit or setting where one applies")
        code: str = Field(description="machine-readable reason, e.g. bad_json, body_too_large, request_timeout")

    return SearchRequest, SearchResponse, Error


# ------------------------------------------------------------------ the wire

@dataclass(frozen=True)
class WireLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_body_bytes: int
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, cfg: Config) -> "WireLimits":
        s = cfg.serve
        return cls(s.max_header_bytes, s.header_timeout_s, s.max_body_bytes, s.body_timeout_s, s.max_connections)


def raw_response(status: int, code: str, message: str, extra: tuple = ()) -> bytes:
    """A whole HTTP/1.1 error response (the JSON shape, Connection: close) for the protocol to write
    when no application is running for the request."""
    from http import HTTPStatus

    body = error_body(code, message)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class _Guard:
    """The bounds of :func:`guarded_protocol`, mixed into uvicorn's httptools protocol (imported
    lazily there): ``limits`` and ``refused`` are set on the class that function makes."""

    limits: WireLimits
    refused: Callable[[str, int, str], None]
    _timer = None
    _refused = False
    _header_bytes = 0
    _body_bytes = 0
    _message_cycle = None  # the cycle of the request being received, once its headers are in

    # ---------------------------------------------------------- timers
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str, seconds: float) -> None:
        self._timer = None
        setting = "serve.header_timeout_s" if what == "headers" else "serve.body_timeout_s"
        self._refuse(408, "request_timeout", f"the request's {what} did not arrive within {seconds:g} s "
                     f"({setting})")

    def _refuse(self, status: int, code: str, message: str, extra: tuple = ()) -> None:
        """Answer with an error (unless this request's response has begun) and close."""
        if self._refused or self.transport is None or self.transport.is_closing():
            return
        self._refused = True
        self._disarm()
        cycle = self._message_cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(raw_response(status, code, message, extra))
            self.refused(self._path(), status, code)
        self.transport.close()

    def _path(self) -> str:
        if self.scope and self.scope.get("path"):
            return self.scope["path"]
        try:  # refused before uvicorn filled the scope in: the path as received so far
            import httptools

            url = getattr(self, "url", b"")
            return httptools.parse_url(url).path.decode("latin-1") if url else ""
        except Exception:  # noqa: BLE001 - a request line too broken to parse
            return ""

    # ---------------------------------------------------------- connection
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections", f"the service has {self.limits.max_connections} open "
                         "connections, its limit (serve.max_connections); retry later",
                         ("retry-after: 1",))
            return
        self._arm(self.limits.header_timeout_s, "headers")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad_http", f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})")

    # ---------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._header_bytes = self._body_bytes = 0
        self._message_cycle = None
        self._arm(self.limits.header_timeout_s, "headers")

    def _count_header(self, n: int) -> bool:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the request line and headers pass "
                         f"{self.limits.max_header_bytes} bytes (serve.max_header_bytes)")
        return not self._refused

    def on_url(self, url: bytes) -> None:
        if self._count_header(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count_header(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        declared = [v for n, v in self.headers if n == b"content-length"]
        if declared and (not declared[0].strip().isdigit() or int(declared[0]) > self.limits.max_body_bytes):
            self._refuse(413, "body_too_large", f"the request body declares {declared[0][:20].decode('latin-1')}"
                         f" bytes; the limit is {self.limits.max_body_bytes} (serve.max_body_bytes)")
            return
        super().on_headers_complete()
        self._message_cycle = self.cycle
        self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._refuse(413, "body_too_large", f"the request body passed {self.limits.max_body_bytes} bytes "
                         "(serve.max_body_bytes)")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()


def guarded_protocol(limits: WireLimits, refused: Callable[[str, int, str], None]) -> type:
    """uvicorn's httptools protocol with the bounds above. ``refused(path, status, code)`` is
    called for every response the protocol writes itself."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedProtocol", (_Guard, HttpToolsProtocol),
                {"limits": limits, "refused": staticmethod(refused)})
