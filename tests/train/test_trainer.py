"""The GRPO trainer end to end on the demo presets: it runs and resumes exactly.

The test process has 8 fake CPU devices (conftest.py); in-process runs use one of them
(`ONE_DEVICE`) except the one that checks the trainer on a 2 x 2 x 2 mesh of all 8.
"""

import functools
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import stage1, stage2
from rwr_jax.data import demo as demo_data, records, tokenizer as tokenizer_lib
from rwr_jax.data.pipeline import PipelineConfig, PromptPipeline
from rwr_jax.rollout import stop_strings
from rwr_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_DEVICE = jax.devices()[:1]


def _config(steps, **changes):
    cfg = stage1.get_config(f"demo,steps={steps}")
    cfg.checkpoint.async_save = False
    cfg.sample_every = 1
    cfg.export_hf = False
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.mark.slow
def test_stage2_demo_command(tmp_path):
    """The README's first command: real retrieval rounds, TensorBoard events,
    checkpoints, compiled programs in the workdir's cache, and an HF export that
    transformers loads."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the tests' shared cache (conftest.py) would win
    result = subprocess.run([sys.executable, "launch/train.py", "--config=configs/stage2.py:demo,steps=3",
                             f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-5000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    queries = [e.value for e in events.Scalars("rollout/queries")]
    print("queries per completion by step:", queries)
    assert max(queries) > 0, "the demo must exercise retrieval rounds"
    visual = [e.value for e in events.Scalars("reward/query_visual")]  # the demo's random CLIP
    assert len(visual) == 3 and all(0 < abs(v) <= 0.1 for v in visual), visual
    assert len(events.Scalars("train/loss")) == 3
    assert os.path.isdir(tmp_path / "checkpoints" / "3")
    assert any(name.startswith("jit_train_step") for name in os.listdir(tmp_path / "compilation_cache"))
    import torch
    import transformers
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf_export",
                                                                            dtype=torch.float32)
    assert model.config.text_config.hidden_size == 64


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path, monkeypatch):
    """3 steps in one go == 2 steps, a crash in step 3 (an error after its batch was read),
    the same command resumed, 1 more step. Only step 1 was due a save (orbax saves the
    first step; save_every 3): the failing run checkpoints step 2 with the data position
    before the failed batch. (The programs compile once: tests share a compilation cache,
    see conftest.)"""
    cfg = _config(3)
    straight = trainer.train(cfg, str(tmp_path / "straight"), devices=ONE_DEVICE)
    experience, calls = trainer.experience, []

    def crash_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return experience(*args, **kwargs)

    monkeypatch.setattr(trainer, "experience", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg, str(tmp_path / "resumed"), devices=ONE_DEVICE)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["1", "2"]
    monkeypatch.setattr(trainer, "experience", experience)
    resumed = trainer.train(cfg, str(tmp_path / "resumed"), devices=ONE_DEVICE)
    assert int(resumed.step) == int(straight.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(straight.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(resumed.opt_state), jax.tree_util.tree_leaves(straight.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_profile_window_traces_its_steps_into_the_tensorboard_logdir(tmp_path):
    """profile.first_step 1, num_steps 1 of 2 steps: one jax.profiler trace, of step 2 (its
    update program in it), where TensorBoard's profile tab looks."""
    cfg = _config(2, profile__first_step=1, profile__num_steps=1, rollout__max_rounds=1)
    trainer.train(cfg, str(tmp_path), devices=ONE_DEVICE)
    traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1, traces
    with open(traces[0], "rb") as f:
        assert b"train_step" in f.read()


def test_profile_config_makes_the_window():
    cfg = _config(4)
    assert trainer.make_profiler(cfg, "unused", total_steps=4) is None  # num_steps 0: off
    cfg.profile.first_step, cfg.profile.num_steps = 1, 3
    assert trainer.make_profiler(cfg, "unused", total_steps=4).num_steps == 3
    cfg.profile.first_step = 2
    with pytest.raises(ValueError, match="profile.first_step=2, profile.num_steps=3"):
        trainer.make_profiler(cfg, "unused", total_steps=4)


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, monkeypatch):
    """Every update poisoned (NaN advantages): each is skipped (params stay the initial
    ones) and counted; the max_consecutive_nonfinite-th in a row, here after a resume,
    checkpoints and stops the run."""
    experience = trainer.experience

    def poisoned(*args, **kwargs):
        batch, metrics, sample = experience(*args, **kwargs)
        return batch.replace(advantages=jnp.full_like(batch.advantages, jnp.nan)), metrics, sample

    monkeypatch.setattr(trainer, "experience", poisoned)
    workdir = str(tmp_path)
    # No retrieval rounds (an index and its compiles): not what this test is about.
    config = functools.partial(_config, optimizer__max_consecutive_nonfinite=3, rollout__max_rounds=1)
    state = trainer.train(config(2), workdir, devices=ONE_DEVICE)
    assert int(state.step) == 2 and int(state.opt_state.notfinite_count) == 2
    initial = trainer.build(config(2), str(tmp_path / "initial"), ONE_DEVICE).initial_params
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(initial)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FloatingPointError, match=r"steps 1-3: 3 non-finite updates in a row"):
        trainer.train(config(4), workdir, devices=ONE_DEVICE)
    assert os.path.isdir(tmp_path / "checkpoints" / "3")  # saved although not due (save_every=3 in the demo)


