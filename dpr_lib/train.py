"""DPR bi-encoder training: in-batch + hard negatives, scaled out with TorchDistributor.

A global batch holds ``train.batch_size`` questions, each with its positive passage and
``train.hard_negatives`` hard negatives. Every question is scored against every passage of the
global batch (the other questions' positives and hard negatives are its negatives; identical
passages are counted once, so a passage shared by two questions is never a negative of a question
it answers) and the loss is the negative log-likelihood of its positive. With several processes
(TorchDistributor, DDP over gloo on CPU) each holds an equal slice of the questions, the passage
embeddings are all-gathered with autograd (``torch.distributed.nn.functional.all_gather``) so the
negatives are the whole global batch as in DPR, and the gradients are averaged across processes:
the loss and the update are those of one process seeing the whole global batch.

Checkpoints are ordinary transformers model directories (``question_encoder/``,
``passage_encoder/``, with the sentence-transformers pooling files of the starting model) that the
encode job loads as ``encoder.model`` / ``encoder.question_model``, plus ``trainer_state.pt``
(optimizer, schedule, step) for resuming. They are written to a local path or any fsspec URL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from dpr_lib import storage
from dpr_lib.config import Config, join_url
from dpr_lib.errors import InputError

log = logging.getLogger("dpr_lib.train")

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling", "2_Normalize")
COMPLETE = "COMPLETE"
ROLES = ("question_encoder", "passage_encoder")


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class TrainSet:
    """Questions and a de-duplicated passage pool; positives / hard negatives index the pool."""

    questions: list[str]
    positives: list[list[int]]
    hard: list[list[int]]
    titles: list[str]
    texts: list[str]
    skipped: dict

    def __len__(self) -> int:
        return len(self.questions)


def _records(url: str, storage_options: dict | None):
    files = [f for f in storage.list_files(url, "", storage_options) if f.endswith((".jsonl", ".json"))]
    if not files:
        raise InputError(f"no training data (.jsonl or .json) under {url}")
    for f in files:
        fs, path = storage.get_fs(f, storage_options)
        with fs.open(path, "rt", encoding="utf-8") as fh:
            head = fh.read(1)
            while head and head.isspace():
                head = fh.read(1)
            fh.seek(0)
            if head == "[":                          # DPR's own biencoder files: one JSON list
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{f}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
                for i, rec in enumerate(data):
                    yield f"{f}[{i}]", rec
            else:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield f"{f}:{n}", json.loads(line)
                        except json.JSONDecodeError as exc:
                            yield f"{f}:{n}", exc


def load_training_data(url: str, storage_options: dict | None = None) -> TrainSet:
    """Read DPR biencoder records (JSON Lines, or DPR's JSON list); records without a question or a
    positive passage are skipped and counted; too many bad records fail naming the file."""
    from dpr_lib.datasets import check_bad, skip_bad

    pool: dict[tuple[str, str], int] = {}
    ts = TrainSet([], [], [], [], [], {})

    def ctx_ids(ctxs) -> list[int]:
        out = []
        for c in ctxs or []:
            if isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"].strip():
                key = (str(c.get("title") or ""), c["text"])
                if key not in pool:
                    pool[key] = len(ts.titles)
                    ts.titles.append(key[0])
                    ts.texts.append(key[1])
                out.append(pool[key])
        return out

    total = 0
    for where, rec in _records(url, storage_options):
        total += 1
        if isinstance(rec, Exception):
            skip_bad(ts.skipped, "invalid_json", where, str(rec))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
            skip_bad(ts.skipped, "no_question", where, "no 'question' text")
            continue
        pos = ctx_ids(rec.get("positive_ctxs"))
        if not pos:
            skip_bad(ts.skipped, "no_positive", where, "no positive_ctxs with text")
            continue
        hard = [h for h in ctx_ids(rec.get("hard_negative_ctxs")) if h not in pos]
        ts.questions.append(rec["question"].strip())
        ts.positives.append(pos)
        ts.hard.append(hard)
    check_bad(ts.skipped, total, url)
    if len(ts) < 2:
        raise InputError(f"{url}: {len(ts)} usable training questions; in-batch training needs at least 2")
    return ts


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) question indices: a seeded, disjoint split."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n - 2)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def batch_passages(ts: TrainSet, questions: np.ndarray, epoch: int, n_hard: int, hard_pool: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each question: [positive, n_hard hard negatives] as pool indices, shape [B, 1 + n_hard],
    and the positives [B]. Hard negatives are drawn from each question's top ``hard_pool``; a
    question with too few is topped up with random passages that are not its positives. Seeded by
    (seed, epoch, question), so every process and every rerun draws the same."""
    rows = np.empty((len(questions), 1 + n_hard), np.int64)
    for r, qi in enumerate(questions):
        rng = np.random.default_rng([seed, epoch, int(qi)])
        pos = ts.positives[qi]
        cand = ts.hard[qi][:hard_pool]
        chosen = list(rng.choice(cand, size=min(n_hard, len(cand)), replace=False)) if cand and n_hard else []
        while len(chosen) < n_hard:
            x = int(rng.integers(len(ts.texts)))
            if x not in pos and x not in chosen:
                chosen.append(x)
        rows[r] = [pos[0], *chosen]
    return rows, rows[:, 0].copy()


# ---------------------------------------------------------------- loss

def biencoder_loss(q, p, p_ids, pos_ids, scale: float = 1.0):
    """NLL of each question's positive over the distinct passages of the batch.

    q [B, d] question vectors, p [M, d] passage vectors with ids ``p_ids`` [M] (the same id may
    occur several times: it is one candidate, scored once), ``pos_ids`` [B] the positive's id of
    each question. Scores are ``scale * q . p``."""
    import torch
    import torch.nn.functional as F

    uniq, inverse = torch.unique(p_ids, return_inverse=True)
    order = torch.arange(len(p_ids), device=p_ids.device)
    first = torch.full((len(uniq),), len(p_ids), dtype=torch.long, device=p_ids.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    target = torch.searchsorted(uniq, pos_ids)
    scores = scale * (q @ p[first].T)
    return F.cross_entropy(scores, target)


# ---------------------------------------------------------------- models

def _specs(cfg: Config) -> tuple:
    from dpr_lib.encode import resolve_spec

    base = cfg.train.model or cfg.encoder.model
    qbase = cfg.train.model or cfg.encoder.question_model or base
    ecfg = dataclasses.replace(cfg.encoder, model=base, question_model=qbase, dtype="fp32")
    opts = cfg.storage_options()
    pspec = resolve_spec(ecfg, cfg.path("cache_dir"), role="passage", storage_options=opts)
    qspec = resolve_spec(ecfg, cfg.path("cache_dir"), role="question", storage_options=opts)
    return qspec, pspec


class _Side:
    """One encoder (model + tokenizer + how it pools) being trained."""

    def __init__(self, spec, dropout: float, model=None, device="cpu"):
        from transformers import AutoTokenizer

        from dpr_lib.encode import load_model

        self.spec = spec
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, use_fast=True)
        overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout} if dropout >= 0 else {}
        self.model = model if model is not None else load_model(spec, **overrides).to(device)

    def embed(self, titles, texts, max_length: int, token_budget: int = 0):
        """Vectors [n, d] with autograd, in input order. Sequences run in length-sorted chunks of
        about ``token_budget`` padded tokens (default 1,024 on CPU, 65,536 on a GPU): one padded
        batch of mixed lengths costs about 2.5x the time on CPU (measured: 64 SQuAD passages,
        forward 8.6 s vs 2.9 s sorted)."""
        import torch

        from dpr_lib.encode import length_batches, model_inputs, pool, tokenize

        ids, types, _ = tokenize(self.tokenizer, titles, texts, max_length)
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        token_budget = token_budget or (1024 if torch.device(self.device).type == "cpu" else 65536)
        chunks = length_batches(lengths, token_budget)
        parts = []
        for c in chunks:
            kwargs = model_inputs(self.tokenizer, [ids[i] for i in c], [types[i] for i in c], self.device,
                                  self.spec.family == "dpr")
            parts.append(pool(self.model(**kwargs), kwargs["attention_mask"], self.spec.pooling, self.spec.normalize))
        order = torch.from_numpy(np.concatenate(chunks)).to(parts[0].device)
        return torch.cat(parts)[torch.argsort(order)]


