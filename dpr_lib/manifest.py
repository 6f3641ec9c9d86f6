"""The index version contract: the manifest, ``LATEST`` and the versions directory.

Layout under ``index_root`` (any fsspec URL)::

    versions/<version>/trained.faiss            trained, empty IVF (quantizer + codebooks)
    versions/<version>/shard-NNNNN.faiss        IVF shards sharing that quantizer, disjoint pids
    versions/<version>/shard-NNNNN.{pids,vectors}.npy   re-rank store of a shard (lossy codes)
    versions/<version>/docstore/part-NNNNN.parquet      pid-sorted (pid, doc_id, title, text)
    versions/<version>/sparse-NNNNN.bm25        BM25 inverted index of shard N's passages
    versions/<version>/sparse-vocab.bm25        corpus-wide document frequencies (dpr_lib.sparse)
    versions/<version>/tombstones.npy           [n, 2] int64 (pid, seq): pid is dead in segments older than seq
    versions/<version>/manifest.json            this module's :class:`Manifest`
    LATEST                                      the current version id, written last

A version is a list of immutable **segments**. Its own files (``shards``, ``docstore``, the
sparse shards) are its newest segment; ``segments`` lists earlier segments it references by the
version that wrote them (their files stay in that version's directory, never copied), and
``tombstones`` the pids removed from those earlier segments (deleted or changed). A full build
has one segment and no tombstones, and is written as format 2 (readable by older loaders); a
version that references segments is format 3.

This module is the only place that builds or parses a manifest: the merge job writes one with
:meth:`Manifest.to_json`, the loader, the service, the nightly job and the evaluation read one
with :func:`read_manifest` / :func:`open_manifest`. A reader refuses a format newer than it
knows, naming both. No pyspark, no FAISS: search services import it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.errors import IncompatibleIndexError, IndexIntegrityError

log = logging.getLogger("dpr_lib.manifest")

FORMAT_VERSION = 3
"""2 adds k_factor, memory and per-shard re-rank stores: a reader of 1 would search compact shards
without re-ranking, so it must refuse them (and a service keeps its current version). 3 adds
segments and tombstones: a reader of 2 would serve only the newest segment, without the deleted
pids filtered, so it must refuse them. Versions without segments are still written as 2."""
SEGMENTED_FORMAT = 3
LATEST = "LATEST"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"


# ---------------------------------------------------------------- the manifest's sections
# Each section is a JSON object in manifest.json; these TypedDicts are their fields, so the writer
# and every reader are checked against one definition. They stay plain dicts at run time: the JSON
# is the contract other languages read, and a reader keeps ``manifest.recall["at_nprobe"]``.


class QuantizerSection(TypedDict, total=False):
    reused: bool
    from_version: str          # when reused
    reason: str


class TrainingSection(TypedDict):
    """How the quantizer was trained (absent when it was reused)."""

    method: str                # flat | two_level k-means
    sample_bytes: int
    estimated_flops: float
    budget_bytes: int


class DeltaRecall(TypedDict):
    vectors: int
    queries: int
    recall_at_nprobe: float | None


class RecallSection(TypedDict, total=False):
    """Recall@k of the served nprobe against exact search, measured when the version was built. A
    delta on a version with recall ``lists`` measures its own (``measured``, ``uncertain_queries``,
    ``rule``); on one without, it carries its base's figures (``carried_from``). Both add
    ``delta_segment``."""

    k: int
    target: float
    queries: int
    query_source: str          # "questions" | "stored vectors, self excluded"
    questions_file: str
    by_nprobe: dict[str, float]
    at_nprobe: float | None
    reached_target: bool
    at_depth: dict[str, float | None]                     # depth -> recall at the served nprobe
    by_nprobe_at_depth: dict[str, dict[str, float | None]]  # deeper depth -> {nprobe: recall}
    base_nprobe: int           # the nprobe of the last full build (what nightly.max_nprobe_growth scales)
    lists: dict                # file entry of recall-lists.npz (versions without a re-rank store)
    measured: str
    uncertain_queries: int
    rule: str | None           # what the delta did when it missed the target (nprobe raised)
    carried_from: str
    delta_segment: DeltaRecall


class ValidationSection(TypedDict, total=False):
    """Figures on index.validation_questions (empty without validation data): what the gate compares."""

    metric: str
    value: float
    k: int
    top1_accuracy: float
    questions: int
    source: str
    seconds: float
    by_mode: dict[str, float]


class GateSection(TypedDict, total=False):
    passed: bool
    forced: bool
    reason: str | None
    compared_with: str | None
    max_regression: float


class FusionSection(TypedDict, total=False):
    """What mode ``hybrid`` serves (:mod:`dpr_lib.fusion`)."""

    mode: str                  # hybrid (or dense / bm25 when neither fusion beats a single side)
    method: Literal["rrf", "linear"]
    rrf_k: int
    dense_weight: float
    alpha_dense: float
    fetch_k_factor: int
    source: Literal["tuned", "default"]
    figures: dict[str, dict[str, float]]   # each candidate's figures on the validation questions
    metric: str
    chosen_by: list[str]
    questions: int
    plain_choice: str          # what the plain rule (largest worst-case margin) would have chosen
    safe_choice: str           # the better single retriever
    intervals: dict[str, list[float]]   # candidate -> [mean, low, high] of its worst-case margin over safe_choice
    singles_interval: list[float] | None  # [mean, low, high] of safe_choice's worst-case margin over the other single
    warning: str | None        # the questions could not separate plain_choice from safe_choice (or the singles)


class SoftwareSection(TypedDict):
    faiss: str
    numpy: str
    dpr_lib: str
    python: str
    index_format: str


class TombstonesSection(TypedDict):
    path: str
    bytes: int
    sha256: str
    count: int


class CompactionSection(TypedDict, total=False):
    kind: Literal["full", "delta"]
    reason: str
    segment_seq: int
    tombstones: int
    delta_vectors: int
    garbage_ratio: float


@dataclass
class FileEntry:
    """One published file: its path relative to the version directory, size and sha256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> FileEntry:
        return cls(path=d["path"], bytes=int(d["bytes"]), sha256=d["sha256"])


