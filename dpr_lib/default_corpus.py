"""The embedded default corpus: Python's own documentation, which every machine with Python has.

Documents are the language reference topics of ``pydoc_data.topics`` (the text behind
``help('if')`` etc.) and the docstrings of a fixed list of standard-library modules, their
classes and functions. Output is JSON Lines with ``id``, ``title`` and ``text``, in a
deterministic order, so ``make run`` needs no data from anywhere.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os

MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fnmatch", "fractions", "functools", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "math", "multiprocessing", "operator", "os", "pathlib", "pickle", "platform", "queue", "random",
    "re", "sched", "secrets", "select", "shelve", "shlex", "shutil", "signal", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "sys", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
]
MIN_CHARS = 200  # shorter docstrings say too little to retrieve


def iter_documents():
    """(id, title, text) of every document, deterministic for a given Python version."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_CHARS:
            yield f"topic:{name}", f"Python language reference: {name}", text
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc and len(doc) >= MIN_CHARS:
            yield f"module:{modname}", f"{modname} module", doc
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (modname, "_" + modname.split(".")[-1]):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= MIN_CHARS:
                yield f"api:{modname}.{attr}", f"{modname}.{attr}", doc
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    member = vars(obj)[meth]
                    if meth.startswith("_") or not callable(member):
                        continue
                    doc = inspect.getdoc(member)
                    if doc and len(doc) >= MIN_CHARS:
                        yield f"api:{modname}.{attr}.{meth}", f"{modname}.{attr}.{meth}", doc


def write_default_corpus(path: str, limit: int = 0) -> int:
    """Write the corpus to local ``path`` (JSON Lines); ``limit`` > 0 keeps the first ``limit`` docs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc_id, title, text in iter_documents():
            if limit and n >= limit:
                break
            fh.write(json.dumps({"id": doc_id, "title": title, "text": text}) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
