"""The jitted train step: micro-batching is exact, frozen params stay put, the
optimiser follows the schedule, non-finite updates are skipped and counted."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rwr_jax import sharding
from rwr_jax.models.qwen2_vl import convert
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl import vision
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, VLConfig
from rwr_jax.rl import losses
from rwr_jax.train import optimizer as optimizer_lib
from rwr_jax.train import step as step_lib
from rwr_jax.train.step import TrainBatch, TrainState, train_step

PROMPT, COMPLETION, ROWS = 6, 10, 8


def _setup(seed=0, group=1, mrope=False):
    """ROWS rows; consecutive groups of `group` rows share their prompt."""
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, mrope_section=(2, 1, 1) if mrope else None)
    model = DecoderLM(config)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (ROWS, PROMPT + COMPLETION)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[::2, :2] = False  # left padding on half the prompts
    first = np.arange(ROWS) // group * group
    tokens[:, :PROMPT], mask[:, :PROMPT] = tokens[first, :PROMPT], mask[first, :PROMPT]
    comp_len = rng.integers(3, COMPLETION + 1, ROWS)
    loss_mask = np.arange(COMPLETION)[None] < comp_len[:, None]
    loss_mask[1, 2:4] = False  # an environment block
    mask[:, PROMPT:] = np.arange(COMPLETION)[None] < comp_len[:, None]
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    if mrope:  # text-only mRoPE: the three sections share the text positions
        positions = np.broadcast_to(positions, (3, *positions.shape)).copy()
    params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(tokens), jnp.asarray(positions),
                                 jnp.asarray(mask))["params"]
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    batch = TrainBatch(tokens=jnp.asarray(tokens), token_mask=jnp.asarray(mask), positions=jnp.asarray(positions),
                       loss_mask=jnp.asarray(loss_mask), advantages=jnp.asarray(rng.normal(size=ROWS), jnp.float32),
                       sampler_logprobs=jnp.zeros((ROWS, COMPLETION), jnp.float32))
    return model, params, batch


def _step(model, params, batch, tx, loss_config, micro, prompt_group=1, ref_params=None, **sizes):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree_util.tree_map(jnp.copy, params),
                       opt_state=tx.init(params))
    ref = jax.tree_util.tree_map(jnp.copy, params if ref_params is None else ref_params)  # not aliasing the state
    return train_step(model, tx, state, batch, ref, loss_config=loss_config, num_micro_batches=micro,
                      chunk_size=4, prompt_length=PROMPT, prompt_group=prompt_group, **sizes)


def _tightest_sizes(batch, micro):
    """`train_step`'s loss_tokens / completion_tokens: the largest micro-batch's exact counts."""
    count = lambda m: int(np.asarray(m).reshape(micro, -1).sum(axis=1).max())  # noqa: E731
    return dict(loss_tokens=count(batch.loss_mask), completion_tokens=count(batch.token_mask[:, PROMPT:]))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_equal_full_batch(loss_type):
    """4 micro-batches of 2 == 1 of 8 (loss and gradients), through the real model.

    "bnpo" is the release's loss: a token mean per micro-batch, averaged over
    micro-batches, so by definition it depends on the split; for it the 4-way run
    must equal the mean of the four micro-batches' own token means, each computed as
    a 1-way step on that micro-batch alone.
    """
    model, params, batch = _setup()
    loss_config = losses.LossConfig(loss_type=loss_type, beta=0.01, max_completion_length=COMPLETION)
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)  # linear in the gradient: equal params <=> equal gradients
    split, split_metrics = _step(model, params, batch, tx, loss_config, 4)
    if loss_type == "bnpo":
        parts = [_step(model, params, jax.tree_util.tree_map(lambda x: x[2 * i:2 * i + 2], batch), tx,
                       loss_config, 1) for i in range(4)]
        np.testing.assert_allclose(split_metrics["loss"], np.mean([m["loss"] for _, m in parts]), rtol=1e-5)
        expected = [np.mean([np.asarray(leaf) for leaf in leaves], axis=0) for leaves in
                    zip(*(jax.tree_util.tree_leaves(state.params) for state, _ in parts))]
    else:
        full, full_metrics = _step(model, params, batch, tx, loss_config, 1)
        np.testing.assert_allclose(split_metrics["loss"], full_metrics["loss"], rtol=1e-5, atol=1e-7)
        expected = jax.tree_util.tree_leaves(full.params)
    for a, b in zip(jax.tree_util.tree_leaves(split.params), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(split_metrics["grad_norm"]) > 0


@pytest.mark.parametrize("micro,group,mrope", [(2, 4, False), (4, 2, True), (2, 1, False)],
                         ids=["rope", "mrope", "unshared"])
def test_packed_work_equals_a_full_forward_per_row(micro, group, mrope):
    """Prompts run once per group (prefill + repeated cache), completions padding-free and
    the LM head on loss tokens only: loss, metrics and the update equal those of a full
    forward pass per row with the head on every position, KL to a different reference
    included."""
    model, params, batch = _setup(group=4, mrope=mrope)
    _, ref_params, _ = _setup(seed=1, group=4, mrope=mrope)
    loss_config = losses.LossConfig(loss_type="dapo", beta=0.05, max_completion_length=COMPLETION)
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)
    sizes = _tightest_sizes(batch, micro)
    assert sizes["loss_tokens"] <= sizes["completion_tokens"] < ROWS // micro * COMPLETION
    packed, packed_metrics = _step(model, params, batch, tx, loss_config, micro, group, ref_params, **sizes)
    full, full_metrics = _step(model, params, batch, tx, loss_config, micro, 1, ref_params)
    assert float(full_metrics["kl"]) > 0
    for name in full_metrics:
        np.testing.assert_allclose(packed_metrics[name], full_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(packed.params), jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shared_prompt_group_divides_micro_batches():
    assert step_lib.shared_prompt_group(8, 64, 2) == 8
    assert step_lib.shared_prompt_group(8, 16, 4) == 4  # micro-batches of 4 rows cut the groups of 8
    assert step_lib.shared_prompt_group(3, 8, 1) == 1
    model, params, batch = _setup()
    with pytest.raises(ValueError, match="prompt_group must divide the 4 rows"):
        _step(model, params, batch, optax.sgd(1.0), losses.LossConfig(), 2, prompt_group=3)


def test_packed_sizes_cover_the_largest_micro_batch():
    loss_mask = np.zeros((4, 8), bool)
    loss_mask[0, :7], loss_mask[1, :2], loss_mask[2:, :] = True, True, True
    token_mask = np.concatenate([np.ones((4, 3), bool), loss_mask], axis=1)
    token_mask[1, 3:7] = True  # a retrieved block: real, not a loss token
    assert step_lib.packed_sizes(loss_mask, token_mask, 2, 4) == {"loss_tokens": 16, "completion_tokens": 16}
    assert step_lib.packed_sizes(loss_mask[:2], token_mask[:2], 1, 4) == {"loss_tokens": 12, "completion_tokens": 12}
    assert step_lib.packed_sizes(loss_mask[:2], token_mask[:2], 2, 4) == {"loss_tokens": 8, "completion_tokens": 8}
    assert step_lib.packed_sizes(loss_mask, token_mask, 1, 16) == {"loss_tokens": 32, "completion_tokens": 32}
    # 2 loss tokens, less than a chunk: one chunk (not 2), so short batches share a program.
    assert step_lib.packed_sizes(loss_mask[1:2], token_mask[1:2], 1, 4) == {"loss_tokens": 4, "completion_tokens": 4}


@pytest.mark.parametrize("size", ["loss_tokens", "completion_tokens"])
def test_too_small_packed_size_never_trains_silently(size):
    model, params, batch = _setup()
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)
    sizes = step_lib.packed_sizes(batch.loss_mask, batch.token_mask, 2, 4)
    sizes[size] = int(np.asarray(batch.loss_mask if size == "loss_tokens" else batch.token_mask[:, PROMPT:])[:4]
                      .sum()) - 1
    state, metrics = _step(model, params, batch, tx, losses.LossConfig(beta=0.0), 2, **sizes)
    assert float(metrics["nonfinite_updates"]) == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_zero_advantages_give_zero_policy_gradient():
    model, params, batch = _setup()
    batch = batch.replace(advantages=jnp.zeros_like(batch.advantages))
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)
    _, metrics = _step(model, params, batch, tx, losses.LossConfig(beta=0.0), 2)
    assert float(metrics["grad_norm"]) == 0.0


def test_frozen_params_do_not_move_and_schedule_warms_up():
    model, params, batch = _setup()
    config = optimizer_lib.OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.2,
                                           frozen_prefixes=("lm_head",))
    tx = optimizer_lib.make_optimizer(config, params)
    schedule = optimizer_lib.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(1e-3) and float(schedule(10)) == 0.0
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree_util.tree_map(jnp.copy, params),
                       opt_state=tx.init(params))
    for _ in range(2):
        state, _ = train_step(model, tx, state, batch, None, loss_config=losses.LossConfig(beta=0.0),
                              num_micro_batches=2, chunk_size=4, prompt_length=PROMPT)
    np.testing.assert_array_equal(state.params["lm_head"]["kernel"], params["lm_head"]["kernel"])
    moved = state.params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"] - params["model"]["layers_0"]["mlp"][
        "up_proj"]["kernel"]
    assert float(jnp.abs(moved).max()) > 0


def test_warmup_steps_round_up_as_transformers_counts_them():
    schedule = optimizer_lib.learning_rate_schedule(
        optimizer_lib.OptimizerConfig(learning_rate=1.0, total_steps=50, warmup_ratio=0.05))  # 2.5 -> 3 steps
    assert float(schedule(2)) == pytest.approx(2 / 3) and float(schedule(3)) == pytest.approx(1.0)


def test_nonfinite_update_is_skipped_and_counted():
    model, params, batch = _setup()
    batch = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
    tx = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(learning_rate=1e-3, total_steps=10), params)
    state, metrics = _step(model, params, batch, tx, losses.LossConfig(beta=0.0), 2)
    assert float(metrics["nonfinite_updates"]) == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_sharded_step_equals_one_device():
    """On a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices (conftest.py), params
    sharded by the logical-axis rules, the trainer's packed update (the "rope" case above)
    equals the one on one device, and the new params keep their shardings."""
    assert jax.device_count() == 8, "conftest.py must force 8 host devices before jax is imported"
    model, params, batch = _setup(group=4)
    _, ref_params, _ = _setup(seed=1, group=4)
    loss_config = losses.LossConfig(loss_type="dapo", beta=0.05, max_completion_length=COMPLETION)
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)
    one, one_metrics = _step(model, params, batch, tx, loss_config, 2, 4, ref_params, **_tightest_sizes(batch, 2))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    groups = step_lib.batch_shard_groups(mesh, ROWS, 2)
    assert groups == 4  # a micro-batch's 4 rows over the 4 batch shards: each device packs its own row
    sizes = step_lib.packed_sizes(batch.loss_mask, batch.token_mask, 2, 4, groups)
    shardings = sharding.logical_shardings(convert.abstract_params(model.config), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        placed, placed_ref = jax.device_put(params, shardings), jax.device_put(ref_params, shardings)
        sharded, sharded_metrics = _step(model, placed, batch, tx, loss_config, 2, 4, placed_ref,
                                         row_groups=groups, **sizes)
    for name in one_metrics:
        np.testing.assert_allclose(sharded_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(sharded.params), jax.tree_util.tree_leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for new, placed_leaf in zip(jax.tree_util.tree_leaves(sharded.params), jax.tree_util.tree_leaves(placed)):
        assert new.sharding.is_equivalent_to(placed_leaf.sharding, new.ndim)
    gate = sharded.params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # [embed] norm scales stay whole: sharded over fsdp, each norm would regather its activations.
    assert sharded.params["model"]["layers_0"]["input_layernorm"]["scale"].sharding.is_fully_replicated
    moved = np.asarray(one.params["lm_head"]["kernel"]) - np.asarray(params["lm_head"]["kernel"])
    assert float(np.abs(moved).max()) > 1e-3  # the update is not a no-op


def test_each_device_computes_its_own_rows_packed_tokens():
    """fsdp = 8, a micro-batch of 8 rows: with row_groups = 8 every device runs the MLP on its own
    row's packed tokens (N = 16 of them); with one group each device ran all 8 x 16 (XLA cannot
    split a single packed sequence over the batch shards)."""
    model, params, batch = _setup(group=4)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    params = jax.device_put(params, sharding.logical_shardings(convert.abstract_params(model.config), mesh))
    tx = optax.apply_if_finite(optax.sgd(1.0), 3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def mlp_dot_rows(groups):
        with jax.set_mesh(mesh), sharding.axis_rules():
            text = train_step.lower(model, tx, state, batch, params, loss_config=losses.LossConfig(beta=0.0),
                                    num_micro_batches=1, chunk_size=4, prompt_length=PROMPT, prompt_group=4,
                                    loss_tokens=16 * 8 // groups, completion_tokens=16 * 8 // groups,
                                    row_groups=groups).compile().as_text()
        # Tokens of the per-device [1, tokens, 48] outputs of the packed MLP's gate / up projections.
        return {int(m) for m in re.findall(r"f32\[1,(\d+),48\](?:\{[^}]*\})? (?:dot|fusion|convolution)\(", text)}

    assert max(mlp_dot_rows(8)) == 16
    assert max(mlp_dot_rows(1)) == 128


def test_image_features_on_a_mesh_wider_than_the_image_batch():
    """The trainer also calls `_image_features` outside the update (confidence gain): 2 images on a
    data = 8 mesh (the stage-2 demo's batch on an 8-device host) give the one-device features. Run op
    by op instead of jitted, the vision tower's sharding constraint raised an IndivisibleError."""
    text = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, mrope_section=(2, 1, 1))
    vis = vision.VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                              fullatt_block_indexes=(0,))
    config = VLConfig(text=text, vision=vis, image_token_id=5)
    model = VisionLanguageLM.from_config(config)
    grid = np.asarray([[1, 4, 4], [1, 4, 4]])  # 2 images of 16 patches -> 4 merged tokens each
    pixels = np.random.default_rng(0).normal(size=(32, vis.patch_dim)).astype(np.float32)
    images = jax.tree_util.tree_map(jnp.asarray, vision.pack_images(pixels, grid, vis, num_images=2,
                                                                    num_patches=16))
    params = convert.init_params(config, 0)
    one = step_lib._image_features(model, params, images)
    mesh = sharding.make_mesh({"data": -1})
    assert mesh.shape["data"] == 8
    with jax.set_mesh(mesh), sharding.axis_rules():
        placed = jax.device_put(params, sharding.logical_shardings(convert.abstract_params(config), mesh))
        on_mesh = step_lib._image_features(model, placed, images)
    assert on_mesh.shape == (8, 32)
    np.testing.assert_allclose(on_mesh, one, atol=1e-5, rtol=0)

