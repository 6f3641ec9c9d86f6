"""``encoder.backend: auto``: the fastest passage-encoder configuration that keeps quality, on the
hardware that runs it, chosen once and kept.

The choice is measured, not guessed from a CPU table: every candidate the installed extras allow
(torch fp32 and bf16, ONNX Runtime int8, OpenVINO fp32/bf16 and static int8) encodes the same
``AUTO_SAMPLE_ROWS`` passages of the corpus itself with the threads one Spark task gets
(``encoder.threads``, else ``spark.task.cpus``), after one warm-up batch; torch fp32 is the
reference. A candidate qualifies when its vectors' cosine to the reference is at least
``encoder.auto_min_cosine`` on average and at most 0.03 below it at the worst passage; the fastest
qualifying one wins. bf16 candidates are measured only where the CPU has native bf16 (avx512_bf16
or AMX) and ``encoder.dtype`` allows them. ONNX Runtime fp32 is left out: it measured slower than
torch fp32 on every CPU tried (docs/encoders.md#encoder-backends-and-int8-which-configuration-on-which-hardware).

Backends give slightly different vectors, so the choice is made once per (model, work dir) and
written to ``<work_dir>/encoders/auto-<model key>.json``; every later run, the nightly job
included, reads it back instead of measuring again, as it reuses an int8 export. The choice
resolves ``encoder.backend``, ``encoder.quantize`` and ``encoder.dtype`` before anything else
reads them, so the fingerprint names the configuration that made the vectors, and its
``chosen_by`` entry (outside the fingerprint's id) says how it was chosen, on which CPU, at what
speed and quality; the manifest carries the fingerprint. On a GPU (``encoder.device`` cuda, or
auto with CUDA present) the choice is torch without a measurement.

The measurement runs on the driver. In local mode that is the executors' machine; on a cluster
whose executors have other CPUs than the driver, run the first encode from a driver of the
executors' kind or set ``encoder.backend`` explicitly: one choice serves every executor, and the
log names the CPU it was measured on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import time

import numpy as np

from dpr_lib import backends, storage
from dpr_lib.backends import calibration_sample
from dpr_lib.config import Config, join_url
from dpr_lib.encoder import Encoder, EncoderSpec, cpu_has_native_bf16, cuda_available, resolve_spec
from dpr_lib.errors import EncoderError
from dpr_lib.runtimes import require

log = logging.getLogger("dpr_lib.encoder_choice")

AUTO_SAMPLE_ROWS = 128
"""Passages each candidate encodes (after a warm-up batch of 8)."""
WORST_SLACK = 0.03
"""How far below encoder.auto_min_cosine one passage's cosine may fall."""
_FEATURES = ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


