"""Running an exported encoder (ONNX Runtime or OpenVINO) on the CPU: the exported files fetched
to a local cache and checked against the sha256 the driver fingerprinted (:func:`local_dir`), and
a loaded model that maps feeds to the pooler output or hidden states (:class:`Runner`).

How the files are made (once per weights, pooling, backend and quantisation) is
:mod:`dpr_lib.backends`. Imports of onnxruntime / openvino are lazy: they are extras.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.errors import EncoderError

FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
EXTRAS = {"onnx": "onnx onnxruntime onnxscript", "openvino": "openvino nncf"}
META = "meta.json"


def require(backend: str) -> None:
    """Fail naming the extra to install when a backend's packages are missing."""
    import importlib.util

    missing = [m for m in EXTRAS[backend].split() if importlib.util.find_spec(m) is None]
    if missing:
        raise EncoderError(f"encoder.backend={backend} needs {', '.join(missing)}: pip install 'dpr_lib[{backend}]' "
                           f"(or pip install {EXTRAS[backend]})")


def local_dir(spec) -> str:
    """The exported model's directory on this machine: the artifact itself when local, else a copy
    in the local cache (downloaded once per sha256, checked)."""
    url = spec.artifact_url
    if "://" not in url or url.startswith("file://"):
        local = url.removeprefix("file://")
        if os.path.isdir(local):
            _check(local, url, spec.artifact_sha256)
            return local
    cache = os.path.join(tempfile.gettempdir(), "dpr_lib_cache", "encoders", spec.artifact_sha256[:24])
    if os.path.exists(os.path.join(cache, META)):
        return cache
    opts = {"client_kwargs": {"endpoint_url": spec.endpoint_url}} if spec.endpoint_url else None
    meta = json.loads(storage.read_bytes(join_url(url, META), opts))
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="dpr-enc-", dir=os.path.dirname(cache))
    for name in meta["files"]:
        storage.download(join_url(url, name), os.path.join(tmp, name), opts)
    with open(os.path.join(tmp, META), "w") as fh:
        json.dump(meta, fh)
    try:
        _check(tmp, url, spec.artifact_sha256)
    except EncoderError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, cache)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _check(path: str, url: str, sha: str) -> None:
    """The exported files at ``path`` are those its meta.json names, and that meta is the one the
    driver fingerprinted (``sha``)."""
    with open(os.path.join(path, META), encoding="utf-8") as fh:
        meta = json.load(fh)
    if hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest() != sha:
        raise EncoderError(f"the exported encoder at {url} is not the one the driver fingerprinted")
    for name, want in meta["files"].items():
        if storage.sha256_file(os.path.join(path, name)) != want:
            raise EncoderError(f"{join_url(url, name)} does not match the sha256 in its meta.json")


class Runner:
    """A loaded exported model: ``runner(feeds)`` -> float32 array (pooler output or hidden states)."""

    def __init__(self, spec, threads: int):
        require(spec.backend)
        self.backend = spec.backend
        path = local_dir(spec)
        threads = max(1, threads or os.cpu_count() or 1)
        if spec.backend == "onnx":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(os.path.join(path, "model.onnx"), so,
                                                providers=["CPUExecutionProvider"])
            self.inputs = {i.name for i in self.session.get_inputs()}
        else:
            import openvino as ov

            core = ov.Core()
            # No pinning: OpenVINO pins its threads to cores by default, so the Python workers of
            # one executor (one per concurrent task) all ran on the same core: two 1-thread tasks
            # on 2 cores encoded 40.5 + 40.7 passages/s where one alone did 80.4.
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                      "INFERENCE_PRECISION_HINT": "bf16" if spec.dtype == "bf16" else "f32"}
            self.compiled = core.compile_model(os.path.join(path, "model.xml"), "CPU", config)
            self.request = self.compiled.create_infer_request()
            self.inputs = {name for i in self.compiled.inputs for name in i.get_names()}

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}
        if self.backend == "onnx":
            return self.session.run(None, feeds)[0]
        return np.array(self.request.infer(feeds)[0], dtype=np.float32)