def save_model_dir(side: _Side, dest: str, provenance: dict) -> None:
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


def _publish_dir(local_dir: str, url: str, storage_options: dict | None) -> None:
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


def _local_copy(url: str, storage_options: dict | None) -> str:
    if storage.is_local(url):
        return storage.local_path(url)
    dest = tempfile.mkdtemp(prefix="dpr_ckpt_")
    fs, path = storage.get_fs(url, storage_options)
    storage.retry(lambda: fs.get(path.rstrip("/") + "/", dest, recursive=True), f"download {url}")
    return dest


# ---------------------------------------------------------------- the worker (one per process)

def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def validate(q: _Side, p: _Side, ts: TrainSet, val: np.ndarray, args: dict) -> dict:
    """Rank of each held-out question's positive among the held-out questions' passages
    (positives + hard negatives): DPR's average-rank validation, plus top-k accuracy.

    Questions are held out, not passages: a held-out question's paragraph may be another training
    question's positive, so this tracks training, and the evaluation job measures generalisation."""
    import torch

    ids = sorted({int(x) for qi in val for x in [ts.positives[qi][0], *ts.hard[qi][:args["hard_negatives"]]]})
    col = {x: i for i, x in enumerate(ids)}
    was = q.model.training
    q.model.eval()
    p.model.eval()
    with torch.no_grad():
        # embed() already runs in length-sorted chunks of a bounded token budget.
        pv = p.embed([ts.titles[x] for x in ids], [ts.texts[x] for x in ids], args["max_length"])
        qv = q.embed(None, [ts.questions[qi] for qi in val], args["max_question_length"])
        scores = qv @ pv.T
        target = torch.tensor([col[ts.positives[qi][0]] for qi in val], device=scores.device)
        best = scores[torch.arange(len(val), device=scores.device), target][:, None]
        ranks = (scores > best).sum(1).cpu().numpy()
    q.model.train(was)
    p.model.train(was)
    return {"val_questions": len(val), "val_passages": len(ids), "avg_rank": round(float(ranks.mean()), 3),
            **{f"top{k}": round(float((ranks < k).mean()), 4) for k in (1, 5, 20)}}


