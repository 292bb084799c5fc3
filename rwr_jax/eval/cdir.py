"""CDIR (METHOD.md): answer again, with a similar case, when the first answer is unsure.

    prompts = SecondPassPrompts(tokenizer, pipeline_config, vision_config, CdirConfig())
    cases = nearest_cases(image_retriever, unsure)
    batch = prompts([(record, kept_completion(...), case) for ...])     # a HostPromptBatch

After the normal retrieval loop, a multimodal record whose answer's first token has
probability below `CdirConfig.threshold` (or that gave no answer) is answered again:
1. the corpus case whose image is nearest to any of the record's images (CLIP cosine,
   `retrieval.image_index`; the record's own image files never count as its case);
2. that image is added to the user turn, after the record's own images;
3. the first completion is kept up to the end of its last retrieved block (its last
   round's reasoning and answer are dropped: `kept_completion`) and continued with a
   fixed think block, a fixed query and a retrieve block holding the case's text
   (trimmed to `max_case_tokens`), as if the model had asked for it;
4. the model writes once more (one round, no further retrieval).
The evaluation loop (`eval.evaluate`) does steps 1 and 4 and keeps the second answer
when there is one. Text-only records are never consulted: there is no image to search
with. The paper searched a random subset of 10,000 images; we search the whole corpus.
The release's exact think text is not available to us: `CdirConfig.think` is ours.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np

from rwr_jax.data import records
from rwr_jax.data.pipeline import CollatePrompts, EncodePrompt, HostPromptBatch, PipelineConfig, load_record_images
from rwr_jax.models.qwen2_vl import vision
from rwr_jax.retrieval.image_index import ImageHit, ImageRetriever
from rwr_jax.rollout import engine, sampler
from rwr_jax.rollout.trajectory import Passage


@dataclasses.dataclass(frozen=True, kw_only=True)
class CdirConfig:
    """CDIR settings.

    Attributes:
      threshold: records whose answer's first token has a lower probability are consulted.
      think: the fixed reasoning that asks for a consultation.
      query: the fixed query.
      max_case_tokens: the retrieve block holding the case's text is trimmed to this.
    """

    threshold: float = 0.9
    think: str = "I need a consultation from a case with similar imaging findings before I answer."
    query: str = "consultation from similar medical imaging case"
    max_case_tokens: int = 1024

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"cdir.threshold must be in (0, 1], got {self.threshold}")
        if self.max_case_tokens < 1:
            raise ValueError(f"cdir.max_case_tokens must be >= 1, got {self.max_case_tokens}")
        for name in ("think", "query"):
            text = getattr(self, name)
            if not text.strip() or "<" in text or ">" in text:
                raise ValueError(f"cdir.{name} must be non-empty text without '<' or '>', got {text!r}")


def wants_consultation(record: records.Record, confidence: float | None, threshold: float) -> bool:
    """True for a multimodal record answered with first-token probability < threshold, or not answered."""
    return bool(record.images) and (confidence is None or confidence < threshold)


def kept_completion(tokens: np.ndarray, source: np.ndarray, length: int) -> np.ndarray:
    """[K] int32: a completion up to the end of its last retrieved block ([0] without one).

    Args:
      tokens, source: [C] one trajectory row's completion tokens and their provenance.
      length: the row's completion length.
    """
    retrieved = np.flatnonzero(source[:length] == sampler.SOURCE_ENV)
    return np.asarray(tokens[:retrieved[-1] + 1 if retrieved.size else 0], np.int32)


def nearest_cases(retriever: ImageRetriever, records_: Sequence[records.Record]) -> list[ImageHit | None]:
    """For each record, the corpus case whose image is the most similar to any of the record's
    images, other than the record's own image files (None if there is none).

    All images of all records go to the index in one search.
    """
    images = [load_record_images(record) for record in records_]
    most = max((len(x) for x in images), default=0)
    found = iter(retriever.search_images([image for row in images for image in row], k=most + 1))
    cases = []
    for record, row in zip(records_, images):
        own = set() if record.image_bytes is not None else {os.path.realpath(path) for path in record.images}
        hits = [hit for _ in row for hit in next(found) if os.path.realpath(hit.image_path) not in own]
        cases.append(max(hits, key=lambda hit: hit.score, default=None))
    return cases


def consultation_ids(tokenizer, case: ImageHit, config: CdirConfig, continues: bool) -> list[int]:
    """Token ids of the fixed think and query blocks and the case's retrieve block.

    continues: the text follows kept completion text (a space separates the blocks, as
    in the system prompt's output shapes); False: it starts the completion.
    """
    lead = (" " if continues else "") + f"<think> {config.think} </think> <query> {config.query} </query>"
    blocks, _ = engine.retrieved_block_ids(tokenizer, [[Passage(case.case_id, case.text, case.score)]],
                                           config.max_case_tokens)
    return tokenizer.encode(lead, add_special_tokens=False) + blocks[0]


def with_case_image(record: records.Record, case: ImageHit) -> records.Record:
    """The record with the case's image added after its own."""
    if record.image_bytes is None:
        return dataclasses.replace(record, images=(*record.images, case.image_path))
    with open(case.image_path, "rb") as f:
        data = f.read()
    return dataclasses.replace(record, images=(*record.images, case.image_path),
                               image_bytes=(*record.image_bytes, data))


def continuation(tokenizer, kept: np.ndarray, case: ImageHit, config: CdirConfig) -> np.ndarray:
    """[K + n] int32: the kept completion (`kept_completion`), then `consultation_ids`: the
    assistant text the second pass starts from."""
    ids = consultation_ids(tokenizer, case, config, continues=len(kept) > 0)
    return np.concatenate([kept, np.asarray(ids, np.int32)]).astype(np.int32)


class SecondPassPrompts:
    """(record, kept completion, case) items -> one HostPromptBatch of second-pass prompts.

    A prompt is the record's chat prompt with the case's image added, then the kept
    completion and `consultation_ids` (`continuation`): the model continues from there.

    Args:
      tokenizer: the Qwen2.5-VL tokenizer.
      config: the evaluation's prompt pipeline settings (batch size, image processing).
      vision_config: the model's vision config.
      cdir: CDIR settings.
      max_completion_length: the first pass's completion capacity (bounds the kept part).
    """

    def __init__(self, tokenizer, config: PipelineConfig, vision_config: vision.VisionConfig, cdir: CdirConfig,
                 max_completion_length: int):
        image = config.image
        image_tokens = image.max_pixels // (image.patch_size * image.merge_size) ** 2 + 2  # + vision start / end
        lead_tokens = len(tokenizer.encode(f" <think> {cdir.think} </think> <query> {cdir.query} </query>",
                                           add_special_tokens=False))
        self.config = dataclasses.replace(
            config, max_images_per_prompt=config.max_images_per_prompt + 1, length_bucket=config.length_bucket or 64,
            max_prompt_length=(config.max_prompt_length + image_tokens + max_completion_length + lead_tokens
                               + cdir.max_case_tokens))
        self.tokenizer, self.cdir = tokenizer, cdir
        self._encode = EncodePrompt(tokenizer, self.config)
        self._collate = CollatePrompts(self.config, vision_config)

    def __call__(self, items: Sequence[tuple[records.Record, np.ndarray, ImageHit]]) -> HostPromptBatch:
        """At most `batch_size` items; a short batch is filled as the pipeline fills one (`example_mask`)."""
        if not 0 < len(items) <= self.config.batch_size:
            raise ValueError(f"a second-pass batch holds 1 to {self.config.batch_size} items, got {len(items)}")
        encoded = []
        for record, kept, case in items:
            prompt = self._encode(with_case_image(record, case))
            tokens = np.concatenate([prompt.tokens, continuation(self.tokenizer, kept, case, self.cdir)])
            if len(tokens) > self.config.max_prompt_length:
                raise ValueError(f"record {record.id!r} ({record.location}): its second-pass prompt has {len(tokens)} "
                                 f"tokens, more than the {self.config.max_prompt_length} planned; lower "
                                 "cdir.max_case_tokens or rollout.max_completion_length")
            encoded.append(dataclasses.replace(prompt, tokens=tokens))
        return self._collate(encoded)
