"""From trajectories to the arrays a GRPO update needs: rewards, advantages, batch.

Strings are parsed once on the host (`rl.parser`); every reward is a jnp function of
the parsed arrays (`rl.rewards`). The confidence-gain reward needs the policy's
option-letter distribution at the first answer token *with* the retrieved blocks in
context and *without* them: one teacher-forced forward pass over each version of the
trajectory, reading a single position per row.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.rl import advantages as advantages_lib
from rwr_jax.rl import rewards
from rwr_jax.rollout import sampler
from rwr_jax.rollout.trajectory import Trajectory
from rwr_jax.train.step import TrainBatch


def image_feature_index(prompt_tokens: np.ndarray, total_length: int, image_token_id: int,
                        group_size: int) -> np.ndarray:
    """[B, L] int32: each `<|image_pad|>` token's rank among the image tokens of the
    batch's P = B / G prompts (the G rows of a group repeat their prompt's ranks), -1
    elsewhere.

    Args:
      prompt_tokens: [B, T] prompts; rows p * G ... p * G + G - 1 repeat prompt p.
      total_length: L = T + C, the full sequence length.
      image_token_id: id of `<|image_pad|>`.
      group_size: G.
    """
    batch, length = prompt_tokens.shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size {group_size} must divide the {batch} rows")
    grouped = prompt_tokens.reshape(-1, group_size, length)
    if (grouped != grouped[:, :1]).any():
        raise ValueError(f"the rows of a group (group_size {group_size}) must repeat one prompt")
    is_image = prompt_tokens == image_token_id
    counts = is_image[::group_size].sum(axis=1)
    offsets = np.repeat(np.cumsum(counts) - counts, group_size)  # image tokens of earlier prompts
    out = np.full((batch, total_length), -1, np.int32)
    out[:, :length] = np.where(is_image, offsets[:, None] + np.cumsum(is_image, axis=1) - 1, -1)
    return out


def _without_retrieval(traj: Trajectory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completions with their environment tokens removed: (tokens, source, old->new index)."""
    batch, capacity = traj.tokens.shape
    tokens = np.zeros_like(traj.tokens)
    source = np.zeros_like(traj.source)
    new_index = np.full((batch, capacity), -1, np.int64)
    for b in range(batch):
        keep = np.flatnonzero(traj.source[b] == sampler.SOURCE_MODEL)
        tokens[b, :len(keep)] = traj.tokens[b, keep]
        source[b, :len(keep)] = sampler.SOURCE_MODEL
        new_index[b, keep] = np.arange(len(keep))
    return tokens, source, new_index


@functools.partial(jax.jit, static_argnames=("model",))
def _distribution_at(model, params, tokens, positions, mask, embeds, read_at, letter_ids, letter_mask, sampled):
    """Log-probs of the option letters (and of one token) at one position per row."""
    hidden, _ = model.apply({"params": params}, tokens, positions, mask, embeds=embeds, return_hidden=True)
    picked = jnp.take_along_axis(hidden, read_at[:, None, None], axis=1)
    logprobs = jax.nn.log_softmax(model.apply({"params": params}, picked, method=type(model).logits)[:, 0]
                                  .astype(jnp.float32))
    letters = rewards.letter_logprobs(logprobs, letter_ids, letter_mask)
    return letters, jnp.take_along_axis(logprobs, sampled[:, None], axis=1)[:, 0]


def confidence_inputs(model, params, traj: Trajectory, parsed, letter_ids, letter_mask,
                      embed_fn) -> dict[str, jax.Array]:
    """The [B, 10] letter log-probs with and without retrieval at the first answer token.

    Args:
      embed_fn: (params, tokens [B, L]) -> [B, L, D] input embeddings (images in place).
    """
    answer_at = np.asarray(parsed.answer_token_index)
    prompt_length = traj.prompt_tokens.shape[1]
    safe = np.maximum(answer_at, 0)
    sampled = traj.tokens[np.arange(len(safe)), safe]
    out = {}
    without_tokens, without_source, new_index = _without_retrieval(traj)
    without = dataclasses.replace(traj, tokens=without_tokens, source=without_source)
    variants = {"with": (traj, safe), "without": (without, np.maximum(new_index[np.arange(len(safe)), safe], 0))}
    for name, (version, index) in variants.items():
        tokens, mask, positions = version.full_sequence()
        embeds = embed_fn(params, jnp.asarray(tokens))
        letters, token_logprob = _distribution_at(
            model, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), embeds,
            jnp.asarray(prompt_length + index - 1, jnp.int32), letter_ids, letter_mask, jnp.asarray(sampled))
        out[f"letter_logprobs_{name}"] = letters
        out[f"sampled_logprob_{name}"] = token_logprob
    return out


def make_train_batch(traj: Trajectory, total_rewards: jax.Array, advantage_config: advantages_lib.AdvantageConfig,
                     images=None, image_token_id: int | None = None) -> TrainBatch:
    """Advantages from rewards, and the device arrays of the update."""
    tokens, mask, positions = traj.full_sequence()
    advantages = advantages_lib.compute_advantages(total_rewards, advantage_config)
    feature_index = None
    if images is not None:
        feature_index = jnp.asarray(image_feature_index(traj.prompt_tokens, tokens.shape[1], image_token_id,
                                                        advantage_config.group_size))
    return TrainBatch(tokens=jnp.asarray(tokens), token_mask=jnp.asarray(mask), positions=jnp.asarray(positions),
                      loss_mask=jnp.asarray(traj.loss_mask), advantages=advantages.astype(jnp.float32),
                      sampler_logprobs=jnp.asarray(traj.logprobs), images=images,
                      image_feature_index=feature_index)
