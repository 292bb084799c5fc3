"""Random model params for the log-prob and loss tests, without compiling `model.init`."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, seed, *args, **kwargs):
    """Random params shaped like `model.init(key, *args, **kwargs)`'s, from `jax.eval_shape`
    (compiling init is slow on CPU): N(0, 0.2) everywhere, RMSNorm scales 1."""
    shapes = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                                    jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)["params"],
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