@pytest.mark.slow
def test_total_steps_0_means_num_epochs_passes_and_running_out_of_data_ends_the_run(tmp_path, monkeypatch):
    """3 records, batch 2, 1 epoch: 1 full batch. Planned for more steps than that (as when
    records are skipped as oversized), the run ends when the data does: checkpointed,
    exported. On a 2 x 2 x 2 (data, fsdp, tensor) mesh of 8 devices: params and optimiser
    moments stay sharded as the rules say."""
    cfg = _config(1, data__demo_size=3)
    cfg.total_steps, cfg.export_hf = 0, True
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.mesh_devices = 0  # all 8 (the demo's default is one)
    cfg.rollout.max_rounds = 1  # no retrieval (an index and its compiles): not what this test is about
    planned = trainer.planned_steps
    monkeypatch.setattr(trainer, "planned_steps", lambda pipeline, epochs: planned(pipeline, epochs) + 2)
    state = trainer.train(cfg, str(tmp_path))
    assert int(state.step) == 1
    assert os.path.isdir(tmp_path / "checkpoints" / "1") and os.path.isdir(tmp_path / "hf_export")
    mlp = state.params["model"]["layers_0"]["mlp"]
    moments = state.opt_state.mu["model"]["layers_0"]["mlp"]
    for tree in (mlp, moments):
        assert tree["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
        assert tree["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state.params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_planned_steps_count_full_batches_of_the_smallest_shard(tmp_path):
    paths = demo_data.generate_demo_data(str(tmp_path), num_train=7, seed=0, multimodal=False)
    source, tokenizer = records.JsonlSource(paths.train), tokenizer_lib.load_tokenizer()

    def pipeline(batch_size):
        return PromptPipeline(source, tokenizer, PipelineConfig(batch_size=batch_size, max_images_per_prompt=0,
                                                                mrope=False, shard_index=1, shard_count=2))

    assert pipeline(2).records_per_shard == 3  # shards of 4 and 3 records
    assert trainer.planned_steps(pipeline(2), 1) == 1 and trainer.planned_steps(pipeline(2), 3) == 4
    with pytest.raises(ValueError, match="1 epoch.s. of 3 records per process make no batch of data.batch_size=4"):
        trainer.planned_steps(pipeline(4), 1)


def test_stage_configs_build():
    for module in (stage1, stage2):
        for arg in ("demo", None):
            cfg = module.get_config(arg)
            assert len(cfg.rewards.names) == len(cfg.rewards.weights)
    assert "query_visual" in stage2.get_config(None).rewards.names
    demo = stage2.get_config("demo")
    assert "query_visual" in demo.rewards.names and demo.rewards.demo_clip
    assert not stage2.get_config("demo,clip=/models/clip").rewards.demo_clip
    assert stage1.get_config(None).rewards.names == ["accuracy", "format"]
    # The paper's retriever query instruction for real runs; the demo's MiniLM keeps its own.
    assert trainer.encoder_overrides(stage2.get_config(None).retrieval) == {
        "query_instruction": "Represent this sentence for searching relevant passages: "}
    assert trainer.encoder_overrides(stage1.get_config("demo").retrieval) == {}


def test_visual_reward_needs_a_clip_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"rewards.clip_checkpoint is empty: the 'query_visual' reward needs"):
        trainer.build_visual(stage2.get_config(None), str(tmp_path))
    assert trainer.build_visual(stage1.get_config("demo"), str(tmp_path)) is None
    cfg = stage2.get_config("demo")
    cfg.rewards.names, cfg.rewards.weights = ["accuracy", "query_vision"], [1.0, 1.0]
    with pytest.raises(ValueError, match=r"rewards.names \['query_vision'\] are not registered"):
        trainer.build(cfg, str(tmp_path))


def test_host_tables_are_built_once_per_tokenizer_and_vocabulary():
    tokenizer = tokenizer_lib.load_tokenizer()
    text_tables, stop_tables = trainer.host_tables(tokenizer, 300)
    assert trainer.host_tables(tokenizer, 300)[1] is stop_tables
    assert len(trainer.host_tables(tokenizer, 200)[0].token_bytes) == 200
    expected = stop_strings.build_stop_tables(stop_strings.token_bytes_of(tokenizer, 300), trainer.STOP_STRINGS)
    for name in ("head", "tail", "length", "contains", "strings"):
        np.testing.assert_array_equal(getattr(stop_tables, name), getattr(expected, name), err_msg=name)
    assert text_tables.token_bytes[:3] == [b"!", b'"', b"#"]
