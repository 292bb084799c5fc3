"""Memory planning: the real train step compiled ahead of time for TPU topologies (libtpu, no TPU here)."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import stage1, stage2
from rwr_jax import sharding
from rwr_jax.train import memory_plan, optimizer as optimizer_lib, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEVEN_B = os.path.join(REPO, "tests", "testdata", "qwen2_5_vl_7b_config.json")


def _seven_b_checkpoint(tmp_path) -> str:
    """A checkpoint directory holding only Qwen2.5-VL-7B's config.json (planning reads no weights)."""
    shutil.copy(SEVEN_B, tmp_path / "config.json")
    return str(tmp_path)


def test_worst_case_batch_of_the_release_configs(tmp_path):
    """Stage 2 with the 7B: 8 prompts per process x G 8, prompt 8192, completion 3 rounds x 4096 + 2
    retrieved x 1024 = 14336; one image per prompt (16 over 2 processes, rounded up to 12 batch
    shards: 24) of max_pixels 262144 / 14^2 = 1337 patches -> bucket 2048. Stage 1: no images."""
    cfg = stage2.get_config(f"checkpoint={_seven_b_checkpoint(tmp_path)}")
    model_config, _ = trainer.read_model_config(cfg)
    assert memory_plan.worst_case_batch(cfg, model_config, num_processes=2, batch_shards=12) == memory_plan.BatchShape(
        rows=128, prompt_length=8192, completion_length=14336, images=24, patches=2048)
    cfg = stage1.get_config(f"checkpoint={tmp_path}")
    model_config, _ = trainer.read_model_config(cfg)
    assert memory_plan.worst_case_batch(cfg, model_config, num_processes=1, batch_shards=8) == memory_plan.BatchShape(
        rows=64, prompt_length=cfg.data.max_prompt_length, completion_length=14336)