@dataclass
class ShardEntry:
    """An IVF shard: its file, vector count, and its re-rank store ({"pids": ..., "vectors": ...})."""

    index: int
    path: str
    vectors: int
    bytes: int
    sha256: str
    rerank: dict[str, FileEntry] | None = None
    task_peak_rss: int = 0
    """Peak resident bytes of the Spark task that built it (0: not measured)."""

    @classmethod
    def from_dict(cls, d: dict) -> ShardEntry:
        rerank = d.get("rerank")
        return cls(index=int(d["index"]), path=d["path"], vectors=int(d["vectors"]), bytes=int(d["bytes"]),
                   sha256=d["sha256"], task_peak_rss=int(d.get("task_peak_rss") or 0),
                   rerank={k: FileEntry.from_dict(v) for k, v in rerank.items()} if rerank else None)

    def to_dict(self) -> dict:
        out = {"index": self.index, "path": self.path, "vectors": self.vectors, "bytes": self.bytes,
               "sha256": self.sha256, "task_peak_rss": self.task_peak_rss}
        if self.rerank:
            out["rerank"] = {k: dataclasses.asdict(v) for k, v in self.rerank.items()}
        return out

    def files(self) -> list[FileEntry]:
        return [FileEntry(self.path, self.bytes, self.sha256), *(self.rerank or {}).values()]


@dataclass
class DocstoreEntry:
    """A pid-sorted docstore file holding pids [min_pid, max_pid]."""

    path: str
    min_pid: int
    max_pid: int
    rows: int
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> DocstoreEntry:
        return cls(path=d["path"], min_pid=int(d["min_pid"]), max_pid=int(d["max_pid"]), rows=int(d["rows"]),
                   bytes=int(d["bytes"]), sha256=d["sha256"])


@dataclass
class Segment:
    """An immutable part of a version: dense shards (with re-rank stores), docstore files and
    sparse shards, all in the directory of the version that wrote it. ``seq`` orders segments:
    a pid tombstoned with seq t is dead in every segment with seq < t."""

    version: str
    seq: int
    shards: list[ShardEntry]
    docstore: list[DocstoreEntry] = field(default_factory=list)
    sparse_shards: list[dict] = field(default_factory=list)
    vectors: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        return cls(version=d["version"], seq=int(d["seq"]), shards=[ShardEntry.from_dict(s) for s in d["shards"]],
                   docstore=[DocstoreEntry.from_dict(e) for e in d.get("docstore") or []],
                   sparse_shards=list(d.get("sparse_shards") or []), vectors=int(d.get("vectors") or 0))

    def to_dict(self) -> dict:
        return {"version": self.version, "seq": self.seq, "vectors": self.vectors,
                "shards": [s.to_dict() for s in self.shards],
                "docstore": [dataclasses.asdict(d) for d in self.docstore], "sparse_shards": self.sparse_shards}

    def files(self) -> list[FileEntry]:
        out = [f for s in self.shards for f in s.files()]
        out += [FileEntry(d.path, d.bytes, d.sha256) for d in self.docstore]
        out += [FileEntry(e["path"], int(e["bytes"]), e["sha256"]) for e in self.sparse_shards]
        return out


