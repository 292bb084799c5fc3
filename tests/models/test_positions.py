"""Tests for rwr_jax.models.qwen2_vl.positions: parity with transformers' get_rope_index and generate."""

import numpy as np
import pytest

from rwr_jax.models.qwen2_vl import positions as positions_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE = positions_lib.IMAGE_TOKEN_ID
START, END = 151652, 151653  # <|vision_start|>, <|vision_end|>
PAD = 151643
# Ids for the tiny generating model (its vocabulary has 160 entries).
TINY_IMAGE, TINY_VIDEO, TINY_START, TINY_END = 150, 151, 152, 153


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random Qwen2_5_VLForConditionalGeneration with small special ids."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                                    "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=TINY_IMAGE, video_token_id=TINY_VIDEO, vision_start_token_id=TINY_START,
        vision_end_token_id=TINY_END)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def _prompt(pieces, image=IMAGE, start=START, end=END):
    """Token ids from pieces: an int n is n text tokens (ids 10, 11, ...); a grid (t, h, w) an image."""
    ids, text = [], 10
    for piece in pieces:
        if isinstance(piece, int):
            ids += list(range(text, text + piece))
            text += piece
        else:
            ids += [start] + [image] * (int(np.prod(piece)) // 4) + [end]
    return ids


def _left_pad(rows, pad=PAD):
    length = max(len(row) for row in rows)
    input_ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return input_ids, mask


def _reference(model, input_ids, mask, grids, image=IMAGE):
    """transformers' get_rope_index, fed mm_token_type_ids as its processor builds them."""
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        positions, deltas = model.model.get_rope_index(
            ids, mm_token_type_ids=(ids == image).int(),
            image_grid_thw=None if grids is None else torch.tensor(grids),
            attention_mask=None if mask is None else torch.from_numpy(mask))
    return positions.numpy(), deltas.numpy()[:, 0]


def _check_against_reference(model, input_ids, mask, grids):
    got_positions, got_deltas = positions_lib.rope_index(input_ids, mask, grids)
    want_positions, want_deltas = _reference(model, input_ids, mask, grids)
    assert got_positions.dtype == np.int32 and got_deltas.dtype == np.int32
    np.testing.assert_array_equal(got_positions, want_positions)
    np.testing.assert_array_equal(got_deltas, want_deltas)
    return got_positions, got_deltas


def test_text_only(tiny_model):
    input_ids, mask = _left_pad([_prompt([7]), _prompt([4])])
    positions, deltas = _check_against_reference(tiny_model, input_ids, mask, None)
    np.testing.assert_array_equal(positions[:, 1], [[0, 0, 0, 0, 1, 2, 3]] * 3)
    np.testing.assert_array_equal(deltas, [0, 0])


def test_one_image(tiny_model):
    input_ids = np.array([_prompt([3, (1, 4, 6), 2])])
    positions, deltas = _check_against_reference(tiny_model, input_ids, None, [[1, 4, 6]])
    # Text 0..3 (with <|vision_start|>), the 2x3 image at 4 + (0, i, j), then text from 4 + 3.
    np.testing.assert_array_equal(positions[:, 0, :4], [[0, 1, 2, 3]] * 3)
    np.testing.assert_array_equal(positions[:, 0, 4:10], [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]])
    np.testing.assert_array_equal(positions[:, 0, 10:], [[7, 8, 9]] * 3)
    np.testing.assert_array_equal(deltas, [10 - 13])


def test_two_images_of_different_grids(tiny_model):
    grids = [[1, 30, 42], [1, 8, 2]]  # 315 and 4 tokens; wide then tall.
    input_ids = np.array([_prompt([5, grids[0], 3, grids[1], 6])])
    _check_against_reference(tiny_model, input_ids, None, grids)
    _check_against_reference(tiny_model, input_ids, np.ones_like(input_ids), grids)


def test_left_padded_batch_with_zero_and_two_images(tiny_model):
    grids = [[1, 4, 4], [1, 2, 6]]
    input_ids, mask = _left_pad([_prompt([9]), _prompt([2, grids[0], 1, grids[1], 3])])
    positions, _ = _check_against_reference(tiny_model, input_ids, mask, grids)
    assert (positions[:, 0, mask[0] == 0] == 0).all()  # Padding holds 0, as in transformers.
    # Images in both rows: grids are consumed row by row.
    grids = [[1, 2, 2], [1, 4, 4], [1, 2, 6]]
    input_ids, mask = _left_pad([_prompt([1, grids[0], 12]), _prompt([2, grids[1], 1, grids[2], 3])])
    _check_against_reference(tiny_model, input_ids, mask, grids)


