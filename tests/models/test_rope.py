"""`rope.apply_rope` against transformers' Qwen2 rotation (float32), and its bfloat16 rule:
rotate in float32, round once."""

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models import rope
from tests.models import hf_models

torch = hf_models.torch


def _inputs(dtype):
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [7, 8, 9, 30, 31, 500]], jnp.int32)
    cos, sin = rope.rope_cos_sin(positions, head_dim=16, theta=10_000.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3, 16), jnp.float32).astype(dtype)
    return x, cos, sin


def test_float32_matches_transformers():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb  # pylint: disable=g-import-not-at-top
    x, cos, sin = _inputs(jnp.float32)
    to_torch = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    # transformers' layout is [B, N, T, head_dim]; cos / sin [B, T, head_dim] unsqueezed at the head axis.
    expected, _ = apply_rotary_pos_emb(to_torch(x).transpose(1, 2), to_torch(x).transpose(1, 2),
                                       to_torch(cos), to_torch(sin))
    got = rope.apply_rope(x, cos, sin)
    difference = np.max(np.abs(np.asarray(got) - expected.transpose(1, 2).numpy()))
    print(f"apply_rope vs transformers, float32: max abs difference {difference:.2e}")
    assert got.dtype == jnp.float32 and difference < 1e-6


def test_bfloat16_is_rotated_in_float32_and_rounded_once():
    x, cos, sin = _inputs(jnp.bfloat16)
    got = rope.apply_rope(x, cos, sin)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(rope.apply_rope(x.astype(jnp.float32), cos, sin).astype(jnp.bfloat16),
                                             np.float32))
    # transformers' bf16 rotation rounds cos, sin and every step: within 2 bf16 ulps of ours (|values| < 4).
    stepwise = x * cos[:, :, None].astype(jnp.bfloat16) + jnp.concatenate(
        [-x[..., 8:], x[..., :8]], axis=-1) * sin[:, :, None].astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(stepwise, np.float32), rtol=0, atol=2 ** -5)