@dataclass
class Manifest:
    """What a version holds and how to search it (docs/reference/index-format.md)."""

    version: str
    encoder: dict
    """Passage encoder fingerprint (model id, weights hash, pooling, max length, normalisation, dim, dtype)."""
    dim: int
    factory: str
    nlist: int
    nprobe: int
    """Recommended nprobe: the smallest reaching recall.target."""
    trained: FileEntry
    """The trained, empty IVF index (quantizer + codebooks) the shards were built from: what a
    nightly run reuses. Search nodes never fetch it (every shard holds its own copy)."""
    shards: list[ShardEntry]
    docstore: list[DocstoreEntry] = field(default_factory=list)
    question_encoder: dict = field(default_factory=dict)
    metric: str = "inner_product"
    factory_reason: str = ""
    quantizer: QuantizerSection = field(default_factory=dict)
    """{"reused": bool, "from_version"?: str, "reason": str}."""
    train_size: int = 0
    training: TrainingSection | None = None
    """{"method", "sample_bytes", "estimated_flops", "budget_bytes"}; None when the quantizer was reused."""
    k_factor: int | None = None
    rerank: dict | None = None
    """{"store": "float16", "k_factor": int, "recall_by_nprobe_k_factor": {"p/kf": recall}} or None."""
    memory: dict = field(default_factory=dict)
    recall: RecallSection = field(default_factory=dict)
    """{"k", "target", "queries", "query_source", "by_nprobe": {"p": recall}, "at_nprobe", "reached_target", ...}."""
    totals: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    accounting: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    validation: ValidationSection = field(default_factory=dict)
    """Figures on index.validation_questions: {"metric", "value", "k", "top1_accuracy", "questions",
    "source", "seconds"} (empty without validation data); what the quality gate compares."""
    gate: GateSection = field(default_factory=dict)
    """The quality gate's verdict: {"passed", "forced", "reason", "compared_with", "max_regression"}."""
    sparse: dict | None = None
    """The BM25 side (dpr_lib.sparse): {"method", "k1", "b", "analyzer", "docs", "avg_doc_len",
    "vocab": {path, bytes, sha256, terms}, "shards": [{index, path, bytes, sha256, docs, terms,
    postings}], "disk_bytes_per_passage"}; None for a dense-only version."""
    fusion: FusionSection = field(default_factory=dict)
    """What ``mode: hybrid`` serves: {"method": "rrf"|"linear", "rrf_k"|"alpha_dense", "fetch_k_factor",
    "source": "tuned"|"default", "figures"?: {candidate: value}, "metric"?}."""
    segments: list[Segment] = field(default_factory=list)
    """Earlier segments this version references (oldest first); its own files are the newest segment."""
    segment_seq: int = 0
    """The seq of this version's own segment (0 for a full build)."""
    trained_version: str = ""
    """The version whose directory holds ``trained``, when not this one: a delta shares the file of
    the full build its segments start from instead of copying it ("" = this version's own; absent
    from the JSON then)."""
    tombstones: TombstonesSection | None = None
    """{path, bytes, sha256, count}: ``tombstones.npy`` of (pid, seq) rows, or None (nothing removed)."""
    compaction: CompactionSection = field(default_factory=dict)
    """Why this version is a full build or a delta: {"kind": "full"|"delta", "reason": str, ...}."""
    software: SoftwareSection = field(default_factory=dict)
    """What wrote the version: {"faiss", "numpy", "dpr_lib", "python", "index_format"}; a reader whose
    FAISS cannot read a shard names both FAISS versions instead of failing inside FAISS."""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    format_version: int = field(default=FORMAT_VERSION, compare=False)
    """As read; what is written follows the content (3 with segments or tombstones, else 2)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys written by the caller of the merge job (the nightly job's ``nightly``, ``retrain_reason``);
    kept at the top level of the JSON."""

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The keys a manifest defines (everything else in the JSON is ``extra``)."""
        return frozenset(f.name for f in dataclasses.fields(cls)) - {"extra"}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "trained":
                value = dataclasses.asdict(value)
            elif f.name == "shards":
                value = [s.to_dict() for s in value]
            elif f.name == "docstore":
                value = [dataclasses.asdict(d) for d in value]
            elif f.name == "segments":
                value = [seg.to_dict() for seg in value]
            elif f.name == "format_version":
                value = SEGMENTED_FORMAT if self.segments or self.tombstones else 2
            elif f.name == "trained_version" and not value:
                continue
            out[f.name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode()

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> Manifest:
        """Parse a manifest; a format newer than this reader's, or a missing key, is refused naming it."""
        fmt = d.get("format_version")
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise IncompatibleIndexError(
                f"{where} has format_version {fmt!r}; this dpr_lib reads up to {FORMAT_VERSION}: upgrade dpr_lib")
        names = cls.field_names()
        try:
            kwargs = {k: v for k, v in d.items() if k in names}
            kwargs["trained"] = FileEntry.from_dict(d["trained"])
            kwargs["shards"] = [ShardEntry.from_dict(s) for s in d["shards"]]
            kwargs["docstore"] = [DocstoreEntry.from_dict(e) for e in d.get("docstore") or []]
            kwargs["segments"] = [Segment.from_dict(e) for e in d.get("segments") or []]
            kwargs["segment_seq"] = int(d.get("segment_seq") or 0)
            kwargs["trained_version"] = str(d.get("trained_version") or "")
            kwargs["dim"], kwargs["nlist"] = int(d["dim"]), int(d["nlist"])
            kwargs["nprobe"] = int(d.get("nprobe") or 1)
            manifest = cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexIntegrityError(f"{where} is not a valid manifest: {type(exc).__name__} {exc}") from None
        return manifest

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexIntegrityError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise IndexIntegrityError(f"{where} is not a JSON object")
        return cls.from_dict(doc, where)

    def own_segment(self) -> Segment:
        """This version's own files as a segment."""
        return Segment(self.version, self.segment_seq, self.shards, self.docstore,
                       list((self.sparse or {}).get("shards") or []), sum(s.vectors for s in self.shards))

    def all_segments(self) -> list[Segment]:
        """Every segment a reader searches, oldest first (the referenced ones, then its own)."""
        return [*self.segments, self.own_segment()]

    def referenced_versions(self) -> frozenset[str]:
        """Versions whose directories hold files this version needs (itself included)."""
        return frozenset({self.version, self.trained_holder(), *(seg.version for seg in self.segments)})

    def trained_holder(self) -> str:
        """The version whose directory holds ``trained.faiss`` (see ``trained_version``)."""
        return self.trained_version or self.version

    def blobs(self) -> frozenset[str]:
        """sha256 of every file a search node fetches for this version (shards, re-rank stores,
        docstore, sparse, tombstones), over all its segments."""
        shas = {f.sha256 for seg in self.all_segments() for f in seg.files()}
        if self.sparse:
            shas.add(self.sparse["vocab"]["sha256"])
        if self.tombstones:
            shas.add(self.tombstones["sha256"])
        return frozenset(shas)

    def files_by_version(self) -> list[tuple[str, FileEntry]]:
        """(version that holds it, entry) for every file a search node fetches: what a swap downloads
        is the part of this list whose sha256 the node does not hold yet."""
        out = [(seg.version, f) for seg in self.all_segments() for f in seg.files()]
        if self.sparse:
            v = self.sparse["vocab"]
            out.append((self.version, FileEntry(v["path"], int(v["bytes"]), v["sha256"])))
        if self.tombstones:
            t = self.tombstones
            out.append((self.version, FileEntry(t["path"], int(t["bytes"]), t["sha256"])))
        return out


