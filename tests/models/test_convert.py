"""Weight conversion: HF -> ours -> HF round trips, clear errors, and 7B coverage."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import checkpoint_io
from rwr_jax.models.qwen2_vl import convert
from rwr_jax.models.qwen2_vl.config import from_hf_config, read_hf_config
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.model import read_vl_config, vl_config_from_hf
from tests.models import hf_models

torch = hf_models.torch
transformers = hf_models.transformers

TESTDATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "testdata")


def _tensors(checkpoint_dir):
    return {name: np.array(array) for path in checkpoint_io.checkpoint_files(checkpoint_dir)
            for name, array in checkpoint_io.iter_file_tensors(path)}


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf_models.make_causal_lm("qwen2_bias").save_pretrained(path, max_shard_size="40KB")
    return str(path)


@pytest.mark.parametrize("name,dtype", [("qwen2_bias", torch.float32), ("llama_tied", torch.float32),
                                        ("qwen2_bias", torch.bfloat16)])
def test_round_trip_is_bit_exact_and_loads_in_transformers(name, dtype, tmp_path):
    source = tmp_path / "source"
    model = hf_models.make_causal_lm(name).to(dtype)
    model.save_pretrained(source, max_shard_size="40KB")
    config, hf_config = read_hf_config(str(source), param_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    params = convert.load_hf_params(str(source), config, progress=False)
    exported = tmp_path / "exported"
    convert.save_hf_checkpoint(params, config, hf_config, str(exported), max_shard_bytes=30_000)
    assert os.path.isfile(exported / checkpoint_io.INDEX_FILE)  # sharded like the source

    before, after = _tensors(str(source)), _tensors(str(exported))
    if config.tie_word_embeddings:
        before.pop("lm_head.weight", None)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)

    # Both loaded the same way (model.to(bf16) would also cast the rotary buffers).
    original = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).eval()
    tokens, mask, _ = hf_models.left_padded_batch([8, 5], total=8)
    with torch.no_grad():
        ref = original(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
        out = reloaded(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_round_trip_qwen2_5_vl_full_checkpoint(tmp_path):
    """Vision tower, merger and language model survive HF -> ours -> HF bit for bit,
    and transformers loads the export."""
    source, exported = tmp_path / "source", tmp_path / "exported"
    hf_models.make_qwen2_5_vl().save_pretrained(source)
    config, hf_config = read_vl_config(str(source))
    params = convert.load_hf_params(str(source), config, progress=False)
    assert set(params) == {"visual", "model", "lm_head"}
    convert.save_hf_checkpoint(params, config, hf_config, str(exported))
    before, after = _tensors(str(source)), _tensors(str(exported))
    assert sorted(before) == sorted(after) and any(k.startswith("visual.") for k in before)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32)
    original = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    for (name, a), (_, b) in zip(sorted(original.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name


def test_decoder_config_reads_only_the_language_model_of_a_vl_checkpoint(tmp_path):
    hf_models.make_qwen2_5_vl().save_pretrained(tmp_path)
    config, _ = read_hf_config(str(tmp_path))
    params = convert.load_hf_params(str(tmp_path), config, progress=False)
    assert set(params) == {"model", "lm_head"}
    written = dict(convert.iter_hf_tensors(params, config))
    source = {k: v for k, v in _tensors(str(tmp_path)).items() if not k.startswith(convert.VISION_PREFIX)}
    assert sorted(written) == sorted(source)


@pytest.mark.parametrize("name", ["qwen2_bias", "llama_bias", "llama_tied"])
def test_random_params_export_with_to_hf_config(name, tmp_path):
    """Params born in JAX export with a generated config.json that transformers loads."""
    import jax

    config = from_hf_config(hf_models.make_causal_lm(name).config.to_dict())
    hf_config = convert.to_hf_config(config)
    assert from_hf_config(hf_config) == config
    model = DecoderLM(config)
    tokens, mask, positions = hf_models.left_padded_batch([7, 4], total=7)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(positions),
                                 jnp.asarray(mask, bool))
    params = jax.tree_util.tree_map(lambda p: p * 4.0, nn.unbox(params["params"]))
    convert.save_hf_checkpoint(params, config, hf_config, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == hf_config["architectures"][0]
    ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                   jnp.asarray(mask, bool))
    with torch.no_grad():
        ref = reloaded(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.numpy()
    valid = mask.astype(bool)
    diff = float(np.abs(np.asarray(ours)[valid] - ref[valid]).max())
    print(f"{name}: JAX-born params in transformers: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4


def test_to_hf_config_refuses_mrope():
    config = from_hf_config(hf_models.make_causal_lm("qwen2_bias").config.to_dict())
    with pytest.raises(ValueError, match="vision tower"):
        convert.to_hf_config(config.replace(mrope_section=(2, 3, 3)))


def _rewrite(src, dst, edit):
    tensors = _tensors(src)
    edit(tensors)
    checkpoint_io.write_checkpoint(dst, tensors.items())
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_shape_mismatch_names_tensor_and_shapes(qwen2_dir, tmp_path):
    config, _ = read_hf_config(qwen2_dir)
    with pytest.raises(ValueError, match=r"tensor (lm_head|model\.embed_tokens)\.weight has shape \(160, 64\), "
                                         r"expected \(160, 48\)"):
        convert.load_hf_params(qwen2_dir, config.replace(hidden_size=48, head_dim=16), progress=False)


def test_missing_and_unexpected_tensors(qwen2_dir, tmp_path):
    config, _ = read_hf_config(qwen2_dir)
    missing = _rewrite(qwen2_dir, str(tmp_path / "missing"),
                       lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"1 tensors missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.load_hf_params(missing, config, progress=False)
    extra = _rewrite(qwen2_dir, str(tmp_path / "extra"),
                     lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.7\.mlp\.up_proj\.weight"):
        convert.load_hf_params(extra, config, progress=False)


def test_bad_directories(tmp_path, qwen2_dir):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    for read in (read_hf_config, read_vl_config):
        with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
            read(str(tmp_path))
    config, _ = read_hf_config(qwen2_dir)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert.load_hf_params(str(tmp_path), config, progress=False)
    index = json.loads((open(os.path.join(qwen2_dir, checkpoint_io.INDEX_FILE)).read()))
    index["weight_map"]["extra"] = "model-99999-of-99999.safetensors"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / checkpoint_io.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_io.checkpoint_files(str(broken))
    for text in ("{not json", json.dumps({"metadata": {}})):
        (broken / checkpoint_io.INDEX_FILE).write_text(text)
        with pytest.raises(ValueError, match=r"index\.json: (not valid JSON|no \"weight_map\")"):
            checkpoint_io.checkpoint_files(str(broken))


def test_truncated_file_is_reported(qwen2_dir, tmp_path):
    path = checkpoint_io.checkpoint_files(qwen2_dir)[0]
    data = open(path, "rb").read()
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="past the end of the file"):
        list(checkpoint_io.iter_file_tensors(str(truncated)))


@pytest.mark.parametrize("part", ["language_model", "full"])
def test_real_qwen2_5_vl_7b_layout_is_covered(part):
    """Every tensor of the real 7B checkpoint maps to a param of the right shape (names
    and shapes from transformers on the meta device; params from jax.eval_shape)."""
    with open(os.path.join(TESTDATA, "qwen2_5_vl_7b_config.json")) as f:
        hf_config = json.load(f)
    text = from_hf_config(hf_config)
    assert (text.num_layers, text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim,
            text.intermediate_size, text.vocab_size, text.mrope_section, text.rms_norm_eps,
            text.rope_theta, text.tie_word_embeddings) == (
                28, 3584, 28, 4, 128, 18944, 152064, (16, 24, 24), 1e-6, 1e6, False)
    config = text if part == "language_model" else vl_config_from_hf(hf_config)
    with torch.device("meta"):
        reference = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**hf_config))
    hf_shapes = {convert.canonical_hf_name(k): tuple(v.shape) for k, v in reference.state_dict().items()}
    if part == "language_model":
        hf_shapes = {k: v for k, v in hf_shapes.items() if not k.startswith(convert.VISION_PREFIX)}
    ours = convert.expected_hf_shapes(config)
    assert len(ours) == len(hf_shapes) == (28 * 12 + 3 if part == "language_model" else 28 * 12 + 3 + 32 * 12 + 6)
    assert ours == hf_shapes
    total = sum(int(np.prod(s)) for s in ours.values())
    print(f"Qwen2.5-VL-7B {part}: {len(ours)} tensors, {total / 1e9:.3f} B parameters")


def test_from_hf_config_rejects_unsupported():
    base = hf_models.make_causal_lm("qwen2_bias").config.to_dict()
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_hf_config(dict(base, model_type="gpt2"))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        from_hf_config(dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        from_hf_config(dict(base, hidden_act="gelu"))


def test_streamed_load_places_params_with_shardings(qwen2_dir):
    import jax

    from rwr_jax import sharding
    config, _ = read_hf_config(qwen2_dir)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    shardings = sharding.logical_shardings(convert.abstract_params(config), mesh)
    params = convert.load_hf_params(qwen2_dir, config, shardings=shardings, progress=False)
    embed = params["model"]["embed_tokens"]["embedding"]  # [V, D] = (vocab, embed) -> (tensor, fsdp)
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert embed.addressable_data(0).shape == (80, 16)
    tokens = jnp.zeros((1, 3), jnp.int32)
    logits, _ = jax.jit(DecoderLM(config).apply)({"params": params}, tokens, tokens, tokens >= 0)
    assert logits.shape == (1, 3, 160)
