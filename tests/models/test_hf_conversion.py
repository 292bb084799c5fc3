"""The model-agnostic HF conversion machinery, on a hand-built param tree (no model, no torch)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rwr_jax.models import hf_conversion
from rwr_jax.models.hf_conversion import Entry

D, H, HEAD_DIM, C, P = 6, 2, 3, 2, 2


def _abstract_params():
    """A tree with every kind of leaf: a q kernel [D, H, hd] and bias, an output kernel
    [H, hd, D], a conv kernel (flattened [C * P * P, D]), a norm scale and an embedding."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {
        "embed_tokens": {"embedding": spec(10, D)},
        "layers_0": {
            "q_proj": {"kernel": spec(D, H, HEAD_DIM), "bias": spec(H, HEAD_DIM)},
            "o_proj": {"kernel": spec(H, HEAD_DIM, D)},
            "norm": {"scale": spec(D)},
        },
        "patch": {"kernel": spec(C * P * P, D)},
    }


def _kernel_hf_shape(path, shape):
    if path[-2] == "patch":
        return (shape[1], C, P, P)
    return hf_conversion.linear_hf_shape(shape, 2 if path[-2] == "o_proj" else 1)


@pytest.fixture
def table():
    return hf_conversion.build_table(_abstract_params(), _kernel_hf_shape)


def _hf_tensors(table):
    """Distinct values per tensor (arange, not an RNG stream), in the checkpoint's shapes."""
    return {name: np.arange(np.prod(e.hf_shape), dtype=np.float32).reshape(e.hf_shape) + 1000 * i
            for i, (name, e) in enumerate(table.items())}


def test_hf_name_and_table(table):
    assert hf_conversion.hf_name(("model", "layers_12", "mlp", "up_proj", "kernel")) == \
        "model.layers.12.mlp.up_proj.weight"
    assert hf_conversion.hf_name(("blocks_0", "attn", "qkv", "bias")) == "blocks.0.attn.qkv.bias"
    assert hf_conversion.hf_name(("norm", "scale")) == "norm.weight"
    assert table == {
        "embed_tokens.weight": Entry(("embed_tokens", "embedding"), (10, D), (10, D)),
        "layers.0.q_proj.weight": Entry(("layers_0", "q_proj", "kernel"), (D, H, HEAD_DIM), (H * HEAD_DIM, D)),
        "layers.0.q_proj.bias": Entry(("layers_0", "q_proj", "bias"), (H, HEAD_DIM), (H * HEAD_DIM,)),
        "layers.0.o_proj.weight": Entry(("layers_0", "o_proj", "kernel"), (H, HEAD_DIM, D), (D, H * HEAD_DIM)),
        "layers.0.norm.weight": Entry(("layers_0", "norm", "scale"), (D,), (D,)),
        "patch.weight": Entry(("patch", "kernel"), (C * P * P, D), (D, C, P, P)),
    }


def test_flatten_unflatten_round_trip_keeps_boxes():
    tree = {"a": {"b_0": nn.Partitioned(jnp.ones((2, 3)), ("embed", "mlp"))}, "c": jnp.zeros(4)}
    flat = hf_conversion.flatten_params(tree)
    assert list(flat) == [("a", "b_0"), ("c",)]
    assert isinstance(flat["a", "b_0"], nn.Partitioned)
    assert hf_conversion.unflatten_params(flat) == {"a": {"b_0": flat["a", "b_0"]}, "c": flat["c",]}


def test_transforms_match_a_numpy_reference_and_round_trip(table):
    tensors = _hf_tensors(table)
    q, o, patch = (tensors[n] for n in ("layers.0.q_proj.weight", "layers.0.o_proj.weight", "patch.weight"))
    ours_q = hf_conversion.to_ours(q, table["layers.0.q_proj.weight"])
    ours_o = hf_conversion.to_ours(o, table["layers.0.o_proj.weight"])
    ours_patch = hf_conversion.to_ours(patch, table["patch.weight"])
    for d in range(D):
        for h in range(H):
            for k in range(HEAD_DIM):
                assert ours_q[d, h, k] == q[h * HEAD_DIM + k, d]
                assert ours_o[h, k, d] == o[d, h * HEAD_DIM + k]
    np.testing.assert_array_equal(ours_patch, patch.reshape(D, -1).T)
    for name, entry in table.items():
        np.testing.assert_array_equal(
            hf_conversion.to_hf(hf_conversion.to_ours(tensors[name], entry), entry), tensors[name], err_msg=name)


