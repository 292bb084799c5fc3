"""Qwen2.5-VL multimodal RoPE (mRoPE) position ids, computed on the host with NumPy.

A port of `transformers`' `Qwen2_5_VLModel.get_rope_index` (5.x) for text and images.
Within each row, over the real tokens (attention_mask 1) only:

- a run of text tokens gets 1-D positions `p, p + 1, ...` on all three axes
  (temporal, height, width), continuing from the running position p;
- a run of `<|image_pad|>` tokens is one image; with its grid (t, h, w) in patches
  and m = spatial_merge_size, it holds t * (h / m) * (w / m) tokens in raster order
  over (t, h / m, w / m), and token (i, j, k) gets positions (p + i, p + j, p + k);
  the running position then advances by max(h, w) / m.

Images are matched to rows of `image_grid_thw` in order, row by row (transformers
finds them through `mm_token_type_ids`, 1 where input_ids == image_token_id, which
is what its processor builds; `<|vision_start|>` plays no part). Padding positions
hold 0 on all three axes, as in transformers. `rope_delta` of a row is
`max position + 1 - number of real tokens`, so a token appended after the row's
`n` real tokens sits at `n + rope_delta` on all three axes: the continuation rule
that transformers' generate follows for decode steps and that the rollout uses for
generated and retrieved tokens (`next_text_positions`, `text_positions_with_delta`).
"""

import numpy as np

IMAGE_TOKEN_ID = 151655  # <|image_pad|>
VIDEO_TOKEN_ID = 151656  # <|video_pad|>


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE positions of a (left-)padded batch of text + image prompts.

    Args:
      input_ids: [B, T] int token ids; each image is a contiguous run of
        `image_token_id` tokens.
      attention_mask: [B, T] bool or 0/1, 0 on padding (left, right or anywhere);
        None means no padding.
      image_grid_thw: [N, 3] int, (t, h, w) of every image in patches, in order of
        appearance, row by row (as `ProcessedImages.grid_thw`); None if no images.
      spatial_merge_size: m, patches merged per side into one token.
      image_token_id: id of <|image_pad|>.
      video_token_id: id of <|video_pad|>; videos are not supported.

    Returns:
      (positions [3, B, T] int32, 0 on padding; rope_deltas [B] int32, the max
      position + 1 - the number of real tokens of each row; 0 for an empty row).

    Raises:
      ValueError: On malformed shapes, video tokens, an image run whose length does
        not match its grid, or a count of image runs different from N.
    """
    input_ids, attention_mask, grids = _check_inputs(input_ids, attention_mask, image_grid_thw, spatial_merge_size)
    real_ids = input_ids[attention_mask]
    if np.any(real_ids == video_token_id):
        raise ValueError(f"input_ids holds video tokens (id {video_token_id}); only text and images are supported")
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), np.int32)
    rope_deltas = np.zeros((batch,), np.int32)
    next_image = 0
    for row in range(batch):
        real = attention_mask[row]
        row_positions, next_image = _row_positions(
            input_ids[row, real] == image_token_id, grids, next_image, spatial_merge_size, row)
        positions[:, row, real] = row_positions
        if row_positions.size:
            rope_deltas[row] = row_positions.max() + 1 - row_positions.shape[1]
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but input_ids holds {next_image} images "
                         f"(runs of image_token_id {image_token_id}); expected one grid per image")
    return positions, rope_deltas


def _check_inputs(input_ids, attention_mask, image_grid_thw, spatial_merge_size):
    """Validates and normalises: ([B, T] ids, [B, T] bool mask, [N, 3] int64 grids)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a [B, T] integer array, got shape {input_ids.shape} "
                         f"dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = np.ones(input_ids.shape, bool)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, "
                         f"got {attention_mask.shape}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0/1 (or bool) values")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    if grids.ndim != 2 or grids.shape[1] != 3 or not np.issubdtype(grids.dtype, np.integer):
        raise ValueError(f"image_grid_thw must be an [N, 3] integer array, got shape {grids.shape} "
                         f"dtype {grids.dtype}")
    if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be an int >= 1, got {spatial_merge_size!r}")
    bad = (grids < 1).any(axis=1) | (grids[:, 1:] % spatial_merge_size != 0).any(axis=1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"image_grid_thw[{index}] must be >= 1 with h and w divisible by spatial_merge_size "
                         f"{spatial_merge_size}, got {grids[index].tolist()}")
    return input_ids, attention_mask.astype(bool), grids.astype(np.int64)


