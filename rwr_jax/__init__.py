"""rwr_jax: Med-RwR (reasoning with retrieval) GRPO training on JAX/Flax."""

__version__ = "0.1.0"
