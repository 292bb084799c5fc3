"""Med-RwR records: the jsonl row schema, its parser and a lazy grain data source.

One row per line (METHOD.md, "Records"):

    {"id": "q1", "question": "stem\\nA. ...\\nB. ...", "images": ["img/1.png"],
     "answer": "B. option text", "options": {"A": "...", "B": "..."}, "difficulty": 0.4}

- `question`, or chat-style `messages: [{role, content}, ...]` with one user turn
  (`content` a string or a list of `{"type": "text", "text": ...}` / image parts;
  `<image>` placeholders are removed, since the template puts images first). System
  turns are ignored (the system prompt comes from config) and the assistant turn is
  dropped; when the row has no `answer`, the assistant turn's text is the answer.
- `images` (optional, default `[]`): paths, relative to the jsonl file's directory or
  absolute; each must exist when `check_images` is on.
- `answer`: with options known, "B. option text", "(B) option text", "b. option text"
  or "B" gives the letter B and that option's text; the letter must be one of the
  options and a given text must match the option (case, whitespace and a final period
  aside); an answer equal to one option's text alone is that option. Anything else,
  and any answer of a row without options, is a free-text answer.
- `options` (optional): a list (lettered A, B, ...) or a `{letter: text}` dict, letters
  A-J (the rewards read option letters A-J, METHOD.md); when absent, lines "A. text" of
  the question are the options, if there are two or more.
- `difficulty` (optional): a finite number, used by the curriculum sampler.

`JsonlSource` indexes the byte range of every non-blank line once and parses rows on
access, so a large file is never held in memory. With `skip_malformed` it parses every
row while indexing and leaves out the malformed ones, counting and logging each with
its file:line; otherwise a malformed row raises `RecordError` when it is read (or at
open, with `validate_on_open`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np

_LETTERS = "ABCDEFGHIJ"
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[.):]\s*(.*?)|\)?)\s*$", re.S)
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s+(\S.*?)\s*$")
_IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")
_MAX_LOGGED_SKIPS = 20


class RecordError(ValueError):
    """A malformed row; the message starts with "file:line: field 'name':"."""

    def __init__(self, path: str, line: int, field: str | None, problem: str):
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One Med-RwR example.

    Attributes:
        id: the row id (CDIR and logs refer to it), as a string.
        question: the user text: stem and options, without image placeholders.
        images: absolute image paths, in prompt order (empty for text-only rows); with
            `image_bytes`, the names the images had when the dataset was built.
        answer: the ground-truth answer as written, e.g. "B. Pneumonia".
        options: letter -> option text, or None for open questions.
        difficulty: optional difficulty score (higher is harder).
        answer_letter: the correct option letter, or None for a free-text answer.
        answer_text: the correct option's text, or the free-text answer.
        location: "file:line" of the row.
        image_bytes: the encoded images, when the record carries them (`tfds_records`);
            None: read them from `images`.
    """

    id: str
    question: str
    images: tuple[str, ...] = ()
    answer: str
    options: dict[str, str] | None = None
    difficulty: float | None = None
    answer_letter: str | None = None
    answer_text: str = ""
    location: str = ""
    image_bytes: tuple[bytes, ...] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordsConfig:
    """How a jsonl file is read.

    Attributes:
        skip_malformed: leave out malformed rows (parsed at open, counted, logged with
            file:line) instead of raising.
        validate_on_open: parse every row at open, so a malformed row fails fast.
        check_images: every image path must exist on disk.
    """

    skip_malformed: bool = False
    validate_on_open: bool = False
    check_images: bool = True


def parse_line(data: bytes | str, *, path: str, line: int, check_images: bool = True) -> Record:
    """Parses one jsonl line; image paths are resolved against `path`'s directory.

    Raises:
        RecordError: If the line is not a JSON object or breaks the schema.
    """
    try:
        row = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(path, line, None, f"invalid JSON ({error})") from None
    if not isinstance(row, dict):
        raise RecordError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
    return parse_record(row, path=path, line=line, check_images=check_images)


