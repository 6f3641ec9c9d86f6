"""Training pieces without Spark: the loss against a hand computation, batch drawing, data loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpr_lib.errors import InputError
from dpr_lib.train import TrainSet, batch_passages, biencoder_loss, load_training_data, split


def _nll(scores: list[float], target: int) -> float:
    m = max(scores)
    return -(scores[target] - m - math.log(sum(math.exp(s - m) for s in scores)))


def test_loss_equals_hand_computation_with_hard_negatives_and_duplicates():
    # 2 questions in 2-d; passages: q0 -> [P0 (pos), H0 (hard)], q1 -> [P1 (pos), P0 again as its hard negative]
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    vec = {10: [0.5, 0.1], 11: [0.2, 0.3], 20: [0.1, 0.9]}      # P0=10, H0=11, P1=20
    ids = [10, 11, 20, 10]
    p = torch.tensor([vec[i] for i in ids])
    loss = biencoder_loss(q, p, torch.tensor(ids), torch.tensor([10, 20]), scale=2.0)
    # Distinct candidates (sorted ids): 10, 11, 20 -- passage 10 is counted once.
    s0 = [2.0 * (1.0 * vec[i][0] + 0.0 * vec[i][1]) for i in (10, 11, 20)]
    s1 = [2.0 * (0.0 * vec[i][0] + 2.0 * vec[i][1]) for i in (10, 11, 20)]
    hand = (_nll(s0, 0) + _nll(s1, 2)) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    # The same vector under another id is another candidate: it enters both denominators, and the
    # product's loss moves by exactly that (so the de-duplication above is by id, and it matters).
    distinct = biencoder_loss(q, p, torch.tensor([10, 11, 20, 12]), torch.tensor([10, 20]), scale=2.0)
    hand_distinct = (_nll(s0 + [s0[0]], 0) + _nll(s1 + [s1[0]], 2)) / 2
    assert distinct.item() == pytest.approx(hand_distinct, rel=1e-6)
    assert distinct.item() != pytest.approx(loss.item(), rel=1e-3)


def test_loss_gradient_reaches_every_distinct_passage():
    q = torch.randn(3, 4)
    p = torch.randn(5, 4, requires_grad=True)
    ids = torch.tensor([7, 8, 9, 7, 6])
    biencoder_loss(q, p, ids, torch.tensor([7, 8, 9])).backward()
    grad_rows = (p.grad.abs().sum(1) > 0).tolist()
    assert grad_rows == [True, True, True, False, True]   # the duplicate (row 3) is not a second candidate


def _ts(n_q=6, n_hard=3) -> TrainSet:
    titles = [f"t{i}" for i in range(n_q * (1 + n_hard))]
    texts = [f"passage {i}" for i in range(len(titles))]
    pos = [[i * (1 + n_hard)] for i in range(n_q)]
    hard = [[i * (1 + n_hard) + j for j in range(1, 1 + n_hard)] for i in range(n_q)]
    hard[0] = []                                           # a question without hard negatives
    return TrainSet([f"q{i}" for i in range(n_q)], pos, hard, titles, texts, {})


def test_batch_passages_draws_from_the_pool_and_tops_up_deterministically():
    ts = _ts()
    rows, pos = batch_passages(ts, np.arange(6), epoch=0, n_hard=2, hard_pool=2, seed=1)
    assert rows.shape == (6, 3) and list(pos) == [p[0] for p in ts.positives]
    for qi in range(1, 6):
        assert set(rows[qi, 1:]) <= set(ts.hard[qi][:2])
    assert rows[0, 1] != rows[0, 0] and rows[0, 2] != rows[0, 0]      # random top-up, never its positive
    again, _ = batch_passages(ts, np.arange(6), epoch=0, n_hard=2, hard_pool=2, seed=1)
    assert (again == rows).all()
    # Per question, not per batch position: the same question draws the same in any batch.
    sub, _ = batch_passages(ts, np.array([3]), epoch=0, n_hard=2, hard_pool=2, seed=1)
    assert (sub[0] == rows[3]).all()


def test_split_is_disjoint_and_seeded():
    tr, va = split(100, 0.1, 7)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert (split(100, 0.1, 7)[1] == va).all() and not (split(100, 0.1, 8)[1] == va).all()


def test_load_training_data_jsonl_and_dpr_json(tmp_path):
    recs = [{"question": "who?", "answers": ["x"], "positive_ctxs": [{"title": "A", "text": "x is here"}],
             "hard_negative_ctxs": [{"title": "B", "text": "nothing"}, {"title": "A", "text": "x is here"}]},
            {"question": "what?", "answers": ["y"], "positive_ctxs": [{"title": "B", "text": "nothing"}]},
            {"question": "no positive", "positive_ctxs": []}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    ts = load_training_data(str(tmp_path / "a.jsonl"))
    assert ts.questions == ["who?", "what?"]
    assert ts.texts == ["x is here", "nothing"]                    # passages de-duplicated into one pool
    assert ts.positives == [[0], [1]] and ts.hard == [[1], []]     # a positive is never its own hard negative
    assert ts.skipped == {"no_positive": 1, "invalid_json": 1}
    (tmp_path / "dpr.json").write_text(json.dumps(recs[:2]))
    assert load_training_data(str(tmp_path / "dpr.json")).questions == ["who?", "what?"]


def test_load_training_data_errors(tmp_path):
    with pytest.raises(InputError, match="no training data"):
        load_training_data(str(tmp_path))
    (tmp_path / "bad.jsonl").write_text("\n".join("{not json" for _ in range(20)))
    with pytest.raises(InputError, match="20 of 20 records are bad"):
        load_training_data(str(tmp_path / "bad.jsonl"))
