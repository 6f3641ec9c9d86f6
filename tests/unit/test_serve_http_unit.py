"""The edge of dpr-serve without a server: body parsing bounds, question checks, the public
reason of a failure, and the /search schema agreeing with the parser."""

import json

import pytest
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpr_lib.serve_http import (
    Refusal,
    check_question,
    error_body,
    json_depth,
    load_json,
    parse_search,
    public_reason,
    search_models,
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return make_config(tmp_path_factory.mktemp("edge"), "serve.max_batch=4", "serve.max_k=20",
                       "serve.max_question_chars=50")


@pytest.mark.parametrize("text, depth", [
    (b"{}", 1), (b'{"questions": ["a", "b"]}', 2), (b"[[[]]]", 3), (b'"[[[[["', 0),
    (b'{"q": "\\"[[[["}', 1), (b"1", 0), (b"[" * 5000 + b"]" * 5000, 5000),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


@pytest.mark.parametrize("body, code, words", [
    (b"[" * 100000 + b"]" * 100000, "too_deep", "100000 levels deep; the limit is 8"),
    (b'{"k": ' + b"9" * 5000 + b"}", "number_too_long", "5000 characters; the limit is 32"),
    (b'{"k": 1.' + b"5" * 40 + b"}", "number_too_long", "the limit is 32"),
    (b'{"k": NaN}', "bad_json", "NaN is not a JSON number"),
    (b'{"q": "\xed\xa0\x80"}', "bad_encoding", "not valid UTF-8"),  # a surrogate's raw (CESU-8) bytes
    (b'{"q": "\xff"}', "bad_encoding", "not valid UTF-8"),
    (b"\xff\xfe{\x00}\x00", "bad_encoding", "not valid UTF-8"),  # UTF-16, which json.loads would accept
    (b"{not json", "bad_json", "not valid JSON"),
])
def test_bodies_that_could_hurt_the_parser_are_refused_with_a_reason(body, code, words):
    with pytest.raises(Refusal) as err:
        load_json(body, 8, 32)
    assert err.value.status == 400 and err.value.code == code and words in str(err.value)


@pytest.mark.parametrize("question, code, words", [
    ("\ud800 what", "bad_question", "lone UTF-16 surrogate at character 0"),
    ("what\x00", "bad_question", "NUL character at 4"),
    ("  \t ", "bad_question", "empty"),
    (7, "bad_question", "not a string"),
    ("x" * 51, "question_too_long", "51 characters; the limit is 50"),
])
def test_questions_must_be_valid_unicode_scalar_values_without_nul(question, code, words):
    with pytest.raises(Refusal) as err:
        check_question(0, question, 50)
    assert err.value.code == code and words in str(err.value)
    # the error body encodes whatever the message quotes (ASCII JSON)
    assert json.loads(error_body(err.value.code, str(err.value)))["code"] == code


def test_a_question_in_the_body_with_an_escaped_surrogate_is_refused(cfg):
    with pytest.raises(Refusal, match="question 1 holds a lone UTF-16 surrogate"):
        parse_search(b'{"questions": ["fine", "bad \\ud800 one"]}', cfg)
    with pytest.raises(Refusal, match="'k' must be an integer from 1 to 20") as err:
        parse_search(b'{"questions": ["q"], "k": "\\udfff"}', cfg)
    assert "\\udfff" in str(err.value)  # quoted escaped, never as the raw surrogate
    assert parse_search(b'{"questions": [" caf\\u00e9 "], "k": 3, "mode": "auto"}', cfg) == (["café"], 3, None)


def test_public_reason_keeps_the_reason_and_drops_paths_and_urls():
    msg = ("shard s3://bucket/idx/versions/v1/shard-0.faiss is corrupt: sha256 ab12 != cd34 "
           "(cached at /var/cache/dpr/blobs/ab12.faiss); see file:///etc/x and C:\\data\\idx")
    out = public_reason(msg)
    assert "is corrupt: sha256 ab12 != cd34" in out
    assert "://" not in out and "/var" not in out and "/etc" not in out and "C:\\" not in out
    assert out.count("<url>") == 2 and out.count("<path>") == 2
    assert public_reason("no index published under ./work/index yet") == "no index published under ./work/index yet"


def _valid_per_schema(cfg):
    from schema_strategies import from_schema

    request, _, _ = search_models(cfg)
    return from_schema(request.model_json_schema())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_body_the_schema_allows_the_parser_accepts(cfg, data):
    """The schema /openapi.json publishes and parse_search hold the same rules: any body valid per
    the schema parses (its questions stripped), so a generated client is never refused."""
    payload = data.draw(_valid_per_schema(cfg))
    questions, k, mode = parse_search(json.dumps(payload, ensure_ascii=data.draw(st.booleans())).encode(), cfg)
    assert questions == [q.strip() for q in payload["questions"]]
    assert k == payload.get("k", cfg.search.k)
    assert mode == (None if payload.get("mode") in (None, "auto") else payload["mode"])