def parse_record(row: Mapping[str, Any], *, path: str, line: int, check_images: bool = True) -> Record:
    """Validates one decoded row and builds its `Record` (see the module docstring).

    Args:
        row: the decoded JSON object.
        path: the jsonl file (error messages; relative image paths start from its directory).
        line: the 1-based line number (error messages).
        check_images: require every image file to exist.

    Returns:
        The record.

    Raises:
        RecordError: naming file, line and field, if the row breaks the schema.
    """
    def fail(field, problem):
        raise RecordError(path, line, field, problem)

    record_id = row.get("id")
    if record_id is None or isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        fail("id", f"must be a non-empty string or an integer, got {record_id!r}")
    question, chat_answer = _question(row, fail)
    images = _images(row.get("images", []), os.path.dirname(os.path.abspath(path)), check_images, fail)
    answer = row.get("answer", chat_answer)
    if not isinstance(answer, str) or not answer.strip():
        fail("answer", f"must be a non-empty string, got {answer!r}")
    options = _options(row["options"], fail) if row.get("options") is not None else _question_options(question)
    letter, text = _answer(answer, options, fail)
    difficulty = row.get("difficulty")
    if difficulty is not None:
        if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not math.isfinite(difficulty):
            fail("difficulty", f"must be a finite number or null, got {difficulty!r}")
        difficulty = float(difficulty)
    return Record(id=str(record_id), question=question, images=images, answer=answer.strip(), options=options,
                  difficulty=difficulty, answer_letter=letter, answer_text=text, location=f"{path}:{line}")


def _question(row, fail) -> tuple[str, str | None]:
    """(question text, assistant answer or None) from `question` or chat-style `messages`."""
    if "question" in row:
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            fail("question", f"must be a non-empty string, got {question!r}")
        return _IMAGE_PLACEHOLDER.sub("", question).strip(), None
    messages = row.get("messages")
    if messages is None:
        fail("question", "is missing (and there are no chat-style 'messages')")
    if not isinstance(messages, list):
        fail("messages", f"must be a list of {{role, content}} objects, got {type(messages).__name__}")
    users, answer = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            fail(f"messages[{i}]", f"must be an object with role system/user/assistant, got {message!r}")
        text = _content_text(message.get("content"), f"messages[{i}].content", fail)
        if message["role"] == "user":
            users.append(text)
        elif message["role"] == "assistant":
            answer = text
    if len(users) != 1 or not users[0]:
        fail("messages", f"must hold exactly one non-empty user turn, got {len(users)} user turns")
    return users[0], answer


def _content_text(content, field, fail) -> str:
    if isinstance(content, str):
        return _IMAGE_PLACEHOLDER.sub("", content).strip()
    if not isinstance(content, list):
        fail(field, f"must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            fail(field, f"parts must be objects with a 'type', got {part!r}")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                fail(field, f"text part must hold a string 'text', got {part!r}")
            texts.append(part["text"])
    return _IMAGE_PLACEHOLDER.sub("", "".join(texts)).strip()


def _images(images, base_dir, check_images, fail) -> tuple[str, ...]:
    if not isinstance(images, list):
        fail("images", f"must be a list of paths, got {type(images).__name__}: {images!r}")
    paths = []
    for i, image in enumerate(images):
        if isinstance(image, dict):
            image = image.get("path")
        if not isinstance(image, str) or not image:
            fail(f"images[{i}]", f"must be a non-empty path string, got {image!r}")
        resolved = os.path.normpath(os.path.join(base_dir, image))
        if check_images and not os.path.isfile(resolved):
            fail(f"images[{i}]", f"image file {resolved!r} does not exist")
        paths.append(resolved)
    return tuple(paths)


def _options(options, fail) -> dict[str, str]:
    if isinstance(options, list):
        if not 2 <= len(options) <= len(_LETTERS):
            fail("options", f"must hold 2 to {len(_LETTERS)} options, got {len(options)}")
        options = dict(zip(_LETTERS, options))
    if not isinstance(options, dict):
        fail("options", f"must be a list or a {{letter: text}} object, got {type(options).__name__}")
    for letter, text in options.items():
        if not (isinstance(letter, str) and len(letter) == 1 and letter in _LETTERS):
            fail("options", f"keys must be single capital letters A-J, got {letter!r}")
        if not isinstance(text, str) or not text.strip():
            fail(f"options.{letter}", f"must be a non-empty string, got {text!r}")
    return {letter: text.strip() for letter, text in options.items()}


def _question_options(question: str) -> dict[str, str] | None:
    """Options written as "A. text" lines in the question, if there are two or more."""
    options = {}
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) not in options:
            options[match.group(1)] = match.group(2)
    return options if len(options) >= 2 else None


