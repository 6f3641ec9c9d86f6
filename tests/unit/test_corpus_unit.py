import io
import json

import pytest
from badinput import JSONL_CASES
from hypothesis import given, settings
from hypothesis import strategies as st

from dpr_lib.corpus import (
    content_hash,
    iter_lines,
    make_pid,
    parse_jsonl_line,
    parse_tsv_line,
    passages_of,
    split_words,
)

words_st = st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=5), max_size=400)


@given(words_st, st.integers(1, 120), st.data())
def test_split_loses_and_duplicates_no_word(words, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    chunks = split_words(words, size, overlap)
    rebuilt = chunks[0] + [w for c in chunks[1:] for w in c[overlap:]] if chunks else []
    assert rebuilt == words
    assert all(1 <= len(c) <= size for c in chunks)
    assert all(len(c) == size for c in chunks[:-1])
    for prev, cur in zip(chunks, chunks[1:]):
        assert prev[len(prev) - overlap:] == cur[:overlap]


def test_split_boundaries_dpr_style():
    words = [f"w{i}" for i in range(250)]
    chunks = split_words(words, 100)
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert chunks[1][0] == "w100" and chunks[2][-1] == "w249"
    assert [len(c) for c in split_words(words[:100], 100)] == [100]


def test_pid_is_stable_non_negative_and_key_sensitive():
    assert make_pid("doc", 0) == make_pid("doc", 0)
    pids = {make_pid(f"d{i}", c) for i in range(200) for c in range(5)}
    assert len(pids) == 1000 and min(pids) >= 0 and max(pids) < 2 ** 63
    assert make_pid("a", 1) != make_pid("a1", 0)  # separator between key parts


def test_passages_keep_title_and_hash_what_the_encoder_sees():
    rows = passages_of("d", "My Title", "one two three four five", 2, 0)
    assert [r[4] for r in rows] == ["one two", "three four", "five"]
    assert all(r[3] == "My Title" for r in rows)
    assert rows[0][5] == content_hash("My Title", "one two") != content_hash("Other", "one two")


@given(st.lists(st.binary(min_size=0, max_size=30).map(lambda b: b.replace(b"\n", b"x")), min_size=1, max_size=40),
       st.lists(st.integers(1, 400), max_size=6))
@settings(max_examples=200)
def test_byte_range_splits_read_every_line_once(lines, cuts):
    data = b"".join(line + b"\n" for line in lines)
    bounds = sorted({0, len(data), *[c for c in cuts if c < len(data)]})
    got = []
    for start, end in zip(bounds, bounds[1:]):
        got.extend(line for _, line in iter_lines(io.BytesIO(data), start, end))
    assert got == [line + b"\n" for line in lines]


@pytest.mark.parametrize("case,line,reason", [c for c in JSONL_CASES if c[2] != "duplicate_doc_id"],
                         ids=[c[0] for c in JSONL_CASES if c[2] != "duplicate_doc_id"])
def test_jsonl_reject_classes_of_the_shared_bad_input_corpus(case, line, reason):
    rec = parse_jsonl_line("f", 0, line, 1000)
    assert rec["reason"] == reason, rec
    if reason is None:
        assert all(ord(c) >= 32 for c in rec["text"] + rec["title"]), "control characters are cleaned"
    else:
        assert rec["raw"] and rec["detail"]


def test_int_ids_are_fine_and_oversized_text_is_too_large():
    assert parse_jsonl_line("f", 0, b'{"id": 7, "text": "int ids are fine"}', 1000)["reason"] is None
    assert parse_jsonl_line("f", 0, json.dumps({"id": "a", "text": "x" * 2000}).encode(), 1000)["reason"] == "too_large"


def test_jsonl_reject_keeps_raw_record_and_location():
    rec = parse_jsonl_line("corpus.jsonl", 123, b'{"id": "a", "text": \xff}', 1000)
    assert rec["file"] == "corpus.jsonl" and rec["offset"] == 123
    assert "\\xff" in rec["raw"]


def test_control_characters_are_cleaned():
    rec = parse_jsonl_line("f", 0, json.dumps({"id": "a", "text": "a\u0007b\u0000c"}).encode(), 1000)
    assert rec["text"] == "a b c"


def test_tsv_dpr_format():
    assert parse_tsv_line("f", 0, b"id\ttext\ttitle\n", 1000) is None
    rec = parse_tsv_line("f", 20, b'1\t"Aaron ( or ; ""Aharon"") was"\tAaron\n', 1000)
    assert (rec["doc_id"], rec["title"], rec["text"]) == ("1", "Aaron", 'Aaron ( or ; "Aharon") was')
    assert parse_tsv_line("f", 20, b"1\tonly two\n", 1000)["reason"] == "bad_columns"
    assert parse_tsv_line("f", 20, b"1\ta\tb\tc\n", 1000)["reason"] == "bad_columns"
