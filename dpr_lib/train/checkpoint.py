"""Checkpoints: ordinary transformers model directories (``question_encoder/``,
``passage_encoder/``, with the starting model's sentence-transformers pooling files) that the
encode job loads, plus ``trainer_state.pt`` (optimizer, schedule, step: tensors and numbers only,
loaded with ``weights_only=True``, so a checkpoint fetched from storage cannot run code), written
to a local path or any fsspec URL and marked ``COMPLETE`` last."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from dpr_lib import storage
from dpr_lib.config import join_url
from dpr_lib.train.model import Side

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling", "2_Normalize")
COMPLETE = "COMPLETE"
ROLES = ("question_encoder", "passage_encoder")
STATE = "trainer_state.pt"


def save_model_dir(side: Side, dest: str, provenance: dict) -> None:
    """An ordinary transformers model directory the encode job loads (weights, config, tokenizer,
    and the starting model's sentence-transformers pooling/normalisation files)."""
    side.model.save_pretrained(dest, safe_serialization=True)
    side.tokenizer.save_pretrained(dest)
    for name in ST_FILES:
        src = os.path.join(side.spec.model_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), dirs_exist_ok=True)
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(dest, name))
    if side.spec.family != "dpr" and side.spec.pooling in ("mean", "cls"):
        # The pooling and normalisation it was trained with, in the sentence-transformers files the
        # encode job's `auto` settings read: the checkpoint encodes as trained without extra config.
        os.makedirs(os.path.join(dest, "1_Pooling"), exist_ok=True)
        with open(os.path.join(dest, "1_Pooling", "config.json"), "w", encoding="utf-8") as fh:
            json.dump({"word_embedding_dimension": side.spec.dim,
                       "pooling_mode_cls_token": side.spec.pooling == "cls",
                       "pooling_mode_mean_tokens": side.spec.pooling == "mean"}, fh, indent=2)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if side.spec.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(dest, "2_Normalize"), exist_ok=True)
        with open(os.path.join(dest, "modules.json"), "w", encoding="utf-8") as fh:
            json.dump(modules, fh, indent=2)
    with open(os.path.join(dest, "dpr_training.json"), "w", encoding="utf-8") as fh:
        json.dump(provenance, fh, indent=2)


def publish_dir(local_dir: str, url: str, storage_options: dict | None) -> None:
    """Copy a finished local directory to ``url`` and mark it complete last."""
    if storage.is_local(url):
        dest = storage.local_path(url)
        if os.path.abspath(local_dir) != os.path.abspath(dest):
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.copytree(local_dir, dest)
    else:
        fs, path = storage.get_fs(url, storage_options)
        if storage.retry(lambda: fs.exists(path), f"stat {url}"):
            storage.retry(lambda: fs.rm(path, recursive=True), f"remove {url}")
        storage.retry(lambda: fs.put(local_dir.rstrip("/") + "/", path, recursive=True), f"upload {url}")
    storage.write_bytes_atomic(join_url(url, COMPLETE), b"", storage_options)


def list_checkpoints(out: str, storage_options: dict | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints under ``out`` as (step, url), oldest first."""
    fs, path = storage.get_fs(out, storage_options)
    if not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint-") and name[11:].isdigit() and fs.exists(f"{p.rstrip('/')}/{COMPLETE}"):
            found.append((int(name[11:]), join_url(out, name)))
    return sorted(found)


def local_copy(url: str, storage_options: dict | None) -> str:
    if storage.is_local(url):
        return storage.local_path(url)
    dest = tempfile.mkdtemp(prefix="dpr_ckpt_")
    fs, path = storage.get_fs(url, storage_options)
    storage.retry(lambda: fs.get(path.rstrip("/") + "/", dest, recursive=True), f"download {url}")
    return dest


def save_state(path: str, step: int, optimizer, scheduler, world_size: int, batch_size: int) -> None:
    import torch

    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "world_size": world_size, "batch_size": batch_size}, path)


def load_state(path: str) -> dict:
    """A ``trainer_state.pt``, unpickled with torch's weights-only loader: tensors, numbers,
    strings and containers only; anything else (code) is refused."""
    import torch

    from dpr_lib.errors import InputError, refused_pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
        raise InputError(f"{path}: not a trainer state this product wrote, refused by the weights-only "
                         f"loader ({refused_pickle(exc)}); it was not executed") from None
