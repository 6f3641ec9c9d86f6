"""DPR bi-encoder training: in-batch + hard negatives, scaled out with TorchDistributor.

A global batch holds ``train.batch_size`` questions, each with its positive passage and
``train.hard_negatives`` hard negatives. Every question is scored against every passage of the
global batch (the other questions' positives and hard negatives are its negatives; identical
passages are counted once, so a passage shared by two questions is never a negative of a question
it answers) and the loss is the negative log-likelihood of its positive. With several processes
(TorchDistributor, DDP over gloo on CPU) each holds an equal slice of the questions, the passage
embeddings are all-gathered with autograd so the negatives are the whole global batch as in DPR,
and the gradients are averaged: the loss and the update are those of one process seeing the
whole global batch.

Modules, in the order a batch flows: ``data`` (records -> TrainSet, split, batch passages),
``model`` (the two encoders), ``loss`` (the NLL), ``loop`` (one process: setup, step, validate,
checkpoint), ``checkpoint`` (model directories the encode job loads + a weights-only trainer
state), ``job`` (the entry point: one process here or many under TorchDistributor).
"""

from dpr_lib.train.checkpoint import list_checkpoints
from dpr_lib.train.data import TrainSet, batch_passages, load_training_data, split
from dpr_lib.train.job import train_encoder
from dpr_lib.train.loop import Trainer, train_worker
from dpr_lib.train.loss import biencoder_loss

__all__ = ["Trainer", "TrainSet", "batch_passages", "biencoder_loss", "list_checkpoints", "load_training_data",
           "split", "train_encoder", "train_worker"]