REJECTED = "rejected.json"  # in a version the quality gate refused (dpr_lib.gate)
INDEX_FORMAT = "faiss.write_index binary, IVF shards sharing one trained quantizer"


def software_versions() -> SoftwareSection:
    """The versions that wrote a version's files (recorded in its manifest)."""
    import platform

    import faiss
    import numpy

    from dpr_lib import __version__

    return {"faiss": faiss.__version__, "numpy": numpy.__version__, "dpr_lib": __version__,
            "python": platform.python_version(), "index_format": INDEX_FORMAT}


# ---------------------------------------------------------------- versions and LATEST

def new_version_id() -> str:
    """Sortable, unique: UTC time to the second plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def version_url(root: str, version: str) -> str:
    if "/" in version or version in (".", "..") or not version:
        raise IncompatibleIndexError(f"invalid version id {version!r}")
    return join_url(root, "versions", version)


def read_latest(root: str, storage_options: dict | None = None) -> str | None:
    url = join_url(root, LATEST)
    if not storage.exists(url, storage_options):
        return None
    return storage.read_bytes(url, storage_options).decode().strip() or None


def set_latest(root: str, version: str, storage_options: dict | None = None, attempts: int = 5) -> None:
    storage.write_bytes_atomic(join_url(root, LATEST), (version + "\n").encode(), storage_options, attempts)


def write_manifest(vurl: str, manifest: Manifest, storage_options: dict | None = None, attempts: int = 5) -> None:
    storage.write_bytes_atomic(join_url(vurl, MANIFEST), manifest.to_json(), storage_options, attempts)


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """The manifest at ``url`` (a manifest.json URL)."""
    return Manifest.from_json(storage.read_bytes(url, storage_options), url)


def open_manifest(index: str, storage_options: dict | None = None) -> tuple[Manifest, str]:
    """(manifest, version URL) for an index root (via LATEST) or a manifest.json URL."""
    if index.rstrip("/").endswith(MANIFEST):
        murl = index.rstrip("/")
        vurl = murl[: -len(MANIFEST)].rstrip("/")
    else:
        latest_url = join_url(index, LATEST)
        version = read_latest(index, storage_options)
        if version is None:
            raise IndexIntegrityError(f"no index published under {index}: {LATEST} is missing "
                                      f"({latest_url})")
        vurl = version_url(index, version)
        murl = join_url(vurl, MANIFEST)
    if not storage.exists(murl, storage_options):
        raise IndexIntegrityError(f"manifest not found: {murl} (half-written or removed version)")
    return read_manifest(murl, storage_options), vurl


def relative_to(url: str, vurl: str) -> str:
    """A published file's path as the manifest records it: relative to its version directory."""
    return url[len(vurl):].lstrip("/") if url.startswith(vurl) else url


