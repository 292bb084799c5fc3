"""One process of a two-process update (tests/train/test_multihost.py starts two).

    python tests/train/two_process_update.py ADDRESS PROCESS_ID OUT.npz

Each process holds its own rows, different widths from the other's (prompt, completion,
images, patches), and takes one `train_step` over the global batch that `Hosts.global_batch`
assembles; process 0 writes the new params and the step's metrics. The test compares them
with one process updating on both processes' rows.
"""

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwr_jax import sharding
from rwr_jax.models.qwen2_vl import convert, vision
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, VLConfig
from rwr_jax.rl import losses
from rwr_jax.train import multihost, scoring
from rwr_jax.train.step import (TrainBatch, TrainState, batch_shard_groups, packed_sizes, shared_prompt_group,
                                train_step)

IMAGE_TOKEN, GROUP, PROMPTS, MICRO_BATCHES = 5, 2, 2, 2
TEXT = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     mrope_section=(2, 1, 1))
VISION = vision.VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                             fullatt_block_indexes=(0,))
CONFIG = VLConfig(text=TEXT, vision=VISION, image_token_id=IMAGE_TOKEN)
LOSS = losses.LossConfig(loss_type="dapo", beta=0.05, max_completion_length=16)
OPTIMIZER = optax.apply_if_finite(optax.sgd(1.0), 3)  # linear in the gradient: equal params <=> equal gradients


def local_batch(process: int) -> tuple[TrainBatch, int]:
    """Process `process`'s rows (host arrays) and their prompt length: PROMPTS prompts of one image
    each (4 x 4 patches on process 0, 4 x 8 on process 1), GROUP completions per prompt."""
    rng = np.random.default_rng(process)
    grid = np.asarray([[1, 4, 4 * (process + 1)]] * PROMPTS)
    image_tokens = int(grid[0].prod()) // VISION.merge_unit
    prompt_length, completion = 6 + image_tokens + 3 * process, 10 - 3 * process
    pixels = rng.normal(size=(int(grid.prod(axis=1).sum()), VISION.patch_dim)).astype(np.float32)
    images = vision.pack_images(pixels, grid, VISION, num_images=PROMPTS, num_patches=int(grid[0].prod()))
    prompts = rng.integers(6, TEXT.vocab_size, (PROMPTS, prompt_length)).astype(np.int32)
    prompts[:, 2:2 + image_tokens] = IMAGE_TOKEN
    prompt_mask = np.ones_like(prompts, bool)
    prompt_mask[0, :1] = False  # left padding
    rows = PROMPTS * GROUP
    tokens = np.concatenate([np.repeat(prompts, GROUP, axis=0),
                             rng.integers(6, TEXT.vocab_size, (rows, completion)).astype(np.int32)], axis=1)
    lengths = rng.integers(3, completion + 1, rows)
    completion_mask = np.arange(completion)[None] < lengths[:, None]
    mask = np.concatenate([np.repeat(prompt_mask, GROUP, axis=0), completion_mask], axis=1)
    positions = np.broadcast_to(np.maximum(np.cumsum(mask, axis=1) - 1, 0), (3, *mask.shape)).astype(np.int32)
    return TrainBatch(
        tokens=tokens, token_mask=mask, positions=positions, loss_mask=completion_mask,
        advantages=rng.normal(size=rows).astype(np.float32),
        sampler_logprobs=-rng.random((rows, completion)).astype(np.float32), images=images,
        image_feature_index=scoring.image_feature_index(tokens[:, :prompt_length], tokens.shape[1], IMAGE_TOKEN,
                                                        GROUP)), prompt_length


def update(mesh, batch: TrainBatch, prompt_length: int, masks) -> tuple[TrainState, dict]:
    """One step from the seed-0 params, placed on `mesh` by the default rules."""
    model = VisionLanguageLM.from_config(CONFIG)
    params = convert.init_params(CONFIG, 0, sharding.logical_shardings(convert.abstract_params(CONFIG), mesh))
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=OPTIMIZER.init(params))
    loss_mask, token_mask = masks
    groups = batch_shard_groups(mesh, loss_mask.shape[0], MICRO_BATCHES)  # 4 devices: each packs its own row
    return train_step(model, OPTIMIZER, state, batch, ref_params, loss_config=LOSS, num_micro_batches=MICRO_BATCHES,
                      chunk_size=4, prompt_length=prompt_length,
                      prompt_group=shared_prompt_group(GROUP, loss_mask.shape[0], MICRO_BATCHES), row_groups=groups,
                      **packed_sizes(loss_mask, token_mask, MICRO_BATCHES, 4, groups))


@contextlib.contextmanager
def traces():
    """Yields a one-item list: how many functions JAX traces to a jaxpr in the block."""
    count = [0]

    def listener(event: str, duration_secs: float, **kwargs):
        del duration_secs, kwargs
        count[0] += event == "/jax/core/compile/jaxpr_trace_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def main(address: str, process: int, out: str) -> None:
    multihost.initialize(address, 2, process)
    hosts = multihost.Hosts.create({"data": 1, "fsdp": -1})  # the real runs' layout: params over both hosts
    with jax.set_mesh(hosts.mesh), sharding.axis_rules():
        batch, prompt_length, masks = hosts.global_batch(*local_batch(process))
        state, metrics = update(hosts.mesh, batch, prompt_length, masks)
        params = hosts.replicate(state.params)
        # As many leaves as Qwen2.5-VL-7B (729): one gather program (resharding leaf by leaf, the processes'
        # collectives could interleave differently and deadlock).
        many = {f"w{i}": jax.device_put(np.full((4, 8), i, np.float32),
                                        jax.sharding.NamedSharding(hosts.mesh, jax.sharding.PartitionSpec("fsdp")))
                for i in range(729)}
        copies = hosts.replicate(many)
        assert all((np.asarray(copies[f"w{i}"]) == i).all() for i in range(729))
        with traces() as count:  # the next step's replica: the cached gather, not traced again
            hosts.replicate(many)
        assert count == [0], f"replicate traced {count[0]} functions on its second call"
    if process == 0:
        leaves = jax.tree_util.tree_leaves_with_path(params)
        np.savez(out, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves},
                 **{f"metric/{k}": np.asarray(v) for k, v in metrics.items()}, prompt_length=prompt_length)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