def test_continuation_rule():
    grids = [[1, 4, 6]]
    input_ids, mask = _left_pad([_prompt([3]), _prompt([3, grids[0], 2])])
    positions, deltas = positions_lib.rope_index(input_ids, mask, grids)
    following = positions_lib.next_text_positions(positions, mask, 4)
    np.testing.assert_array_equal(following[:, 0], [[3, 4, 5, 6]] * 3)
    np.testing.assert_array_equal(following[:, 1], [[10, 11, 12, 13]] * 3)
    text_index = mask.sum(1, keepdims=True) + np.arange(4)
    np.testing.assert_array_equal(positions_lib.text_positions_with_delta(text_index, deltas), following)
    # Appending the text tokens and recomputing from scratch gives the same positions.
    longer_ids, longer_mask = _left_pad([_prompt([7]), _prompt([3, grids[0], 6])])
    longer, _ = positions_lib.rope_index(longer_ids, longer_mask, grids)
    np.testing.assert_array_equal(longer[:, :, -4:], following)
    np.testing.assert_array_equal(positions_lib.next_text_positions(np.zeros((3, 2, 0)), None, 2),
                                  [[[0, 1], [0, 1]]] * 3)


def test_continuation_matches_transformers_generate(tiny_model):
    """Prefill positions equal rope_index; decode-step positions equal the continuation rule."""
    grids = [[1, 4, 6], [1, 2, 2]]
    rows = [_prompt([6], TINY_IMAGE, TINY_START, TINY_END),
            _prompt([2, grids[0], 1, grids[1], 2], TINY_IMAGE, TINY_START, TINY_END)]
    input_ids, mask = _left_pad(rows, pad=0)
    seen = []

    def record(module, args, kwargs):
        del module, args
        seen.append(kwargs["position_ids"][-3:].numpy().copy())  # transformers passes [4, B, T]: text + 3 axes.

    hook = tiny_model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ids = torch.from_numpy(input_ids)
        pixels = torch.from_numpy(np.random.default_rng(0).normal(size=(28, 1176)).astype(np.float32))
        with torch.no_grad():
            tiny_model.generate(input_ids=ids, attention_mask=torch.from_numpy(mask), pixel_values=pixels,
                                image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == TINY_IMAGE).int(),
                                max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    positions, deltas = positions_lib.rope_index(input_ids, mask, grids, image_token_id=TINY_IMAGE,
                                                 video_token_id=TINY_VIDEO)
    assert len(seen) == 4
    np.testing.assert_array_equal(seen[0], positions)  # Padding included (0 in both).
    # Decode step k feeds generated token k - 1, the (k - 1)-th text token after the prompt.
    decoded = np.concatenate(seen[1:], axis=-1)  # [3, B, 3]
    np.testing.assert_array_equal(decoded, positions_lib.next_text_positions(positions, mask, 3))
    cache_length = mask.sum(1, keepdims=True) + np.arange(3)
    np.testing.assert_array_equal(decoded, positions_lib.text_positions_with_delta(cache_length, deltas))


def test_errors():
    ids = np.array([_prompt([2, (1, 4, 4), 2])])
    with pytest.raises(ValueError, match="image_grid_thw has 0 rows but input_ids holds|only 0 rows"):
        positions_lib.rope_index(ids, None, None)
    with pytest.raises(ValueError, match="has 4 image tokens but its grid"):
        positions_lib.rope_index(ids, None, [[1, 4, 6]])
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows but input_ids holds 1 images"):
        positions_lib.rope_index(ids, None, [[1, 4, 4], [1, 2, 2]])
    with pytest.raises(ValueError, match="video tokens"):
        positions_lib.rope_index(np.array([[1, 2, positions_lib.VIDEO_TOKEN_ID]]))
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\] must be >= 1 with h and w divisible"):
        positions_lib.rope_index(ids, None, [[1, 3, 4]])
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, T\] integer array"):
        positions_lib.rope_index(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        positions_lib.rope_index(ids, np.ones((1, 3)), [[1, 4, 4]])
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0, got -1"):
        positions_lib.next_text_positions(np.zeros((3, 1, 2), np.int32), None, -1)