def list_versions(root: str, storage_options: dict | None = None) -> list[str]:
    fs, path = storage.get_fs(join_url(root, "versions"), storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def prune_versions(root: str, keep: int, storage_options: dict | None = None) -> list[str]:
    """Keep the newest ``keep`` complete versions (and always the one LATEST names); also remove
    incomplete ones (no manifest: a run that died) older than the newest complete version, and
    versions the quality gate rejected (``rejected.json``) once a newer one is published: they are
    kept for inspection until then, and never take the place of a version a reader can fall back to.
    Returns the removed ids."""
    latest = read_latest(root, storage_options)
    versions = list_versions(root, storage_options)
    complete = [v for v in versions if storage.exists(join_url(version_url(root, v), MANIFEST), storage_options)]
    rejected = [v for v in complete if storage.exists(join_url(version_url(root, v), REJECTED), storage_options)]
    good = [v for v in complete if v not in rejected]
    doomed = [v for v in good[:-keep] if v != latest] if keep > 0 else []
    if good:
        doomed += [v for v in rejected if v < good[-1] and v != latest]
    if complete:
        doomed += [v for v in versions if v not in complete and v < complete[-1]]
    # A segment's files live in the version that wrote it: never remove a version that a kept
    # (or rejected-but-kept) version references.
    survivors = [v for v in complete if v not in doomed]
    needed: set[str] = set()
    for v in survivors:
        try:
            needed |= read_manifest(join_url(version_url(root, v), MANIFEST), storage_options).referenced_versions()
        except IncompatibleIndexError:  # written by a newer dpr_lib: keep whatever it may reference
            return []
    kept_for_segments = sorted(set(doomed) & needed)
    if kept_for_segments:
        log.info("keeping version(s) %s: their segments are referenced by kept versions", kept_for_segments)
    doomed = [v for v in doomed if v not in needed]
    fs, _ = storage.get_fs(root, storage_options)
    for v in doomed:
        _, path = storage.get_fs(version_url(root, v), storage_options)
        storage.retry(lambda p=path: fs.rm(p, recursive=True), f"remove old version {v}")
        log.info("removed old version %s", v)
    return doomed
