"""Mesh construction and the logical-axis rules, on 8 fake CPU devices (conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import sharding
from rwr_jax.models import kv_cache
from rwr_jax.models.qwen2_vl import convert, inference
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM

CONFIG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2)


@pytest.fixture(autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "conftest.py must force 8 host devices before jax is imported"


@pytest.mark.parametrize("shape,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 4, "tensor": 2}, (1, 4, 2)),
])
def test_make_mesh(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape.values()) == expected


@pytest.mark.parametrize("shape,message", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"model": 8}, "not known"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
])
def test_make_mesh_rejects(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_first_devices():
    assert sharding.first_devices(0) == jax.devices()
    assert sharding.first_devices(1) == jax.devices()[:1]
    assert tuple(sharding.make_mesh({"data": -1}, sharding.first_devices(2)).shape.values()) == (2, 1, 1)
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=rf"mesh_devices must be in \[0, 8\] \(0: all 8 devices\), got {bad}"):
            sharding.first_devices(bad)


def test_rules_cover_every_logical_name():
    abstract = convert.abstract_params(CONFIG.replace(mrope_section=(2, 1, 1), tie_word_embeddings=True))
    sharding.check_rules_cover(abstract)
    assert set(kv_cache.CACHE_AXES) <= {name for name, _ in sharding.DEFAULT_RULES}
    with pytest.raises(ValueError, match="embed"):
        sharding.check_rules_cover(abstract, rules=(("vocab", "tensor"),))


def test_rules_from_config_validates():
    assert sharding.rules_from_config([["embed", ["fsdp", "data"]], ["vocab", None]]) == (
        ("embed", ("fsdp", "data")), ("vocab", None))
    with pytest.raises(ValueError, match="'model' is not one of"):
        sharding.rules_from_config([["embed", "model"]])


def test_sharded_forward_matches_single_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = DecoderLM(CONFIG)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 6)), jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    positions = inference.text_positions(mask)
    init = lambda: model.init(jax.random.key(0), tokens, positions, mask)["params"]  # noqa: E731
    abstract = jax.eval_shape(init)
    shardings = sharding.logical_shardings(abstract, mesh)
    params = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [D, H, hd] = (embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_data(0).shape == (16, 2, 8)
    reference, _ = jax.jit(model.apply)({"params": jax.device_get(params)}, tokens, positions, mask)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        sharded, _ = jax.jit(model.apply)({"params": params}, tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), atol=1e-5, rtol=0)
