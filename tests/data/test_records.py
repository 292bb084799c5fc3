"""Tests for rwr_jax.data.records: the row schema, its errors and the lazy jsonl source."""

import json
import logging
import os
import pickle

import pytest

from rwr_jax.data import records

QUESTION = "Which organ is shown?\nA. Liver\nB. Lung\nC. Heart"


@pytest.fixture
def image(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "img" / "x.png"
    path.write_bytes(b"not decoded here")
    return path


def _write(path, rows):
    """Writes rows (dicts, or raw strings) one per line; returns the path as str."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _good(index=0, **changes):
    row = {"id": f"q{index}", "question": QUESTION, "images": [], "answer": "B. Lung"}
    row.update(changes)
    return row


def test_question_row(tmp_path, image):
    path = _write(tmp_path / "d.jsonl", [_good(images=["img/x.png"], difficulty=2)])
    record = records.JsonlSource(path)[0]
    assert record.id == "q0" and record.question == QUESTION
    assert record.images == (str(image),)
    assert record.answer == "B. Lung" and record.answer_letter == "B" and record.answer_text == "Lung"
    assert record.options == {"A": "Liver", "B": "Lung", "C": "Heart"}  # From the question's option lines.
    assert record.difficulty == 2.0 and record.location == f"{path}:1"


def test_chat_row_drops_assistant_turn(tmp_path, image):
    row = {"id": 7, "images": [str(image)], "messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "<image>\n" + QUESTION},
        {"role": "assistant", "content": "B. Lung"}]}
    parts = {"id": "p", "answer": "(A) liver", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "C. Heart"}]}
    source = records.JsonlSource(_write(tmp_path / "chat.jsonl", [row, parts]))
    first, second = source[0], source[1]
    assert first.id == "7" and first.question == QUESTION and first.images == (str(image),)
    assert (first.answer_letter, first.answer_text) == ("B", "Lung")
    # An explicit `answer` wins over the assistant turn; letter forms and case are accepted.
    assert (second.question, second.answer_letter, second.answer_text) == (QUESTION, "A", "Liver")


def test_options_field_and_free_text(tmp_path):
    rows = [_good(question="Stem?", options=["x", "y"], answer="B"),
            _good(1, question="Stem?", options={"A": "x", "C": "z"}, answer="C. z"),
            _good(2, question="What causes it?", answer="B12 deficiency"),
            _good(3, answer="lung."), _good(4, answer="c. heart"),
            _good(5, question="Which organism?", answer="E. coli"), _good(6, question="Group?", answer="o")]
    source = records.JsonlSource(_write(tmp_path / "o.jsonl", rows))
    assert (source[0].options, source[0].answer_letter, source[0].answer_text) == ({"A": "x", "B": "y"}, "B", "y")
    assert (source[1].answer_letter, source[1].answer_text) == ("C", "z")
    assert (source[2].options, source[2].answer_letter, source[2].answer_text) == (None, None, "B12 deficiency")
    # An option's text alone is that option; a lower-case letter names an option too.
    assert [(source[i].answer_letter, source[i].answer_text) for i in (3, 4)] == [("B", "Lung"), ("C", "Heart")]
    # Without options, "E. coli" and a lower-case one-letter answer are free text.
    assert [(source[i].answer_letter, source[i].answer_text) for i in (5, 6)] == [(None, "E. coli"), (None, "o")]


@pytest.mark.parametrize("bad, field", [
    ({"question": QUESTION, "answer": "B. Lung"}, "id"),
    ({"id": ["x"], "question": QUESTION, "answer": "B. Lung"}, "id"),
    ({"id": "x", "answer": "B. Lung"}, "question"),
    ({"id": "x", "question": 3, "answer": "B. Lung"}, "question"),
    ({"id": "x", "question": QUESTION}, "answer"),
    ({"id": "x", "question": QUESTION, "answer": ""}, "answer"),
    ({"id": "x", "question": QUESTION, "answer": "E. Kidney"}, "answer"),
    ({"id": "x", "question": QUESTION, "answer": "B. Kidney"}, "answer"),
    ({"id": "x", "question": QUESTION, "answer": "B", "images": "a.png"}, "images"),
    ({"id": "x", "question": QUESTION, "answer": "B", "images": ["missing.png"]}, "images[0]"),
    ({"id": "x", "question": QUESTION, "answer": "B", "difficulty": "hard"}, "difficulty"),
    ({"id": "x", "question": "Stem?", "answer": "A", "options": "A/B"}, "options"),
    ({"id": "x", "question": "Stem?", "answer": "A", "options": list("abcdefghijk")}, "options"),  # past J
    ({"id": "x", "question": "Stem?", "answer": "A", "options": {"A": "x", "K": "y"}}, "options"),
    ({"id": "x", "question": "Group?", "answer": "O"}, "answer"),  # a bare capital letter, no options
    ({"id": "x", "answer": "A", "messages": [{"role": "assistant", "content": "A"}]}, "messages"),
    ("{not json", None),
])
def test_malformed_row_names_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path / "bad.jsonl", [_good(), "", bad])  # Line 2 is blank; the bad row is line 3.
    source = records.JsonlSource(path)
    assert len(source) == 2 and source.line_number(1) == 3
    with pytest.raises(records.RecordError) as error:
        source[1]
    assert (error.value.path, error.value.line, error.value.field) == (path, 3, field)
    assert str(error.value).startswith(f"{path}:3" + (f": field {field!r}" if field else ""))
    with pytest.raises(records.RecordError, match=f"{path}:3"):
        records.JsonlSource(path, records.RecordsConfig(validate_on_open=True))


def test_missing_image_message(tmp_path):
    path = _write(tmp_path / "m.jsonl", [_good(images=["img/none.png"])])
    with pytest.raises(records.RecordError, match=r"m.jsonl:1: field 'images\[0\]'.*none.png.*does not exist"):
        records.JsonlSource(path)[0]
    unchecked = records.JsonlSource(path, records.RecordsConfig(check_images=False))[0]
    assert unchecked.images == (str(tmp_path / "img" / "none.png"),)


def test_skip_malformed_counts_and_logs(tmp_path, caplog):
    rows = [_good(0), _good(1, answer="Z. none"), "[1, 2]", _good(3), _good(4, id=None)]
    path = _write(tmp_path / "s.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        source = records.JsonlSource(path, records.RecordsConfig(skip_malformed=True))
    assert len(source) == 2 and source.num_skipped == 3
    assert [source[i].id for i in range(2)] == ["q0", "q3"]
    assert [s.split(": ")[0] for s in source.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    for line in (2, 3, 5):
        assert f"{path}:{line}" in caplog.text
    assert "Skipped 3 malformed rows" in caplog.text


def test_rows_are_indexed_once_and_parsed_lazily(tmp_path, monkeypatch):
    path = _write(tmp_path / "l.jsonl", [_good(i) for i in range(50)])
    calls = []
    parse = records.parse_line
    monkeypatch.setattr(records, "parse_line", lambda *a, **k: calls.append(k["line"]) or parse(*a, **k))
    source = records.JsonlSource(path)
    assert len(source) == 50 and calls == []  # Opening reads offsets only.
    assert source[37].id == "q37" and source[-1].id == "q49" and calls == [38, 50]
    assert source._starts.nbytes == 50 * 8  # pylint: disable=protected-access
    clone = pickle.loads(pickle.dumps(source))  # Crosses into grain workers without its file descriptor.
    assert clone[5] == source[5]
    with pytest.raises(IndexError, match="out of range for 50 records"):
        source[50]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        records.JsonlSource(os.path.join(tmp_path, "nope.jsonl"))
