"""Training over several processes (`train.multihost`): rows padded to agreed widths keep
their update, two processes update as one process on both their rows, and a two-process
stage-2 run trains, stops, resumes and exports (JAX's gloo CPU collectives, local
processes as DESIGN.md §5 plans)."""

import os
import sys

import jax
import numpy as np
import pytest

from rwr_jax import sharding
from rwr_jax.train import multihost
from tests.multiprocess import free_address, run_processes, subprocess_env
from tests.train import two_process_update as worker


def _host_batch(process):
    batch, prompt_length = worker.local_batch(process)
    return batch, prompt_length, (batch.loss_mask, batch.token_mask)


def _update_on_one_device(batch, prompt_length, masks):
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh), sharding.axis_rules():
        return worker.update(mesh, batch, prompt_length, masks)


def _assert_same_update(a, b):
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    for name in metrics_a:
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for x, y in zip(jax.tree_util.tree_leaves(state_a.params), jax.tree_util.tree_leaves(state_b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_padding_a_batch_keeps_its_update():
    """Wider prompts (left), completions (right), more images and patches: masked padding only,
    the same loss, metrics and new params."""
    batch, prompt_length, masks = _host_batch(1)
    widths = (prompt_length + 3, batch.loss_mask.shape[1] + 5)
    images = (batch.images.patch_mask.shape[0] + 2, batch.images.patch_mask.shape[1] * 2)
    padded = multihost.pad_batch(batch, prompt_length, *widths, images=images)
    assert padded.tokens.shape == (batch.tokens.shape[0], sum(widths))
    assert padded.images.patches.shape[:2] == images
    assert (padded.image_feature_index[:, :3] == -1).all()  # the new prompt columns hold no image token
    plain = _update_on_one_device(batch, prompt_length, masks)
    assert float(plain[1]["loss"]) != 0.0
    _assert_same_update(plain, _update_on_one_device(padded, widths[0], (padded.loss_mask, padded.token_mask)))


def test_pad_batch_refuses_to_narrow():
    batch, prompt_length, _ = _host_batch(0)
    with pytest.raises(ValueError, match="cannot narrow"):
        multihost.pad_batch(batch, prompt_length, prompt_length - 1, batch.loss_mask.shape[1])


def test_one_process_is_the_identity():
    hosts = multihost.Hosts.create({"data": 1}, jax.devices()[:1])
    batch, prompt_length, _ = _host_batch(0)
    assert not hosts.multi and hosts.local_mesh is hosts.mesh
    assert hosts.global_batch(batch, prompt_length)[:2] == (batch, prompt_length)
    assert hosts.replicate(batch) is batch
    assert hosts.mean({"a": 1.5}) == {"a": 1.5} and hosts.maximum({"a": 3}) == {"a": 3}


@pytest.mark.slow
def test_two_processes_update_as_one_process_on_all_their_rows(tmp_path):
    """Two processes of 2 devices (an fsdp = 4 mesh: params sharded over both), rows of
    different prompt, completion, image and patch widths: their one update (params then
    gathered into each process's replica) equals one process's on both sets of rows (padded
    to the same widths, process 1's image ranks after process 0's 8 image tokens). The worker
    also replicates a tree of 729 leaves (a per-leaf device_put hung there)."""
    address, out = free_address(), str(tmp_path / "update.npz")
    run_processes([[sys.executable, "tests/train/two_process_update.py", address, str(p), out] for p in (0, 1)],
                  subprocess_env(devices=2), timeout=400)
    (b0, p0, _), (b1, p1, _) = _host_batch(0), _host_batch(1)
    prompt_length, completion = max(p0, p1), max(b0.loss_mask.shape[1], b1.loss_mask.shape[1])
    images = tuple(max(a, b) for a, b in zip(b0.images.patch_mask.shape, b1.images.patch_mask.shape))
    offset = int(b0.image_feature_index.max()) + 1
    assert offset == 8
    parts = [multihost.pad_batch(b0, p0, prompt_length, completion, images=images),
             multihost.pad_batch(b1, p1, prompt_length, completion, images=images, feature_offset=offset)]
    both = jax.tree_util.tree_map(lambda *x: np.concatenate(x, axis=0), *parts)
    both = both.replace(positions=np.concatenate([p.positions for p in parts], axis=1))
    state, metrics = _update_on_one_device(both, prompt_length, (both.loss_mask, both.token_mask))
    saved = np.load(out)
    assert int(saved["prompt_length"]) == prompt_length
    for name, value in metrics.items():
        np.testing.assert_allclose(saved[f"metric/{name}"], value, rtol=1e-5, atol=1e-6, err_msg=name)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    for path, value in leaves:
        np.testing.assert_allclose(saved[jax.tree_util.keystr(path)], value, rtol=1e-5, atol=1e-6)
    print("two processes vs one: max |param diff|",
          max(float(np.abs(saved[jax.tree_util.keystr(p)] - v).max()) for p, v in leaves),
          "| loss", float(saved["metric/loss"]), "vs", float(metrics["loss"]))
    assert float(metrics["loss"]) != 0.0


@pytest.mark.slow
def test_two_process_demo_run_stops_resumes_and_exports(tmp_path):
    """`launch/train.py` as two processes of one device (each its own prompts, rollouts with
    retrieval, one shared index): stopped after step 1 and started again, the run resumes
    from step 1's checkpoint (both processes' data positions in it), logs once per step, and
    exports a model transformers loads. (Stage 1: images across processes are checked by the
    update test above and by the two-process evaluation, tests/eval.)"""
    def command(process, address, *extra):
        return [sys.executable, "launch/train.py", "--config=configs/stage1.py:demo,steps=2", "--config.mesh_devices=0",
                f"--workdir={tmp_path}", f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={process}", *extra]

    address = free_address()
    run_processes([command(p, address, "--stop_after=1") for p in (0, 1)], subprocess_env(devices=1))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "1" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert not (tmp_path / "hf_export").exists()
    address = free_address()
    outputs = run_processes([command(p, address) for p in (0, 1)], subprocess_env(devices=1))
    assert all("restored checkpoint step 1" in output for output in outputs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # process 0 writes, once per step
    assert all(np.isfinite(e.value) for e in events.Scalars("reward/total"))
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export", dtype=torch.float32)
    assert model.config.hidden_size == 64
