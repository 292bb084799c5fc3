"""The dtypes of a model config, named by strings (as config files and config.json give them)."""

import dataclasses
from typing import Any, Self

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Numerics:
    """Mixin of the frozen model config dataclasses, whose fields `dtype` (compute) and
    `param_dtype` (storage) name a key of `DTYPES`."""

    def check_dtypes(self) -> None:
        """Raises ValueError naming the field unless both dtypes are known (call in __post_init__)."""
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{type(self).__name__}.{name} must be one of {sorted(DTYPES)}, got "
                                 f"{getattr(self, name)!r}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)
