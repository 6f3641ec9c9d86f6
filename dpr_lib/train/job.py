"""The training job: check the data, resolve the starting encoders, then run one training
process here or ``train.num_processes`` of them under TorchDistributor (:mod:`dpr_lib.train.loop`)."""

from __future__ import annotations

import logging
import time

from dpr_lib import storage
from dpr_lib.config import Config
from dpr_lib.errors import InputError
from dpr_lib.train.checkpoint import COMPLETE, list_checkpoints
from dpr_lib.train.data import load_training_data
from dpr_lib.train.loop import train_worker
from dpr_lib.train.model import encoder_specs

log = logging.getLogger("dpr_lib.train")


def train_encoder(spark, cfg: Config, data: str, out: str, resume: str | None = None) -> dict:
    """Train question + passage encoders on DPR biencoder data; returns the final figures.

    With ``spark`` the training runs under TorchDistributor with ``train.num_processes``
    processes (``num_processes=1`` locally runs the very same code path); ``spark=None`` runs
    one process here (tests, notebooks). ``resume``: a checkpoint URL, or ``auto`` for the newest
    complete checkpoint under ``out``."""
    from dpr_lib.spark import bind_storage

    t = cfg.train
    opts = bind_storage(spark, cfg)
    ts = load_training_data(data, opts)            # fail before any process starts
    if resume == "auto":
        found = list_checkpoints(out, opts)
        resume = found[-1][1] if found else None
        if resume is None:
            log.info("no checkpoint under %s: starting from the base model", out)
    elif resume:
        fs, path = storage.get_fs(resume, opts)
        if not fs.exists(f"{path.rstrip('/')}/{COMPLETE}"):
            raise InputError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    qspec, pspec = encoder_specs(cfg)
    similarity = t.similarity
    if similarity == "auto":
        similarity = "cosine" if pspec.normalize else "dot"
    if similarity == "dot" and pspec.normalize:
        log.warning("train.similarity=dot but the encoder L2-normalises its vectors: the index will rank by cosine")
    args = {
        "data": data, "out": out, "resume": resume, "storage_options": opts, "qspec": qspec, "pspec": pspec,
        "shared": t.shared_encoder, "batch_size": t.batch_size, "hard_negatives": t.hard_negatives,
        "hard_negative_pool": t.hard_negative_pool, "epochs": t.epochs, "max_steps": t.max_steps, "lr": t.lr,
        "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
        "similarity": similarity, "scale": t.scale, "dropout": t.dropout, "dtype": t.dtype,
        "max_question_length": t.max_question_length, "max_length": pspec.max_length, "seed": t.seed,
        "val_fraction": t.val_fraction, "val_every": t.val_every, "checkpoint_every": t.checkpoint_every,
        "keep_checkpoints": t.keep_checkpoints, "log_every": t.log_every, "threads": t.threads,
        "device": t.device,
    }
    log.info("training data %s: %d questions, %d distinct passages (skipped %s)", data, len(ts), len(ts.texts),
             ts.skipped or "none")
    t0 = time.time()
    if spark is None:
        if t.num_processes != 1:
            raise InputError("train.num_processes > 1 needs Spark (TorchDistributor)")
        result = train_worker(args)
    else:
        from pyspark.ml.torch.distributor import TorchDistributor

        from dpr_lib.encoder import cuda_available

        use_gpu = t.device == "cuda" or (t.device == "auto" and cuda_available())
        result = TorchDistributor(num_processes=t.num_processes, local_mode=t.local_mode,
                                  use_gpu=use_gpu).run(train_worker, args)
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["data"] = data
    result["encode_with"] = [f"encoder.model={result['model']}", f"encoder.question_model={result['question_model']}"]
    log.info("trained %d steps in %.0fs; encode with --set %s --set %s", result["steps"], result["wall_seconds"],
             *result["encode_with"])
    return result
