"""The grain pipeline from records to fixed-shape prompt batches for rollouts (NumPy only).

    source = records.JsonlSource("train.jsonl")
    pipeline = PromptPipeline(source, tokenizer, PipelineConfig(batch_size=8), vision_config)
    iterator = iter(pipeline)            # a grain DatasetIterator
    batch = next(iterator)               # HostPromptBatch of NumPy arrays and strings
    state = iterator.get_state()         # save with each checkpoint; set_state(state) resumes exactly
    prompts = engine.PromptBatch(**batch.prompt_fields())

Stages: source -> [difficulty order] -> this process's shard -> map (load + process images,
tokenise the chat prompt) -> filter (the batch limits, `FitsLimits`) -> shuffle(seed) -> repeat(epochs) ->
to_iter_dataset (read threads) -> batch (left-pad to a length bucket, mRoPE positions with
`rope_index`, pack images into [N, patch bucket]) -> [mp_prefetch workers]. Every stage is
NumPy; batches go to devices in the train loop. Shapes: T is the next multiple of
`length_bucket` >= the batch's longest prompt, capped at `max_prompt_length` (always
`max_prompt_length` when `length_bucket` is None); N = batch_size * max_images_per_prompt;
the patch bucket is `num_patches`, or the power-of-two `vision.patch_bucket` of the batch's
largest image. With `clip_image` set, each image is also preprocessed for a CLIP image tower
(`clip_pixels`, for the visual query reward). A short final batch (`drop_remainder=False`) is filled with copies of its
last prompt and `example_mask` False.
"""

from __future__ import annotations

import dataclasses
import threading

from absl import flags, logging
import grain
import numpy as np

