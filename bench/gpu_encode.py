"""Passage encoding on a GPU: dpr_lib's Encoder vs SentenceTransformer.encode on the same GPU.

    python bench/gpu_encode.py --model DIR --passages passages.jsonl [--n 30000] [--out result.json]

passages.jsonl holds {"title", "text"} rows (e.g. what the corpus stage writes); they are repeated
up to --n. Baselines in the same process and on the same GPU: sentence-transformers with its
defaults (fp32, batch 32) and in fp16 (model.half(), batch 32). dpr_lib runs as the encode job
does on a GPU: encoder.device=cuda (so dtype auto = bf16), length-sorted batches with the token
budget sized to the card. Reported: passages/s, the ratios, and cosine agreement with ST fp32.
No Spark or FAISS needed (the GPU machine may have neither).

Three ways through dpr_lib's encoder, in buffers of encoder.buffer_rows (as the encode job reads a
Passages file): ``sync`` copies each batch's vectors to the host as it finishes (the GPU waits
while the CPU pads the next batch), ``deferred`` keeps a buffer's vectors on the GPU and copies
them once, ``stream`` (what the encode job runs on a GPU) also tokenizes the next buffer in a
thread while this one runs. ``gpu_busy`` = the same batches' forward passes alone, inputs already
on the GPU, over the wall time: the fraction of the time the GPU had work.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, *args, **kwargs):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t


def encode_buffers(enc, buffers, way: str) -> list:
    """The buffers through ``enc`` one of three ways (see the module's docstring)."""
    enc.deferred_copy = way != "sync"
    if way == "stream":
        return [v for _, v in enc.encode_stream(buffers, lambda b: b)]
    return [enc.encode(t, x) for t, x in buffers]


def forward_only_seconds(enc, titles, texts) -> float:
    """The model's forward passes over the batches the encoder would run, inputs built on the GPU
    beforehand: the GPU's own share of an encode."""
    import torch

    from dpr_lib.encoder import length_batches, model_inputs, pool

    ids, types = enc.tokenize(titles, texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    inputs = [model_inputs(enc.tokenizer, [ids[i] for i in b], [types[i] for i in b], enc.device,
                           enc.spec.family == "dpr") for b in length_batches(lengths, enc.token_budget)]
    use_bf16 = enc.spec.dtype == "bf16"

    def run():
        with torch.inference_mode(), torch.autocast(enc.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for kw in inputs:
                pool(enc.model(**kw), kw["attention_mask"], enc.spec.pooling, enc.spec.normalize)

    run()
    return timed(run)[1]


def main() -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    from dpr_lib.config import EncoderConfig
    from dpr_lib.encoder import Encoder, resolve_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--passages", required=True)
    parser.add_argument("--n", type=int, default=30000)
    parser.add_argument("--out", default="")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the harness")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in open(args.passages, encoding="utf-8")]
    rows = (rows * (args.n // len(rows) + 1))[: args.n]
    titles, texts = [r["title"] for r in rows], [r["text"] for r in rows]
    joined = [f"{t} {x}" for t, x in zip(titles, texts)]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (cpu dry run)"
    result = {"gpu": gpu, "torch": torch.__version__, "passages": len(rows)}

    # float32 weights as the published checkpoint has them (a carried copy may be stored in fp16)
    st = SentenceTransformer(args.model, device=args.device, model_kwargs={"dtype": torch.float32})
    st.encode(joined[:256], batch_size=32)
    st_vecs, st_s = timed(st.encode, joined, batch_size=32, convert_to_numpy=True)
    result["st_fp32_per_s"] = round(len(rows) / st_s, 1)
    if args.device == "cuda":
        st.half()
        st.encode(joined[:256], batch_size=32)
        _, st16_s = timed(st.encode, joined, batch_size=32, convert_to_numpy=True)
        result["st_fp16_per_s"] = round(len(rows) / st16_s, 1)
    del st

    cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dpr-gpu-bench")
    for name, dtype in (("dpr_lib_bf16", "auto"), ("dpr_lib_fp32", "fp32")):
        spec = resolve_spec(EncoderConfig(model=args.model, device=args.device, dtype=dtype), cache)
        enc = Encoder(spec)
        enc.encode(titles[:256], texts[:256])
        buffers = [(titles[i:i + spec.buffer_rows], texts[i:i + spec.buffer_rows])
                   for i in range(0, len(rows), spec.buffer_rows)]
        for way in ("sync", "deferred", "stream"):
            _, secs = timed(encode_buffers, enc, buffers, way)
            result[f"{name}_{way}_per_s"] = round(len(rows) / secs, 1)
            result[f"{name}_{way}_s"] = round(secs, 3)
        enc.deferred_copy = True
        _, tok_s = timed(enc.tokenize, titles, texts)
        busy_s = forward_only_seconds(enc, titles, texts)
        result[f"{name}_per_s"] = result[f"{name}_stream_per_s"]
        result[f"{name}_tokenize_s"] = round(tok_s, 3)
        result[f"{name}_forward_only_s"] = round(busy_s, 3)
        for way in ("sync", "deferred", "stream"):
            result[f"{name}_{way}_gpu_busy"] = round(busy_s / result[f"{name}_{way}_s"], 3)
        result[f"{name}_dtype"] = spec.dtype
        result[f"{name}_token_budget"] = enc.token_budget
        m = min(len(rows), 4000)  # agreement on the strings ST encoded
        vecs = enc.encode(None, joined[:m])
        ref = st_vecs[:m]
        cos = np.sum(vecs * ref, axis=1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
        result[f"{name}_cosine_vs_st_fp32"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}
        del enc
    result["ratio_vs_st_fp32"] = round(result["dpr_lib_bf16_per_s"] / result["st_fp32_per_s"], 3)
    if "st_fp16_per_s" in result:
        result["ratio_vs_st_fp16"] = round(result["dpr_lib_bf16_per_s"] / result["st_fp16_per_s"], 3)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