def _normalise(text: str) -> str:
    return " ".join(text.split()).rstrip(".").casefold()


def _answer(answer: str, options, fail) -> tuple[str | None, str]:
    """(letter or None, correct text) of an answer string."""
    match = _LETTER_ANSWER.match(answer)
    if match is None or options is None:
        if match is not None and not match.group(2) and match.group(1).isupper():
            fail("answer", f"{answer!r} is a bare option letter but the row has no options")
        same = [letter for letter, text in (options or {}).items() if _normalise(text) == _normalise(answer)]
        if same:  # the option's text without its letter
            return same[0], options[same[0]]
        return None, answer.strip()
    letter, text = match.group(1).upper(), (match.group(2) or "").strip()
    if letter not in options:
        fail("answer", f"letter {letter!r} of {answer!r} is not among the options {sorted(options)}")
    if text and _normalise(text) != _normalise(options[letter]):
        fail("answer", f"text {text!r} does not match option {letter} {options[letter]!r}")
    return letter, options[letter]


class JsonlSource:
    """A grain `RandomAccessDataSource` of `Record`s over one jsonl file, parsed lazily.

    Opening scans the file once and keeps only line offsets (`[N] int64` starts and
    ends, and line numbers); rows are read with `os.pread` and parsed on access, so
    the source is cheap to pickle into grain worker processes and thread-safe.

    Attributes:
        path: the jsonl file.
        skipped: "file:line: problem" of every malformed row left out (skip mode).
    """

    def __init__(self, path: str | os.PathLike[str], config: RecordsConfig = RecordsConfig()):
        self.path = os.path.abspath(os.fspath(path))
        self.config = config
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"records file {self.path!r} does not exist")
        starts, ends, lines = _index_lines(self.path)
        self.skipped: tuple[str, ...] = ()
        self._fd = None
        self._starts, self._ends, self._lines = starts, ends, lines
        if config.skip_malformed or config.validate_on_open:
            self._validate_all()
        logging.info("Indexed %d records in %s (%d malformed rows skipped)", len(self), self.path, len(self.skipped))

    def _validate_all(self) -> None:
        keep, skipped = np.ones(len(self._starts), bool), []
        for i in range(len(self._starts)):
            try:
                self[i]
            except RecordError as error:
                if not self.config.skip_malformed:
                    raise
                keep[i] = False
                skipped.append(str(error))
                if len(skipped) <= _MAX_LOGGED_SKIPS:
                    logging.warning("Skipping malformed record: %s", error)
        if skipped:
            logging.warning("Skipped %d malformed rows of %s (first %d logged)", len(skipped), self.path,
                            min(len(skipped), _MAX_LOGGED_SKIPS))
        self._starts, self._ends, self._lines = self._starts[keep], self._ends[keep], self._lines[keep]
        self.skipped = tuple(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def line_number(self, index: int) -> int:
        """1-based line number in the file of record `index`."""
        return int(self._lines[index])

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records of {self.path}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self._starts[index]), int(self._ends[index])
        data = os.pread(self._fd, end - start, start)
        return parse_line(data, path=self.path, line=int(self._lines[index]), check_images=self.config.check_images)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None  # File descriptors do not cross processes; reopened on first read.
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte [start, end) and 1-based line number of every non-blank line."""
    starts, ends, lines = [], [], []
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                starts.append(offset)
                ends.append(offset + len(line.rstrip(b"\r\n")))
                lines.append(number)
            offset += len(line)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(lines, np.int64)