def train_worker(args: dict) -> dict:
    """Train in this process (rank ``RANK`` of ``WORLD_SIZE``, as set by torchrun/TorchDistributor)."""
    import torch
    import torch.distributed as dist

    from dpr_lib.cli import setup_logging

    setup_logging()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = args["device"] in ("auto", "cuda") and torch.cuda.is_available()
    if args["device"] == "cuda" and not cuda:
        log.warning("train.device=cuda but CUDA is not available: training on CPU")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(args["threads"] or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args["seed"] + rank)
    opts = args["storage_options"]
    ts = load_training_data(args["data"], opts)
    train_idx, val_idx = split(len(ts), args["val_fraction"], args["seed"])
    B, W = args["batch_size"], world
    b = B // W
    steps_per_epoch = len(train_idx) // B
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_idx)} training questions do not fill one batch of {B}")
    total = args["max_steps"] or max(1, math.ceil(args["epochs"] * steps_per_epoch))

    start_step, state = 0, None
    qdir, pdir = args["qspec"].model_dir, args["pspec"].model_dir
    if args["resume"]:
        local = _local_copy(args["resume"], opts)
        qdir, pdir = os.path.join(local, ROLES[0]), os.path.join(local, ROLES[1])
        state = torch.load(os.path.join(local, "trainer_state.pt"), weights_only=False)
        start_step = int(state["step"])
        if rank == 0:
            log.info("resuming from %s at step %d", args["resume"], start_step)
    pside = _Side(dataclasses.replace(args["pspec"], model_dir=pdir), args["dropout"], device=device)
    pside.spec = args["pspec"]  # pooling files and provenance come from the starting model
    if args["shared"]:
        qside = _Side(args["qspec"], args["dropout"], model=pside.model, device=device)
    else:
        qside = _Side(dataclasses.replace(args["qspec"], model_dir=qdir), args["dropout"], device=device)
        qside.spec = args["qspec"]
    if args["resume"] and not storage.is_local(args["resume"]):
        shutil.rmtree(local, ignore_errors=True)       # the downloaded checkpoint is loaded: drop the copy
    qside.model.train()
    pside.model.train()
    params = list(pside.model.parameters()) + ([] if args["shared"] else list(qside.model.parameters()))
    decay = [x for x in params if x.ndim > 1]
    no_decay = [x for x in params if x.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args["lr"], eps=1e-8)
    warm = args["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    out = args["out"].rstrip("/")
    log_local = storage.local_path(join_url(out, "train_log.jsonl")) if storage.is_local(out) else \
        os.path.join(tempfile.mkdtemp(prefix="dpr_train_"), "train_log.jsonl")
    if rank == 0:
        os.makedirs(os.path.dirname(log_local), exist_ok=True)
    logf = open(log_local, "a", encoding="utf-8") if rank == 0 else None

    def record(entry: dict) -> None:
        if logf is not None:
            logf.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
            logf.flush()

    def gather(t):
        if world == 1:
            return t
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated for a private successor; still the public autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(t))

    def gather_ids(t):
        if world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def checkpoint(step: int, name: str, metrics: dict) -> str:
        url = join_url(out, name)
        stage = tempfile.mkdtemp(prefix="dpr_ckpt_")
        try:
            prov = {"base_model": args["pspec"].model_id, "step": step, "similarity": args["similarity"],
                    "scale": args["scale"], "shared_encoder": args["shared"], "metrics": metrics}
            save_model_dir(qside, os.path.join(stage, ROLES[0]), {**prov, "role": "question"})
            save_model_dir(pside, os.path.join(stage, ROLES[1]), {**prov, "role": "passage"})
            torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "world_size": world, "batch_size": B}, os.path.join(stage, "trainer_state.pt"))
            if not storage.is_local(out):
                shutil.copy2(log_local, os.path.join(stage, "train_log.jsonl"))
            _publish_dir(stage, url, opts)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if name.startswith("checkpoint-"):
            for _, old in list_checkpoints(out, opts)[:-args["keep_checkpoints"]]:
                fs, path = storage.get_fs(old, opts)
                fs.rm(path, recursive=True)
        log.info("checkpoint %s (step %d)", url, step)
        return url

    cosine = args["similarity"] == "cosine"
    scale = args["scale"] if cosine else 1.0
    use_bf16 = args["dtype"] == "bf16"
    if rank == 0:
        log.info("training %d questions (%d held out), %d passages: %d steps of %d questions x (1 + %d hard "
                 "negatives) over %d process(es) on %s, %s similarity%s, lr %g", len(train_idx), len(val_idx),
                 len(ts.texts), total, B, args["hard_negatives"], world, device, args["similarity"],
                 f" x {scale:g}" if cosine else "", args["lr"])
        record({"event": "start", "device": str(device), "step": start_step, "total_steps": total, "questions": len(train_idx),
                "val_questions": len(val_idx), "world_size": world, "batch_size": B, "skipped": ts.skipped})
    bar = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
    losses, last_val = [], {}
    if rank == 0 and len(val_idx) and start_step == 0 and args["val_every"]:
        first = validate(qside, pside, ts, val_idx, args)     # the starting model, for comparison
        record({"event": "validation", "step": 0, **first})
        log.info("validation of the starting model: %s", first)
    if world > 1:
        dist.barrier()
    t_start = time.time()
    step = start_step
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = train_idx[np.random.default_rng([args["seed"], epoch]).permutation(len(train_idx))]
        qs = order[k * B:(k + 1) * B]
        rows, pos = batch_passages(ts, qs, epoch, args["hard_negatives"], args["hard_negative_pool"], args["seed"])
        mine = slice(rank * b, (rank + 1) * b)
        flat = rows[mine].reshape(-1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            qv = qside.embed(None, [ts.questions[i] for i in qs[mine]], args["max_question_length"])
            pv = pside.embed([ts.titles[i] for i in flat], [ts.texts[i] for i in flat], args["max_length"])
        qv, pv = qv.float(), pv.float()
        if cosine:
            qv = torch.nn.functional.normalize(qv, dim=-1)
            pv = torch.nn.functional.normalize(pv, dim=-1)
        loss = biencoder_loss(qv, gather(pv), gather_ids(torch.from_numpy(flat).to(device)),
                              torch.from_numpy(pos[mine]).to(device), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in params]
            flat_g = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat_g)
            flat_g /= world
            offset = 0
            for x, g in zip(params, grads):
                x.grad = flat_g[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            global_loss = float(global_loss) / world
        else:
            global_loss = float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args["max_grad_norm"]))
        opt.step()
        sched.step()
        step += 1
        losses.append(global_loss)
        if rank == 0:
            done = step - start_step
            rate = done * B / (time.time() - t_start)
            eta = (total - step) * B / rate if rate else 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{global_loss:.3f}", q_per_s=f"{rate:.1f}")
                bar.update(1)
            if step % args["log_every"] == 0 or step == total:
                window = losses[-args["log_every"]:]
                record({"event": "train", "step": step, "epoch": round(step / steps_per_epoch, 3),
                        "loss": round(float(np.mean(window)), 5), "lr": sched.get_last_lr()[0],
                        "grad_norm": round(grad_norm, 4), "questions_per_s": round(rate, 2)})
                if bar is None:
                    log.info("step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f questions/s ETA %s", step, total,
                             100.0 * step / total, float(np.mean(window)), sched.get_last_lr()[0], rate, _fmt_s(eta))
        is_last = step == total
        if rank == 0 and len(val_idx) and (is_last or (args["val_every"] and step % args["val_every"] == 0)):
            last_val = validate(qside, pside, ts, val_idx, args)
            record({"event": "validation", "step": step, **last_val})
            log.info("validation at step %d: %s", step, last_val)
        if rank == 0 and not is_last and args["checkpoint_every"] and step % args["checkpoint_every"] == 0:
            checkpoint(step, f"checkpoint-{step}", last_val)
        if world > 1:
            dist.barrier()
    result = {"steps": step, "start_step": start_step, "total_steps": total, "losses": losses,
              "world_size": world, "batch_size": B, "seconds": round(time.time() - t_start, 1),
              "questions": len(train_idx), "val_questions": len(val_idx), "validation": last_val,
              "skipped": ts.skipped}
    if rank == 0:
        result["questions_per_s"] = round((step - start_step) * B / max(1e-9, time.time() - t_start), 2)
        record({"event": "end", **{k: v for k, v in result.items() if k != "losses"}})
        if bar is not None:
            bar.close()
        logf.close()
        checkpoint(step, "final", last_val)
    # Every rank returns the same paths: TorchDistributor hands back one process's result.
    final = join_url(out, "final")
    result["model"] = join_url(final, ROLES[1])
    result["question_model"] = join_url(final, ROLES[0])
    result["log"] = join_url(out, "train_log.jsonl") if storage.is_local(out) else join_url(final, "train_log.jsonl")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


# ---------------------------------------------------------------- the job

def train_encoder(spark, cfg: Config, data: str, out: str, resume: str | None = None) -> dict:
    """Train question + passage encoders on DPR biencoder data; returns the final figures.

    With ``spark`` the training runs under TorchDistributor with ``train.num_processes``
    processes (``num_processes=1`` locally runs the very same code path); ``spark=None`` runs
    one process here (tests, notebooks). ``resume``: a checkpoint URL, or ``auto`` for the newest
    complete checkpoint under ``out``."""
    t = cfg.train
    opts = cfg.storage_options()
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
    qspec, pspec = _specs(cfg)
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

        from dpr_lib.encode import cuda_available

        use_gpu = t.device == "cuda" or (t.device == "auto" and cuda_available())
        result = TorchDistributor(num_processes=t.num_processes, local_mode=t.local_mode,
                                  use_gpu=use_gpu).run(train_worker, args)
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["data"] = data
    result["encode_with"] = [f"encoder.model={result['model']}", f"encoder.question_model={result['question_model']}"]
    log.info("trained %d steps in %.0fs; encode with --set %s --set %s", result["steps"], result["wall_seconds"],
             *result["encode_with"])
    return result