def _row_positions(is_image: np.ndarray, grids: np.ndarray, next_image: int, merge: int,
                   row: int) -> tuple[np.ndarray, int]:
    """Positions [3, n] of one row's n real tokens; returns them and the next unused grid."""
    positions = np.empty((3, is_image.shape[0]), np.int32)
    current = 0
    for image, start, end in _runs(is_image):
        if not image:
            positions[:, start:end] = current + np.arange(end - start)
            current += end - start
            continue
        if next_image >= len(grids):
            raise ValueError(f"input_ids row {row} holds image number {next_image + 1} but image_grid_thw has "
                             f"only {len(grids)} rows; expected one grid per image")
        t, h, w = (int(v) for v in grids[next_image])
        h, w = h // merge, w // merge
        if end - start != t * h * w:
            raise ValueError(f"image {next_image} (row {row}) has {end - start} image tokens but its grid "
                             f"{grids[next_image].tolist()} needs t*h*w/{merge**2} = {t * h * w}; adjacent images "
                             f"must be separated by other tokens")
        grid_t, grid_h, grid_w = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        positions[:, start:end] = current + np.stack([grid_t, grid_h, grid_w]).reshape(3, -1)
        current += max(h, w)
        next_image += 1
    return positions, next_image


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values: (value, start, end) in order."""
    if flags.shape[0] == 0:
        return []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flags.astype(np.int8))) + 1, [flags.shape[0]]])
    return [(bool(flags[start]), int(start), int(end)) for start, end in zip(bounds[:-1], bounds[1:])]


def next_text_positions(positions: np.ndarray, attention_mask: np.ndarray | None, num_tokens: int) -> np.ndarray:
    """Positions of the next `num_tokens` text tokens appended to each row.

    The row's largest position over its real tokens, plus 1, plus 0 .. num_tokens - 1,
    on all three axes (0, 1, ... for a row without real tokens). For a prompt that
    ends in text (every chat prompt does) this is what transformers' generate gives
    decode steps, and it equals `text_positions_with_delta(n + arange(num_tokens),
    rope_deltas)` with n the row's real-token count.

    Args:
      positions: [3, B, T] int, from `rope_index` (or earlier continuations).
      attention_mask: [B, T] bool or 0/1, 0 on padding; None means no padding.
      num_tokens: n >= 0, tokens to place.

    Returns:
      [3, B, n] int32.
    """
    positions = np.asarray(positions)
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"positions must have shape [3, B, T], got {positions.shape}")
    if attention_mask is None:
        attention_mask = np.ones(positions.shape[1:], bool)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if attention_mask.shape != positions.shape[1:]:
        raise ValueError(f"attention_mask must have shape {positions.shape[1:]} (B, T of positions), "
                         f"got {attention_mask.shape}")
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if positions.shape[2] == 0:
        last = np.full((positions.shape[1],), -1, np.int64)
    else:
        last = np.where(attention_mask[None], positions, -1).max(axis=(0, 2))  # [B]
    text = last[:, None] + 1 + np.arange(num_tokens)  # [B, n]
    return np.repeat(text[None], 3, axis=0).astype(np.int32)


def text_positions_with_delta(text_index: np.ndarray, rope_deltas: np.ndarray) -> np.ndarray:
    """mRoPE positions of text tokens from their 1-D index and the row's rope delta.

    Args:
      text_index: [B, n] int, each token's index among the row's real tokens
        (0-based, counting image tokens one each), e.g. the cache length of the row
        at the time the token is written.
      rope_deltas: [B] int, from `rope_index`.

    Returns:
      [3, B, n] int32, text_index + rope_delta on all three axes.
    """
    text_index = np.asarray(text_index)
    rope_deltas = np.asarray(rope_deltas)
    if text_index.ndim != 2 or rope_deltas.shape != text_index.shape[:1]:
        raise ValueError(f"text_index must be [B, n] and rope_deltas [B], got shapes {text_index.shape} "
                         f"and {rope_deltas.shape}")
    text = text_index + rope_deltas[:, None]
    return np.repeat(text[None], 3, axis=0).astype(np.int32)
