"""Name registries: fixed categories, duplicates raise, unknown names list the choices."""

import pytest

from rwr_jax import registry
from rwr_jax.models import attention  # noqa: F401  (registers the attention kernels)


def test_attention_kernels_are_registered():
    assert {"xla", "cudnn"} <= set(registry.names("attention"))


def test_unknown_name_lists_choices():
    with pytest.raises(LookupError, match=r"no attention named 'flash'; registered: \['cudnn', 'xla'"):
        registry.lookup("attention", "flash")


def test_unknown_category_raises():
    with pytest.raises(ValueError, match="unknown registry category 'optimizer'"):
        registry.register("optimizer", "adamw")
    with pytest.raises(ValueError, match="unknown registry category"):
        registry.names("optimizer")


def test_duplicate_name_raises():
    with pytest.raises(ValueError, match="attention 'xla' is already registered"):
        registry.register("attention", "xla")(lambda *args: None)
