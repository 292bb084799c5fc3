r"""Builds a retrieval index directory (embeddings + exact or ScaNN searcher + manifest).

    python launch/build_index.py --corpus=/data/medcorpus.jsonl --index_dir=/data/index_bge_m3 \
        --encoder=/models/bge-m3 --batch_size=64 --searcher=auto \
        --query_instruction="Represent this sentence for searching relevant passages: "  # as the real-run configs

    # split long documents into 256-token windows overlapping by 32 (the encoder's tokenizer)
    python launch/build_index.py --corpus=/data/textbooks.jsonl --index_dir=/data/index_textbooks \
        --encoder=/models/bge-m3 --window=256 --window_overlap=32 --window_unit=tokens

The corpus is `.tsv` (id<TAB>text[<TAB>title]) or `.jsonl` ({"id", "text"/"contents",
"title"?}). With --window, documents are first split into overlapping windows written
to <index_dir>/passages.jsonl, which becomes the indexed corpus. Embedding shows a
progress bar with ETA and saves every --chunk_rows rows, so rerunning the same command
after an interruption continues where it stopped.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rwr_jax.retrieval import document_store, index as index_lib  # noqa: E402

_CORPUS = flags.DEFINE_string("corpus", None, "Corpus file (.tsv or .jsonl).")
_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Output index directory.")
_ENCODER = flags.DEFINE_string("encoder", None, "Text encoder checkpoint directory (local files).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Passages per encoder call.")
_CHUNK_ROWS = flags.DEFINE_integer("chunk_rows", 8192, "Rows per saved embedding chunk (resume granularity).")
_SEARCHER = flags.DEFINE_enum("searcher", "auto", list(index_lib.SEARCHER_TYPES),
                              "Searcher: exact brute force, ScaNN, or auto (ScaNN from --scann_min_rows rows).")
_SCANN_MIN_ROWS = flags.DEFINE_integer("scann_min_rows", 100_000, "Corpus size from which auto picks ScaNN.")
_WINDOW = flags.DEFINE_integer("window", 0, "Split documents into windows of this many words/tokens (0: off).")
_WINDOW_OVERLAP = flags.DEFINE_integer("window_overlap", 32, "Words/tokens shared by consecutive windows.")
_WINDOW_UNIT = flags.DEFINE_enum("window_unit", "words", ["words", "tokens"],
                                 "Window unit: whitespace words, or tokens of <encoder>/tokenizer.json.")

_QUERY_INSTRUCTION = flags.DEFINE_string(
    "query_instruction", None, "Text prepended to queries (part of the index's encoder fingerprint: use the "
    "trainer's retrieval.query_instruction); default: the encoder checkpoint's own.")
_POOLING = flags.DEFINE_enum("pooling", None, ["cls", "mean"], "Pooling; default: the encoder checkpoint's own.")

PASSAGES_FILE = "passages.jsonl"


def _load_embedder(path: str) -> index_lib.Embedder:
    """The Flax text encoder at `path` (imported here: it is optional for the rest of the script)."""
    from rwr_jax.models.text_encoder.encode import TextEncoder  # pylint: disable=g-import-not-at-top
    overrides = {"query_instruction": _QUERY_INSTRUCTION.value, "pooling": _POOLING.value}
    return TextEncoder.from_pretrained(path, **{k: v for k, v in overrides.items() if v is not None})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    corpus = _CORPUS.value
    os.makedirs(_INDEX_DIR.value, exist_ok=True)
    if _WINDOW.value > 0:
        tokenize = (document_store.tokenizer_spans(os.path.join(_ENCODER.value, "tokenizer.json"))
                    if _WINDOW_UNIT.value == "tokens" else document_store.word_spans)
        corpus = os.path.join(_INDEX_DIR.value, PASSAGES_FILE)  # rewritten identically when resuming
        document_store.split_documents(_CORPUS.value, corpus, _WINDOW.value, _WINDOW_OVERLAP.value, tokenize)
    store = document_store.DocumentStore(corpus, offsets_path=os.path.join(_INDEX_DIR.value,
                                                                           index_lib.OFFSETS_FILE))
    index = index_lib.build_index(_INDEX_DIR.value, store, _load_embedder(_ENCODER.value),
                                  searcher=_SEARCHER.value, batch_size=_BATCH_SIZE.value,
                                  chunk_rows=_CHUNK_ROWS.value, scann_min_rows=_SCANN_MIN_ROWS.value)
    logging.info("index %s: %d passages x %d dims, searcher %s", index.index_dir, index.num_rows, index.dim,
                 index.manifest["searcher"])


if __name__ == "__main__":
    flags.mark_flags_as_required(["corpus", "index_dir", "encoder"])
    app.run(main)
