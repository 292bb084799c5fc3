"""Passages of a `.tsv` or `.jsonl` corpus, read by row without loading the corpus.

One passage per line; blank lines are skipped and are not rows.

- `.tsv`: `id<TAB>text`, or `id<TAB>text<TAB>title` (the DPR `psgs_w100.tsv` layout),
  a field that starts with a double quote is CSV-quoted (inner quotes doubled), as DPR
  writes them. A first line reading exactly `id<TAB>text[<TAB>title]` is a header and skipped.
  A UTF-8 byte-order mark opening the file is not part of the first row.
- `.jsonl`: `{"id": ..., "text" or "contents": ..., "title": ...}`; `title` is optional
  and numeric ids are kept as strings.

Opening a corpus the first time scans it once, checks every row (a malformed row raises
a ValueError naming the file and line) and saves the byte range of every row in a
`[1 + N, 2] int64` `.npy` offsets file: row 0 holds the corpus size and mtime (so a
changed corpus is rescanned), row 1 + i the `[start, end)` bytes of passage i. Later
opens reuse it, and passages are read from a memory map of the corpus, so a
20M-passage corpus costs 320 MB of offsets and nothing more.

`split_documents` cuts long documents into overlapping windows of words (default) or of
tokens (any callable returning token character spans, e.g. `tokenizer_spans` of an
encoder's tokenizer.json) and writes them as a `.jsonl` passages file; window text is a verbatim slice
of the document, so its inner whitespace is kept.
"""

import csv
import dataclasses
import functools
import hashlib
import json
import mmap
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np
from absl import logging

FORMATS = {".tsv": "tsv", ".jsonl": "jsonl"}
TSV_HEADERS = (b"id\ttext", b"id\ttext\ttitle")
_BOM = b"\xef\xbb\xbf"

TokenSpans = Sequence[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Passage:
    """One corpus row. `contents` (title line + text, or the text) is what gets embedded and shown."""
    id: str
    text: str
    title: str = ""

    @property
    def contents(self) -> str:
        return f"{self.title}\n{self.text}" if self.title else self.text


def corpus_format(path: str) -> str:
    """Returns "tsv" or "jsonl" from the file extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: corpus extension {ext!r} is not supported; expected one of {sorted(FORMATS)}")
    return FORMATS[ext]


def file_sha256(path: str, block_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def _parse_tsv(line: bytes, where: str) -> Passage:
    fields = next(csv.reader([line.decode("utf-8")], delimiter="\t"), [])
    if len(fields) not in (2, 3):
        raise ValueError(f"{where}: expected 2 or 3 tab-separated fields (id, text[, title]), got {len(fields)}")
    return Passage(fields[0], fields[1], fields[2] if len(fields) == 3 else "")


def _parse_jsonl(line: bytes, where: str) -> Passage:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
        raise ValueError(f"{where}: field 'id' must be a string or integer, got {row.get('id')!r}")
    text = row["text"] if "text" in row else row.get("contents")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field 'text' (or 'contents') must be a string, got {text!r}")
    title = row.get("title", "")
    if not isinstance(title, str):
        raise ValueError(f"{where}: field 'title' must be a string, got {title!r}")
    return Passage(str(row["id"]), text, title)


def parse_row(line: bytes, fmt: str, where: str) -> Passage:
    """Parses one corpus line (without its newline); `where` ("file:line") goes into errors."""
    line = line.rstrip(b"\r")
    try:
        passage = _parse_tsv(line, where) if fmt == "tsv" else _parse_jsonl(line, where)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e})") from None
    if not passage.id:
        raise ValueError(f"{where}: empty passage id")
    if not passage.text.strip():
        raise ValueError(f"{where}: passage {passage.id!r} has empty text")
    return passage


def iter_rows(path: str) -> Iterator[tuple[int, int, Passage]]:
    """Yields (start byte, end byte, passage) for every row of a corpus, checking each.

    Raises:
      FileNotFoundError: no such corpus file.
      ValueError: a malformed row (naming file and line), or a corpus without passages.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path} not found")
    fmt = corpus_format(path)
    rows = 0
    with open(path, "rb") as f:
        start = 0
        for line_no, line in enumerate(f, 1):
            end = start + len(line)
            body = line.rstrip(b"\n")
            if line_no == 1 and body.startswith(_BOM):
                start, body = start + len(_BOM), body[len(_BOM):]
            if body.strip() and not (fmt == "tsv" and rows == 0 and body.rstrip(b"\r") in TSV_HEADERS):
                yield start, start + len(body), parse_row(body, fmt, f"{path}:{line_no}")
                rows += 1
            start = end
    if rows == 0:
        raise ValueError(f"{path}: corpus has no passages (empty, or only blank lines / a header)")


