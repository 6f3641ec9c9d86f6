"""The accounting ledger: every equation whose terms are known is checked; a mismatch names it."""

import pytest

from dpr_lib import accounting
from dpr_lib.config import load_config
from dpr_lib.errors import AccountingError, ConfigError

FULL = {"input_records": 10, "docs": 7, "rejects": 3, "corpus_passages": 20, "passages": 20, "embedded": 15,
        "reused": 5, "embeddings": 20, "vectors": 20, "docstore_rows": 20}


def test_a_balanced_ledger_checks_every_equation():
    ledger = accounting.check(FULL, "test")
    assert len(ledger["checked"]) == len(accounting.EQUATIONS) and ledger["unchecked"] == []
    assert ledger["counts"] == FULL


@pytest.mark.parametrize("key,value,expected", [
    ("rejects", 2, "input_records 10 != docs 7 + rejects 2 (= 9)"),
    ("reused", 4, "passages 20 != embedded 15 + reused 4 (= 19)"),
    ("vectors", 19, "vectors 19 != embeddings 20"),
    ("docstore_rows", 21, "docstore_rows 21 != passages 20"),
    ("corpus_passages", 22, "corpus_passages 22 != passages 20"),
])
def test_each_mismatch_is_named_and_refused(key, value, expected):
    with pytest.raises(AccountingError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        accounting.check({**FULL, key: value}, "merge job")


def test_unknown_terms_leave_an_equation_unchecked_not_passed():
    ledger = accounting.check({"embeddings": 5, "vectors": 5}, "merge job")
    assert ledger["checked"] == ["vectors = embeddings"]
    assert "input_records = docs + rejects" in ledger["unchecked"]


@pytest.mark.parametrize("override", ["publish.endpoint_url=http://AKIAXX:s3cr3t@127.0.0.1:9000",
                                      "paths.index_root=s3://AKIAXX:s3cr3t@bucket/index",
                                      "encoder.model=https://user:token@example.com/model"])
def test_credentials_in_config_urls_are_refused_without_echoing_them(override):
    with pytest.raises(ConfigError, match="contains credentials") as err:
        load_config(None, [override])
    assert "s3cr3t" not in str(err.value) and "token" not in str(err.value)
