"""CDIR's image index: nearest corpus images by CLIP image embedding, with their case text.

    encoder = ClipImageEncoder.from_pretrained("/models/clip-vit-base-patch16")
    corpus = ImageCorpus("/data/pmc_cases.jsonl")                 # images relative to the file
    retriever = build_image_index("/data/pmc_image_index", corpus, encoder)
    hits = retriever.search_images([query_image], k=1)           # [[ImageHit(case_id, text, score, ...)]]

The corpus is `.jsonl`, one case per line: `id` (string or integer), the image path
(`image`, or `images` holding exactly one path; relative paths are resolved against
`image_root`, by default the corpus file's folder) and the case text (`caption`, `text`,
or a chat in `conversations` / `messages` as `[{from|role, value|content}]`, whose turns
are joined by newlines with `<image>` placeholders removed). Every row is checked when
the corpus is first opened; a malformed row raises a ValueError naming file and line.

Building reuses `rwr_jax.retrieval.index` unchanged: the corpus offers the document-store
interface (its "contents" are image paths) and an adapter offers the `Embedder` interface,
so embeddings are computed in resumable chunks with a progress bar, searched exactly or
with ScaNN, and recorded in a manifest holding the image encoder's fingerprint (weights
checksum, image size, normalisation, ...) and the corpus checksum; loading refuses a
mismatch. Images are embedded by the CLIP image tower in batches padded to power-of-two
sizes (one compile per batch bucket), L2-normalised, so scores are cosine similarities.
A missing or unreadable image stops the build with an error naming the file, the corpus
line and the case id; missing files are all looked for before embedding starts.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import mmap
import os
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from rwr_jax.data import image_processing
from rwr_jax.data.image_processing import load_image
from rwr_jax.models import checkpoint_io, hf_conversion
from rwr_jax.models.clip import convert
from rwr_jax.models.clip.config import ClipConfig, open_clip_vision_config, read_clip_config
from rwr_jax.models.clip.model import ClipImageModel
from rwr_jax.models.text_encoder.encode import power_of_two_buckets
from rwr_jax.retrieval import document_store, index as index_lib

CORPUS_FORMAT = "image_jsonl"
_LOAD_THREADS = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One corpus row: id, resolved image path and the text shown to the model."""
    id: str
    image_path: str
    text: str


@dataclasses.dataclass(frozen=True)
class ImageHit:
    """One retrieved case: corpus id and row, image path, case text and cosine score."""
    case_id: str
    row: int
    image_path: str
    text: str
    score: float


def _chat_text(turns: Any, where: str) -> str:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{where}: 'conversations' / 'messages' must be a list of turns (objects)")
    values = [t.get("value", t.get("content")) for t in turns]
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: every turn needs a string 'value' (or 'content')")
    return "\n".join(v.replace("<image>", "").strip() for v in values).strip()


