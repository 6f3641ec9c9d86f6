"""Exported passage encoders: ``encoder.backend: onnx | openvino``, ``encoder.quantize: none | int8``.

The torch model is exported once per (weights, pooling, backend, quantisation) into
``<work_dir>/encoders/<key>/`` with a ``meta.json`` written last; every later run, nightly
included, reuses it, so the vectors (and the encoder fingerprint, which names the exported
files' sha256) stay the same from night to night. Executors copy the directory into their local
cache once, checked against the sha256 the driver fingerprinted.

- ``openvino`` + ``int8``: static post-training quantisation with NNCF (``ModelType.TRANSFORMER``:
  SmoothQuant, fast bias correction), calibrated on ``encoder.calibration_rows`` passages of the
  corpus itself, sampled evenly over its Passages files. Non-quantised ops run in the
  fingerprint's dtype (OpenVINO's precision hint: f32, or bf16 where the CPU has it natively).
- ``onnx`` + ``int8``: ONNX Runtime's dynamic quantisation of the MatMul weights to int8 per
  output channel; activations are quantised per batch at run time (ONNX Runtime's static QDQ
  graphs measured slower and less faithful on CPUs, see the table in docs/encoders.md).

Only passages go through these backends: questions are encoded one at a time in services, where
torch's latency is lower, and the manifest's ``question_encoder`` says so.

Imports of onnx / onnxruntime / openvino / nncf are lazy: they are extras
(``pip install 'dpr_lib[onnx]'`` / ``'dpr_lib[openvino]'``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import EncoderError
from dpr_lib.runtimes import FILES, META, require

log = logging.getLogger("dpr_lib.backends")

QUESTION_NOTE = ("questions are encoded by the torch model (one question at a time, where torch's latency is "
                 "lowest); passages by the exported model named in encoder.artifact")


def artifact_url(cfg: Config, spec) -> str:
    key = f"{spec.weights_sha256[:16]}-{spec.family}-{spec.pooling}-{spec.backend}-{spec.quantize}"
    return join_url(cfg.paths.work_dir, "encoders", key)


def attach(cfg: Config, spec, build: bool = False, passages_url: str | None = None):
    """``spec`` with its exported model attached (``artifact_url``, ``artifact_sha256``,
    ``calibration``), read from ``<work_dir>/encoders``; made first when ``build`` and missing
    (int8 calibrates on ``passages_url``, default the configured Passages). Without ``build`` a
    missing export leaves the spec as configured: its fingerprint then matches no Embeddings."""
    if spec.backend == "torch" or spec.role != "passage":
        return spec
    url = artifact_url(cfg, spec)
    opts = cfg.storage_options()
    meta_url = join_url(url, META)
    if not storage.exists(meta_url, opts) and build:
        _build(cfg, spec, url, passages_url or cfg.path("passages"))
    if not storage.exists(meta_url, opts):
        return spec
    meta = json.loads(storage.read_bytes(meta_url, opts))
    return dataclasses.replace(spec, artifact_url=url, artifact_sha256=meta["sha256"],
                               calibration=meta.get("calibration", {}).get("sha256", ""))


def _build(cfg: Config, spec, url: str, passages_url: str) -> None:
    from dpr_lib.encoder import Encoder

    require(spec.backend)
    t0 = time.time()
    log.info("encoder: exporting %s to %s%s (once; kept in %s)", spec.model_id, spec.backend,
             " int8" if spec.quantize == "int8" else "", url)
    enc = Encoder(dataclasses.replace(spec, backend="torch", dtype="fp32", quantize="none"))
    calibration = None
    if spec.quantize == "int8" and spec.backend == "openvino":  # onnx int8 is dynamic: nothing to calibrate
        titles, texts = calibration_sample(passages_url, cfg.encoder.calibration_rows, cfg.storage_options())
        calibration = {"rows": len(texts), "source": passages_url,
                       "sha256": hashlib.sha256(json.dumps([titles, texts]).encode()).hexdigest()}
    with tempfile.TemporaryDirectory(prefix="dpr-export-") as tmp:
        if spec.backend == "onnx":
            export_onnx(enc, tmp, quantize=spec.quantize == "int8")
        else:
            export_openvino(enc, tmp, (titles, texts) if calibration else None)
        files = {name: storage.sha256_file(os.path.join(tmp, name)) for name in FILES[spec.backend]}
        meta = {"backend": spec.backend, "quantize": spec.quantize, "model_id": spec.model_id,
                "weights_sha256": spec.weights_sha256, "files": files, "calibration": calibration or {},
                "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
                "seconds": round(time.time() - t0, 1)}
        for name in files:
            storage.upload_file_atomic(os.path.join(tmp, name), join_url(url, name), cfg.storage_options())
        storage.write_bytes_atomic(join_url(url, META), json.dumps(meta, indent=1).encode(), cfg.storage_options())
    log.info("encoder: %s export ready in %.0fs (sha256 %s)", spec.backend, time.time() - t0, meta["sha256"][:12])


def calibration_sample(passages_url: str, rows: int, opts: dict | None = None) -> tuple[list[str], list[str]]:
    """Up to ``rows`` (title, text) passages spread evenly over the Passages files: a bounded read
    (at most 16 files, the first rows of each), never the corpus."""
    import pyarrow.parquet as pq

    files = storage.list_files(passages_url, ".parquet", opts)
    if not files:
        raise EncoderError(f"encoder.quantize=int8 calibrates on the corpus's passages, but {passages_url} has none; "
                           "run the corpus stage first")
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(16, len(files))).round().astype(int)]
    picked = list(dict.fromkeys(picked))
    per_file = -(-rows // len(picked))
    titles, texts = [], []
    for f in picked:
        fs, path = storage.get_fs(f, opts)
        with fs.open(path, "rb") as fh:
            got = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=min(per_file, 1024), columns=["title", "text"]):
                take = batch.slice(0, per_file - got)
                titles += take.column("title").to_pylist()
                texts += take.column("text").to_pylist()
                got += take.num_rows
                if got >= per_file:
                    break
    return titles[:rows], texts[:rows]


# ---------------------------------------------------------------- export

def _graph(enc):
    """The torch module to export: input ids, mask (and type ids) -> the tensor the pooling reads
    (DPR's pooler output, else the last hidden state)."""
    import torch

    pooler = enc.spec.pooling == "pooler"

    class Graph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.pooler_output if pooler else out.last_hidden_state

    return Graph(enc.model).eval()


def _example(enc, titles=None, texts=None) -> dict:
    from dpr_lib.encoder import model_inputs

    texts = texts or ["an example passage for the export", "a second, longer example passage for the export ok"]
    ids, types = enc.tokenize(titles, texts)
    return dict(model_inputs(enc.tokenizer, ids, types, "cpu", enc.spec.family == "dpr"))


def export_onnx(enc, out_dir: str, quantize: bool) -> None:
    import torch

    path = os.path.join(out_dir, "model.onnx")
    example = _example(enc)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {k: {0: batch, 1: seq} for k in example}
    # The dynamo exporter: the legacy TorchScript one traced the attention mask into a graph that
    # was wrong for padded rows (measured: vectors of padded rows differed).
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_graph(enc), (), path, kwargs=example, dynamo=True, dynamic_shapes=shapes,
                          external_data=False, verbose=False)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = os.path.join(out_dir, "model.fp32.onnx")
        os.replace(path, tmp)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser logs every node it skips to the root logger
        try:
            quantize_dynamic(tmp, path, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
        finally:
            root.setLevel(level)
        os.remove(tmp)


def export_openvino(enc, out_dir: str, calibration: tuple[list[str], list[str]] | None) -> None:
    import openvino as ov
    import torch

    from dpr_lib.encoder import length_batches, model_inputs

    with torch.no_grad():
        model = ov.convert_model(_graph(enc), example_input=_example(enc))
    if calibration is not None:
        import nncf

        titles, texts = calibration
        ids, types = enc.tokenize(titles, texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        items = []
        for b in length_batches(lengths, enc.spec.token_budget):
            feeds = model_inputs(enc.tokenizer, [ids[i] for i in b], [types[i] for i in b], "cpu",
                                 enc.spec.family == "dpr")
            items.append({k: v.numpy() for k, v in feeds.items()})
        model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(items))
    ov.save_model(model, os.path.join(out_dir, "model.xml"), compress_to_fp16=False)


# ---------------------------------------------------------------- run

