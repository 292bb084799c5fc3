"""Tests for rwr_jax.data.pipeline: static-shape prompt batches from the synthetic demo set."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from rwr_jax.data import chat_template, demo, image_processing, pipeline, records, tokenizer as tokenizer_lib
from rwr_jax.models.qwen2_vl import positions as positions_lib, vision

SYSTEM = "You are a doctor."
VISION = vision.VisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=16,
                             fullatt_block_indexes=())
NUM_TRAIN = 13


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def image_source(tmp_path_factory):
    paths = demo.generate_demo_data(tmp_path_factory.mktemp("mm"), num_train=NUM_TRAIN, num_eval=1, seed=5)
    return records.JsonlSource(paths.train)


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    paths = demo.generate_demo_data(tmp_path_factory.mktemp("text"), num_train=NUM_TRAIN, num_eval=1, seed=5,
                                    multimodal=False)
    return records.JsonlSource(paths.train)


def _config(**changes):
    base = dict(batch_size=4, system_prompt=SYSTEM, max_prompt_length=256, length_bucket=64, shard_index=0,
                shard_count=1, read_threads=2)
    base.update(changes)
    return pipeline.PipelineConfig(**base)


def _batches(source, tokenizer, count=None, iterator=None, **changes):
    config = _config(**changes)
    if iterator is None:
        vision_config = VISION if config.max_images_per_prompt else None
        iterator = iter(pipeline.PromptPipeline(source, tokenizer, config, vision_config))
    if count is None:
        return list(iterator)
    return [next(iterator) for _ in range(count)]


def _real_ids(batches):
    return [i for b in batches for i, real in zip(b.ids, b.example_mask) if real]


def _assert_same(first, second):
    for field in dataclasses.fields(first):
        want, got = getattr(first, field.name), getattr(second, field.name)
        if field.name == "images" and want is not None:
            want, got = jax.tree.leaves(want), jax.tree.leaves(got)
            assert len(want) == len(got) == 4
        np.testing.assert_equal(got, want, err_msg=field.name)


def test_static_shapes_and_dtypes(image_source, tokenizer):
    batches = _batches(image_source, tokenizer, count=5, length_bucket=None, max_prompt_length=192,
                       num_patches=64)
    expected = {"tokens": ((4, 192), np.int32), "token_mask": ((4, 192), bool), "positions": ((3, 4, 192), np.int32),
                "rope_deltas": ((4,), np.int32), "image_grid_thw": ((4, 3), np.int32), "num_images": ((4,), np.int32),
                "num_image_tokens": ((4,), np.int32), "example_mask": ((4,), bool)}
    images = {"patches": ((4, 64, VISION.patch_dim), np.float32), "positions": ((4, 64, 2), np.int32),
              "window_ids": ((4, 64), np.int32), "patch_mask": ((4, 64), bool)}
    for batch in batches:
        for name, (shape, dtype) in expected.items():
            value = getattr(batch, name)
            assert isinstance(value, np.ndarray) and (value.shape, value.dtype) == (shape, dtype), name
        for name, (shape, dtype) in images.items():
            value = getattr(batch.images, name)
            assert isinstance(value, np.ndarray) and (value.shape, value.dtype) == (shape, dtype), name
        assert all(isinstance(x, str) for x in batch.ids + batch.answers + batch.answer_letters + batch.answer_texts)
        assert batch.example_mask.all()
        assert set(batch.prompt_fields()) == {"tokens", "token_mask", "positions", "images"}


def test_left_padded_chat_prompts(image_source, tokenizer):
    by_id = {image_source[i].id: image_source[i] for i in range(len(image_source))}
    for batch in _batches(image_source, tokenizer, count=2):
        assert batch.tokens.shape[1] % 64 == 0
        for row, record_id in enumerate(batch.ids):
            mask = batch.token_mask[row]
            start = int(np.argmax(mask))
            assert mask[start:].all() and not mask[:start].any()  # Padding only on the left.
            assert (batch.tokens[row, :start] == tokenizer_lib.PAD_ID).all()
            record = by_id[record_id]
            grid = batch.image_grid_thw[row:row + 1]  # One image per demo prompt.
            expected = chat_template.encode_prompt(tokenizer, record.question, [int(grid.prod()) // 4], SYSTEM)
            np.testing.assert_array_equal(batch.tokens[row, start:], expected)
            assert (batch.answers[row], batch.answer_letters[row]) == (record.answer, record.answer_letter)


def test_image_tokens_patches_and_positions(image_source, tokenizer):
    for batch in _batches(image_source, tokenizer, count=3):
        n = int(batch.num_images.sum())
        grids = batch.image_grid_thw[:n]
        assert (batch.image_grid_thw[n:] == 0).all()
        pads = (batch.tokens == tokenizer_lib.IMAGE_PAD_ID).sum(axis=1)
        per_image = grids.prod(axis=1) // 4
        np.testing.assert_array_equal(batch.num_image_tokens, pads)
        np.testing.assert_array_equal(pads, np.add.reduceat(per_image, np.cumsum(batch.num_images) - batch.num_images))
        np.testing.assert_array_equal(batch.images.patch_mask.sum(axis=1)[:n], grids.prod(axis=1))
        assert vision.merged_token_mask(batch.images, VISION).sum() == pads.sum()
        positions, deltas = positions_lib.rope_index(batch.tokens, batch.token_mask, grids)
        np.testing.assert_array_equal(batch.positions, positions)
        np.testing.assert_array_equal(batch.rope_deltas, deltas)


def test_seeded_shuffle_and_epochs(text_source, tokenizer):
    settings = dict(max_images_per_prompt=0, num_epochs=2, drop_remainder=False)
    first = _batches(text_source, tokenizer, **settings)
    again = _batches(text_source, tokenizer, **settings)
    other = _batches(text_source, tokenizer, seed=1, **settings)
    ids = _real_ids(first)
    assert ids == _real_ids(again) and ids != _real_ids(other)
    assert len(first) == 7 and first[-1].example_mask.tolist() == [True, True, False, False]
    all_ids = sorted(text_source[i].id for i in range(NUM_TRAIN))
    assert sorted(ids[:NUM_TRAIN]) == sorted(ids[NUM_TRAIN:]) == all_ids
    assert ids[:NUM_TRAIN] != ids[NUM_TRAIN:]  # Each epoch is shuffled anew.


def test_restored_iterator_reproduces_the_next_batches(image_source, tokenizer):
    config = _config(num_patches=64)
    iterator = iter(pipeline.PromptPipeline(image_source, tokenizer, config, VISION))
    _batches(image_source, tokenizer, count=3, iterator=iterator)  # Crosses an epoch boundary later.
    state = iterator.get_state()
    json.dumps(state)  # Plain data, saved with the checkpoint.
    expected = _batches(image_source, tokenizer, count=3, iterator=iterator)
    restored = iter(pipeline.PromptPipeline(image_source, tokenizer, config, VISION))
    restored.set_state(state)
    for want, got in zip(expected, _batches(image_source, tokenizer, count=3, iterator=restored)):
        _assert_same(want, got)


def test_process_shards_are_disjoint_and_cover_the_data(text_source, tokenizer):
    shards = [set(_real_ids(_batches(text_source, tokenizer, max_images_per_prompt=0, num_epochs=1,
                                      drop_remainder=False, batch_size=2, shard_index=k, shard_count=3)))
              for k in range(3)]
    assert [len(s) for s in shards] == [5, 4, 4]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set.union(*shards) == {text_source[i].id for i in range(NUM_TRAIN)}
    default = pipeline.PromptPipeline(text_source, tokenizer, dataclasses.replace(
        _config(max_images_per_prompt=0), shard_index=None, shard_count=None))
    assert default.num_records == NUM_TRAIN  # jax.process_index() 0 of jax.process_count() 1.


def test_curriculum_orders_by_difficulty(text_source, tokenizer, tmp_path):
    settings = dict(max_images_per_prompt=0, num_epochs=1, drop_remainder=False, curriculum=True)
    ids = _real_ids(_batches(text_source, tokenizer, **settings))
    difficulty = {text_source[i].id: text_source[i].difficulty for i in range(NUM_TRAIN)}
    order = [difficulty[i] for i in ids]
    assert sorted(ids) == sorted(difficulty) and order == sorted(order) and len(set(order)) > 1
    assert ids == _real_ids(_batches(text_source, tokenizer, **settings))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "nodiff", "question": "Q?", "answer": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"record 'nodiff' \(.*d.jsonl:1\) has none"):
        pipeline.PromptPipeline(records.JsonlSource(str(path)), tokenizer, _config(max_images_per_prompt=0,
                                                                                  curriculum=True))


@pytest.fixture
def long_source(tmp_path):
    rows = [{"id": f"r{i}", "question": f"Short question {i}?", "answer": "yes"} for i in range(5)]
    rows[2] = {"id": "too-long", "question": "word " * 300, "answer": "yes"}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return records.JsonlSource(str(path))


def test_long_prompt_raises_or_is_skipped(long_source, tokenizer):
    settings = dict(max_images_per_prompt=0, num_epochs=1, drop_remainder=False, shuffle=False, batch_size=2)
    with pytest.raises(ValueError, match=r"record 'too-long' \(.*long.jsonl:3\) prompt has 3\d\d tokens, more "
                                         r"than data.max_prompt_length=256; raise max_prompt_length, or set "
                                         r"data.skip_oversized"):
        _batches(long_source, tokenizer, **settings)
    config = _config(skip_oversized=True, **settings)
    prompts = pipeline.PromptPipeline(long_source, tokenizer, config)
    assert _real_ids(list(prompts)) == ["r0", "r1", "r3", "r4"]
    assert list(prompts.skipped_oversized) == ["too-long"]
    assert prompts.skipped_oversized["too-long"].startswith("prompt has 3")


def test_records_over_the_image_limits_raise_or_are_skipped(image_source, tokenizer):
    """A record with 2 images (max_images_per_prompt 1), an image over a fixed num_patches."""
    rows = [json.loads(line) for line in open(image_source.path)][:4]
    rows[1]["images"] = rows[1]["images"] + rows[0]["images"]
    path = pathlib.Path(image_source.path).with_name("two_images.jsonl")  # the images' directory
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = records.JsonlSource(str(path))
    settings = dict(num_epochs=1, drop_remainder=False, shuffle=False, batch_size=2)
    with pytest.raises(ValueError, match=r"record '[\w-]+' \(.*two_images.jsonl:2\) has 2 images, more than "
                                         r"data.max_images_per_prompt=1; raise max_images_per_prompt, or set "
                                         r"data.skip_oversized"):
        _batches(source, tokenizer, **settings)
    prompts = pipeline.PromptPipeline(source, tokenizer, _config(skip_oversized=True, **settings), VISION)
    assert _real_ids(list(prompts)) == [rows[i]["id"] for i in (0, 2, 3)]
    assert prompts.skipped_oversized == {rows[1]["id"]: "has 2 images, more than data.max_images_per_prompt=1"}
    with pytest.raises(ValueError, match=r"\(.*two_images.jsonl:1\) has an image of \d+ patches, more than "
                                         r"data.num_patches=4; lower image.max_pixels or raise num_patches"):
        _batches(source, tokenizer, num_patches=4, **settings)
    prompts = pipeline.PromptPipeline(source, tokenizer, _config(skip_oversized=True, num_patches=4, **settings),
                                      VISION)
    assert list(prompts) == [] and len(prompts.skipped_oversized) == 4


def test_text_only_and_1d_positions(text_source, image_source, tokenizer):
    batch = _batches(text_source, tokenizer, count=1, max_images_per_prompt=0, mrope=False)[0]
    assert batch.images is None and batch.image_grid_thw.shape == (0, 3)
    np.testing.assert_array_equal(batch.positions, np.maximum(np.cumsum(batch.token_mask, 1) - 1, 0))
    with pytest.raises(ValueError, match=r"record 'demo-train-\d+' \(.*train.jsonl:\d+\) has 1 images, more than "
                                         r"data.max_images_per_prompt=0"):
        _batches(image_source, tokenizer, count=1, max_images_per_prompt=0)


def test_clip_pixels_of_the_record_images(image_source, text_source, tokenizer):
    clip = image_processing.ClipImageConfig(image_size=24)
    batch = _batches(image_source, tokenizer, count=1, clip_image=clip)[0]
    by_id = {image_source[i].id: image_source[i] for i in range(len(image_source))}
    images = [image_processing.load_image(p) for i in batch.ids for p in by_id[i].images]
    assert batch.clip_pixels.shape == (4, 24, 24, 3) and len(images) == 4
    np.testing.assert_array_equal(batch.clip_pixels, image_processing.clip_pixel_values(images, clip))
    assert _batches(image_source, tokenizer, count=1)[0].clip_pixels is None
    text = _batches(text_source, tokenizer, count=1, max_images_per_prompt=0, clip_image=clip)[0]
    assert text.clip_pixels.shape == (0, 24, 24, 3)


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=0), "data.batch_size must be an int >= 1, got 0"),
    (dict(shard_index=None), "data.shard_index and data.shard_count must be set together"),
    (dict(shard_index=3), r"data.shard_index must be in \[0, 1\), got 3"),
    (dict(length_bucket=0), "data.length_bucket must be None or an int >= 1, got 0"),
])
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_vision_config_is_checked(image_source, tokenizer):
    with pytest.raises(ValueError, match="vision_config is required"):
        pipeline.PromptPipeline(image_source, tokenizer, _config())
    with pytest.raises(ValueError, match=r"data.image.patch_size \(14\) must equal the vision config's patch_size"):
        pipeline.PromptPipeline(image_source, tokenizer, _config(), VISION.replace(patch_size=16, window_size=128))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(text_source, tokenizer):
    settings = dict(max_images_per_prompt=0, num_epochs=1, drop_remainder=False)
    expected = _batches(text_source, tokenizer, **settings)
    got = _batches(text_source, tokenizer, num_workers=1, **settings)
    assert len(got) == len(expected) == 4
    for want, batch in zip(expected, got):
        _assert_same(want, batch)