from rwr_jax.data import chat_template, image_processing, records, tokenizer as tokenizer_lib
from rwr_jax.models.qwen2_vl import positions as positions_lib, vision


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Prompt pipeline settings.

    Attributes:
        batch_size: P, prompts per batch (per process).
        max_prompt_length: longest allowed prompt, in tokens (images included).
        length_bucket: T is rounded up to a multiple of this; None: T = max_prompt_length.
        skip_oversized: leave out (log, record) prompts over the batch limits (max_prompt_length,
            max_images_per_prompt, num_patches) instead of raising, as ms-swift's default
            truncation strategy "delete" does.
        system_prompt: the system turn (METHOD.md, "Prompt").
        max_images_per_prompt: images a record may have; 0 for text-only data (no `images`).
        num_patches: fixed patch bucket per image; None: power-of-two buckets per batch.
        min_patch_bucket: smallest power-of-two patch bucket.
        image: image preprocessing settings.
        clip_image: also preprocess every image for a CLIP image tower (`clip_pixels`);
            None: don't.
        mrope: positions [3, P, T] from `rope_index` (Qwen2.5-VL); False: [P, T] 1-D.
        seed: shuffle seed (and curriculum tie-breaking).
        shuffle: shuffle records (each epoch differently).
        curriculum: ascending difficulty order instead of shuffling (every record needs one).
        num_epochs: passes over the data; None repeats forever.
        drop_remainder: drop a short final batch (finite epochs) instead of padding it.
        shard_index, shard_count: this process's shard; None: jax.process_index()/count().
        read_threads: threads preparing records (grain ReadOptions).
        num_workers: grain worker processes (mp_prefetch); 0 runs in this process.
    """

    batch_size: int
    max_prompt_length: int = 2048
    length_bucket: int | None = 128
    skip_oversized: bool = False
    system_prompt: str = chat_template.DEFAULT_SYSTEM_PROMPT
    max_images_per_prompt: int = 1
    num_patches: int | None = None
    min_patch_bucket: int = 64
    image: image_processing.ImageProcessingConfig = image_processing.ImageProcessingConfig()
    clip_image: image_processing.ClipImageConfig | None = None
    mrope: bool = True
    seed: int = 0
    shuffle: bool = True
    curriculum: bool = False
    num_epochs: int | None = None
    drop_remainder: bool = True
    shard_index: int | None = None
    shard_count: int | None = None
    read_threads: int = 4
    num_workers: int = 0

    def __post_init__(self):
        for name, minimum in (("batch_size", 1), ("max_prompt_length", 1), ("max_images_per_prompt", 0),
                              ("min_patch_bucket", 1), ("read_threads", 0), ("num_workers", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"data.{name} must be an int >= {minimum}, got {value!r}")
        for name in ("length_bucket", "num_patches", "num_epochs", "shard_count"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be None or an int >= 1, got {value!r}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError(f"data.shard_index and data.shard_count must be set together, got "
                             f"{self.shard_index!r} and {self.shard_count!r}")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"data.shard_index must be in [0, {self.shard_count}), got {self.shard_index!r}")


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One record made ready for batching: prompt tokens [L] int32, grid_thw [n, 3] int32,
    pixel_values [sum(t * h * w), patch_dim] float32, clip_pixels [n, S, S, 3] float32
    (None without `clip_image`)."""

    record: records.Record
    tokens: np.ndarray
    grid_thw: np.ndarray
    pixel_values: np.ndarray
    clip_pixels: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostPromptBatch:
    """P prompts on the host: every array is NumPy (see the module docstring for T, N, Np).

    Attributes:
        tokens: [P, T] int32, left-padded with `<|endoftext|>`.
        token_mask: [P, T] bool, True on prompt tokens.
        positions: [3, P, T] int32 mRoPE positions (`rope_index`), or [P, T] int32; 0 on padding.
        rope_deltas: [P] int32, from `rope_index` (0 without mRoPE).
        images: VisionInputs (patches [N, Np, patch_dim] float32, positions [N, Np, 2] int32,
            window_ids [N, Np] int32, patch_mask [N, Np] bool), or None for text-only data.
        image_grid_thw: [N, 3] int32 (t, h, w) of the images in prompt order; 0 rows pad.
        num_images: [P] int32 images of each prompt.
        num_image_tokens: [P] int32 `<|image_pad|>` tokens of each prompt.
        example_mask: [P] bool, False on rows filling a short final batch.
        ids, answers, answer_letters, answer_texts: P strings each: record id, answer as
            written, correct letter ("" for free text), correct option text.
        options: P `{letter: text}` dicts (None for open questions).
        clip_pixels: [N, S, S, 3] float32 CLIP-preprocessed images in the order of
            image_grid_thw, zeros on padding (`PipelineConfig.clip_image`), else None.
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    positions: np.ndarray
    rope_deltas: np.ndarray
    images: vision.VisionInputs | None
    image_grid_thw: np.ndarray
    num_images: np.ndarray
    num_image_tokens: np.ndarray
    example_mask: np.ndarray
    ids: tuple[str, ...]
    answers: tuple[str, ...]
    answer_letters: tuple[str, ...]
    answer_texts: tuple[str, ...]
    options: tuple[dict[str, str] | None, ...]
    clip_pixels: np.ndarray | None = None

    def prompt_fields(self) -> dict:
        """The fields of `rollout.engine.PromptBatch`: tokens, token_mask, positions, images."""
        return {"tokens": self.tokens, "token_mask": self.token_mask, "positions": self.positions,
                "images": self.images}


class EncodePrompt:
    """Map: Record -> EncodedPrompt (loads and processes images, tokenises the prompt)."""

    def __init__(self, tokenizer, config: PipelineConfig):
        self.tokenizer, self.config = tokenizer, config
        self._lock = threading.Lock()  # HF tokenizers are not safe to call from several threads.

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "config": self.config}

    def __setstate__(self, state):
        self.__init__(state["tokenizer"], state["config"])

    def __call__(self, record: records.Record) -> EncodedPrompt:
        config = self.config
        grid = np.zeros((0, 3), np.int32)
        pixels = np.zeros((0, config.image.patch_dim), np.float32)
        loaded = load_record_images(record)
        clip_pixels = None if config.clip_image is None else image_processing.clip_pixel_values(
            loaded, config.clip_image)
        if record.images:
            processed = image_processing.process_images(loaded, config.image, names=record.images)
            grid, pixels = processed.grid_thw, processed.pixel_values
        counts = image_processing.image_token_counts(grid, config.image.merge_size).tolist()
        with self._lock:
            tokens = chat_template.encode_prompt(self.tokenizer, record.question, counts, config.system_prompt)
        return EncodedPrompt(record=record, tokens=tokens, grid_thw=grid, pixel_values=pixels,
                             clip_pixels=clip_pixels)


def load_record_images(record: records.Record) -> list:
    """A record's images as RGB PIL images: decoded from `image_bytes` when it carries them (a
    `tfds_records` dataset), else read from its files."""
    if record.image_bytes is not None:
        return [image_processing.decode_image(data, name) for data, name in zip(record.image_bytes, record.images)]
    return [image_processing.load_image(path) for path in record.images]


class FitsLimits:
    """Filters for the batch limits: `images` (records, before their images load) checks
    max_images_per_prompt, a call (encoded prompts) max_prompt_length and num_patches.

    A record over a limit raises a ValueError naming it, or with `skip_oversized` is
    logged once and recorded in `skipped` (record id -> problem; this process only).
    """

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.skipped: dict[str, str] = {}

    def images(self, record: records.Record) -> bool:
        limit = self.config.max_images_per_prompt
        return len(record.images) <= limit or self._refuse(
            record, f"has {len(record.images)} images, more than data.max_images_per_prompt={limit}",
            "raise max_images_per_prompt")

    def __call__(self, encoded: EncodedPrompt) -> bool:
        config, record = self.config, encoded.record
        if len(encoded.tokens) > config.max_prompt_length:
            return self._refuse(record, f"prompt has {len(encoded.tokens)} tokens, more than "
                                        f"data.max_prompt_length={config.max_prompt_length}", "raise max_prompt_length")
        largest = int(encoded.grid_thw.prod(axis=1).max()) if len(encoded.grid_thw) else 0
        if config.num_patches is not None and largest > config.num_patches:
            return self._refuse(record, f"has an image of {largest} patches, more than data.num_patches="
                                        f"{config.num_patches}", "lower image.max_pixels or raise num_patches")
        return True

    def _refuse(self, record: records.Record, problem: str, remedy: str) -> bool:
        message = f"record {record.id!r} ({record.location}) {problem}"
        if not self.config.skip_oversized:
            raise ValueError(f"{message}; {remedy}, or set data.skip_oversized to leave such records out")
        if record.id not in self.skipped:
            self.skipped[record.id] = problem
            logging.warning("Skipping %s", message)
        return False


class CollatePrompts:
    """Batch fn: EncodedPrompts -> HostPromptBatch of static shapes."""

    def __init__(self, config: PipelineConfig, vision_config: vision.VisionConfig | None):
        self.config, self.vision_config = config, vision_config

    def __call__(self, examples) -> HostPromptBatch:
        config, size = self.config, self.config.batch_size
        examples = list(examples)
        real = len(examples)
        examples += [examples[-1]] * (size - real)
        lengths = np.array([len(e.tokens) for e in examples])
        length = config.max_prompt_length
        if config.length_bucket is not None:
            length = min(length, -(-int(lengths.max()) // config.length_bucket) * config.length_bucket)
        tokens = np.full((size, length), tokenizer_lib.PAD_ID, np.int32)
        token_mask = np.zeros((size, length), bool)
        for row, example in enumerate(examples):
            tokens[row, length - lengths[row]:] = example.tokens
            token_mask[row, length - lengths[row]:] = True
        grids = np.concatenate([e.grid_thw for e in examples]).astype(np.int32)
        if config.mrope:
            positions, deltas = positions_lib.rope_index(tokens, token_mask, grids,
                                                         spatial_merge_size=config.image.merge_size)
        else:
            positions, deltas = np.maximum(np.cumsum(token_mask, 1) - 1, 0).astype(np.int32), np.zeros(size, np.int32)
        num_images = np.array([len(e.grid_thw) for e in examples], np.int32)
        capacity = size * config.max_images_per_prompt
        padded_grids = np.zeros((capacity, 3), np.int32)
        padded_grids[:len(grids)] = grids
        records_ = [e.record for e in examples]
        return HostPromptBatch(
            tokens=tokens, token_mask=token_mask, positions=positions, rope_deltas=deltas.astype(np.int32),
            images=self._pack(examples, grids, capacity), image_grid_thw=padded_grids, num_images=num_images,
            num_image_tokens=(tokens == tokenizer_lib.IMAGE_PAD_ID).sum(axis=1).astype(np.int32),
            example_mask=np.arange(size) < real, ids=tuple(r.id for r in records_),
            answers=tuple(r.answer for r in records_), answer_letters=tuple(r.answer_letter or "" for r in records_),
            answer_texts=tuple(r.answer_text for r in records_), options=tuple(r.options for r in records_),
            clip_pixels=self._clip_pixels(examples, capacity))

    def _clip_pixels(self, examples, capacity: int) -> np.ndarray | None:
        clip = self.config.clip_image
        if clip is None:
            return None
        out = np.zeros((capacity, clip.image_size, clip.image_size, 3), np.float32)
        pixels = np.concatenate([e.clip_pixels for e in examples])
        out[:len(pixels)] = pixels
        return out

    def _pack(self, examples, grids: np.ndarray, capacity: int) -> vision.VisionInputs | None:
        if capacity == 0:
            return None
        largest = int(grids.prod(axis=1).max()) if len(grids) else 0
        num_patches = self.config.num_patches or vision.patch_bucket(largest, self.vision_config,
                                                                     self.config.min_patch_bucket)
        pixels = np.concatenate([e.pixel_values for e in examples])
        return vision.pack_images(pixels, grids, self.vision_config, capacity, num_patches)


class _Reordered:
    """A data source reading `source` in a given index order."""

    def __init__(self, source, order: np.ndarray):
        self.source, self.order = source, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int):
        return self.source[int(self.order[index])]


def curriculum_order(source, seed: int) -> np.ndarray:
    """[N] int64 record indices by ascending difficulty; ties in a seeded random order.

    Raises:
        ValueError: If a record has no difficulty (naming it).
    """
    difficulties = np.empty(len(source), np.float64)
    for index in range(len(source)):
        record = source[index]
        if record.difficulty is None:
            raise ValueError(f"data.curriculum needs a difficulty on every record; record {record.id!r} "
                             f"({record.location}) has none")
        difficulties[index] = record.difficulty
    shuffled = np.random.default_rng(seed).permutation(len(source))
    return shuffled[np.argsort(difficulties[shuffled], kind="stable")]


class PromptPipeline:
    """The prompt dataset of one process (see the module docstring); iterate it for batches.

    Args:
        source: a random-access source of `Record`s (e.g. `records.JsonlSource`).
        tokenizer: the Qwen2.5-VL tokenizer.
        config: pipeline settings.
        vision_config: the model's vision config (patch/merge sizes, window size for
            `pack_images`); required unless max_images_per_prompt == 0.

    Attributes:
        dataset: the grain IterDataset of HostPromptBatch.
        num_records: records in this process's shard, before length filtering.
        records_per_shard: records of the smallest process shard (every process can
            take this many; steps planned from it agree across processes).
    """

    def __init__(self, source, tokenizer, config: PipelineConfig,
                 vision_config: vision.VisionConfig | None = None):
        _check_vision(config, vision_config)
        self.config = config
        shard_index, shard_count = _shard(config)
        if config.curriculum:
            source = _Reordered(source, curriculum_order(source, config.seed))
        dataset = grain.MapDataset.source(source)[shard_index::shard_count]
        self.num_records = len(dataset)
        self.records_per_shard = len(source) // shard_count
        if self.num_records == 0:
            raise ValueError(f"shard {shard_index} of {shard_count} has no records ({len(source)} in the source)")
        self._limits = FitsLimits(config)
        dataset = dataset.filter(self._limits.images).map(EncodePrompt(tokenizer, config)).filter(self._limits)
        if config.shuffle and not config.curriculum:
            dataset = dataset.shuffle(seed=config.seed)
        dataset = dataset.repeat(config.num_epochs)
        iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads))
        iter_dataset = iter_dataset.batch(config.batch_size, drop_remainder=config.drop_remainder,
                                          batch_fn=CollatePrompts(config, vision_config))
        if config.num_workers:
            if not flags.FLAGS.is_parsed():  # grain workers read absl flags (DESIGN.md, section 6).
                flags.FLAGS.mark_as_parsed()
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
        self.dataset = iter_dataset
        logging.info("Prompt pipeline: shard %d/%d, %d records, batch %d, seed %d, curriculum %s",
                     shard_index, shard_count, self.num_records, config.batch_size, config.seed, config.curriculum)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    @property
    def skipped_oversized(self) -> dict[str, str]:
        """Record id -> why it was left out (`skip_oversized`; this process, workers log theirs)."""
        return dict(self._limits.skipped)


def _shard(config: PipelineConfig) -> tuple[int, int]:
    if config.shard_count is not None:
        return config.shard_index, config.shard_count
    import jax  # pylint: disable=import-outside-toplevel

    return jax.process_index(), jax.process_count()


def _check_vision(config: PipelineConfig, vision_config: vision.VisionConfig | None) -> None:
    if config.max_images_per_prompt == 0:
        return
    if vision_config is None:
        raise ValueError("vision_config is required when data.max_images_per_prompt > 0 "
                         f"(got {config.max_images_per_prompt}); set it to 0 for text-only data")
    pairs = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
             ("merge_size", "spatial_merge_size"))
    for image_name, vision_name in pairs:
        if getattr(config.image, image_name) != getattr(vision_config, vision_name):
            raise ValueError(f"data.image.{image_name} ({getattr(config.image, image_name)}) must equal the "
                             f"vision config's {vision_name} ({getattr(vision_config, vision_name)})")
