"""sentence-transformers' own speed setups, run in the bench-only virtualenv (work/st-venv) that
bench/encode_bench.py creates: its torch, onnx and openvino backends, each with its int8 export
(ONNX: dynamic qint8 for this CPU's ISA; OpenVINO: static int8, NNCF, calibrated on passages of
the same corpus). Every setup encodes the same strings with batch_size 32 (its default) on all
cores; the timing excludes export and load.

    work/st-venv/bin/python bench/st_backends.py MODEL_DIR TEXTS.json OUT_DIR

writes OUT_DIR/st_backends.json ({setup: {"passages_per_s", "seconds", "error"?}}) and
OUT_DIR/<setup>.npy (the vectors, for the cosine to fp32).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np


def isa() -> str:
    """The ONNX Runtime dynamic-quantisation preset sentence-transformers offers for this CPU."""
    flags = open("/proc/cpuinfo", encoding="utf-8").read()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def main(model_dir: str, texts_path: str, out: str) -> None:
    from sentence_transformers import (
        SentenceTransformer,
        export_dynamic_quantized_onnx_model,
        export_static_quantized_openvino_model,
    )

    texts = json.load(open(texts_path, encoding="utf-8"))
    calib = texts["calibration"]
    texts = texts["texts"]
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "models")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(model_dir, work)
    # The static OpenVINO export reads its calibration set with datasets.load_dataset: a local
    # folder (nothing is downloaded), passages of the same corpus, as ours are.
    calib_dir = os.path.join(out, "calibration")
    os.makedirs(calib_dir, exist_ok=True)
    with open(os.path.join(calib_dir, "train.jsonl"), "w", encoding="utf-8") as fh:
        for t in calib:
            fh.write(json.dumps({"sentence": t}) + "\n")

    def load(setup: str):
        if setup == "torch":
            return SentenceTransformer(work, device="cpu")
        if setup == "onnx":
            return SentenceTransformer(work, device="cpu", backend="onnx")
        if setup == "onnx_int8":
            m = SentenceTransformer(work, device="cpu", backend="onnx")
            export_dynamic_quantized_onnx_model(m, isa(), work)
            # model_qint8_<isa>.onnx, or model_quint8_avx2.onnx (AVX2 quantises activations as uint8)
            name = next(f for f in sorted(os.listdir(os.path.join(work, "onnx"))) if f.endswith(f"int8_{isa()}.onnx"))
            return SentenceTransformer(work, device="cpu", backend="onnx", model_kwargs={"file_name": f"onnx/{name}"})
        if setup == "openvino":
            return SentenceTransformer(work, device="cpu", backend="openvino")
        if setup == "openvino_int8":
            from optimum.intel import OVQuantizationConfig

            m = SentenceTransformer(work, device="cpu", backend="openvino")
            export_static_quantized_openvino_model(
                m, OVQuantizationConfig(num_samples=len(calib)), work, dataset_name=calib_dir,
                dataset_config_name="default", dataset_split="train", column_name="sentence")
            return SentenceTransformer(work, device="cpu", backend="openvino",
                                       model_kwargs={"file_name": "openvino/openvino_model_qint8_quantized.xml"})
        raise ValueError(setup)

    report = {}
    for setup in ("torch", "onnx", "onnx_int8", "openvino", "openvino_int8"):
        try:
            model = load(setup)
            model.encode(texts[:64], batch_size=32)
            t = time.perf_counter()
            vecs = model.encode(texts, batch_size=32, convert_to_numpy=True)
            s = time.perf_counter() - t
            np.save(os.path.join(out, f"{setup}.npy"), vecs.astype(np.float32))
            report[setup] = {"passages_per_s": round(len(texts) / s, 2), "seconds": round(s, 2)}
        except Exception as exc:  # noqa: BLE001 - a setup that cannot run here is reported, not fatal
            report[setup] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"st_backends: {setup}: {report[setup]}", flush=True)
    json.dump(report, open(os.path.join(out, "st_backends.json"), "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