def parse_case(line: bytes, where: str, image_root: str) -> Case:
    """Parses one corpus line; `where` ("file:line") goes into errors."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    case_id = row.get("id")
    if not isinstance(case_id, (str, int)) or isinstance(case_id, bool) or case_id == "":
        raise ValueError(f"{where}: field 'id' must be a non-empty string or an integer, got {case_id!r}")
    image = row["image"] if "image" in row else row.get("images")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: field 'image' must be one non-empty path (or 'images' a list of exactly one), "
                         f"got {image!r}")
    if "caption" in row or "text" in row:
        text = row.get("caption", row.get("text"))
    elif "conversations" in row or "messages" in row:
        text = _chat_text(row.get("conversations", row.get("messages")), where)
    else:
        raise ValueError(f"{where}: no case text: expected 'caption', 'text', 'conversations' or 'messages'")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: case {case_id!r} has empty or non-string text {text!r}")
    return Case(str(case_id), os.path.normpath(os.path.join(image_root, image)), text)


class ImageCorpus:
    """Cases of a multimodal `.jsonl` corpus by row, read through a memory map and an offsets file.

    Offers what `index.build_index` reads from a document store: path, format,
    offsets_path, checksum, len and `contents(start, stop)` (here: image paths).
    """

    format = CORPUS_FORMAT

    def __init__(self, corpus_path: str, offsets_path: str | None = None, image_root: str | None = None):
        """Opens `corpus_path`, scanning and checking it unless `offsets_path` (default `<corpus>.offsets.npy`)
        matches its size and mtime; `image_root` defaults to the corpus file's folder."""
        if not os.path.isfile(corpus_path):
            raise FileNotFoundError(f"image corpus file {corpus_path} not found")
        if not corpus_path.endswith(".jsonl"):
            raise ValueError(f"{corpus_path}: image corpus must be a .jsonl file")
        self.path = corpus_path
        self.offsets_path = offsets_path or corpus_path + ".offsets.npy"
        self.image_root = image_root or os.path.dirname(os.path.abspath(corpus_path))
        with open(corpus_path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(corpus_path) else b""
        self._offsets = self._load_offsets()

    def _stamp(self) -> list[int]:
        stat = os.stat(self.path)
        return [stat.st_size, stat.st_mtime_ns]

    def _load_offsets(self) -> np.ndarray:
        if os.path.isfile(self.offsets_path):
            offsets = np.load(self.offsets_path, mmap_mode="r")
            if offsets.ndim == 2 and offsets.shape[1] == 2 and list(offsets[0]) == self._stamp():
                return offsets
        spans, start = [], 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                body = line.rstrip(b"\n").rstrip(b"\r")
                if body.strip():
                    parse_case(body, f"{self.path}:{line_no}", self.image_root)
                    spans.append((start, start + len(body)))
                start += len(line)
        if not spans:
            raise ValueError(f"{self.path}: image corpus has no cases (empty, or only blank lines)")
        offsets = np.array([self._stamp()] + spans, np.int64)
        with open(self.offsets_path + ".tmp", "wb") as f:
            np.save(f, offsets)
        os.replace(self.offsets_path + ".tmp", self.offsets_path)
        return offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @functools.cached_property
    def checksum(self) -> str:
        """sha256 of the corpus file (computed once)."""
        return document_store.file_sha256(self.path)

    def _span(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"{self.path}: row {row} out of range [0, {len(self)})")
        return int(self._offsets[row + 1][0]), int(self._offsets[row + 1][1])

    def where(self, row: int) -> str:
        """'corpus.jsonl:LINE (row R, id ID)' for error messages."""
        start, end = self._span(row)
        line_no = self._mmap[:start].count(b"\n") + 1
        case_id = json.loads(self._mmap[start:end]).get("id")
        return f"{self.path}:{line_no} (row {row}, id {str(case_id)!r})"

    def case(self, row: int) -> Case:
        """The case at `row` (0-based, blank lines excluded)."""
        start, end = self._span(row)
        return parse_case(self._mmap[start:end], f"{self.path} row {row}", self.image_root)

    def contents(self, start: int, stop: int) -> list[str]:
        """Image paths of rows [start, stop): what the index embeds."""
        return [self.case(row).image_path for row in range(start, min(stop, len(self)))]

    def rows_with_image(self, image_path: str) -> list[int]:
        """Rows whose image is `image_path` (a scan; used for error messages)."""
        return [row for row in range(len(self)) if self.case(row).image_path == image_path]

    def missing_images(self) -> list[int]:
        """Rows whose image file does not exist."""
        return [row for row in range(len(self)) if not os.path.isfile(self.case(row).image_path)]


def preprocess_images(images: Sequence[Image.Image], config: ClipConfig) -> np.ndarray:
    """CLIP preprocessing as transformers' CLIPImageProcessor does it, channels last
    (`image_processing.clip_pixel_values` with the config's image size, mean and std).

    Returns:
      [N, S, S, 3] float32, S = config.vision.image_size.
    """
    return image_processing.clip_pixel_values(images, clip_image_config(config))


def clip_image_config(config: ClipConfig) -> image_processing.ClipImageConfig:
    """The image preprocessing a CLIP config was trained with."""
    return image_processing.ClipImageConfig(image_size=config.vision.image_size, image_mean=config.image_mean,
                                            image_std=config.image_std)


class ClipImageEncoder:
    """Embeds images with a CLIP image tower, in power-of-two padded batches (one compile per batch size)."""

    def __init__(self, config: ClipConfig, params: Any, *, name: str, batch_size: int = 32,
                 weights_sha256: str | None = None):
        """Args: config (text may be None), ClipImageModel params, a name for the manifest, the largest batch
        per forward pass, and the weights checksum (default: sha256 of the param bytes)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.params, self.name = config.replace(text=None), params, name
        self.batch_buckets = power_of_two_buckets(batch_size)
        self._weights_sha256 = weights_sha256
        self._compiled: list[int] = []
        self._forward = jax.jit(self._embed)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, **kwargs: Any) -> "ClipImageEncoder":
        """The image side of a transformers CLIPModel directory (config, preprocessor config, weights)."""
        config = read_clip_config(checkpoint_dir, text=None)
        return cls(config, convert.load_hf_params(checkpoint_dir, config), name=os.path.basename(
            os.path.normpath(checkpoint_dir)), weights_sha256=_files_sha256(checkpoint_io.weight_files(
                checkpoint_dir)), **kwargs)

    @classmethod
    def from_open_clip(cls, weights_path: str, open_clip_config_path: str, **kwargs: Any) -> "ClipImageEncoder":
        """The image tower of an open_clip timm-ViT checkpoint (BiomedCLIP) and its `open_clip_config.json`."""
        config = open_clip_vision_config(checkpoint_io.read_json(open_clip_config_path), where=open_clip_config_path)
        return cls(config, convert.load_open_clip_image_params(weights_path, config),
                   name=os.path.basename(os.path.dirname(os.path.abspath(weights_path))),
                   weights_sha256=_files_sha256([weights_path]), **kwargs)

    @property
    def dim(self) -> int:
        return self.config.projection_dim

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-serialisable identity of the embeddings, recorded in and checked against index manifests."""
        if self._weights_sha256 is None:
            digest = hashlib.sha256()
            for leaf in jax.tree_util.tree_leaves(hf_conversion.flatten_params(self.params)):
                digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
            self._weights_sha256 = digest.hexdigest()
        c, v = self.config, self.config.vision
        return {"kind": "clip_image", "name": self.name, "dim": self.dim, "image_size": v.image_size,
                "patch_size": v.patch_size, "image_mean": list(c.image_mean), "image_std": list(c.image_std),
                "resize": "shortest_edge_bicubic_center_crop", "normalize": True, "dtype": c.dtype,
                "weights_sha256": self._weights_sha256}

    def _embed(self, params, pixels):
        self._compiled.append(pixels.shape[0])  # runs only while tracing: once per batch bucket
        return ClipImageModel(self.config).apply({"params": params}, pixels)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeds RGB PIL images.

        Returns:
          [N, P] float32, L2-normalised; [0, P] for no images.
        """
        out = np.zeros((len(images), self.dim), np.float32)
        step = self.batch_buckets[-1]
        for start in range(0, len(images), step):
            pixels = preprocess_images(images[start:start + step], self.config)
            bucket = next(b for b in self.batch_buckets if b >= len(pixels))
            padded = np.zeros((bucket,) + pixels.shape[1:], np.float32)
            padded[:len(pixels)] = pixels
            out[start:start + len(pixels)] = np.asarray(self._forward(self.params, padded))[:len(pixels)]
        return out


def _files_sha256(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(document_store.file_sha256(path)))
    return digest.hexdigest()


class _CorpusEmbedder:
    """`index.Embedder` over an ImageCorpus: the "passages" it gets are the corpus' image paths."""

    def __init__(self, encoder: ClipImageEncoder, corpus: ImageCorpus):
        self.encoder, self.corpus = encoder, corpus

    def _load(self, path: str) -> Image.Image:
        try:
            return load_image(path)
        except (FileNotFoundError, ValueError) as e:
            rows = self.corpus.rows_with_image(path)
            where = self.corpus.where(rows[0]) if rows else self.corpus.path
            raise type(e)(f"{where}: image {path!r}: {e}") from e

    def encode_passages(self, paths: list[str]) -> np.ndarray:
        with concurrent.futures.ThreadPoolExecutor(min(_LOAD_THREADS, max(len(paths), 1))) as pool:
            return self.encoder.encode_images(list(pool.map(self._load, paths)))

    encode_queries = encode_passages

    def fingerprint(self) -> dict[str, Any]:
        return self.encoder.fingerprint()


class ImageRetriever:
    """Nearest-image search over one image index, its corpus and the encoder it was built with."""

    def __init__(self, corpus: ImageCorpus, index: index_lib.Index, encoder: ClipImageEncoder):
        """Checks that `index` was built with `encoder` over `corpus` (ValueError listing what differs)."""
        where = os.path.join(index.index_dir, index_lib.MANIFEST_FILE)
        if index.manifest.get("corpus", {}).get("format") != CORPUS_FORMAT:
            raise ValueError(f"{where}: corpus format {index.manifest.get('corpus', {}).get('format')!r} is not "
                             f"{CORPUS_FORMAT!r}; this is not an image index")
        index_lib.check_manifest(index.manifest, where, encoder.fingerprint(), corpus.checksum, len(corpus))
        self.corpus, self.index, self.encoder = corpus, index, encoder

    def search_images(self, images: Sequence[Image.Image | str | os.PathLike], k: int) -> list[list[ImageHit]]:
        """The k corpus cases whose images are most similar to each query image, best first.

        Args:
          images: Q PIL images or image file paths.
          k: cases per query (>= 1); more than the corpus holds returns every case.

        Returns:
          Q lists of min(k, N) hits (fewer only if an approximate searcher found fewer).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        loaded = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
        if not loaded:
            return []
        scores, rows = self.index.search(self.encoder.encode_images(loaded), k)
        return [[self._hit(int(row), float(score)) for score, row in zip(q_scores, q_rows) if row >= 0]
                for q_scores, q_rows in zip(scores, rows)]

    def _hit(self, row: int, score: float) -> ImageHit:
        case = self.corpus.case(row)
        return ImageHit(case.id, row, case.image_path, case.text, score)


def build_image_index(index_dir: str, corpus: ImageCorpus, encoder: ClipImageEncoder, *, searcher: str = "auto",
                      batch_size: int = 32, chunk_rows: int = 4096, scann_min_rows: int = 100_000) -> ImageRetriever:
    """Embeds every corpus image and builds the index in `index_dir` (resumable; see `index.build_index`).

    Raises:
      FileNotFoundError: corpus images are missing (count, and the first ones with file, line and id).
      ValueError: an image is unreadable (file, line and id named), or bad arguments.
    """
    missing = corpus.missing_images()
    if missing:
        listed = "; ".join(f"{corpus.where(r)}: {corpus.case(r).image_path}" for r in missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(corpus)} images of {corpus.path} do not exist, e.g. {listed}")
    index = index_lib.build_index(index_dir, corpus, _CorpusEmbedder(encoder, corpus), searcher=searcher,
                                  batch_size=batch_size, chunk_rows=chunk_rows, scann_min_rows=scann_min_rows)
    return ImageRetriever(corpus, index, encoder)


def open_image_index(index_dir: str, encoder: ClipImageEncoder, corpus_path: str | None = None,
                     image_root: str | None = None) -> ImageRetriever:
    """Opens an image index and the corpus it was built from (or `corpus_path`, e.g. after a move).

    Raises:
      FileNotFoundError / ValueError: as `index.load_index` (missing files; encoder or corpus mismatch).
    """
    corpus_path = corpus_path or index_lib.read_manifest(index_dir)["corpus"]["path"]
    corpus = ImageCorpus(corpus_path, os.path.join(index_dir, index_lib.OFFSETS_FILE), image_root)
    return ImageRetriever(corpus, index_lib.load_index(index_dir, _CorpusEmbedder(encoder, corpus), corpus), encoder)
