"""The quality gate's rule and its validation file formats (no Spark)."""

import pytest

from dpr_lib.config import load_config
from dpr_lib.errors import ConfigError
from dpr_lib.gate import judge, read_validation_questions


def _fig(value, source="v.jsonl", metric="top20_accuracy"):
    return {"metric": metric, "value": value, "questions": 100, "source": source}


def test_rule():
    cfg = load_config(None, ["publish.max_regression=0.01", "publish.min_validation=0.5"])
    assert judge(_fig(0.795), _fig(0.80), "v1", cfg) == "", "within max_regression"
    reason = judge(_fig(0.78), _fig(0.80), "v1", cfg)
    assert "top20_accuracy (dense) fell from 0.8000 (version v1, which LATEST names) to 0.7800" in reason
    assert "publish.max_regression=0.01" in reason
    assert judge(_fig(0.9), _fig(0.80), "v1", cfg) == "", "an improvement passes"
    # no comparable earlier figure (none, other questions, another metric): the floor applies
    for previous in (None, _fig(0.9, source="other.jsonl"), _fig(0.9, metric="ndcg@10")):
        assert judge(_fig(0.6), previous, "v1", cfg) == ""
        assert "below publish.min_validation=0.5" in judge(_fig(0.4), previous, "v1", cfg)
    assert judge({}, _fig(0.8), "v1", cfg) == "", "no validation data: no gate"


def test_formats(tmp_path):
    tsv = tmp_path / "q.qa.tsv"
    tsv.write_text("who wrote hamlet\t['Shakespeare', 'William Shakespeare']\n\nwhat is 2+2\t['4']\n")
    v = read_validation_questions(load_config(None, [f"index.validation_questions={tsv}"]))
    assert v.questions == ["who wrote hamlet", "what is 2+2"] and v.answers[0] == ["Shakespeare", "William Shakespeare"]
    tsv.write_text("who wrote hamlet\tShakespeare\n")
    with pytest.raises(ConfigError, match="line 1 is not a question with a non-empty list of answers"):
        read_validation_questions(load_config(None, [f"index.validation_questions={tsv}"]))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "a question"}\n{"_id": "2", "text": "unjudged"}\n')
    (beir / "qrels" / "dev.tsv").write_text("1\td9\t2\n1\td3\t0\n")
    v = read_validation_questions(load_config(None, [f"index.validation_questions={beir}"]))
    assert v.qids == ["1"] and v.qrels == {"1": {"d9": 2, "d3": 0}} and v.questions == ["a question"]
    (beir / "qrels" / "dev.tsv").write_text("1\td9\tvery\n")
    with pytest.raises(ConfigError, match="dev.tsv line 1 is not query-id<TAB>corpus-id<TAB>integer score"):
        read_validation_questions(load_config(None, [f"index.validation_questions={beir}"]))
    with pytest.raises(ConfigError, match="cannot read"):
        read_validation_questions(load_config(None, [f"index.validation_questions={tmp_path}/missing.jsonl"]))
