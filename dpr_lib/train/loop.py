"""One training process: :class:`Trainer` sets up (data, encoders, optimizer, schedule, resume),
then ``step()`` runs one optimizer step on the next global batch, ``validate()`` ranks the
held-out questions' positives, ``checkpoint()`` writes a resumable checkpoint; ``run()`` loops
them. ``train_worker`` is what TorchDistributor (or the job, in one process) calls.

A global batch holds ``train.batch_size`` questions, each with its positive and
``train.hard_negatives`` hard negatives. With several processes each holds an equal slice of the
questions; passage embeddings are all-gathered with autograd so every question sees the whole
global batch as negatives, and gradients are averaged: the update is that of one process seeing
the whole batch.
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
from dpr_lib.config import join_url
from dpr_lib.errors import InputError
from dpr_lib.train.checkpoint import (
    ROLES,
    STATE,
    list_checkpoints,
    load_state,
    local_copy,
    publish_dir,
    save_model_dir,
    save_state,
)
from dpr_lib.train.data import TrainSet, batch_passages, load_training_data, split
from dpr_lib.train.loss import biencoder_loss
from dpr_lib.train.model import Side

log = logging.getLogger("dpr_lib.train")


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def validate(q: Side, p: Side, ts: TrainSet, val: np.ndarray, args: dict) -> dict:
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


class Trainer:
    """The state of one training process (rank ``RANK`` of ``WORLD_SIZE``, as set by
    torchrun/TorchDistributor). ``args``: the plain dict :func:`dpr_lib.train.job.train_encoder`
    builds (picklable for TorchDistributor)."""

    def __init__(self, args: dict):
        import torch
        import torch.distributed as dist

        self.args = args
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        cuda = args["device"] in ("auto", "cuda") and torch.cuda.is_available()
        if args["device"] == "cuda" and not cuda:
            log.warning("train.device=cuda but CUDA is not available: training on CPU")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        torch.set_num_threads(args["threads"] or max(1, (os.cpu_count() or 1) // self.world))
        torch.manual_seed(args["seed"] + self.rank)
        self.opts = args["storage_options"]
        self.ts = load_training_data(args["data"], self.opts)
        self.train_idx, self.val_idx = split(len(self.ts), args["val_fraction"], args["seed"])
        self.batch = args["batch_size"]
        self.steps_per_epoch = len(self.train_idx) // self.batch
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(self.train_idx)} training questions do not fill one batch of {self.batch}")
        self.total = args["max_steps"] or max(1, math.ceil(args["epochs"] * self.steps_per_epoch))
        state = self._load_encoders()
        self.params = list(self.pside.model.parameters()) + \
            ([] if args["shared"] else list(self.qside.model.parameters()))
        decay = [x for x in self.params if x.ndim > 1]
        no_decay = [x for x in self.params if x.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args["weight_decay"]},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=args["lr"], eps=1e-8)
        warm, total = args["warmup_steps"], self.total
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        self.cosine = args["similarity"] == "cosine"
        self.scale = args["scale"] if self.cosine else 1.0
        self.out = args["out"].rstrip("/")
        self.log_local = storage.local_path(join_url(self.out, "train_log.jsonl")) if storage.is_local(self.out) \
            else os.path.join(tempfile.mkdtemp(prefix="dpr_train_"), "train_log.jsonl")
        self.logf = None
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.log_local), exist_ok=True)
            self.logf = open(self.log_local, "a", encoding="utf-8")
        self.losses: list[float] = []
        self.last_val: dict = {}

    def _load_encoders(self) -> dict | None:
        """Both encoders, from the starting models or the checkpoint to resume; the trainer state
        of that checkpoint (None when starting afresh)."""
        args = self.args
        self.start_step, state = 0, None
        qdir, pdir = args["qspec"].model_dir, args["pspec"].model_dir
        local = None
        if args["resume"]:
            local = local_copy(args["resume"], self.opts)
            qdir, pdir = os.path.join(local, ROLES[0]), os.path.join(local, ROLES[1])
            state = load_state(os.path.join(local, STATE))
            self.start_step = int(state["step"])
            if self.rank == 0:
                log.info("resuming from %s at step %d", args["resume"], self.start_step)
        self.pside = Side(dataclasses.replace(args["pspec"], model_dir=pdir), args["dropout"], device=self.device)
        self.pside.spec = args["pspec"]  # pooling files and provenance come from the starting model
        if args["shared"]:
            self.qside = Side(args["qspec"], args["dropout"], model=self.pside.model, device=self.device)
        else:
            self.qside = Side(dataclasses.replace(args["qspec"], model_dir=qdir), args["dropout"], device=self.device)
            self.qside.spec = args["qspec"]
        if local and not storage.is_local(args["resume"]):
            shutil.rmtree(local, ignore_errors=True)       # the downloaded checkpoint is loaded: drop the copy
        self.qside.model.train()
        self.pside.model.train()
        return state

    # ------------------------------------------------------------ helpers

    def record(self, entry: dict) -> None:
        if self.logf is not None:
            self.logf.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
            self.logf.flush()

    def _gather(self, t):
        """All processes' rows of ``t``, with autograd (a process's gradient reaches its own rows)."""
        if self.world == 1:
            return t
        import warnings

        import torch
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated for a private successor; still the public autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(t))

    def _gather_ids(self, t):
        if self.world == 1:
            return t
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def _average_gradients(self, loss) -> float:
        """Average the gradients over the processes; returns the global mean loss."""
        if self.world == 1:
            return float(loss.detach())
        import torch
        import torch.distributed as dist

        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in self.params]
        flat_g = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat_g)
        flat_g /= self.world
        offset = 0
        for x, g in zip(self.params, grads):
            x.grad = flat_g[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        return float(global_loss) / self.world

    # ------------------------------------------------------------ the three operations

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(questions [B], passages [B, 1 + hard], positives [B]) of global step ``step``: a seeded
        permutation per epoch, so every process and every resumed run sees the same batches."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.train_idx[np.random.default_rng([self.args["seed"], epoch]).permutation(len(self.train_idx))]
        qs = order[k * self.batch:(k + 1) * self.batch]
        rows, pos = batch_passages(self.ts, qs, epoch, self.args["hard_negatives"], self.args["hard_negative_pool"],
                                   self.args["seed"])
        return qs, rows, pos

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step on the global batch of ``step``: (global loss, gradient norm)."""
        import torch

        args, ts, dev = self.args, self.ts, self.device
        qs, rows, pos = self.batch_at(step)
        b = self.batch // self.world
        mine = slice(self.rank * b, (self.rank + 1) * b)
        flat = rows[mine].reshape(-1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args["dtype"] == "bf16"):
            qv = self.qside.embed(None, [ts.questions[i] for i in qs[mine]], args["max_question_length"])
            pv = self.pside.embed([ts.titles[i] for i in flat], [ts.texts[i] for i in flat], args["max_length"])
        qv, pv = qv.float(), pv.float()
        if self.cosine:
            qv = torch.nn.functional.normalize(qv, dim=-1)
            pv = torch.nn.functional.normalize(pv, dim=-1)
        loss = biencoder_loss(qv, self._gather(pv), self._gather_ids(torch.from_numpy(flat).to(dev)),
                              torch.from_numpy(pos[mine]).to(dev), self.scale)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        global_loss = self._average_gradients(loss)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, args["max_grad_norm"]))
        self.opt.step()
        self.sched.step()
        return global_loss, grad_norm

    def validate(self) -> dict:
        return validate(self.qside, self.pside, self.ts, self.val_idx, self.args)

    def checkpoint(self, step: int, name: str, metrics: dict) -> str:
        """Write both encoders and the trainer state under ``<out>/<name>`` (staged locally, marked
        complete last); keeps the newest ``train.keep_checkpoints`` periodic checkpoints."""
        args, url = self.args, join_url(self.out, name)
        stage = tempfile.mkdtemp(prefix="dpr_ckpt_")
        try:
            prov = {"base_model": args["pspec"].model_id, "step": step, "similarity": args["similarity"],
                    "scale": args["scale"], "shared_encoder": args["shared"], "metrics": metrics}
            save_model_dir(self.qside, os.path.join(stage, ROLES[0]), {**prov, "role": "question"})
            save_model_dir(self.pside, os.path.join(stage, ROLES[1]), {**prov, "role": "passage"})
            save_state(os.path.join(stage, STATE), step, self.opt, self.sched, self.world, self.batch)
            if not storage.is_local(self.out):
                shutil.copy2(self.log_local, os.path.join(stage, "train_log.jsonl"))
            publish_dir(stage, url, self.opts)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if name.startswith("checkpoint-"):
            for _, old in list_checkpoints(self.out, self.opts)[:-args["keep_checkpoints"]]:
                fs, path = storage.get_fs(old, self.opts)
                fs.rm(path, recursive=True)
        log.info("checkpoint %s (step %d)", url, step)
        return url

    # ------------------------------------------------------------ the loop

    def _log_step(self, step: int, loss: float, grad_norm: float, t_start: float, bar) -> None:
        args, total = self.args, self.total
        rate = (step - self.start_step) * self.batch / (time.time() - t_start)
        eta = (total - step) * self.batch / rate if rate else 0.0
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", q_per_s=f"{rate:.1f}")
            bar.update(1)
        if step % args["log_every"] == 0 or step == total:
            window = self.losses[-args["log_every"]:]
            self.record({"event": "train", "step": step, "epoch": round(step / self.steps_per_epoch, 3),
                         "loss": round(float(np.mean(window)), 5), "lr": self.sched.get_last_lr()[0],
                         "grad_norm": round(grad_norm, 4), "questions_per_s": round(rate, 2)})
            if bar is None:
                log.info("step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f questions/s ETA %s", step, total,
                         100.0 * step / total, float(np.mean(window)), self.sched.get_last_lr()[0], rate, _fmt_s(eta))

    def run(self) -> dict:
        import torch.distributed as dist

        args, rank, total = self.args, self.rank, self.total
        if rank == 0:
            log.info("training %d questions (%d held out), %d passages: %d steps of %d questions x (1 + %d hard "
                     "negatives) over %d process(es) on %s, %s similarity%s, lr %g", len(self.train_idx),
                     len(self.val_idx), len(self.ts.texts), total, self.batch, args["hard_negatives"], self.world,
                     self.device, args["similarity"], f" x {self.scale:g}" if self.cosine else "", args["lr"])
            self.record({"event": "start", "device": str(self.device), "step": self.start_step, "total_steps": total,
                         "questions": len(self.train_idx), "val_questions": len(self.val_idx),
                         "world_size": self.world, "batch_size": self.batch, "skipped": self.ts.skipped})
        bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.start_step, unit="step", dynamic_ncols=True)
        if rank == 0 and len(self.val_idx) and self.start_step == 0 and args["val_every"]:
            first = self.validate()     # the starting model, for comparison
            self.record({"event": "validation", "step": 0, **first})
            log.info("validation of the starting model: %s", first)
        if self.world > 1:
            dist.barrier()
        t_start = time.time()
        step = self.start_step
        while step < total:
            loss, grad_norm = self.step(step)
            step += 1
            self.losses.append(loss)
            if rank == 0:
                self._log_step(step, loss, grad_norm, t_start, bar)
            is_last = step == total
            if rank == 0 and len(self.val_idx) and (is_last or (args["val_every"] and step % args["val_every"] == 0)):
                self.last_val = self.validate()
                self.record({"event": "validation", "step": step, **self.last_val})
                log.info("validation at step %d: %s", step, self.last_val)
            if rank == 0 and not is_last and args["checkpoint_every"] and step % args["checkpoint_every"] == 0:
                self.checkpoint(step, f"checkpoint-{step}", self.last_val)
            if self.world > 1:
                dist.barrier()
        result = {"steps": step, "start_step": self.start_step, "total_steps": total, "losses": self.losses,
                  "world_size": self.world, "batch_size": self.batch, "seconds": round(time.time() - t_start, 1),
                  "questions": len(self.train_idx), "val_questions": len(self.val_idx), "validation": self.last_val,
                  "skipped": self.ts.skipped}
        if rank == 0:
            result["questions_per_s"] = round((step - self.start_step) * self.batch / max(1e-9, time.time() - t_start), 2)
            self.record({"event": "end", **{k: v for k, v in result.items() if k != "losses"}})
            if bar is not None:
                bar.close()
            self.logf.close()
            self.checkpoint(step, "final", self.last_val)
        # Every rank returns the same paths: TorchDistributor hands back one process's result.
        final = join_url(self.out, "final")
        result["model"] = join_url(final, ROLES[1])
        result["question_model"] = join_url(final, ROLES[0])
        result["log"] = join_url(self.out, "train_log.jsonl") if storage.is_local(self.out) \
            else join_url(final, "train_log.jsonl")
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result


def train_worker(args: dict) -> dict:
    """Train in this process: what TorchDistributor runs in each of its processes."""
    from dpr_lib import storage
    from dpr_lib.cli import setup_logging

    setup_logging()
    storage.use_options(args["storage_options"])  # its own process: the job's options bound here too
    return Trainer(args).run()
