"""Batched, jitted sentence embedding with the checkpoint's own tokenizer.

Texts are tokenised on the host (the checkpoint's HF tokenizer, local files only),
sorted by length, cut into batches and padded to static shapes: the token length to
the next bucket (powers of two from `min_bucket_length`, capped at the config's
`max_length`) and the batch to the next power of two (capped at `batch_size`). The
jitted forward therefore compiles once per (batch, length) bucket; `num_compiles`
counts them.
"""

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
import transformers
from absl import logging

from rwr_jax.models import checkpoint_io
from rwr_jax.models.text_encoder import convert
from rwr_jax.models.text_encoder.config import EncoderConfig, read_encoder_config
from rwr_jax.models.text_encoder.model import TextEncoderModel


def power_of_two_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
    """Powers of two from `start` below `limit`, then `limit`: e.g. (16, 32, 64, 100) for 100."""
    if limit < 1 or start < 1:
        raise ValueError(f"bucket limit and start must be >= 1, got limit={limit}, start={start}")
    buckets = []
    size = 1
    while size < limit:
        if size >= start:
            buckets.append(size)
        size *= 2
    return tuple(buckets) + (limit,)


def _bucket(size: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= size)


def _check_texts(texts: Sequence[str], kind: str, allow_empty: bool) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{kind} must be a list of strings, got a single str")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{kind}[{i}] must be a str, got {type(text).__name__}")
        if not allow_empty and not text.strip():
            raise ValueError(f"{kind}[{i}] is empty; expected a non-empty query")


class TextEncoder:
    """Embeds queries and passages with a BERT / XLM-R checkpoint.

    Example:
      encoder = TextEncoder("/models/bge-m3", pooling="cls",
                            query_instruction="Represent this sentence for searching relevant passages: ")
      q = encoder.encode_queries(["chest pain and dyspnea"])   # [1, 1024] float32
      p = encoder.encode_passages(corpus)                       # [N, 1024] float32
    """

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        batch_size: int = 32,
        min_bucket_length: int = 16,
        tokenizer: Any = None,
        shardings: Any = None,
        **overrides: Any,
    ):
        """Loads config, weights and tokenizer from a local directory.

        Args:
          checkpoint_dir: a HF / sentence-transformers model directory.
          batch_size: largest batch per forward pass.
          min_bucket_length: smallest token-length bucket.
          tokenizer: a HF tokenizer to use instead of the directory's own.
          shardings: optional param shardings (see `convert.load_hf_params`).
          **overrides: EncoderConfig fields (pooling, normalize, query_instruction,
            max_length, dtype, ...), winning over the directory's files.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.checkpoint_dir = checkpoint_dir
        self.config: EncoderConfig = read_encoder_config(checkpoint_dir, **overrides)
        self.params = convert.load_hf_params(checkpoint_dir, self.config, shardings=shardings)
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
        self.tokenizer = tokenizer
        self.batch_buckets = power_of_two_buckets(batch_size)
        self.length_buckets = power_of_two_buckets(self.config.max_length, min(min_bucket_length,
                                                                                self.config.max_length))
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.config.pad_token_id
        self._compiled: list[tuple[int, int]] = []
        self._forward = jax.jit(self._embed)
        self._weights_sha256: str | None = None
        self._tokenizer_sha256: str | None = None

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, **kwargs: Any) -> "TextEncoder":
        """Same as `TextEncoder(checkpoint_dir, **kwargs)`."""
        return cls(checkpoint_dir, **kwargs)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.config.hidden_size

    @property
    def num_compiles(self) -> int:
        """How many (batch, length) buckets the forward pass has been compiled for."""
        return len(self._compiled)

    @property
    def compiled_shapes(self) -> tuple[tuple[int, int], ...]:
        """The (batch, length) input shapes compiled so far, in order."""
        return tuple(self._compiled)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the embeddings, recorded in and checked against index manifests.

        Returns:
          JSON-serialisable dict: directory name, dim, pooling, normalize,
          query_instruction, max_length, dtype, the sha256 of the weight files and
          that of the tokenizer (`tokenizer_sha256`; computed on first call, then cached).
        """
        if self._weights_sha256 is None:
            digest = hashlib.sha256()
            for path in checkpoint_io.weight_files(self.checkpoint_dir):
                with open(path, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(block)
            self._weights_sha256 = digest.hexdigest()
            self._tokenizer_sha256 = tokenizer_sha256(self.tokenizer)
        c = self.config
        return {"name": os.path.basename(os.path.normpath(self.checkpoint_dir)), "dim": self.dim,
                "pooling": c.pooling, "normalize": c.normalize, "query_instruction": c.query_instruction,
                "max_length": c.max_length, "dtype": c.dtype, "weights_sha256": self._weights_sha256,
                "tokenizer_sha256": self._tokenizer_sha256}

    def _embed(self, params, tokens, token_mask):
        # Runs only while tracing, i.e. once per new input shape.
        self._compiled.append(tokens.shape)
        logging.info("compiling text encoder for batch %d x length %d (%d compiles)", tokens.shape[0],
                     tokens.shape[1], len(self._compiled))
        return TextEncoderModel(self.config).apply({"params": params}, tokens, token_mask)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length, padding=False,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def _run_batch(self, ids: list[list[int]]) -> np.ndarray:
        batch = _bucket(len(ids), self.batch_buckets)
        length = _bucket(max(len(row) for row in ids), self.length_buckets)
        tokens = np.full((batch, length), self._pad_id, np.int32)
        token_mask = np.zeros((batch, length), bool)
        for row, row_ids in enumerate(ids):
            tokens[row, :len(row_ids)] = row_ids
            token_mask[row, :len(row_ids)] = True
        out = self._forward(self.params, tokens, token_mask)
        return np.asarray(out, np.float32)[:len(ids)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts as given (no instruction).

        Args:
          texts: N strings.

        Returns:
          [N, D] float32 (L2-normalised if the config says so); [0, D] for no texts.
        """
        _check_texts(texts, "texts", allow_empty=True)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self._tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        step = self.batch_buckets[-1]
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            out[chunk] = self._run_batch([ids[i] for i in chunk])
        return out

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Embeds search queries, each prefixed with `config.query_instruction`.

        Args:
          queries: N non-empty strings.

        Returns:
          [N, D] float32; [0, D] for no queries.

        Raises:
          ValueError: a query is empty or whitespace only; the message names its index.
        """
        _check_texts(queries, "queries", allow_empty=False)
        return self.encode([self.config.query_instruction + q for q in queries])

    def encode_passages(self, passages: Sequence[str]) -> np.ndarray:
        """Embeds passages (no instruction); an empty passage is embedded as-is.

        Args:
          passages: N strings.

        Returns:
          [N, D] float32; [0, D] for no passages.
        """
        _check_texts(passages, "passages", allow_empty=True)
        return self.encode(passages)


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides a HF tokenizer's ids: a fast tokenizer's whole definition
    (vocabulary, normaliser, pre-tokeniser, post-processor, added tokens; not its current
    truncation / padding state, which each call sets), or a slow one's class and vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
