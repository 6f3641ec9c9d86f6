"""Training data mining (Spark, BM25) and the bi-encoder trainer (TorchDistributor, gloo) for real."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from conftest import make_config

from dpr_lib import storage
from dpr_lib.datasets import has_answer
from dpr_lib.errors import InputError

# Two real SQuAD training articles shipped with the tests (tests/data/README.md): the tests run
# in a clone without ../shared.
SQUAD_TRAIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "squad-train-2-articles.json.gz")


UNANSWERABLE = "zzqx-not-in-any-passage"


def _small_squad(path, articles: int = 2) -> str:
    """Two real SQuAD articles; the first question's answer is replaced by a string no passage has."""
    with gzip.open(SQUAD_TRAIN, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    data["data"] = data["data"][:articles]
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": UNANSWERABLE, "answer_start": 0}]
    path.write_text(json.dumps(data))
    return str(path)


def _read_jsonl(url: str) -> list[dict]:
    return [json.loads(line) for f in storage.list_files(url, ".jsonl") for line in open(f)]


@pytest.fixture(scope="module")
def mined(spark, tmp_path_factory):
    from dpr_lib.train_data import build_training_data

    tmp = tmp_path_factory.mktemp("mined")
    cfg = make_config(tmp, "train.mine_k=20", "train.hard_negatives_kept=4")
    stats = build_training_data(spark, cfg, _small_squad(tmp / "squad.json"), "squad", str(tmp / "out"))
    return stats, _read_jsonl(stats["data_url"])


def _toy_records(n: int) -> list[dict]:
    """Questions that share a rare word with their positive only (learnable by a tiny model)."""
    recs = []
    for i in range(n):
        recs.append({"question": f"where is token{i} kept",
                     "answers": [f"token{i}"],
                     "positive_ctxs": [{"title": f"doc {i}", "text": f"token{i} is kept in box {i} on shelf"}],
                     "hard_negative_ctxs": [{"title": f"doc {i}b", "text": f"box {i} on shelf holds nothing"}]})
    return recs


@pytest.fixture()
def toy_data(tmp_path):
    path = tmp_path / "toy" / "part-00000.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in _toy_records(40)) + "\n")
    return str(path.parent)


def _cfg(tmp_path, tiny_bert_dir, *extra):
    return make_config(tmp_path, f"encoder.model={tiny_bert_dir}", "encoder.pooling=mean", "train.batch_size=8",
                       "train.val_fraction=0.1", "train.log_every=1", "train.dropout=0", "train.warmup_steps=0",
                       *extra)


def test_mined_positives_contain_an_answer_and_hard_negatives_do_not(mined):
    stats, recs = mined
    assert stats["records"] == len(recs) > 500
    assert stats["records"] + stats["no_positive"] == stats["questions"]
    with_hard = 0
    for r in recs:
        assert set(r) >= {"question", "answers", "positive_ctxs", "hard_negative_ctxs", "negative_ctxs"}
        assert len(r["positive_ctxs"]) == 1 and has_answer(r["positive_ctxs"][0]["text"], r["answers"])
        assert len(r["hard_negative_ctxs"]) <= 4
        for h in r["hard_negative_ctxs"]:
            assert not has_answer(h["text"], r["answers"])
        scores = [h["score"] for h in r["hard_negative_ctxs"]]
        assert scores == sorted(scores, reverse=True)            # the top BM25 passages first
        with_hard += bool(r["hard_negative_ctxs"])
    assert with_hard > 0.95 * len(recs)


def test_mining_counts_and_keeps_questions_without_a_positive(mined):
    stats, recs = mined
    assert stats["no_positive_reasons"].get("no_gold_passage_contains_an_answer", 0) >= 1
    rejected = _read_jsonl(os.path.join(os.path.dirname(stats["data_url"]), "no_positive"))
    assert len(rejected) == stats["no_positive"]
    assert any(r["answers"] == [UNANSWERABLE] and r["reason"] == "no_gold_passage_contains_an_answer"
               for r in rejected)
    assert not any(r["answers"] == [UNANSWERABLE] for r in recs)


def test_mining_bm25_ranks_as_the_evaluation_bm25(mined):
    """The distributed BM25 orders candidates as bm25s (the evaluation baseline) does."""
    from dpr_lib.bm25 import Passages, bm25_topk

    stats, recs = mined
    table = Passages(stats["passages_table"])
    sample = recs[:40]
    _, ref = bm25_topk(table, [r["question"] for r in sample], 20)
    for r, row in zip(sample, ref):
        expected = [int(p) for p in row if not has_answer(table.texts[table.row_of[int(p)]], r["answers"])
                    and table.doc_id(int(p)) != table.doc_id(int(r["positive_ctxs"][0]["passage_id"]))]
        got = [int(h["passage_id"]) for h in r["hard_negative_ctxs"]]
        assert got[:2] == expected[:2]


def test_training_lowers_the_loss_and_the_checkpoint_encodes(spark, tmp_path, tiny_bert_dir, toy_data):
    from conftest import synthetic_docs, write_jsonl

    from dpr_lib.corpus import shard_corpus
    from dpr_lib.encode import encode_passages
    from dpr_lib.train import train_encoder

    cfg = _cfg(tmp_path, tiny_bert_dir, "train.max_steps=12", "train.lr=2e-3")
    out = str(tmp_path / "model")
    result = train_encoder(spark, cfg, toy_data, out)
    losses = result["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert result["validation"]["val_questions"] == 4
    log_lines = [json.loads(x) for x in open(result["log"])]
    assert [x["event"] for x in log_lines][0] == "start" and log_lines[-1]["event"] == "end"
    assert any(x["event"] == "validation" for x in log_lines)
    # The final checkpoint is an ordinary model directory the encode job loads.
    docs = write_jsonl(tmp_path / "docs.jsonl", synthetic_docs(6))
    ecfg = make_config(tmp_path, f"encoder.model={result['model']}", f"encoder.question_model={result['question_model']}",
                       f"corpus.input={docs}")
    shard_corpus(spark, ecfg)
    stats = encode_passages(spark, ecfg)
    assert stats["passages_encoded"] > 0 and stats["fingerprint"]["model_id"] == result["model"]
    assert stats["fingerprint"]["pooling"] == "mean" and stats["fingerprint"]["dim"] == 32


def test_two_processes_all_gather_give_the_loss_of_one(spark, tmp_path, tiny_bert_dir, toy_data):
    """DDP over gloo, passage embeddings all-gathered: same losses (and so same updates) as one
    process seeing the whole global batch."""
    from dpr_lib.train import train_encoder

    runs = {}
    for n in (1, 2):
        cfg = _cfg(tmp_path, tiny_bert_dir, "train.max_steps=3", "train.lr=1e-3", f"train.num_processes={n}")
        runs[n] = train_encoder(spark, cfg, toy_data, str(tmp_path / f"model{n}"))
    assert runs[2]["world_size"] == 2 and runs[1]["world_size"] == 1
    assert runs[1]["losses"] == pytest.approx(runs[2]["losses"], abs=1e-5)
    assert runs[1]["losses"][0] != pytest.approx(runs[1]["losses"][-1], abs=1e-3)   # the weights did move


def test_resume_from_an_object_storage_checkpoint_continues_exactly(spark, tmp_path, tiny_bert_dir, toy_data,
                                                                     s3_endpoint):
    from dpr_lib.train import list_checkpoints, train_encoder

    cfg = _cfg(tmp_path, tiny_bert_dir, "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-3",
               f"publish.endpoint_url={s3_endpoint}")
    full = train_encoder(spark, cfg, toy_data, "s3://dpr-test/train-a")
    ckpts = list_checkpoints("s3://dpr-test/train-a", cfg.storage_options())
    assert [step for step, _ in ckpts] == [2]
    resumed = train_encoder(spark, cfg, toy_data, str(tmp_path / "b"), resume=ckpts[0][1])
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-5)
    with pytest.raises(InputError, match="not a complete checkpoint"):
        train_encoder(spark, cfg, toy_data, str(tmp_path / "c"), resume=str(tmp_path / "nowhere"))


def test_mining_dpr_questions_without_gold_counts_every_question(spark, tmp_path):
    """DPR questions (no gold paragraph): the positive is the best BM25 passage with an answer;
    a question whose answer is nowhere, and one sharing no term with any passage, are both
    written to no_positive/ with their reason."""
    from dpr_lib.train_data import build_training_data

    docs = [{"id": "d1", "title": "Rivers", "text": "The Nile is the longest river in Africa and flows north."},
            {"id": "d2", "title": "Rivers", "text": "The Amazon river carries the most water of any river."},
            {"id": "d3", "title": "Mountains", "text": "Everest is the highest mountain above sea level."}]
    passages = tmp_path / "psgs.jsonl"
    passages.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    qa = tmp_path / "q.qa.csv"
    qa.write_text("which river is the longest in africa\t['Nile']\n"
                  "which river is the shortest\t['Danube']\n"
                  "zyxw qvut\t['Everest']\n")
    cfg = make_config(tmp_path, "train.mine_k=3")
    stats = build_training_data(spark, cfg, str(qa), "dpr", str(tmp_path / "out"), passages=str(passages))
    assert stats["questions"] == 3 and stats["records"] == 1
    assert stats["no_positive_reasons"] == {"no_candidate_contains_an_answer": 1, "no_bm25_candidate": 1}
    (rec,) = _read_jsonl(stats["data_url"])
    assert rec["positive_ctxs"][0]["text"].startswith("The Nile")
    assert [h["text"][:10] for h in rec["hard_negative_ctxs"]] == ["The Amazon"]   # shares "river"; no answer
    rejected = _read_jsonl(os.path.join(str(tmp_path / "out"), "no_positive"))
    assert sorted(r["reason"] for r in rejected) == ["no_bm25_candidate", "no_candidate_contains_an_answer"]


class _Payload:
    """Pickled, it runs ``Path.touch(sentinel)`` when unpickled by a loader that executes code."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


@pytest.mark.parametrize("poisoned", ["trainer_state.pt", "passage_encoder/pytorch_model.bin"])
def test_a_malicious_checkpoint_on_object_storage_does_not_execute(tmp_path, tiny_bert_dir, toy_data, s3_endpoint,
                                                                    poisoned):
    """A checkpoint fetched from S3 whose pickle would run code when loaded: the trainer state is
    read by torch's weights-only loader, the model weights by transformers' (weights-only as well);
    both refuse, the code never runs, and nothing is trained."""
    import fsspec
    import torch

    from dpr_lib.errors import EncoderError
    from dpr_lib.train import train_encoder
    from dpr_lib.train.checkpoint import COMPLETE

    sentinel = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    for role in ("question_encoder", "passage_encoder"):
        shutil.copytree(tiny_bert_dir, ckpt / role)
    torch.save({"step": 2, "optimizer": {}, "scheduler": {}, "world_size": 1, "batch_size": 8},
               ckpt / "trainer_state.pt")
    target = ckpt / poisoned
    if poisoned.endswith(".bin"):  # the weights only as a pickle, no safetensors beside it
        (ckpt / "passage_encoder" / "model.safetensors").unlink()
    torch.save({"step": _Payload(str(sentinel))}, target)  # the format both loaders read
    (ckpt / COMPLETE).write_text("")
    url = f"s3://dpr-test/malicious-{poisoned.split('/')[0]}"
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(ckpt) + "/", url.removeprefix("s3://") + "/", recursive=True)

    cfg = _cfg(tmp_path, tiny_bert_dir, "train.max_steps=3", f"publish.endpoint_url={s3_endpoint}")
    with pytest.raises((InputError, EncoderError)) as err:
        train_encoder(None, cfg, toy_data, str(tmp_path / "out"), resume=url)
    assert "weights" in str(err.value).lower() and "Unsupported global" in str(err.value), str(err.value)[:500]
    assert not sentinel.exists(), "the checkpoint's pickle ran code"
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out"), "nothing was trained"
    torch.load(target, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert sentinel.exists()
