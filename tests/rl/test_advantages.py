"""Group advantages: hand-computed values, degenerate groups give exactly 0, groups are
independent, and the estimators are chosen by name."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import registry
from rwr_jax.rl import advantages
from rwr_jax.rl.advantages import AdvantageConfig, compute_advantages


def _adv(rewards, estimator="grpo", group_size=4, **kwargs):
    config = AdvantageConfig(estimator=estimator, group_size=group_size, **kwargs)
    return np.asarray(compute_advantages(jnp.asarray(rewards, jnp.float32), config))


def test_registered():
    assert {"grpo", "dr_grpo", "rloo"} <= set(registry.names("advantage"))
    assert registry.lookup("advantage", "grpo") is advantages.grpo_advantages


def test_grpo_hand_computed():
    # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3.
    std = math.sqrt(14 / 3)
    expected = np.array([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
    np.testing.assert_allclose(_adv([1, 2, 3, 6]), expected, rtol=1e-6)
    np.testing.assert_allclose(_adv([1, 2, 3, 6], eps=0.5), np.array([-2.0, -1.0, 0.0, 3.0]) / (std + 0.5),
                               rtol=1e-6)


def test_dr_grpo_and_rloo_hand_computed():
    np.testing.assert_allclose(_adv([1, 2, 3, 6], "dr_grpo"), [-2.0, -1.0, 0.0, 3.0], atol=1e-6)
    # RLOO: r_i minus the mean of the other three.
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]
    np.testing.assert_allclose(_adv([1, 2, 3, 6], "rloo"), expected, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.0, 0.1, 1.7, -3.3])
def test_equal_rewards_give_exactly_zero(estimator, value):
    out = _adv([value] * 8, estimator, group_size=8)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(_adv([value] * 8, estimator, group_size=8, eps=0.0), 0.0)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_of_one_gives_zero(estimator):
    out = _adv([1.0, -2.0, 5.0], estimator, group_size=1)
    np.testing.assert_array_equal(out, 0.0)
    grad = jax.grad(lambda r: jnp.sum(compute_advantages(r, AdvantageConfig(estimator=estimator, group_size=1))))(
        jnp.asarray([1.0, -2.0, 5.0]))
    assert np.isfinite(np.asarray(grad)).all()


def test_groups_are_independent():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 5)).astype(np.float32)
    together = _adv(rewards.reshape(-1), group_size=5).reshape(3, 5)
    for g in range(3):
        np.testing.assert_allclose(together[g], _adv(rewards[g], group_size=5), rtol=1e-6)
        centered = rewards[g] - rewards[g].mean()
        np.testing.assert_allclose(together[g], centered / (rewards[g].std(ddof=1) + 1e-4), rtol=1e-5, atol=1e-6)
    # Changing one group leaves the others alone.
    changed = rewards.copy()
    changed[1] += rng.normal(size=5).astype(np.float32)
    other = _adv(changed.reshape(-1), group_size=5).reshape(3, 5)
    np.testing.assert_array_equal(other[[0, 2]], together[[0, 2]])


def test_jit_and_mixed_groups():
    rewards = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    out = np.asarray(jax.jit(compute_advantages, static_argnums=1)(rewards, AdvantageConfig(group_size=4)))
    np.testing.assert_array_equal(out[:4], 0.0)
    np.testing.assert_allclose(out[4:], np.array([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-4), rtol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        _adv([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        _adv([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="AdvantageConfig.group_size must be >= 1, got 0"):
        AdvantageConfig(group_size=0)
    with pytest.raises(ValueError, match="AdvantageConfig.eps must be >= 0, got -1"):
        AdvantageConfig(eps=-1)
    with pytest.raises(LookupError, match="no advantage named 'ppo'"):
        _adv([1.0, 2.0, 3.0, 4.0], "ppo")