def _load(table, tensors, **kwargs):
    kwargs.setdefault("param_dtype", lambda path: jnp.float32)
    return hf_conversion.load_params(tensors, table, source="ckpt", config_summary="num_layers=1", **kwargs)


def test_load_applies_aliases_skips_and_dtypes(table):
    tensors = _hf_tensors(table)
    stream = [("prefix." + name, array) for name, array in tensors.items()] + [("pooler.weight", np.ones(3))]
    aliases = ((re.compile(r"^prefix\."), ""),)
    params = _load(table, stream, canonical_name=lambda n: hf_conversion.apply_aliases(n, aliases),
                   skip=lambda n: n.startswith("pooler."),
                   param_dtype=lambda path: jnp.bfloat16 if path[-1] == "scale" else jnp.float32)
    assert params["layers_0"]["norm"]["scale"].dtype == jnp.bfloat16
    assert params["layers_0"]["q_proj"]["kernel"].dtype == jnp.float32
    exported = dict(hf_conversion.iter_hf_tensors(params, table))
    assert list(exported) == list(tensors)
    for name, array in tensors.items():  # the scale went through bfloat16
        np.testing.assert_array_equal(exported[name], array.astype(exported[name].dtype), err_msg=name)
    assert exported["layers.0.norm.weight"].dtype == ml_dtypes.bfloat16
    assert next(hf_conversion.iter_hf_tensors(params, table, ml_dtypes.bfloat16))[1].dtype == ml_dtypes.bfloat16


def test_load_errors_name_the_tensor_and_both_shapes(table):
    tensors = _hf_tensors(table)
    wrong = dict(tensors, **{"layers.0.q_proj.bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"ckpt: tensor layers\.0\.q_proj\.bias has shape \(5,\), expected \(6,\)"):
        _load(table, wrong.items())
    renamed = [("old." + name, array) for name, array in wrong.items()]
    with pytest.raises(ValueError, match=r"tensor old\.embed_tokens\.weight \(read as embed_tokens\.weight\) "
                                         r"has shape \(10, 6\), expected \(11, 6\)"):
        _load(dict(table, **{"embed_tokens.weight": table["embed_tokens.weight"]._replace(hf_shape=(11, D))}),
              renamed, canonical_name=lambda n: n.removeprefix("old."))
    with pytest.raises(ValueError, match=r"unexpected tensor extra\.weight \(2,\): the config \(num_layers=1\)"):
        _load(table, list(tensors.items()) + [("extra.weight", np.zeros(2))])
    del tensors["layers.0.o_proj.weight"]
    with pytest.raises(ValueError, match=r"1 tensors missing .*layers\.0\.o_proj\.weight.*expected shape \(6, 6\)"):
        _load(table, tensors.items())


def test_check_params_match_names_the_param(table):
    params = _load(table, _hf_tensors(table).items())
    hf_conversion.check_params_match(params, table, where="params")
    params["layers_0"]["norm"]["scale"] = jnp.zeros(D + 1)
    with pytest.raises(ValueError, match=r"params: parameter layers\.0\.norm\.weight has shape \(7,\), "
                                         r"expected \(6,\)"):
        hf_conversion.check_params_match(params, table, where="params")
    del params["layers_0"]["norm"]
    with pytest.raises(ValueError, match=r"parameter layers\.0\.norm\.weight is missing \(expected shape \(6,\)\)"):
        hf_conversion.check_params_match(params, table, where="params")


def test_load_places_each_tensor_with_its_sharding(table):
    assert len(jax.devices()) == 8, "conftest.py sets 8 fake CPU devices"
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    spec = jax.sharding.PartitionSpec
    shardings = jax.tree_util.tree_map(lambda _: jax.sharding.NamedSharding(mesh, spec()), _abstract_params())
    shardings["layers_0"]["q_proj"]["kernel"] = jax.sharding.NamedSharding(mesh, spec("data", None, None))
    shardings["patch"]["kernel"] = jax.sharding.NamedSharding(mesh, spec("model", None))
    tensors = _hf_tensors(table)
    params = _load(table, tensors.items(), shardings=shardings)
    unsharded = _load(table, tensors.items())
    for got, want, sharding in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(unsharded),
                                   jax.tree_util.tree_leaves(shardings)):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