def test_optimizer_moments_are_sharded_like_their_params():
    """fsdp = 8: each Adam moment has its param's sharding (a replicated one would cost every device
    the whole state); the frozen vision tower has none; counts are replicated."""
    cfg = stage2.get_config("demo")
    model_config, _ = trainer.read_model_config(cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
    params = memory_plan.abstract_params(model_config, mesh, sharding.DEFAULT_RULES)
    optimizer = optimizer_lib.make_optimizer(trainer.make_optimizer_config(cfg, model_config, 10), params)
    state = memory_plan.abstract_optimizer_state(optimizer, params, mesh)
    by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    moments = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        key = jax.tree_util.keystr(path)
        param = next((by_path[k] for k in by_path if key.endswith(k)), None)
        if param is None:
            assert x.shape == () and x.sharding.is_fully_replicated, key
            continue
        assert "visual" not in key
        assert x.shape == param.shape and x.sharding == param.sharding, key
        moments += 1
    trained = [k for k in by_path if not k.startswith("['visual']")]
    assert moments == 2 * len(trained)  # mu and nu
    trained_bytes = memory_plan.bytes_per_device({k: by_path[k] for k in trained})
    embedding = by_path["['model']['embed_tokens']['embedding']"]
    assert embedding.sharding.shard_shape(embedding.shape) == (151_680, 8)  # [vocab, embed / 8]
    assert 2 * trained_bytes <= memory_plan.bytes_per_device(state) <= 2 * trained_bytes + 64


def test_plan_of_the_stage2_demo_on_a_tpu_slice():
    """v5p:2x2x2 (8 chips of 95 GiB, 2 hosts) compiled here through libtpu: XLA's argument bytes are
    the state's and batch's shards (TPU layouts pad a little); the donated train state and decode
    state are written over in place; each host rolls out on its 4 chips with its own replica of the
    policy while the sharded train state stays; every program fits."""
    plan = memory_plan.plan_memory(stage2.get_config("demo"), memory_plan.topology_devices("v5p:2x2x2"))
    print(plan.report())
    assert plan.devices == "8 x TPU v5" and plan.num_processes == 2
    assert plan.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and plan.rollout_mesh == {"data": 4, "fsdp": 1,
                                                                                       "tensor": 1}
    # 2 prompts per process x 2 processes x G 4; 4 images (one per prompt) rounded up to the 8 shards.
    assert plan.batch == memory_plan.BatchShape(rows=16, prompt_length=512, completion_length=512, images=8,
                                                patches=2048)
    assert plan.state["optimizer"] == pytest.approx(2 * plan.state["params"], rel=0.01)  # vision tower frozen
    update, decode = plan.programs["update"], plan.programs["decode"]
    shards = sum(plan.state.values())
    assert shards <= update.arguments <= 1.01 * shards
    # The new train state is written over the donated one; only the step's metrics (scalars) are new.
    assert update.aliased > plan.state["params"] + plan.state["optimizer"]
    assert 0 < update.outputs - update.aliased < 2**16
    # The decode loop writes its state over its input (one layout in and out), its KV cache sharded:
    # 2 layers x (keys, values) x 8 rows / 4 chips x 2 KV heads x 1040 slots x head_dim 16 x 4 bytes.
    cache_bytes = 2 * 2 * 8 // 4 * 2 * 1040 * 16 * 4
    assert cache_bytes < decode.aliased and decode.outputs - decode.aliased < 2**10
    # Compaction writes the decode state over the donated one and never sets the rollout's peak.
    compact = plan.programs["compact"]
    assert compact.aliased == compact.arguments and compact.peak < decode.peak
    # Demo rollout: 2 prompts x G 4 rows; 512 prompt + 3 rounds x 48 + 2 chunks of 192 slots.
    assert plan.rollout_rows == 8 and plan.cache_length == 512 + 3 * 48 + 2 * 192
    # Two hosts: the rollout runs on a replica, so the sharded params stay too.
    assert plan.resident == plan.state["params"] + plan.state["optimizer"] + plan.state["reference"]
    assert plan.rollout_peak == plan.resident + max(p.peak for n, p in plan.programs.items() if n != "update")
    assert plan.capacity == 95 * 2**30 and plan.fits
    assert plan.report().splitlines()[-1].startswith("fits: peak per device update ")


def test_plan_command_refuses_an_update_too_large(tmp_path):
    """32768-token completions of the stage-1 demo on v5e chips (16 GiB): the TPU compiler refuses the
    update; the command says so with the compiler's numbers and exits 1."""
    result = subprocess.run(
        [sys.executable, "launch/plan_memory.py", "--config=configs/stage1.py:demo", "--topology=v5e:2x2",
         "--config.rollout.max_completion_length=32768"], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1 and lines, result.stderr[-3000:]
    assert lines[0] == "memory plan of a training step on 4 x TPU v5 lite (1 process), 16.00 GiB per device"
    assert lines[1] == ("update: mesh {'data': 4, 'fsdp': 1, 'tensor': 1}; 8 rows of prompt 384 + completion "
                        "32768 tokens, 2 micro-batches")
    assert lines[3].startswith("  update: REFUSED by the compiler: RESOURCE_EXHAUSTED")
    assert "exceeds available HBM" in lines[3]
    assert lines[-1].startswith("DOES NOT FIT: peak per device update refused, rollout ")


def test_plan_on_this_hosts_cpu_devices():
    """Without a topology the plan is for local devices; CPU reports no capacity."""
    cfg = stage1.get_config("demo")
    cfg.data.max_prompt_length, cfg.rollout.max_completion_length = 64, 64
    plan = memory_plan.plan_memory(cfg, jax.devices()[:2])
    assert plan.devices == "2 x cpu" and plan.batch.rows == 8 and not plan.refused
    assert plan.capacity is None and plan.fits is None
    assert plan.programs["update"].arguments >= sum(plan.state.values())
    assert plan.report().splitlines()[-1].startswith("capacity unknown: peak per device update ")
    assert np.isclose(plan.state["reference"], plan.state["params"])


def test_unknown_topology_is_named():
    with pytest.raises(ValueError, match="TPU topology 'v9z:1x1'"):
        memory_plan.topology_devices("v9z:1x1")