def _corpus_stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def build_offsets(corpus_path: str, offsets_path: str) -> np.ndarray:
    """Scans the corpus and writes its `[1 + N, 2] int64` offsets file (see the module docstring)."""
    spans = [(start, end) for start, end, _ in iter_rows(corpus_path)]
    offsets = np.array([_corpus_stamp(corpus_path)] + spans, np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(offsets_path)), exist_ok=True)
    with open(offsets_path + ".tmp", "wb") as f:
        np.save(f, offsets)
    os.replace(offsets_path + ".tmp", offsets_path)
    logging.info("indexed %d passages of %s into %s", len(spans), corpus_path, offsets_path)
    return offsets


def load_offsets(corpus_path: str, offsets_path: str) -> np.ndarray:
    """Memory-maps the offsets file, rebuilding it when missing or older than the corpus."""
    if os.path.isfile(offsets_path):
        offsets = np.load(offsets_path, mmap_mode="r")
        if offsets.ndim == 2 and offsets.shape[1] == 2 and list(offsets[0]) == _corpus_stamp(corpus_path):
            return offsets
        logging.info("%s does not match %s (changed corpus); rescanning", offsets_path, corpus_path)
    build_offsets(corpus_path, offsets_path)
    return np.load(offsets_path, mmap_mode="r")


class DocumentStore:
    """Random access to the passages of one corpus file by row (0-based, file order)."""

    def __init__(self, corpus_path: str, offsets_path: str | None = None):
        """Opens `corpus_path`; `offsets_path` defaults to `<corpus_path>.offsets.npy`."""
        self.path = corpus_path
        self.format = corpus_format(corpus_path)
        self.offsets_path = offsets_path or corpus_path + ".offsets.npy"
        self._offsets = load_offsets(corpus_path, self.offsets_path)
        with open(corpus_path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @functools.cached_property
    def checksum(self) -> str:
        """sha256 of the corpus file (computed once)."""
        return file_sha256(self.path)

    def passage(self, row: int) -> Passage:
        """The passage at `row`; IndexError outside [0, len)."""
        if not 0 <= row < len(self):
            raise IndexError(f"{self.path}: row {row} out of range [0, {len(self)})")
        start, end = (int(x) for x in self._offsets[row + 1])
        try:
            return parse_row(self._mmap[start:end], self.format, "")
        except ValueError as e:  # rows were checked when scanned: the file changed in place
            line_no = self._mmap[:start].count(b"\n") + 1
            raise ValueError(f"{self.path}:{line_no}{e}") from None

    def passages(self, rows: Sequence[int]) -> list[Passage]:
        """The passages at `rows`, in order."""
        return [self.passage(int(row)) for row in rows]

    def contents(self, start: int, stop: int) -> list[str]:
        """`Passage.contents` of rows [start, stop)."""
        return [self.passage(row).contents for row in range(start, min(stop, len(self)))]

    def close(self) -> None:
        self._mmap.close()

    def __enter__(self) -> "DocumentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of `text`."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]



def tokenizer_spans(tokenizer_json: str) -> Callable[[str], TokenSpans]:
    """text -> character spans of its tokens under a Hugging Face `tokenizer.json` (no
    special tokens; the file's own truncation and padding switched off, so every token
    of a long document counts)."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(tokenizer_json):
        raise FileNotFoundError(f"{tokenizer_json} not found: token windows need the encoder's tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: tokenizer.encode(text, add_special_tokens=False).offsets

def window_ranges(num_tokens: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of overlapping windows covering `num_tokens` tokens.

    Windows start every `window - overlap` tokens; the last one ends at the last token.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    ranges = []
    for start in range(0, max(num_tokens, 1), window - overlap):
        ranges.append((start, min(start + window, num_tokens)))
        if start + window >= num_tokens:
            break
    return ranges


def split_documents(src_path: str, dst_path: str, window: int, overlap: int,
                    tokenize: Callable[[str], TokenSpans] = word_spans) -> int:
    """Writes the documents of `src_path` as `.jsonl` passages of at most `window` tokens.

    A document that fits in one window keeps its id and text; a longer one becomes
    passages `<id>#0`, `<id>#1`, ... overlapping by `overlap` tokens, each keeping the
    title. Tokens are what `tokenize` returns: character spans `[(start, end), ...]` in
    order (special tokens excluded); the default splits on whitespace.

    Returns:
      The number of passages written.
    """
    count = 0
    with open(dst_path + ".tmp", "w", encoding="utf-8") as out:
        for _, _, doc in iter_rows(src_path):
            spans = tokenize(doc.text)
            ranges = window_ranges(len(spans), window, overlap)
            for k, (a, b) in enumerate(ranges):
                text = doc.text if len(ranges) == 1 else doc.text[spans[a][0]:spans[b - 1][1]]
                row = {"id": doc.id if len(ranges) == 1 else f"{doc.id}#{k}", "text": text}
                if doc.title:
                    row["title"] = doc.title
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    os.replace(dst_path + ".tmp", dst_path)
    logging.info("split %s into %d passages (window %d, overlap %d) at %s", src_path, count, window,
                 overlap, dst_path)
    return count
