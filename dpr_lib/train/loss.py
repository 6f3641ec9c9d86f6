"""The DPR loss: negative log-likelihood of each question's positive among every distinct
passage of the global batch (in-batch negatives + hard negatives)."""

from __future__ import annotations


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
