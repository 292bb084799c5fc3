"""`make_optimizer` equals optax's apply_if_finite(clip_by_global_norm + adamw), bit for bit,
through clipped, unclipped and skipped (non-finite) updates; frozen leaves never move."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwr_jax.train import optimizer as optimizer_lib

CONFIG = optimizer_lib.OptimizerConfig(learning_rate=1e-2, total_steps=8, warmup_ratio=0.25, max_grad_norm=1.0)


def _params():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"dense": {"kernel": jax.random.normal(keys[0], (4, 3)), "bias": jax.random.normal(keys[1], (3,))},
            "visual": {"kernel": jax.random.normal(keys[2], (2, 2))}}


def _grads(step: int, params):
    """Small gradients (unclipped) on even steps, large ones (clipped) on odd steps, NaN at step 3."""
    scale = 0.01 if step % 2 == 0 else 10.0
    grads = jax.tree_util.tree_map(lambda p: scale * jnp.cos(p * (step + 1)), params)
    if step == 3:
        grads["dense"]["bias"] = grads["dense"]["bias"].at[1].set(jnp.nan)
    return grads


def _optax_reference(config, params):
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    chain = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                        optax.adamw(optimizer_lib.learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                                    eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.apply_if_finite(chain, max_consecutive_errors=config.max_consecutive_nonfinite)


def _run(tx, params, steps=6):
    state = tx.init(params)
    update = jax.jit(tx.update)
    trajectory = []
    for step in range(steps):
        updates, state = update(_grads(step, params), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append((params, state))
    return trajectory


def test_equals_optax_apply_if_finite_adamw_bit_for_bit():
    params = _params()
    ours, reference = _run(optimizer_lib.make_optimizer(CONFIG, params), params), _run(_optax_reference(CONFIG, params),
                                                                                   params)
    for step, ((our_params, our_state), (ref_params, ref_state)) in enumerate(zip(ours, reference)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, our_params, ref_params)
        adam = ref_state.inner_state[1][0]
        jax.tree_util.tree_map(np.testing.assert_array_equal, (our_state.mu, our_state.nu), (adam.mu, adam.nu))
        assert int(our_state.count) == int(adam.count) == step + (step < 3)  # step 3 was skipped
        assert int(our_state.notfinite_count) == int(ref_state.notfinite_count) == (step == 3)
        assert int(our_state.total_notfinite) == int(ref_state.total_notfinite) == (step >= 3)


def test_a_nonfinite_update_changes_nothing():
    params = _params()
    tx = optimizer_lib.make_optimizer(CONFIG, params)
    (before, state), = _run(tx, params, steps=1)
    nan_grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.inf), params)
    updates, after = jax.jit(tx.update)(nan_grads, state, before)
    jax.tree_util.tree_map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (after.mu, after.nu, after.count), (state.mu, state.nu,
                                                                                            state.count))
    assert int(after.notfinite_count) == 1 and int(after.total_notfinite) == 1


def test_frozen_leaves_never_move_and_hold_no_moments():
    params = _params()
    config = dataclasses.replace(CONFIG, frozen_prefixes=("visual",))
    trajectory = _run(optimizer_lib.make_optimizer(config, params), params)
    final, state = trajectory[-1]
    np.testing.assert_array_equal(final["visual"]["kernel"], params["visual"]["kernel"])
    assert not np.array_equal(final["dense"]["kernel"], params["dense"]["kernel"])
    assert isinstance(state.mu["visual"]["kernel"], optax.MaskedNode)
    # the trained leaves follow optax on the trained leaves alone (the norm and clip exclude frozen ones)
    trained = {"dense": params["dense"]}
    reference, _ = _run(_optax_reference(config, trained), trained)[-1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, final["dense"], reference["dense"])