def cpu_kind() -> dict:
    """This CPU's model name, the features that decide encoder speed, and a short kind
    (amx | avx512_bf16 | avx512 | avx2 | other) that benchmark figures are keyed by."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("unknown", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = [f for f in _FEATURES if f in flags]
    kind = next((k for k, f in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"),
                                ("avx2", "avx2")) if f in flags), "other")
    return {"kind": kind, "model": model, "features": have}


def candidates(dtype: str, native_bf16: bool) -> list[tuple[str, str, str]]:
    """(backend, quantize, dtype) to measure; torch fp32 first (the reference)."""
    wide = "bf16" if dtype == "bf16" or (dtype == "auto" and native_bf16) else "fp32"
    out = [("torch", "none", "fp32")]
    if wide == "bf16":
        out.append(("torch", "none", "bf16"))
    if dtype != "bf16":
        out.append(("onnx", "int8", "fp32"))
    out += [("openvino", "none", wide), ("openvino", "int8", wide)]
    return out


def record_url(cfg: Config, spec) -> str:
    key = f"{spec.weights_sha256[:16]}-{spec.family}-{spec.pooling}-{spec.max_length}"
    return join_url(cfg.paths.work_dir, "encoders", f"auto-{key}.json")


def with_choice(cfg: Config, choice: dict) -> Config:
    enc = dataclasses.replace(cfg.encoder, backend=choice["backend"], quantize=choice["quantize"],
                              dtype=choice["dtype"])
    return dataclasses.replace(cfg, encoder=enc)


def choose(cfg: Config, build: bool = False, passages_url: str | None = None,
           missing_ok: bool = False) -> tuple[Config, str]:
    """(``cfg`` with ``encoder.backend: auto`` replaced by the recorded choice, how it was chosen);
    measured on a sample of ``passages_url`` (default: the configured Passages) and recorded first
    when ``build`` and none is recorded. With no record and no ``build``: an EncoderError, or
    ``cfg`` unchanged when ``missing_ok``. Any other backend: (``cfg``, "")."""
    if cfg.encoder.backend != "auto":
        return cfg, ""
    opts = cfg.storage_options()
    torch_cfg = dataclasses.replace(cfg.encoder, backend="torch", quantize="none")
    base = resolve_spec(torch_cfg, cfg.path("cache_dir"), role="passage", storage_options=opts)
    url = record_url(cfg, base)
    if storage.exists(url, opts):
        choice = json.loads(storage.read_bytes(url, opts))
    elif build:
        choice = measure(cfg, passages_url or cfg.path("passages"))
        storage.write_bytes_atomic(url, json.dumps(choice, indent=1).encode(), opts)
        log.info("encoder.backend=auto: %s (kept in %s for every later run)", choice["summary"], url)
    elif missing_ok:
        return cfg, ""
    else:
        raise EncoderError(f"encoder.backend=auto has no recorded choice for {base.model_id} in {url} yet: the encode "
                           "stage measures and records it (or set encoder.backend explicitly)")
    return with_choice(cfg, choice), choice["summary"]


def resolve(cfg: Config, build: bool = False, passages_url: str | None = None, missing_ok: bool = False) -> Config:
    """``cfg`` with the choice applied (see :func:`choose`)."""
    return choose(cfg, build, passages_url, missing_ok)[0]


def measure(cfg: Config, passages_url: str) -> dict:
    """Every candidate on the same sample; the record of what was measured and what won."""
    import torch

    ecfg, cpu = cfg.encoder, cpu_kind()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if ecfg.device == "cuda" or (ecfg.device == "auto" and cuda_available()):
        return {"backend": "torch", "quantize": "none", "dtype": ecfg.dtype, "cpu": cpu, "measured": [],
                "date": when, "summary": "auto: torch (the encoder runs on CUDA; exported backends are CPU-only)"}
    titles, texts = calibration_sample(passages_url, AUTO_SAMPLE_ROWS, cfg.storage_options())
    threads = ecfg.threads or int(cfg.spark.conf.get("spark.task.cpus", 1) or 1)
    log.info("encoder.backend=auto: measuring the candidates on %d passages, %d thread(s), on %s (%s)",
             len(texts), threads, cpu["model"], ", ".join(cpu["features"]) or "no vector extensions")
    saved_threads = torch.get_num_threads()
    rows, ref = [], None
    try:
        for backend, quantize, dtype in candidates(ecfg.dtype, cpu_has_native_bf16()):
            row = {"backend": backend, "quantize": quantize, "dtype": dtype}
            rows.append(row)
            if backend != "torch":
                try:
                    require(backend)
                except EncoderError as exc:
                    row["skipped"] = str(exc)
                    continue
            c = with_choice(cfg, row)
            c = dataclasses.replace(c, encoder=dataclasses.replace(c.encoder, threads=threads))
            t0 = time.perf_counter()
            spec = passage_spec(c, build=True, passages_url=passages_url)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            enc = Encoder(spec)
            enc.encode(titles[:8], texts[:8])
            t0 = time.perf_counter()
            vectors = enc.encode(titles, texts)
            row["passages_per_s"] = round(len(texts) / (time.perf_counter() - t0), 2)
            del enc
            ref = vectors if ref is None else ref
            cos = (vectors * ref).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(ref, axis=1)
            row["mean_cosine"], row["min_cosine"] = round(float(cos.mean()), 5), round(float(cos.min()), 5)
            log.info("encoder.backend=auto: %s %s %s: %.1f passages/s, cosine to torch fp32 mean %.4f min %.4f",
                     backend, quantize, dtype, row["passages_per_s"], cos.mean(), cos.min())
    finally:
        torch.set_num_threads(saved_threads)
    floor = ecfg.auto_min_cosine
    ok = [rows[0]] + [r for r in rows[1:] if "passages_per_s" in r and r["mean_cosine"] >= floor
                      and r["min_cosine"] >= floor - WORST_SLACK]  # the reference always qualifies
    best = max(ok, key=lambda r: r["passages_per_s"])
    reference = rows[0]["passages_per_s"]
    summary = (f"auto on {cpu['kind']} ({cpu['model']}): {best['backend']} {best['quantize']} {best['dtype']}, "
               f"{best['passages_per_s']:.1f} passages/s per {threads} thread(s) = "
               f"{best['passages_per_s'] / reference:.2f}x torch fp32, cosine to fp32 mean {best['mean_cosine']:.4f}")
    return {"backend": best["backend"], "quantize": best["quantize"], "dtype": best["dtype"], "cpu": cpu,
            "host": socket.gethostname(), "pid": os.getpid(), "date": when, "threads": threads,
            "sample_rows": len(texts), "min_cosine_floor": floor, "measured": rows, "summary": summary}


def passage_spec(cfg: Config, build: bool = False, passages_url: str | None = None) -> EncoderSpec:
    """The configured passage encoder, with its exported model attached when encoder.backend is
    onnx/openvino (made first when ``build``; see :func:`dpr_lib.backends.attach`)."""
    cfg, chosen_by = choose(cfg, build, passages_url)  # encoder.backend: auto
    spec = resolve_spec(cfg.encoder, cfg.path("cache_dir"), role="passage", storage_options=cfg.storage_options())
    if chosen_by:
        spec = dataclasses.replace(spec, chosen_by=chosen_by)
    return backends.attach(cfg, spec, build=build, passages_url=passages_url)
