"""Every model config names its dtypes by string, checked when it is built (models/numerics.py)."""

import jax.numpy as jnp
import pytest

from rwr_jax.models.clip.config import ClipConfig, ClipVisionConfig
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.vision import VisionConfig
from rwr_jax.models.text_encoder.config import EncoderConfig

CONFIGS = {
    DecoderConfig: dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2),
    VisionConfig: dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                       fullatt_block_indexes=(0,)),
    EncoderConfig: dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4),
    ClipConfig: dict(vision=ClipVisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                             image_size=32, patch_size=8), projection_dim=16),
}


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_dtypes_by_name(config_class):
    config = config_class(**CONFIGS[config_class], dtype="bfloat16")
    assert (config.jnp_dtype, config.jnp_param_dtype) == (jnp.bfloat16, jnp.float32)
    changed = config.replace(param_dtype="float16")
    assert type(changed) is config_class and changed.jnp_param_dtype == jnp.float16 and config.param_dtype == "float32"
    for field in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field} must be one of .*got 'fp8'"):
            config_class(**CONFIGS[config_class], **{field: "fp8"})
